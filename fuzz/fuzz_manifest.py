"""Fuzz the manifest reader: ``read_manifest``, ``variant_dir`` and ``verify_files`` on arbitrary
manifest.json contents, over a small package whose files (configs, an ONNX model with external data)
the manifest may describe truthfully or not."""

from __future__ import annotations

import make_corpus
import onnx  # noqa: F401  (imported before instrumentation: its parser is C++, its Python is not under test)
import pydantic  # noqa: F401  (likewise: the schema library genai_config.json is checked with)
from harness import WORK, expected, main

ROOT = WORK / "pkg"


def load() -> None:
    global manifest_module, verify
    from edgekit.package import manifest as manifest_module  # instrumented under atheris
    from edgekit.package import references, verify  # noqa: F401

    make_corpus.write_package_files(ROOT)


def check(data: bytes) -> None:
    (ROOT / "manifest.json").write_bytes(data)
    manifest = manifest_module.read_manifest(ROOT)
    name, _ = verify.variant_dir(ROOT, manifest, None)
    verify.verify_files(ROOT, manifest, manifest["variants"][name]["path"])
    verify.verify_files(ROOT, manifest)


def test_one_input(data: bytes) -> None:
    expected(lambda: check(data))


if __name__ == "__main__":
    main(test_one_input, load)
