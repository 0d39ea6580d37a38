"""Fuzz the package reader on ``genai_config.json``: ``verify_files`` over a small valid package whose
variant's genai_config.json is the input, with the manifest rewritten to list it truthfully (as an
attacker would), so the input reaches the config checks instead of stopping at a hash mismatch."""

from __future__ import annotations

import hashlib
import json

import make_corpus
import onnx  # noqa: F401  (imported before instrumentation: its parser is C++, its Python is not under test)
import pydantic  # noqa: F401  (likewise: the schema library, not edgekit's use of it)
from harness import WORK, expected, main

ROOT = WORK / "package"
CONFIG = "fp32/genai_config.json"


def load() -> None:
    global manifest_module, verify, manifest
    from edgekit.package import genai_config, references, verify  # noqa: F401
    from edgekit.package import manifest as manifest_module  # instrumented under atheris

    manifest = make_corpus.write_package_files(ROOT)


def check(data: bytes) -> None:
    (ROOT / CONFIG).write_bytes(data)
    entry = {"path": CONFIG, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    files = [entry if e["path"] == CONFIG else e for e in manifest["files"]]
    (ROOT / "manifest.json").write_text(json.dumps({**manifest, "files": files}, indent=2))
    verify.verify_files(ROOT, manifest_module.read_manifest(ROOT))


def test_one_input(data: bytes) -> None:
    expected(lambda: check(data))


if __name__ == "__main__":
    main(test_one_input, load)
