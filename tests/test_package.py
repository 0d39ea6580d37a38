"""The package on disk: atomic creation, the manifest, verification, and `edgekit info` / `edgekit run`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import snapshot
from package_fixtures import genai_config

from edgekit.cli import main
from edgekit.errors import OutputExistsError, PackageError
from edgekit.package.manifest import MANIFEST, read_manifest, sha256_file, write_manifest
from edgekit.package.staging import staged_output
from edgekit.package.verify import verify_files


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*"))


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- staged_output ---------------------------------------------------------------------------------


def test_staged_output_renames_the_finished_folder_into_place(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    with staged_output(out, force=False) as staging:
        assert staging.parent == out.parent
        assert staging.name.startswith(f".pkg.partial-{os.getpid()}-")
        assert not out.exists()
        (staging / "a.txt").write_text("a")
        (staging / "sub").mkdir()
        (staging / "sub" / "b.txt").write_text("b")
    assert (out / "a.txt").read_text() == "a"
    assert (out / "sub" / "b.txt").read_text() == "b"
    assert not staging.exists()
    assert partials(out) == []


def test_staged_output_creates_missing_parents(tmp_path: Path) -> None:
    out = tmp_path / "x" / "y" / "pkg"
    with staged_output(out, force=False) as staging:
        (staging / "f").write_text("1")
    assert (out / "f").is_file()


def test_an_exception_inside_leaves_no_out_and_no_partial(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    before = snapshot(tmp_path)
    with pytest.raises(RuntimeError, match="boom"), staged_output(out, force=False) as staging:
        (staging / "half.onnx").write_bytes(b"x" * 100)
        raise RuntimeError("boom")
    assert not out.exists()
    assert partials(out) == []
    assert snapshot(tmp_path) == before


def test_a_keyboard_interrupt_inside_leaves_no_out_and_no_partial(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    with pytest.raises(KeyboardInterrupt), staged_output(out, force=False) as staging:
        (staging / "half.onnx").write_bytes(b"x")
        raise KeyboardInterrupt
    assert not out.exists()
    assert partials(out) == []


def test_an_existing_out_without_force_is_refused_before_anything_is_made(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputExistsError) as info, staged_output(out, force=False):
        pytest.fail("the body must not run")
    assert str(out) in str(info.value)
    assert "--force" in str(info.value)
    assert info.value.exit_code == 2
    assert snapshot(tmp_path) == before


def test_force_replaces_an_existing_out(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with staged_output(out, force=True) as staging:
        assert (out / "old.txt").is_file()  # the old package stays until the new one is complete
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert partials(out) == []


def test_force_replaces_an_out_that_is_a_file(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    out.write_text("a file where the package goes")
    with staged_output(out, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert (out / "new.txt").read_text() == "new"
    assert partials(out) == [], "the replaced file was left behind as a hidden partial"


def test_a_finished_package_folder_has_the_permissions_mkdir_gives(tmp_path: Path) -> None:
    reference = tmp_path / "made-with-mkdir"
    reference.mkdir()
    out = tmp_path / "pkg"
    with staged_output(out, force=False) as staging:
        (staging / "f").write_text("1")
    assert oct(out.stat().st_mode & 0o777) == oct(reference.stat().st_mode & 0o777)


def test_force_with_a_failure_keeps_the_existing_out(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError), staged_output(out, force=True) as staging:
        (staging / "new.txt").write_text("new")
        raise ValueError
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert partials(out) == []


def test_a_stale_partial_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    stale = tmp_path / f".pkg.partial-{dead_pid()}-abc123"
    stale.mkdir()
    (stale / "model.onnx.data").write_bytes(b"x" * 1000)
    stale_old = tmp_path / f".pkg.partial-{dead_pid()}-old"
    stale_old.mkdir()
    alive = tmp_path / f".pkg.partial-{os.getppid()}-live"  # our parent runs: not stale
    alive.mkdir()
    other = tmp_path / f".other.partial-{dead_pid()}-zzz"  # another OUT's leftovers are not ours
    other.mkdir()
    with staged_output(out, force=False) as staging:
        assert not stale.exists()
        assert not stale_old.exists()
        (staging / "f").write_text("1")
    assert alive.is_dir()
    assert other.is_dir()
    assert partials(out) == [alive]


def test_work_space_beside_a_dead_builds_staging_folder_is_swept(tmp_path: Path) -> None:
    # The build's evaluation keeps a backup of eval/ beside the package it evaluates, which during a build is
    # the staging folder: a kill there leaves "..pkg.partial-PID-x.partial-PID-work-y", swept like the rest.
    out = tmp_path / "pkg"
    dead = dead_pid()
    nested = tmp_path / f"..pkg.partial-{dead}-abc123.partial-{dead}-work-xyz"
    nested.mkdir()
    (nested / "reference.npz").write_bytes(b"x")
    alive = tmp_path / f"..pkg.partial-{os.getppid()}-abc.partial-{os.getppid()}-work-xyz"
    alive.mkdir()
    # the output ".pkg" has the same prefix: its package moved aside by a killed --force build is not ours
    retired_of_dot_pkg = tmp_path / f"..pkg.partial-{dead_pid()}-old"
    retired_of_dot_pkg.mkdir()
    with staged_output(out, force=False) as staging:
        (staging / "f").write_text("1")
    assert not nested.exists()
    assert alive.is_dir()
    assert retired_of_dot_pkg.is_dir()


def test_the_sweep_matches_out_by_name_not_by_pattern(tmp_path: Path) -> None:
    out = tmp_path / "pk[g]"  # unescaped, "[g]" would match the plain "g" of another OUT's leftovers
    ours = tmp_path / f".pk[g].partial-{dead_pid()}-abc"
    ours.mkdir()
    other = tmp_path / f".pkg.partial-{dead_pid()}-abc"
    other.mkdir()
    with staged_output(out, force=False) as staging:
        (staging / "f").write_text("1")
    assert not ours.exists()
    assert other.is_dir()


# --- manifest and verification -----------------------------------------------------------------------


def onnx_of_size(size: int) -> bytes:
    """A valid (empty-graph) ONNX model of exactly ``size`` bytes, padded with its doc string."""
    import onnx

    for pad in range(size):
        data = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []), doc_string="p" * pad)
        raw = data.SerializeToString()
        if len(raw) == size:
            return raw
    raise AssertionError(size)


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A hand-made package: two variants and a log, with a manifest."""
    root = tmp_path / "pkg"
    (root / "fp32").mkdir(parents=True)
    (root / "int4").mkdir()
    (root / "build.log").write_text("log\n")
    (root / "fp32" / "model.onnx").write_bytes(onnx_of_size(1024))
    (root / "fp32" / "genai_config.json").write_text(json.dumps(genai_config()))
    (root / "int4" / "model.onnx").write_bytes(onnx_of_size(300))
    write_manifest(root, {"architecture": "llama", "variants": {"fp32": {"path": "fp32"}}})
    return root


def test_write_manifest_lists_every_file_and_verify_passes(package: Path) -> None:
    manifest = read_manifest(package)
    assert manifest["schema_version"] == 1
    assert manifest["architecture"] == "llama"
    assert [f["path"] for f in manifest["files"]] == [
        "build.log",
        "fp32/genai_config.json",
        "fp32/model.onnx",
        "int4/model.onnx",
    ]
    entry = manifest["files"][2]
    assert entry["size"] == 1024
    assert entry["sha256"] == sha256_file(package / "fp32" / "model.onnx")
    verify_files(package, manifest)
    verify_files(package, manifest, "fp32")
    verify_files(package, manifest, "int4")


def verify_error(root: Path, subfolder: str | None = None) -> PackageError:
    with pytest.raises(PackageError) as info:
        verify_files(root, read_manifest(root), subfolder)
    assert info.value.exit_code == 2
    return info.value


def test_a_flipped_byte_shows_both_hashes(package: Path) -> None:
    path = package / "fp32" / "model.onnx"
    listed = sha256_file(path)
    data = bytearray(path.read_bytes())
    data[500] ^= 0x01
    path.write_bytes(bytes(data))
    error = verify_error(package)
    message = str(error)
    assert str(path) in message
    assert listed in message
    assert sha256_file(path) in message
    # Only the variant that was changed fails when one variant is checked.
    verify_files(package, read_manifest(package), "int4")
    assert str(path) in str(verify_error(package, "fp32"))


def test_a_size_mismatch(package: Path) -> None:
    path = package / "int4" / "model.onnx"
    path.write_bytes(b"\x01" * 299)
    message = str(verify_error(package))
    assert str(path) in message
    assert "299 bytes" in message and "300" in message


def test_an_extra_unlisted_file(package: Path) -> None:
    extra = package / "int4" / "model.onnx.data"
    extra.write_bytes(b"x")
    message = str(verify_error(package))
    assert str(extra) in message
    assert "not listed in the manifest" in message
    verify_files(package, read_manifest(package), "fp32")  # another variant is unaffected


def test_a_missing_file(package: Path) -> None:
    path = package / "fp32" / "genai_config.json"
    path.unlink()
    message = str(verify_error(package))
    assert str(path) in message
    assert "missing" in message


def test_a_symlink_is_refused(package: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"evil")
    link = package / "int4" / "evil.onnx"
    link.symlink_to(outside)
    message = str(verify_error(package))
    assert str(link) in message
    assert "symbolic link" in message


def test_a_symlink_replacing_a_listed_file_is_refused(package: Path, tmp_path: Path) -> None:
    path = package / "int4" / "model.onnx"
    outside = tmp_path / "same-bytes.onnx"
    shutil.copyfile(path, outside)  # same content: only the link itself is wrong
    path.unlink()
    path.symlink_to(outside)
    message = str(verify_error(package))
    assert "symbolic link" in message
    assert str(path) in message


def test_a_hard_link_is_refused(package: Path, tmp_path: Path) -> None:
    path = package / "int4" / "model.onnx"
    os.link(path, tmp_path / "hard-link-elsewhere")
    message = str(verify_error(package))
    assert "hard link" in message
    assert str(path) in message


def test_write_manifest_refuses_a_symlink(package: Path, tmp_path: Path) -> None:
    (package / "link").symlink_to(tmp_path)
    with pytest.raises(PackageError) as info:
        write_manifest(package, {})
    assert "symbolic link" in str(info.value)
    assert str(package / "link") in str(info.value)


@pytest.mark.parametrize("listed", ["../x", "fp32/../../x", "/etc/passwd"])
def test_a_manifest_listing_a_path_outside_the_package(package: Path, listed: str) -> None:
    manifest = read_manifest(package)
    manifest["files"].append({"path": listed, "size": 1, "sha256": "0" * 64})
    (package / MANIFEST).write_text(json.dumps(manifest))
    message = str(verify_error(package))
    assert listed in message
    assert "outside the package" in message


def test_read_manifest_of_a_folder_without_one(tmp_path: Path) -> None:
    with pytest.raises(PackageError) as info:
        read_manifest(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "no manifest.json" in str(info.value)
    assert "edgekit build" in str(info.value)


def test_read_manifest_of_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(PackageError) as info:
        read_manifest(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)
    assert "not a package folder" in str(info.value)


def test_read_manifest_with_bad_json(tmp_path: Path) -> None:
    (tmp_path / MANIFEST).write_text('{"schema_version": 1,')
    with pytest.raises(PackageError) as info:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(info.value)
    assert "not valid JSON" in str(info.value)


@pytest.mark.parametrize("content", [{"schema_version": 2}, {"files": []}, [1, 2], {"schema_version": "1"}])
def test_read_manifest_with_the_wrong_schema_version(tmp_path: Path, content) -> None:
    (tmp_path / MANIFEST).write_text(json.dumps(content))
    with pytest.raises(PackageError) as info:
        read_manifest(tmp_path)
    message = str(info.value)
    assert str(tmp_path / MANIFEST) in message
    assert "schema_version" in message
    assert "rebuild" in message


# --- `edgekit info` and `edgekit run` on a real (tiny) package -------------------------------------------


def test_info_shows_architecture_variants_and_validation(runner, tiny_llama_package: Path) -> None:
    manifest = read_manifest(tiny_llama_package)
    result = runner.invoke(main, ["info", str(tiny_llama_package)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "architecture: llama" in out
    assert f"{manifest['parameter_count']:,} parameters" in out
    assert "fp32" in out and "int4-rtn" in out
    assert "int4-rtn *" in out  # the deployed variant is marked
    assert "target laptop-cpu-rtn: runs 'int4-rtn' on cpu" in out
    validation = manifest["validation"]
    assert f"max |Δlogit| {validation['max_abs_diff']:.2e}" in out
    assert f"tolerance {validation['tolerance']:g}" in out
    assert f"files: {len(manifest['files'])}" in out


def test_info_json_prints_the_manifest(runner, tiny_llama_package: Path) -> None:
    result = runner.invoke(main, ["info", str(tiny_llama_package), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == read_manifest(tiny_llama_package)
    assert printed["architecture"] == "llama"
    assert set(printed["variants"]) == {"fp32", "int4-rtn"}
    assert printed["default_variant"] == "int4-rtn"
    assert printed["validation"]["max_abs_diff"] <= printed["validation"]["tolerance"]
    verify_files(tiny_llama_package, printed)


def test_info_of_a_folder_that_is_not_a_package(runner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["info", str(tmp_path)])
    assert result.exit_code == 2
    assert result.stderr.startswith("edgekit: error:")
    assert str(tmp_path) in result.stderr
    assert "manifest.json" in result.stderr


def test_run_answers_a_prompt(runner, tiny_llama_package: Path) -> None:
    result = runner.invoke(main, ["run", str(tiny_llama_package), "--prompt", "hello", "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert "[int4-rtn on cpu]" in result.stderr
    assert result.stdout.endswith("\n")


def test_run_without_prompt_or_chat_is_a_usage_error(runner, tiny_llama_package: Path) -> None:
    result = runner.invoke(main, ["run", str(tiny_llama_package)])
    assert result.exit_code == 2
    assert "--prompt" in result.stderr and "--chat" in result.stderr


def test_run_an_unknown_variant_lists_the_variants(runner, tiny_llama_package: Path) -> None:
    result = runner.invoke(main, ["run", str(tiny_llama_package), "--variant", "nope", "--prompt", "hi"])
    assert result.exit_code == 2
    assert "'nope'" in result.stderr
    assert "fp32" in result.stderr and "int4-rtn" in result.stderr
    assert str(tiny_llama_package) in result.stderr


def test_run_refuses_a_tampered_package(runner, tiny_llama_package: Path, tmp_path: Path) -> None:
    copy = tmp_path / "pkg"
    shutil.copytree(tiny_llama_package, copy)
    data = copy / "int4-rtn" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    result = runner.invoke(main, ["run", str(copy), "--prompt", "hello", "--max-new-tokens", "2"])
    assert result.exit_code == 2
    assert str(data) in result.stderr
    assert "sha256" in result.stderr
    assert result.stdout == ""
    # The untouched fp32 variant still runs.
    result = runner.invoke(main, ["run", str(copy), "--variant", "fp32", "--prompt", "hello", "--max-new-tokens", "2"])
    assert result.exit_code == 0, result.output
