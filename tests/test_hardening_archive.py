"""Packages as archives (issue #5, requirement 6): `edgekit pack` writes a reproducible archive, and
`edgekit unpack` refuses every unsafe member by name, writing nothing outside (or inside) the target.
tests/test_archive_headers.py and tests/test_archive_pack.py hold the manifest-first format's tests."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import snapshot
from test_package import onnx_of_size

from edgekit.cli import main
from edgekit.errors import OutputExistsError, PackageError
from edgekit.package import archive as archive_module
from edgekit.package.archive import pack_package, unpack_package
from edgekit.package.manifest import read_manifest, sha256_file, write_manifest
from edgekit.package.verify import verify_files

# A genai_config.json as the builder writes it (a tiny llama's), so the package passes verify_files.
GENAI_CONFIG = {
    "model": {
        "bos_token_id": 1,
        "context_length": 256,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": "model.onnx",
            "head_size": 16,
            "hidden_size": 64,
            "inputs": {
                "input_ids": "input_ids",
                "attention_mask": "attention_mask",
                "past_key_names": "past_key_values.%d.key",
                "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {
                "logits": "logits",
                "present_key_names": "present.%d.key",
                "present_value_names": "present.%d.value",
            },
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "num_key_value_heads": 2,
        },
        "eos_token_id": 2,
        "pad_token_id": 3,
        "type": "llama",
        "vocab_size": 512,
    },
    "search": {"max_length": 256, "past_present_share_buffer": True, "top_k": 50, "top_p": 1.0},
}


def make_package(root: Path) -> Path:
    """A hand-made package at ``root``: a variant folder, a log and a manifest."""
    (root / "fp32").mkdir(parents=True)
    (root / "build.log").write_text("log\n")
    (root / "fp32" / "model.onnx").write_bytes(onnx_of_size(2048))
    (root / "fp32" / "genai_config.json").write_text(json.dumps(GENAI_CONFIG, indent=4))
    write_manifest(root, {"variants": {"fp32": {"path": "fp32"}}})
    return root


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A hand-made package: a variant folder, a log and a manifest."""
    return make_package(tmp_path / "pkg")


def member(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tuple:
    return name, data, kind, linkname


def write_tar(path: Path, members: list[tuple], *, compress: bool = True) -> Path:
    """A tar archive with exactly these members (name, data, type, link target), written by tarfile."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, kind, linkname in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, linkname, len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    path.write_bytes(gzip.compress(raw.getvalue(), mtime=0) if compress else raw.getvalue())
    return path


def package_members(root: Path) -> list[tuple]:
    """The package's files as members in the order `edgekit pack` writes them: manifest.json first, then sorted."""
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    names = ["manifest.json", *(name for name in files if name != "manifest.json")]
    return [member(name, (root / name).read_bytes()) for name in names]


def refuse(archive: Path, dest: Path) -> str:
    """Unpacking must fail with a PackageError naming the archive, and leave nothing behind."""
    before = snapshot(dest.parent)
    with pytest.raises(PackageError) as info:
        unpack_package(archive, dest)
    assert info.value.path == str(archive)
    assert not dest.exists()
    assert snapshot(dest.parent) == before
    message = str(info.value)
    assert "\n" not in message
    return message


# --- pack ---------------------------------------------------------------------------------------------


def test_pack_then_unpack_gives_the_same_verified_package(package: Path, tmp_path: Path) -> None:
    archive = pack_package(package, tmp_path / "pkg.tar.gz")
    manifest = unpack_package(archive, tmp_path / "copy")
    verify_files(tmp_path / "copy", manifest)
    assert manifest == read_manifest(package)
    for entry in manifest["files"]:
        assert sha256_file(tmp_path / "copy" / entry["path"]) == entry["sha256"]
    assert not [p for p in (tmp_path / "copy").rglob("*") if p.is_symlink()]


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar"])
def test_packing_twice_gives_identical_bytes(package: Path, tmp_path: Path, suffix: str) -> None:
    first = pack_package(package, tmp_path / f"a{suffix}")
    (package / "build.log").touch()  # a newer modification time changes nothing
    second = pack_package(package, tmp_path / f"b{suffix}")
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == second.sha256 and first.size == second.size
    with tarfile.open(first) as tar:
        infos = tar.getmembers()
    # manifest.json first (the reader checks every later header against it), then the files sorted.
    assert [i.name for i in infos] == ["manifest.json", *sorted(i.name for i in infos[1:])]
    assert "manifest.json" not in [i.name for i in infos[1:]]
    assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}


def test_pack_refuses_a_tampered_package(package: Path, tmp_path: Path) -> None:
    (package / "fp32" / "model.onnx").write_bytes(b"changed")
    with pytest.raises(PackageError) as info:
        pack_package(package, tmp_path / "pkg.tar.gz")
    assert "model.onnx" in str(info.value)
    assert not (tmp_path / "pkg.tar.gz").exists()


def test_pack_refuses_an_existing_archive_without_force(package: Path, tmp_path: Path) -> None:
    target = tmp_path / "pkg.tar.gz"
    target.write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        pack_package(package, target)
    assert target.read_bytes() == b"old"
    pack_package(package, target, force=True)
    assert tarfile.is_tarfile(target)


def test_pack_refuses_an_archive_inside_the_package_and_unknown_suffixes(package: Path, tmp_path: Path) -> None:
    with pytest.raises(PackageError, match="inside the package"):
        pack_package(package, package / "self.tar.gz")
    with pytest.raises(PackageError, match=r"\.tar\.gz"):
        pack_package(package, tmp_path / "pkg.zip")


def test_a_failed_pack_leaves_no_partial_file(package: Path, tmp_path: Path, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(archive_module, "_add_file", broken)
    with pytest.raises(PackageError, match="could not be written \\(disk full\\)") as info:
        pack_package(package, tmp_path / "pkg.tar")
    assert info.value.path == str(tmp_path / "pkg.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


# --- unpack: unsafe members ---------------------------------------------------------------------------

UNSAFE: dict[str, tuple[Callable[[Path], list[tuple]], str, str]] = {
    # case: (extra members, the member the message names, what it says)
    "dot-dot": (lambda t: [member("../escaped", b"x")], "../escaped", "climbs out of the package"),
    "dot-dot-inside": (lambda t: [member("fp32/../../escaped", b"x")], "fp32/../../escaped", "climbs out"),
    "absolute": (lambda t: [member(str(t / "absolute-escape"), b"x")], "/", "is an absolute path"),
    "symlink": (lambda t: [member("fp32/link", kind=tarfile.SYMTYPE, linkname="/etc/passwd")], "fp32/link", "symbolic"),
    "hard-link": (lambda t: [member("fp32/hard", kind=tarfile.LNKTYPE, linkname="/etc/passwd")], "fp32/hard", "hard"),
    "hard-link-inside": (
        lambda t: [member("fp32/hard", kind=tarfile.LNKTYPE, linkname="build.log")],
        "fp32/hard",
        "hard link",
    ),
    "char-device": (lambda t: [member("fp32/null", kind=tarfile.CHRTYPE)], "fp32/null", "device file"),
    "block-device": (lambda t: [member("fp32/sda", kind=tarfile.BLKTYPE)], "fp32/sda", "device file"),
    "fifo": (lambda t: [member("fp32/pipe", kind=tarfile.FIFOTYPE)], "fp32/pipe", "FIFO"),
    "duplicate": (lambda t: [member("build.log", b"second")], "build.log", "appears twice"),
    "duplicate-by-case": (lambda t: [member("BUILD.LOG", b"x")], "BUILD.LOG", "appears twice"),
    "backslash": (lambda t: [member("..\\escaped", b"x")], "..\\escaped", "backslash"),
    "control-character": (lambda t: [member("fp32/a\nb", b"x")], "fp32/a\\x0ab", "control character"),
    "colon": (lambda t: [member("C:escaped", b"x")], "C:escaped", "colon"),
    "file-as-folder": (lambda t: [member("Build.log/inner", b"x")], "Build.log/inner", "inside 'build.log'"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_an_unsafe_member_is_refused_by_name(package: Path, tmp_path: Path, case: str) -> None:
    extra, named, phrase = UNSAFE[case]
    work = tmp_path / "work"
    work.mkdir()
    archive = write_tar(tmp_path / f"{case}.tar.gz", [*package_members(package), *extra(work)])
    message = refuse(archive, work / "dest")
    assert f"member '{named}" in message
    assert phrase in message
    assert not (tmp_path / "escaped").exists() and not (work / "escaped").exists()
    assert not (work / "absolute-escape").exists()


def test_too_many_members(package: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(archive_module, "MAX_MEMBERS", 3)
    archive = write_tar(tmp_path / "many.tar.gz", package_members(package))  # 4 members
    assert "more than 3 members" in refuse(archive, tmp_path / "dest")


def test_too_many_declared_bytes(package: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(archive_module, "MAX_TOTAL_BYTES", 100)
    archive = write_tar(tmp_path / "big.tar.gz", package_members(package))
    message = refuse(archive, tmp_path / "dest")
    assert "member 'manifest.json' lists" in message and "past the 100-byte limit" in message


def test_a_compressed_header_bomb_is_refused_without_inflating_it(tmp_path: Path, monkeypatch) -> None:
    # A pax header declaring 8 MiB of records, made of zeros: a few KB compressed.
    monkeypatch.setattr(archive_module, "MAX_HEADER_READ", 1 << 20)
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, 8 << 20
    header = info.tobuf(format=tarfile.USTAR_FORMAT)
    archive = tmp_path / "bomb.tar.gz"
    with gzip.GzipFile(archive, "wb", mtime=0) as stream:
        stream.write(header)
        for _ in range(8):
            stream.write(bytes(1 << 20))
    assert archive.stat().st_size < 100_000
    assert "needs a 8388608-byte read" in refuse(archive, tmp_path / "dest")


def test_an_archive_without_a_manifest(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "x.tar.gz", [member("fp32/model.onnx", b"x")])
    message = refuse(archive, tmp_path / "dest")
    assert "member 'fp32/model.onnx' comes first, but manifest.json must be the archive's first member" in message


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "tar"])
def test_a_member_that_does_not_match_the_manifest(package: Path, tmp_path: Path, compress: bool) -> None:
    members = [
        member(name, b"tampered" if name == "fp32/model.onnx" else data, kind, link)
        for name, data, kind, link in package_members(package)
    ]
    archive = write_tar(tmp_path / "tampered.tar", members, compress=compress)
    message = refuse(archive, tmp_path / "dest")
    assert "member 'fp32/model.onnx'" in message
    assert "8 bytes, the manifest says 2048" in message


def test_an_unlisted_member(package: Path, tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "extra.tar.gz", [*package_members(package), member("fp32/extra.onnx", b"x")])
    message = refuse(archive, tmp_path / "dest")
    assert "member 'fp32/extra.onnx' is not listed in the archive's manifest.json" in message


@pytest.mark.parametrize(
    "content",
    [b"", b"not an archive at all" * 50, b"\x1f\x8b\x08\x00garbage", b"BZh9garbage", b"\xfd7zXZ\x00garbage"],
    ids=["empty", "text", "bad-gzip", "bad-bzip2", "bad-xz"],
)
def test_a_file_that_is_not_an_archive(tmp_path: Path, content: bytes) -> None:
    archive = tmp_path / "x.tar.gz"
    archive.write_bytes(content)
    assert "is not a readable tar archive" in refuse(archive, tmp_path / "dest")


def test_a_truncated_archive(package: Path, tmp_path: Path) -> None:
    whole = pack_package(package, tmp_path / "whole.tar")
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.path.read_bytes()[:2000])
    message = refuse(cut, tmp_path / "dest")
    assert "is not a readable tar archive" in message or "cut short" in message or "lacks" in message


def test_unpack_refuses_an_existing_dest_and_replaces_it_with_force(package: Path, tmp_path: Path) -> None:
    archive = pack_package(package, tmp_path / "pkg.tar.gz")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "old").write_text("old")
    with pytest.raises(OutputExistsError):
        unpack_package(archive, dest)
    assert (dest / "old").exists()
    unpack_package(archive, dest, force=True)
    assert not (dest / "old").exists()
    verify_files(dest, read_manifest(dest))


# --- CLI ----------------------------------------------------------------------------------------------


def test_cli_pack_and_unpack(runner, package: Path, tmp_path: Path) -> None:
    result = runner.invoke(main, ["pack", str(package)])
    assert result.exit_code == 0, result.output
    archive = tmp_path / "pkg.tar.gz"
    assert archive.is_file() and str(archive) in result.stdout
    result = runner.invoke(main, ["unpack", str(archive), "-o", str(tmp_path / "copy")])
    assert result.exit_code == 0, result.output
    assert "unpacked 3 files" in result.stdout
    verify_files(tmp_path / "copy", read_manifest(tmp_path / "copy"))


def test_cli_unpack_of_an_unsafe_archive_is_one_line_and_exit_2(runner, package: Path, tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "evil.tar.gz", [*package_members(package), member("../evil", b"x")])
    result = runner.invoke(main, ["unpack", str(archive), "-o", str(tmp_path / "dest")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekit: error: ")
    assert str(archive) in lines[0] and "member '../evil'" in lines[0]
    assert not (tmp_path / "dest").exists() and not (tmp_path / "evil").exists()
