"""Crafted GGUF files (issue #5, requirement 4): each is a CorruptFileError naming the file, in under a
second, in a child process limited to 1 GiB of address space. The files are written by hand below."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from limited import MiB, assert_refused_quickly, run_limited

from edgekit.errors import CorruptFileError
from edgekit.exporters.gguf_header import read_gguf_header
from edgekit.exporters.weight_files import check_gguf

F32, Q4_0 = 0, 2
STRING, ARRAY, UINT32 = 8, 9, 4


def text(value: str | bytes) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, value_type: int, payload: bytes) -> bytes:
    return text(key) + struct.pack("<I", value_type) + payload


def kv_str(key: str, value: str) -> bytes:
    return kv(key, STRING, text(value))


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, UINT32, struct.pack("<I", value))


def info(name: str | bytes, dims: list[int], ggml_type: int = F32, offset: int = 0, n_dims: int | None = None) -> bytes:
    count = len(dims) if n_dims is None else n_dims
    return (
        text(name)
        + struct.pack("<I", count)
        + b"".join(struct.pack("<Q", d) for d in dims)
        + struct.pack("<IQ", ggml_type, offset)
    )


ARCH = kv_str("general.architecture", "llama")


def gguf_bytes(
    kvs: list[bytes] | None = None,
    infos: list[bytes] | None = None,
    data: bytes | None = None,
    *,
    version: int = 3,
    tensor_count: int | None = None,
    kv_count: int | None = None,
    alignment: int = 32,
) -> bytes:
    """A GGUF file: header, metadata, tensor infos, padding to ``alignment``, data (default: one 8x2 F32)."""
    kvs = [ARCH] if kvs is None else kvs
    infos = [info("w", [8, 2])] if infos is None else infos
    data = bytes(64) if data is None else data
    head = b"GGUF" + struct.pack(
        "<IQQ",
        version,
        len(infos) if tensor_count is None else tensor_count,
        len(kvs) if kv_count is None else kv_count,
    )
    head += b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment) + data


CASES = {
    "huge-tensor-count": (gguf_bytes(tensor_count=2**63), "declares 9223372036854775808 tensors"),
    "huge-kv-count": (gguf_bytes(kv_count=2**64 - 1), "edgekit reads at most"),
    "more-tensors-than-the-cap": (gguf_bytes(tensor_count=65537, infos=[bytes(65537 * 24)]), "at most 65536 tensors"),
    "more-keys-than-the-cap": (gguf_bytes(kv_count=65537, kvs=[bytes(65537 * 13)]), "65536 keys"),
    "more-tensors-than-the-file-holds": (gguf_bytes(tensor_count=1000), "more than the"),
    "n-dims-2^32-1": (gguf_bytes(infos=[info("w", [], n_dims=2**32 - 1)]), "declares 4294967295 dimensions"),
    "overflowing-dims": (gguf_bytes(infos=[info("w", [2**63, 2**63, 2**63, 2**63])]), "past the end"),
    "product-wraps-to-zero": (gguf_bytes(infos=[info("w", [2**32, 2**32])]), "past the end"),
    "zero-dimension": (gguf_bytes(infos=[info("w", [8, 0])], data=b""), "zero dimension"),
    "string-longer-than-file": (
        gguf_bytes(kvs=[kv("general.architecture", STRING, struct.pack("<Q", 2**62) + b"llama")]),
        "past the end",
    ),
    "key-longer-than-file": (gguf_bytes(kvs=[struct.pack("<Q", 2**40) + b"general"]), "more than the 65535"),
    "tensor-name-longer-than-file": (gguf_bytes(infos=[struct.pack("<Q", 2**63) + b"w"]), "tensor name"),
    "alignment-2^31": (gguf_bytes(kvs=[ARCH, kv_u32("general.alignment", 2**31)]), "general.alignment is 2147483648"),
    "alignment-not-a-power-of-two": (gguf_bytes(kvs=[ARCH, kv_u32("general.alignment", 48)]), "power of two"),
    "alignment-zero": (gguf_bytes(kvs=[ARCH, kv_u32("general.alignment", 0)]), "power of two"),
    "alignment-of-the-wrong-type": (
        gguf_bytes(kvs=[ARCH, kv_str("general.alignment", "32")]),
        "general.alignment is not an integer",
    ),
    "duplicate-keys": (gguf_bytes(kvs=[ARCH, ARCH]), "has the metadata key 'general.architecture' twice"),
    "duplicate-tensor-names": (
        gguf_bytes(infos=[info("w", [8, 2]), info("w", [8, 2], offset=64)], data=bytes(128)),
        "two tensors named 'w'",
    ),
    "string-array-longer-than-file": (
        gguf_bytes(kvs=[ARCH, kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 2**61))]),
        "past the end",
    ),
    "number-array-longer-than-file": (
        gguf_bytes(kvs=[ARCH, kv("tokenizer.ggml.scores", ARRAY, struct.pack("<IQ", 6, 2**62))]),
        "past the end",
    ),
    "nested-array": (
        gguf_bytes(kvs=[ARCH, kv("x", ARRAY, struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", 0, 0))]),
        "nested arrays",
    ),
    "unknown-value-type": (gguf_bytes(kvs=[ARCH, kv("x", 99, b"")]), "unknown value type 99"),
    "unknown-ggml-type": (gguf_bytes(infos=[info("w", [8, 2], ggml_type=99)]), "unknown ggml type 99"),
    "block-size-does-not-divide": (gguf_bytes(infos=[info("w", [8, 2], ggml_type=Q4_0)]), "not a multiple of 32"),
    "data-past-the-end": (gguf_bytes(infos=[info("w", [1024, 1024])]), "past the end"),
    "offset-past-the-end": (gguf_bytes(infos=[info("w", [8, 2], offset=2**63)]), "past the end"),
    "misaligned-offset": (gguf_bytes(infos=[info("w", [8, 2], offset=4)], data=bytes(68)), "not a multiple of 32"),
    "overlapping-tensors": (
        gguf_bytes(infos=[info("a", [8, 2]), info("b", [8, 2], offset=32)], data=bytes(96)),
        "overlaps",
    ),
    "version-1": (gguf_bytes(version=1), "GGUF version 1"),
    "big-endian": (gguf_bytes(version=0x03000000), "big-endian"),
    "not-utf8-key": (gguf_bytes(kvs=[kv(b"\xff\xfe", UINT32, bytes(4))]), "not UTF-8"),
    "cut-inside-the-counts": (gguf_bytes()[:12], "past the end"),
    "cut-inside-the-metadata": (gguf_bytes()[:62], "past the end"),
    "cut-inside-the-data": (gguf_bytes()[:-1], "past the end"),
}


def test_the_writer_makes_files_the_gguf_reader_accepts(tmp_path: Path) -> None:
    from gguf import GGUFReader

    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes(kvs=[ARCH, kv_u32("general.alignment", 64)], alignment=64))
    header = read_gguf_header(path)
    reader = GGUFReader(str(path))
    assert header.metadata["general.architecture"] == "llama"
    assert header.alignment == 64
    assert [(t.name, t.offset, t.n_bytes) for t in header.tensors] == [
        (t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors
    ]
    check_gguf(path)


@pytest.fixture(scope="module")
def crafted_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """Every crafted file checked by ``check_gguf`` in one child process limited to 1 GiB."""
    folder = tmp_path_factory.mktemp("crafted-gguf")
    paths = []
    for case, (content, _) in sorted(CASES.items()):
        paths.append(folder / f"{case}.gguf")
        paths[-1].write_bytes(content)
    results = run_limited(
        "edgekit.exporters.weight_files:check_gguf", paths, 1024 * MiB, warm=("gguf", "gguf.constants")
    )
    return {case: (path, result) for case, path, result in zip(sorted(CASES), paths, results, strict=True)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crafted_gguf_file_is_refused_quickly_in_little_memory(crafted_results, case: str) -> None:
    path, result = crafted_results[case]
    assert_refused_quickly(result, path, CASES[case][1], "download or copy the GGUF file again")


def test_the_demo_header_matches_the_gguf_reader() -> None:
    from gguf import GGUFReader

    from edgekit.demo import demo_gguf_path

    path = demo_gguf_path()
    header = read_gguf_header(path)
    reader = GGUFReader(str(path))
    assert header.metadata["general.architecture"] == "llama"
    assert [(t.name, t.shape, t.offset, t.n_bytes) for t in header.tensors] == [
        (t.name, tuple(int(d) for d in t.shape), int(t.data_offset), int(t.n_bytes)) for t in reader.tensors
    ]


def test_a_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(CorruptFileError) as info_:
        read_gguf_header(tmp_path / "absent.gguf")
    assert "cannot be read" in str(info_.value)


def test_a_vocabulary_larger_than_the_read_block_is_walked_exactly(tmp_path: Path) -> None:
    from gguf import GGUFReader

    strings = [f"token-{i}-{'x' * (i % 13)}" for i in range(150_000)]  # about 2.7 MB: three read blocks
    tokens = kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, len(strings)) + b"".join(map(text, strings)))
    path = tmp_path / "vocab.gguf"
    path.write_bytes(gguf_bytes(kvs=[ARCH, tokens, kv_u32("after.vocab", 7)]))
    header = read_gguf_header(path)
    assert header.metadata["after.vocab"] == 7
    assert [t.offset for t in header.tensors] == [int(t.data_offset) for t in GGUFReader(str(path)).tensors]
    path.write_bytes(path.read_bytes()[:2_000_000])
    with pytest.raises(CorruptFileError, match="past the end"):
        read_gguf_header(path)
