"""Fuzz the archive reader: ``unpack_package`` on arbitrary archive contents (tar, gzip, bzip2, xz). The seeds
include manifest-first archives whose member headers disagree with the manifest (sizes, unlisted or missing
members, the manifest out of place)."""

from __future__ import annotations

import shutil

import onnx  # noqa: F401  (imported before instrumentation: its parser is C++, its Python is not under test)
import pydantic  # noqa: F401  (likewise: the schema library genai_config.json is checked with)
from harness import WORK, expected, main

ARCHIVE = WORK / "package.tar"
DEST = WORK / "unpacked"


def load() -> None:
    global archive
    from edgekit.package import archive, manifest, references, verify  # noqa: F401  (instrumented under atheris)


def test_one_input(data: bytes) -> None:
    ARCHIVE.write_bytes(data)
    try:
        expected(lambda: archive.unpack_package(ARCHIVE, DEST))
    finally:
        shutil.rmtree(DEST, ignore_errors=True)
    leftovers = [p.name for p in WORK.iterdir() if p.name not in {ARCHIVE.name, "pkg"}]
    if leftovers:
        raise AssertionError(f"unpacking left {leftovers} behind")


if __name__ == "__main__":
    main(test_one_input, load)
