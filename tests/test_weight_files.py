"""Header checks of safetensors and GGUF files on crafted files, and the GGUF import's verification."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgekit.errors import CorruptFileError
from edgekit.sources.weight_files import (
    MAX_SAFETENSORS_HEADER,
    TensorInfo,
    check_gguf,
    read_safetensors_header,
)


def write_safetensors(path: Path, header: dict[str, Any] | bytes, data: bytes = b"", header_len=None) -> Path:
    """A safetensors file from a header (dict or raw bytes) and a data section, written by hand."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)
    return path


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def corrupt(path: Path) -> str:
    """The message of the CorruptFileError that reading ``path``'s header raises; it must name the file."""
    with pytest.raises(CorruptFileError) as info:
        read_safetensors_header(path)
    message = str(info.value)
    assert info.value.path == str(path)
    assert message.startswith(f"{path}: ")
    assert info.value.exit_code == 2
    return message


# --- safetensors -----------------------------------------------------------------------------------


def test_a_valid_file_passes_and_returns_names_dtypes_and_shapes(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "model.safetensors"
    save_file(
        {
            "a.weight": np.zeros((3, 5), dtype=np.float32),
            "b.bias": np.ones((7,), dtype=np.float16),
            "c.ids": np.arange(4, dtype=np.int64).reshape(2, 2),
            "d.scalar": np.array(1.5, dtype=np.float64),
        },
        str(path),
        metadata={"format": "pt"},
    )
    infos = {info.name: info for info in read_safetensors_header(path)}
    assert infos == {
        "a.weight": TensorInfo("a.weight", "F32", (3, 5)),
        "b.bias": TensorInfo("b.bias", "F16", (7,)),
        "c.ids": TensorInfo("c.ids", "I64", (2, 2)),
        "d.scalar": TensorInfo("d.scalar", "F64", ()),
    }
    raw = path.read_bytes()
    for name, expected in (("b.bias", np.ones(7, np.float16)), ("c.ids", np.arange(4, dtype=np.int64))):
        info = infos[name]
        assert raw[info.offset : info.offset + info.nbytes] == expected.tobytes()


def test_a_hand_written_valid_file_passes(tmp_path: Path) -> None:
    path = write_safetensors(
        tmp_path / "ok.safetensors",
        {"__metadata__": {"format": "pt"}, "x": entry("F32", [2, 2], 0, 16), "y": entry("U8", [3], 16, 19)},
        bytes(19),
    )
    assert [(i.name, i.shape) for i in read_safetensors_header(path)] == [("x", (2, 2)), ("y", (3,))]


def test_a_file_shorter_than_the_length_prefix(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    assert "shorter than a safetensors header" in corrupt(path)


def test_a_header_length_larger_than_the_file(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "long.safetensors", {"x": entry("F32", [1], 0, 4)}, bytes(4), 1000)
    size = path.stat().st_size
    message = corrupt(path)
    assert f"declares a 1000-byte header in a {size}-byte file" in message
    assert "download or copy the file again" in message


def test_a_200_mb_header_is_refused_without_reading_it(tmp_path: Path) -> None:
    # A sparse file big enough to hold the declared header: only the size cap can refuse it.
    declared = 200 * 1024 * 1024
    assert declared > MAX_SAFETENSORS_HEADER
    path = tmp_path / "huge-header.safetensors"
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", declared) + b"{")
        handle.truncate(8 + declared + 16)
    message = corrupt(path)
    assert f"declares a {declared}-byte header" in message


@pytest.mark.parametrize(
    "raw",
    [b"\xff\xfe not utf-8", b'{"x": {"dtype": "F32",', b"not json at all"],
    ids=["not-utf8", "cut-json", "text"],
)
def test_a_header_that_is_not_json(tmp_path: Path, raw: bytes) -> None:
    path = write_safetensors(tmp_path / "bad.safetensors", raw, bytes(8))
    assert "header is not JSON" in corrupt(path)


@pytest.mark.parametrize("metadata", [["x"], {"format": 5}, "pt", {"a": {"b": "c"}}, 7])
def test_metadata_that_is_not_strings_to_strings(tmp_path: Path, metadata: object) -> None:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    header = {"__metadata__": metadata, "x": entry("F32", [1], 0, 4)}
    path = write_safetensors(tmp_path / "meta.safetensors", header, bytes(4))
    assert "__metadata__ is not a map of strings to strings" in corrupt(path)
    with pytest.raises(SafetensorError):  # what the builder would meet later, as a traceback in its log
        load_file(str(path))


def test_null_metadata_is_read_as_the_library_reads_it(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    path = write_safetensors(
        tmp_path / "null.safetensors", {"__metadata__": None, "x": entry("F32", [1], 0, 4)}, bytes(4)
    )
    assert [i.name for i in read_safetensors_header(path)] == ["x"]
    assert list(load_file(str(path))) == ["x"]


def test_a_header_that_is_a_json_list(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "list.safetensors", b"[1, 2]", b"")
    assert "not a JSON object" in corrupt(path)


def test_overlapping_offsets(tmp_path: Path) -> None:
    path = write_safetensors(
        tmp_path / "overlap.safetensors",
        {"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)},
        bytes(12),
    )
    assert "tensor 'b' overlaps the tensor before it" in corrupt(path)


def test_a_gap_between_tensors(tmp_path: Path) -> None:
    path = write_safetensors(
        tmp_path / "gap.safetensors",
        {"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)},
        bytes(12),
    )
    assert "tensor 'b' leaves a gap before it" in corrupt(path)


def test_a_gap_before_the_first_tensor(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "gap0.safetensors", {"a": entry("F32", [1], 4, 8)}, bytes(8))
    assert "tensor 'a' leaves a gap before it" in corrupt(path)


@pytest.mark.parametrize(
    ("dtype", "shape", "span"),
    [
        ("F32", [2**40, 2**40], 8),  # 2**82 bytes
        ("U8", [2**32, 2**32], 0),  # 2**64 bytes: exactly 0 in 64-bit arithmetic
        ("F16", [2**62, 4], 0),  # 2**65 bytes
    ],
    ids=["2^40x2^40-f32", "2^32x2^32-u8", "2^62x4-f16"],
)
def test_a_shape_whose_byte_count_overflows_64_bits(tmp_path: Path, dtype: str, shape, span: int) -> None:
    path = write_safetensors(tmp_path / "overflow.safetensors", {"w": entry(dtype, shape, 0, span)}, bytes(span))
    message = corrupt(path)
    assert "tensor 'w'" in message
    assert f"spans {span}" in message


def test_an_unknown_dtype(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "dtype.safetensors", {"w": entry("Q4_K", [4], 0, 2)}, bytes(2))
    message = corrupt(path)
    assert "tensor 'w' has unknown dtype 'Q4_K'" in message


@pytest.mark.parametrize(
    "bad",
    [
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0]},
        {"dtype": "F32", "shape": [1]},
        "F32",
    ],
    ids=["negative-dim", "float-dim", "reversed-offsets", "one-offset", "no-offsets", "not-a-dict"],
)
def test_a_malformed_entry(tmp_path: Path, bad: Any) -> None:
    path = write_safetensors(tmp_path / "entry.safetensors", {"w": bad}, bytes(4))
    message = corrupt(path)
    assert "tensor 'w'" in message
    assert "malformed" in message


def test_a_shape_that_does_not_match_its_byte_range(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "shape.safetensors", {"w": entry("F32", [3], 0, 8)}, bytes(8))
    assert "needs 12 bytes but spans 8" in corrupt(path)


def test_truncated_data(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "cut.safetensors"
    save_file({"a": np.ones((16, 16), dtype=np.float32), "b": np.ones((8,), dtype=np.float32)}, str(path))
    whole = path.read_bytes()
    path.write_bytes(whole[:-100])
    message = corrupt(path)
    assert "tensors need 1056 bytes of data but the file holds 956" in message


def test_extra_bytes_after_the_data(tmp_path: Path) -> None:
    path = write_safetensors(tmp_path / "extra.safetensors", {"w": entry("F32", [1], 0, 4)}, bytes(12))
    assert "tensors need 4 bytes of data but the file holds 12" in corrupt(path)


def test_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    assert "absent.safetensors: does not exist" in corrupt(path)


# --- GGUF ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_gguf() -> Path:
    from edgekit.demo import demo_gguf_path

    return demo_gguf_path()


def gguf_error(path: Path) -> str:
    with pytest.raises(CorruptFileError) as info:
        check_gguf(path)
    assert info.value.path == str(path)
    assert str(info.value).startswith(f"{path}: ")
    return str(info.value)


def test_a_file_with_bad_magic_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGML" + bytes(1000))
    message = gguf_error(path)
    assert "GGUF magic bytes" in message


def test_an_empty_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert "GGUF magic bytes" in gguf_error(path)


def test_a_gguf_header_alone(tmp_path: Path) -> None:
    path = tmp_path / "header.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 3))
    assert "the tensor count (8 bytes at byte 8) runs past the end of the 8-byte file" in gguf_error(path)


def test_the_demo_gguf_passes(demo_gguf: Path) -> None:
    check_gguf(demo_gguf)


@pytest.mark.parametrize("keep", [1 << 20, 0.5, 0.999], ids=["first-1MB", "half", "all-but-0.1%"])
def test_a_truncated_gguf_file(demo_gguf: Path, tmp_path: Path, keep: float) -> None:
    count = int(keep) if keep > 1 else int(demo_gguf.stat().st_size * keep)
    path = tmp_path / "cut.gguf"
    with demo_gguf.open("rb") as source:
        path.write_bytes(source.read(count))
    message = gguf_error(path)
    assert "truncated" in message  # the fix says what happened
    assert "cannot be parsed as GGUF" in message or "past the end" in message
