"""The manifest-first archive format (the decompression-bomb issue): `edgekit unpack` reads manifest.json
(the first member) and holds every later header to it, refusing at the first header that disagrees,
before any file data is decompressed past it or written."""

from __future__ import annotations

import gzip
import json
import tarfile
import time
from pathlib import Path

import pytest
from test_hardening_archive import make_package, member, package_members, refuse, write_tar

from edgekit.package import archive as archive_module
from edgekit.package.archive import pack_package, unpack_package
from edgekit.package.manifest import MAX_MANIFEST_BYTES, read_manifest
from edgekit.package.verify import verify_files


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return make_package(tmp_path / "pkg")


@pytest.fixture
def nothing_staged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if unpacking gets as far as making its staged folder (where file data is written)."""

    def staged_output(*args, **kwargs):
        raise AssertionError("the archive reached extraction; it should have been refused at its headers")

    monkeypatch.setattr(archive_module, "staged_output", staged_output)


def _block(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    """One member's header and data, padded to tar's 512-byte blocks."""
    return info.tobuf(format=tarfile.PAX_FORMAT) + data + bytes(-len(data) % 512)


def write_bomb(path: Path, manifest: bytes, name: str, declared: int) -> Path:
    """A gzip archive: manifest.json, then member ``name`` declaring ``declared`` bytes of zeros that are
    really there. The zeros are one compressed 8 MiB gzip member repeated (gzip streams concatenate), so
    a few MB on disk hold gigabytes without compressing them all here."""
    chunk = 8 << 20
    assert declared % chunk == 0
    manifest_info, bomb_info = tarfile.TarInfo("manifest.json"), tarfile.TarInfo(name)
    manifest_info.size, bomb_info.size = len(manifest), declared
    zeros = gzip.compress(bytes(chunk), mtime=0)
    with path.open("wb") as handle:
        handle.write(gzip.compress(_block(manifest_info, manifest) + bomb_info.tobuf(format=tarfile.PAX_FORMAT)))
        for _ in range(declared // chunk):
            handle.write(zeros)
        handle.write(gzip.compress(bytes(1024), mtime=0))  # tar's two end blocks
    return path


@pytest.mark.parametrize("name", ["fp32/bomb.bin", "fp32/model.onnx"], ids=["unlisted", "listed-other-size"])
def test_a_decompression_bomb_is_refused_at_its_header(
    package: Path, tmp_path: Path, name: str, nothing_staged: None
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    declared = 4 << 30
    archive = write_bomb(work / "bomb.tar.gz", (package / "manifest.json").read_bytes(), name, declared)
    assert archive.stat().st_size < 8 << 20
    with gzip.open(archive) as stream, tarfile.open(fileobj=stream, mode="r:") as tar:  # the bomb is real
        assert tar.next().name == "manifest.json"
        assert tar.next().size == declared
    started = time.monotonic()
    message = refuse(archive, work / "dest")
    assert time.monotonic() - started < 2
    assert f"member '{name}'" in message
    assert ("not listed in the archive's manifest.json" if name.endswith("bomb.bin") else f"is {declared} bytes") in (
        message
    )
    assert sorted(p.name for p in work.iterdir()) == ["bomb.tar.gz"]


@pytest.mark.parametrize("delta", [-1, 1], ids=["smaller", "larger"])
def test_a_listed_member_whose_header_size_differs_is_refused_before_writing(
    package: Path, tmp_path: Path, delta: int, nothing_staged: None
) -> None:
    members = [
        member(name, data + b"x" if delta > 0 else data[:-1]) if name == "fp32/model.onnx" else (name, data, *rest)
        for name, data, *rest in package_members(package)
    ]
    archive = write_tar(tmp_path / "resized.tar.gz", members)
    message = refuse(archive, tmp_path / "dest")
    assert f"member 'fp32/model.onnx' is {2048 + delta} bytes, the manifest says 2048" in message


def test_a_member_missing_from_the_manifest_is_refused_before_writing(
    package: Path, tmp_path: Path, nothing_staged: None
) -> None:
    members = package_members(package)
    archive = write_tar(tmp_path / "extra.tar.gz", [*members[:2], member("fp32/extra.onnx", b"x"), *members[2:]])
    message = refuse(archive, tmp_path / "dest")
    assert "member 'fp32/extra.onnx' is not listed in the archive's manifest.json" in message


def test_a_listed_file_missing_from_the_archive_is_refused_before_writing(
    package: Path, tmp_path: Path, nothing_staged: None
) -> None:
    members = [m for m in package_members(package) if m[0] not in ("fp32/model.onnx", "build.log")]
    archive = write_tar(tmp_path / "short.tar.gz", members)
    message = refuse(archive, tmp_path / "dest")
    assert "lacks 'build.log', which its manifest.json lists (and 1 more)" in message


def test_manifest_not_first_is_refused_with_the_fix(package: Path, tmp_path: Path, nothing_staged: None) -> None:
    members = package_members(package)
    archive = write_tar(tmp_path / "late.tar.gz", [*members[1:], members[0]])
    message = refuse(archive, tmp_path / "dest")
    assert "member 'build.log' comes first, but manifest.json must be the archive's first member" in message
    assert "repack it with `edgekit pack`" in message


@pytest.mark.parametrize(
    "first",
    [
        member("manifest.json", kind=tarfile.DIRTYPE),
        member("manifest.json", kind=tarfile.SYMTYPE, linkname="fp32/genai_config.json"),
    ],
    ids=["folder", "symlink"],
)
def test_a_first_manifest_that_is_not_a_plain_file_is_refused(
    package: Path, tmp_path: Path, first: tuple, nothing_staged: None
) -> None:
    archive = write_tar(tmp_path / "odd.tar.gz", [first, *package_members(package)[1:]])
    assert "must be the archive's first member" in refuse(archive, tmp_path / "dest")


def test_a_manifest_over_the_cap_is_refused_without_reading_it(
    package: Path, tmp_path: Path, nothing_staged: None
) -> None:
    manifest = json.loads((package / "manifest.json").read_bytes())
    body = json.dumps(manifest).encode()
    big = body + b" " * (MAX_MANIFEST_BYTES + 1 - len(body))  # valid JSON, one byte over the cap
    archive = write_tar(tmp_path / "big.tar.gz", [member("manifest.json", big), *package_members(package)[1:]])
    message = refuse(archive, tmp_path / "dest")
    assert f"member 'manifest.json' is {MAX_MANIFEST_BYTES + 1} bytes; a manifest is at most" in message


def test_a_first_manifest_that_is_not_json_names_the_member(tmp_path: Path, nothing_staged: None) -> None:
    archive = write_tar(tmp_path / "bad.tar.gz", [member("manifest.json", b"{not json")])
    assert "member 'manifest.json' is not valid JSON" in refuse(archive, tmp_path / "dest")


def test_a_folder_that_holds_no_listed_file_is_refused(package: Path, tmp_path: Path, nothing_staged: None) -> None:
    members = package_members(package)
    archive = write_tar(tmp_path / "dir.tar.gz", [members[0], member("cache", kind=tarfile.DIRTYPE), *members[1:]])
    assert "member 'cache' is a folder that holds no file manifest.json lists" in refuse(archive, tmp_path / "dest")


def test_folders_of_listed_files_are_accepted(package: Path, tmp_path: Path) -> None:
    # Archives made by `tar` hold folder members; those of listed files are harmless.
    members = package_members(package)
    archive = write_tar(tmp_path / "dirs.tar.gz", [members[0], member("fp32/", kind=tarfile.DIRTYPE), *members[1:]])
    manifest = unpack_package(archive, tmp_path / "copy")
    verify_files(tmp_path / "copy", manifest)


def test_a_file_after_members_inside_it_is_refused(package: Path, tmp_path: Path, nothing_staged: None) -> None:
    members = package_members(package)
    archive = write_tar(tmp_path / "clash.tar.gz", [*members, member("FP32", b"x")])
    assert "member 'FP32' is a file, but earlier members are inside it" in refuse(archive, tmp_path / "dest")


def test_pack_writes_manifest_first_and_unpack_round_trips(package: Path, tmp_path: Path) -> None:
    packed = pack_package(package, tmp_path / "pkg.tar.gz")
    with tarfile.open(packed) as tar:
        first = tar.next()
        assert first is not None and first.name == "manifest.json"
        handle = tar.extractfile(first)
        assert handle is not None and handle.read() == (package / "manifest.json").read_bytes()
    manifest = unpack_package(packed, tmp_path / "copy")
    assert manifest == read_manifest(package)
    verify_files(tmp_path / "copy", manifest)
    again = pack_package(package, tmp_path / "again.tar.gz")
    assert again.path.read_bytes() == packed.path.read_bytes()


def test_an_uncompressed_bomb_header_is_refused_too(package: Path, tmp_path: Path, nothing_staged: None) -> None:
    # A plain .tar needs no decompression to skip data, but the header is still held to the manifest.
    manifest = (package / "manifest.json").read_bytes()
    info, bomb = tarfile.TarInfo("manifest.json"), tarfile.TarInfo("fp32/bomb.bin")
    info.size, bomb.size = len(manifest), 1 << 40
    archive = tmp_path / "bomb.tar"
    archive.write_bytes(_block(info, manifest) + bomb.tobuf(format=tarfile.PAX_FORMAT) + bytes(1024))
    assert "member 'fp32/bomb.bin' is not listed" in refuse(archive, tmp_path / "dest")


def test_reading_the_manifest_does_not_decompress_the_rest(package: Path, tmp_path: Path, monkeypatch) -> None:
    """The walk stops at the first bad header: the decompressed bytes read stay near the manifest's size."""
    manifest = (package / "manifest.json").read_bytes()
    archive = write_bomb(tmp_path / "bomb.tar.gz", manifest, "fp32/bomb.bin", 64 << 20)
    positions: list[int] = []
    real_read = archive_module._BoundedStream.read

    def read(self, size=-1):
        data = real_read(self, size)
        positions.append(self.tell())
        return data

    monkeypatch.setattr(archive_module._BoundedStream, "read", read)
    refuse(archive, tmp_path / "dest")
    assert max(positions) < len(manifest) + 64 * 1024


def test_a_manifest_without_a_file_list_lists_nothing(tmp_path: Path, nothing_staged: None) -> None:
    # Found by fuzz_archive: a manifest with no "files" key ended in a KeyError instead of a refusal.
    archive = write_tar(tmp_path / "nofiles.tar", [member("manifest.json", b'{"schema_version": 1}'), member("a", b"")])
    assert "member 'a' is not listed in the archive's manifest.json" in refuse(archive, tmp_path / "dest")


def test_a_member_with_a_huge_pax_header_is_refused(package: Path, tmp_path: Path, nothing_staged: None) -> None:
    """tarfile keeps every member's pax header: 16 MiB each made a 1.6 MB archive hold 1.7 GB (a red-team pass)."""
    import io

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for index, (name, data, _, _) in enumerate(package_members(package)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            if index == 1:
                info.pax_headers = {"comment": "x" * 100_000}
            tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "pax.tar.gz"
    archive.write_bytes(gzip.compress(raw.getvalue(), mtime=0))
    assert "has a pax header of over 65536 characters" in refuse(archive, tmp_path / "dest")
