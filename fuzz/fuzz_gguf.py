"""Fuzz the GGUF front door: ``check_gguf`` (edgekit's header reader, then the gguf package's reader)."""

from __future__ import annotations

from harness import WORK, expected, main

PATH = WORK / "model.gguf"


def load() -> None:
    global weight_files
    from edgekit.sources import gguf_header, weight_files  # noqa: F401  (instrumented under atheris)


def test_one_input(data: bytes) -> None:
    PATH.write_bytes(data)
    weight_files._gguf_reader.cache_clear()  # the same path is rewritten with every input
    expected(lambda: weight_files.check_gguf(PATH))


if __name__ == "__main__":
    main(test_one_input, load)
