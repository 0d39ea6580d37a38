"""Fuzz the safetensors front door: ``read_safetensors_header`` on arbitrary file contents."""

from __future__ import annotations

from harness import WORK, expected, main

PATH = WORK / "model.safetensors"


def load() -> None:
    global read_safetensors_header
    from edgekit.sources.weight_files import read_safetensors_header


def test_one_input(data: bytes) -> None:
    PATH.write_bytes(data)
    expected(lambda: read_safetensors_header(PATH))


if __name__ == "__main__":
    main(test_one_input, load)
