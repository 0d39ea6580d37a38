"""Manifest verification fails closed (issue #5, requirement 7): malformed manifests are PackageErrors, and
every size is compared before any file is hashed. (A listed ../ path, an unlisted file and a flipped byte
are in test_package.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from edgekit.errors import PackageError
from edgekit.package import manifest as manifest_module
from edgekit.package import verify as verify_module
from edgekit.package.manifest import MANIFEST, read_manifest, write_manifest
from edgekit.package.verify import variant_dir, verify_files


@pytest.fixture
def package(tmp_path: Path) -> Path:
    root = tmp_path / "pkg"
    (root / "fp32").mkdir(parents=True)
    (root / "fp32" / "a.onnx.data").write_bytes(b"a" * 10)
    (root / "fp32" / "z.onnx.data").write_bytes(b"z" * 10)
    write_manifest(root, {"variants": {"fp32": {"path": "fp32"}}, "default_variant": "fp32"})
    return root


def test_a_size_mismatch_is_caught_before_any_file_is_hashed(package: Path, monkeypatch) -> None:
    (package / "fp32" / "z.onnx.data").write_bytes(
        b"z" * 11
    )  # the last file, sorted: a.onnx.data would be hashed first

    def no_hashing(path: Path, chunk: int = 0) -> str:
        raise AssertionError(f"hashed {path} before comparing sizes")

    monkeypatch.setattr(verify_module, "sha256_file", no_hashing)
    with pytest.raises(PackageError) as info:
        verify_files(package, read_manifest(package))
    assert "is 11 bytes, the manifest says 10" in str(info.value)
    assert str(package / "fp32" / "z.onnx.data") in str(info.value)


def rewrite(root: Path, change: Any) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    change(manifest)
    (root / MANIFEST).write_text(json.dumps(manifest))


MALFORMED = {
    "files-not-a-list": lambda m: m.update(files={"a": 1}),
    "entry-not-a-mapping": lambda m: m["files"].append("fp32/a.onnx.data"),
    "path-not-a-string": lambda m: m["files"][0].update(path=7),
    "size-a-string": lambda m: m["files"][0].update(size="10"),
    "size-a-boolean": lambda m: m["files"][0].update(size=True),
    "size-negative": lambda m: m["files"][0].update(size=-1),
    "sha256-short": lambda m: m["files"][0].update(sha256="abc"),
    "sha256-not-hex": lambda m: m["files"][0].update(sha256="g" * 64),
    "variants-a-list": lambda m: m.update(variants=["fp32"]),
    "variant-without-path": lambda m: m["variants"].update(fp32={}),
    "default-variant-a-number": lambda m: m.update(default_variant=3),
    "targets-malformed": lambda m: m.update(targets={"laptop-cpu": "fp32"}),
    # fields `info`, `run` and `check` read and print: each gave a traceback (a red-team pass)
    "tools-null": lambda m: m.update(tools=None),
    "source-without-kind": lambda m: m.update(source={}),
    "parameter-count-a-string": lambda m: m.update(parameter_count="x"),
    "precision-a-number": lambda m: m["variants"]["fp32"].update(precision=5),
    "provider-a-mapping": lambda m: m["variants"]["fp32"].update(provider={}),
    "validation-figure-a-string": lambda m: m.update(validation={"variant": "fp32", "max_abs_diff": "x"}),
    "build-step-without-seconds": lambda m: m.update(build_steps=[{"name": "x", "peak_rss_mb": 1}]),
    # names go into rich tables, JUnit files and terminal lines: "[/x]" was a MarkupError traceback
    "variant-name-markup": lambda m: m.update(variants={"[/x]": {"path": "fp32"}}),
    "variant-name-escape": lambda m: m.update(variants={"\x1b]0;x\x07": {"path": "fp32"}}),
    "default-variant-markup": lambda m: m.update(default_variant="[b]fp32"),
    "target-name-markup": lambda m: m.update(targets={"[/x]": {"variant": "fp32"}}),
    "bytes-past-any-float": lambda m: m["variants"]["fp32"].update(bytes=10**400),
    # an unpacked archive's folders come from these paths: 40,000 levels took 1.6 GB from 267 bytes
    "path-thousands-of-levels-deep": lambda m: m["files"][0].update(path="a/" * 40_000 + "x"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_manifest_is_refused_when_read(package: Path, case: str) -> None:
    rewrite(package, MALFORMED[case])
    with pytest.raises(PackageError) as info:
        read_manifest(package)
    assert str(package / MANIFEST) in str(info.value)


@pytest.mark.parametrize(
    ("raw", "phrase"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"schema_version": 1, "x": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
    ],
    ids=["deep", "huge-integer", "not-utf8"],
)
def test_a_hostile_manifest_file(package: Path, raw: bytes, phrase: str) -> None:
    (package / MANIFEST).write_bytes(raw)
    with pytest.raises(PackageError, match=phrase):
        read_manifest(package)


def test_a_manifest_larger_than_the_cap(package: Path, monkeypatch) -> None:
    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(PackageError, match="larger than 100 bytes"):
        read_manifest(package)


def test_a_manifest_that_is_a_symlink(package: Path, tmp_path: Path) -> None:
    (package / MANIFEST).rename(tmp_path / "elsewhere.json")
    (package / MANIFEST).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(PackageError, match=r"has no manifest\.json"):
        read_manifest(package)


def test_a_path_listed_twice(package: Path) -> None:
    rewrite(package, lambda m: m["files"].append(dict(m["files"][0])))
    with pytest.raises(PackageError, match="listed twice"):
        verify_files(package, read_manifest(package))


@pytest.mark.parametrize("listed", ["fp32\\..\\..\\x", "C:x", "", "fp32/a\x00.onnx"])
def test_a_listed_path_that_is_not_portable(package: Path, listed: str) -> None:
    rewrite(package, lambda m: m["files"].append({"path": listed, "size": 1, "sha256": "0" * 64}))
    with pytest.raises(PackageError, match="outside the package"):
        verify_files(package, read_manifest(package))


def test_a_subfolder_outside_the_package(package: Path) -> None:
    with pytest.raises(PackageError, match="not a folder of the package"):
        verify_files(package, read_manifest(package), "../pkg")
    manifest = read_manifest(package)
    manifest["variants"]["fp32"]["path"] = "../pkg"
    with pytest.raises(PackageError, match="not a folder of the package"):
        variant_dir(package, manifest, None)


def test_a_fifo_in_the_package_is_refused(package: Path) -> None:
    import os

    os.mkfifo(package / "fp32" / "pipe")
    with pytest.raises(PackageError, match="FIFO, socket or device") as info:
        verify_files(package, read_manifest(package))
    assert str(package / "fp32" / "pipe") in str(info.value)


def _mutations(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The manifest with one field deleted or given another shape, for every field two levels deep."""
    cases = []
    paths = [(key,) for key in manifest] + [
        (key, inner) for key, value in manifest.items() if isinstance(value, dict) for inner in value
    ]
    for path in paths:
        for label, value in (("deleted", None), ("null", None), ("seven", 7), ("list", [7]), ("text", "x")):
            changed = json.loads(json.dumps(manifest))
            holder = changed
            for key in path[:-1]:
                holder = holder[key]
            if label == "deleted":
                del holder[path[-1]]
            else:
                holder[path[-1]] = value
            cases.append(("/".join(path) + f" {label}", changed))
    return cases


def test_info_on_a_rewritten_manifest_shows_it_or_says_why_in_one_line(tiny_llama_package: Path,
                                                                        tmp_path: Path) -> None:  # fmt: skip
    """Fields the schema lets be missing or null (parameter_count, a variant's bytes, ...) were tracebacks."""
    from click.testing import CliRunner

    from edgekit.cli import main

    original = json.loads((tiny_llama_package / MANIFEST).read_text(encoding="utf-8"))
    root = tmp_path / "pkg"
    root.mkdir()
    runner, shown, refused = CliRunner(), 0, 0
    for label, changed in _mutations(original):
        (root / MANIFEST).write_text(json.dumps(changed), encoding="utf-8")
        result = runner.invoke(main, ["info", str(root)])
        assert result.exit_code in (0, 2), (label, result.output, result.exception)
        assert "Traceback" not in result.output and len(result.output.strip().splitlines()) >= 1, label
        shown += result.exit_code == 0
        refused += result.exit_code == 2
        if result.exit_code == 2:
            assert result.output.count("\n") == 1 and str(root / MANIFEST) in result.output, (label, result.output)
    assert shown > 50 and refused > 50  # both paths are exercised


def test_info_prints_a_packages_text_as_text(tiny_llama_package: Path, tmp_path: Path) -> None:
    """Markup and terminal escapes in the manifest's free text (a path, tool versions) are shown, not obeyed."""
    from click.testing import CliRunner

    from edgekit.cli import main

    manifest = json.loads((tiny_llama_package / MANIFEST).read_text(encoding="utf-8"))
    manifest["source"]["location"] = "/m/[/x][link=https://evil.example]docs[/link]\x1b]0;OWNED\x07"
    manifest["architecture"] = "[bold red]llama"
    manifest["tools"] = {"edgekit": "\x1b[2J1.0"}
    root = tmp_path / "pkg"
    root.mkdir()
    (root / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    result = CliRunner().invoke(main, ["info", str(root)])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "[/x][link=https://evil.example]docs[/link]\\x1b]0;OWNED\\x07" in result.output
    assert "[bold red]llama" in result.output and "\\x1b[2J1.0" in result.output


def test_a_folder_path_too_long_for_the_system_is_one_line(package: Path, monkeypatch) -> None:
    monkeypatch.chdir(package / "fp32")
    for _ in range(40):  # each name is allowed, the whole path (made one level at a time) is not
        os.mkdir("d" * 200)
        os.chdir("d" * 200)
    monkeypatch.chdir(package)
    with pytest.raises(PackageError, match="cannot be read"):
        verify_files(package, read_manifest(package))
