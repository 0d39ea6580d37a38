"""Crafted safetensors files (issue #5, requirement 3): each is a CorruptFileError naming the file, in under
a second, in a child process limited to 512 MiB of address space."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from limited import MiB, assert_refused_quickly, run_limited
from test_weight_files import entry, write_safetensors

from edgekit.sources.weight_files import MAX_SAFETENSORS_HEADER


def sparse_header(path: Path, declared: int) -> None:
    """A file big enough (sparse) to hold a ``declared``-byte header: only the size cap can refuse it."""
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", declared) + b"{")
        handle.truncate(8 + declared + 16)


def raw_header(path: Path, raw: bytes) -> None:
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


CASES = {
    "200-mb-header": (lambda p: sparse_header(p, 200 * MiB), "declares a 209715200-byte header"),
    "header-just-over-the-cap": (lambda p: sparse_header(p, MAX_SAFETENSORS_HEADER + 1), "-byte header"),
    "overlapping-offsets": (
        lambda p: write_safetensors(p, {"a": entry("F32", [4], 0, 16), "b": entry("F32", [4], 8, 24)}, bytes(24)),
        "tensor 'b' overlaps the tensor before it",
    ),
    "shape-product-overflows": (
        lambda p: write_safetensors(p, {"w": entry("F32", [2**32, 2**32, 2**32], 0, 0)}),
        "needs 316912650057057350374175801344 bytes but spans 0",
    ),
    "shape-product-wraps-to-zero-in-64-bits": (
        lambda p: write_safetensors(p, {"w": entry("U8", [2**32, 2**32], 0, 0)}),
        "needs 18446744073709551616 bytes",
    ),
    "truncated": (
        lambda p: write_safetensors(p, {"w": entry("F32", [256], 0, 1024)}, bytes(1000)),
        "tensors need 1024 bytes of data but the file holds 1000",
    ),
    "cut-inside-the-length": (lambda p: p.write_bytes(b"\x10\x00\x00"), "shorter than a safetensors header"),
    "nested-200000-deep": (lambda p: raw_header(p, b"[" * 200_000 + b"]" * 200_000), "nested too deeply"),
    "integer-of-5000-digits": (lambda p: raw_header(p, b'{"w": ' + b"9" * 5000 + b"}"), "header is not JSON"),
    # Found by fuzz_safetensors: a dtype that is a list raised TypeError (unhashable) instead of refusing.
    "list-dtype": (
        lambda p: write_safetensors(p, {"w": {"dtype": [0, 32], "shape": [1], "data_offsets": [0, 1]}}, bytes(1)),
        "tensor 'w' has unknown dtype [0, 32]",
    ),
    # The builder's safetensors loader refused these late, as a traceback in its log (exit 1).
    "metadata-a-list": (
        lambda p: write_safetensors(p, {"__metadata__": ["pt"], "w": entry("U8", [1], 0, 1)}, bytes(1)),
        "__metadata__ is not a map of strings to strings",
    ),
    "metadata-value-a-number": (
        lambda p: write_safetensors(p, {"__metadata__": {"format": 5}, "w": entry("U8", [1], 0, 1)}, bytes(1)),
        "__metadata__ is not a map of strings to strings",
    ),
    "boolean-shape": (
        lambda p: write_safetensors(p, {"w": entry("U8", [True], 0, 1)}, bytes(1)),
        "tensor 'w' has a malformed shape",
    ),
}


@pytest.fixture(scope="module")
def crafted_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    folder = tmp_path_factory.mktemp("crafted-safetensors")
    paths = []
    for case, (make, _) in sorted(CASES.items()):
        paths.append(folder / f"{case}.safetensors")
        make(paths[-1])
    results = run_limited("edgekit.sources.weight_files:read_safetensors_header", paths, 512 * MiB)
    return {case: (path, result) for case, path, result in zip(sorted(CASES), paths, results, strict=True)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crafted_safetensors_file_is_refused_quickly_in_little_memory(crafted_results, case: str) -> None:
    path, result = crafted_results[case]
    assert_refused_quickly(result, path, CASES[case][1], "download or copy the file again")


def test_a_header_of_a_million_tiny_entries_is_refused_by_its_size(tmp_path: Path) -> None:
    # 100 MB of tiny entries (under safetensors' own 100 MB cap) parses into over 1 GB of objects.
    path = tmp_path / "many.safetensors"
    body = ",".join(f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(1_000_000))
    raw_header(path, ("{" + body + "}").encode())
    (result,) = run_limited("edgekit.sources.weight_files:read_safetensors_header", [path], 512 * MiB)
    assert result["error"] == "CorruptFileError", result
    assert "-byte header" in result["message"]
    assert result["seconds"] < 1.0
