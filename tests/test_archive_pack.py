"""`edgekit pack`: a one-line error for an archive path in no folder, progress as bytes are hashed and
written, and the archive's sha256 and size taken from the bytes as they were written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import snapshot
from test_hardening_archive import make_package

from edgekit.cli import main
from edgekit.errors import PackageError
from edgekit.package import archive as archive_module
from edgekit.package.archive import PackedArchive, pack_package, unpack_package
from edgekit.package.manifest import write_manifest
from edgekit.package.verify import verify_files


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return make_package(tmp_path / "pkg")


@pytest.mark.parametrize("blocker", ["missing", "file"])
def test_cli_pack_into_a_folder_that_is_not_there_is_one_line_and_exit_2(
    package: Path, tmp_path: Path, blocker: str
) -> None:
    folder = tmp_path / "no" / "such" if blocker == "missing" else tmp_path / "a-file"
    if blocker == "file":
        folder.write_text("not a folder")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(main, ["pack", str(package), "-o", str(folder / "pkg.tar.gz")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgekit: error: "), result.stderr
    assert f"{folder}: {'does not exist' if blocker == 'missing' else 'is not a folder'}" in lines[0]
    assert "create the folder first, or choose another path" in lines[0]
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before


def test_cli_pack_prints_the_archive_sha256_and_size(package: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.tar.gz"
    result = CliRunner().invoke(main, ["pack", str(package), "-o", str(target)])
    assert result.exit_code == 0, result.output
    data = target.read_bytes()
    expected = f"wrote {target} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})"
    assert result.stdout.strip() == expected


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar"])
def test_pack_returns_the_sha256_and_size_of_what_it_wrote(package: Path, tmp_path: Path, suffix: str) -> None:
    packed = pack_package(package, tmp_path / f"pkg{suffix}")
    assert isinstance(packed, PackedArchive)
    data = packed.path.read_bytes()
    assert (packed.size, packed.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert os.fspath(packed) == str(tmp_path / f"pkg{suffix}")  # still usable as the archive's path
    verify_files(tmp_path / "copy", unpack_package(packed, tmp_path / "copy"))


def test_pack_reports_progress_up_to_every_byte(package: Path, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    pack_package(package, tmp_path / "pkg.tar.gz", progress=lambda done, total: calls.append((done, total)))
    total = sum(p.stat().st_size for p in package.rglob("*") if p.is_file())  # the manifest included
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert all(total_ == total for _, total_ in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)
    assert len(calls) > 2


def test_a_file_changed_after_verification_is_refused_while_writing(
    package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hash is taken from the bytes copied into the archive, so a change between the manifest check
    # and the copy (same size) cannot end up in an archive that claims to match the manifest.
    real_verify = archive_module.verify_files

    def verify_then_tamper(*args, **kwargs):
        real_verify(*args, **kwargs)
        model = package / "fp32" / "model.onnx"
        model.write_bytes(bytes(model.stat().st_size))

    monkeypatch.setattr(archive_module, "verify_files", verify_then_tamper)
    with pytest.raises(PackageError) as info:
        pack_package(package, tmp_path / "pkg.tar.gz")
    assert info.value.path == str(package / "fp32" / "model.onnx")
    assert "the manifest says" in info.value.problem
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_a_file_cut_short_while_packing_is_refused(
    package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_verify = archive_module.verify_files

    def verify_then_truncate(*args, **kwargs):
        real_verify(*args, **kwargs)
        (package / "fp32" / "model.onnx").write_bytes(b"short")

    monkeypatch.setattr(archive_module, "verify_files", verify_then_truncate)
    with pytest.raises(PackageError, match="got shorter while it was being packed") as info:
        pack_package(package, tmp_path / "pkg.tar")
    assert info.value.path == str(package / "fp32" / "model.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]


def test_a_package_whose_manifest_has_no_file_list_packs_and_unpacks(tmp_path: Path) -> None:
    root = tmp_path / "bare"
    root.mkdir()
    (root / "manifest.json").write_text('{"schema_version": 1}')
    packed = pack_package(root, tmp_path / "bare.tar")
    assert unpack_package(packed, tmp_path / "copy") == {"schema_version": 1}


def test_the_gzip_level_trades_size_and_each_level_unpacks_to_the_package(package: Path, tmp_path: Path) -> None:
    # Compressible weights, so the levels give different bytes; every level must still unpack and verify.
    (package / "fp32" / "model.onnx.data").write_bytes(bytes(range(64)) * 4096)
    write_manifest(package, {"variants": {"fp32": {"path": "fp32"}}})
    sizes = {}
    for level in (1, 9):
        result = CliRunner().invoke(main, ["pack", str(package), "-o", str(tmp_path / f"{level}.tar.gz"), "--level",
                                           str(level)])  # fmt: skip
        assert result.exit_code == 0, result.output
        sizes[level] = (tmp_path / f"{level}.tar.gz").stat().st_size
        verify_files(tmp_path / f"copy{level}", unpack_package(tmp_path / f"{level}.tar.gz", tmp_path / f"copy{level}"))
    assert sizes[9] < sizes[1]
    assert pack_package(package, tmp_path / "default.tar.gz").size == sizes[1]  # level 1 is the default


@pytest.mark.parametrize("level", ["0", "10"])
def test_a_gzip_level_outside_1_to_9_is_refused_before_writing(package: Path, tmp_path: Path, level: str) -> None:
    result = CliRunner().invoke(main, ["pack", str(package), "-o", str(tmp_path / "pkg.tar.gz"), "--level", level])
    assert result.exit_code == 2 and "--level" in result.output
    assert not (tmp_path / "pkg.tar.gz").exists()
    with pytest.raises(ValueError, match="1 to 9"):
        pack_package(package, tmp_path / "pkg.tar.gz", compress_level=int(level))
