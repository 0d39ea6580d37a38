"""A bounds-checked reader of a GGUF file's header, run before ``gguf.GGUFReader`` ever sees the file.

The ``gguf`` package's reader maps the whole file and trusts its counts: a crafted tensor count or string
length makes it allocate without limit or fail with a bare ``IndexError``. This reader walks the header
(magic, version, counts, metadata, tensor infos) with a buffered file handle, checks every count and
length against the bytes that are left before using it, and never reads tensor data. Everything it
refuses is a ``CorruptFileError`` naming the file. The rules follow llama.cpp's ``gguf.cpp``, with a few
stricter ones (zero dimensions, alignment above 1 MiB, overlapping tensor data) that no real file breaks.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from edgekit.errors import CorruptFileError
from edgekit.safe_io import open_regular

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME = 63  # GGML_MAX_NAME is 64 bytes with the terminating NUL
MAX_KEY = 65535  # the GGUF specification's limit on a key's length
MAX_ALIGNMENT = 1 << 20  # llama.cpp takes any power of two; real files use 32
DEFAULT_ALIGNMENT = 32
KEPT_STRING = 4096  # longer string values are skipped, not read
# Real files hold tens of keys (a vocabulary is one array) and at most a few thousand tensors (experts are
# stored merged); these caps keep a crafted file's Python objects far below 1 GiB.
MAX_KEYS = 1 << 16
MAX_TENSORS = 1 << 16
# The gguf package's reader makes Python objects of every array element (hundreds of bytes each): a
# vocabulary's arrays hold about a million at most, and a real file's weights are far larger than they are.
MIN_ARRAY_BUDGET = 1 << 20
ARRAY_ELEMENTS_PER_FILE_BYTE = 1 / 64
FIX = "download or copy the GGUF file again; it is truncated or not a GGUF file"

# Value types: (struct format, byte size) of the fixed-size ones; 8 is a string, 9 an array.
_SCALARS = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}  # fmt: skip
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MIN_KV = 8 + 4 + 1  # key length, value type, the smallest value
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as the header declares it; ``offset`` is absolute (from the start of the file)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int
    n_bytes: int


@dataclass
class GGUFHeader:
    """What a GGUF file's header holds: version, scalar and short string metadata, tensors, layout."""

    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    """Scalars and strings up to 4 KiB by key; arrays and longer strings map to ``None``."""
    tensors: list[GGUFTensor] = field(default_factory=list)
    alignment: int = DEFAULT_ALIGNMENT
    data_offset: int = 0


class _Cursor:
    """Reads from a file handle, refusing any read or skip that would pass the end of the file."""

    def __init__(self, handle: IO[bytes], size: int, path: Path) -> None:
        self.handle, self.size, self.path, self.pos = handle, size, path, 0
        self.array_elements = 0

    def fail(self, problem: str) -> CorruptFileError:
        return CorruptFileError(problem, path=self.path, fix=FIX)

    def need(self, count: int, what: str) -> None:
        if count > self.size - self.pos:
            raise self.fail(f"{what} ({count} bytes at byte {self.pos}) runs past the end of the {self.size}-byte file")

    def read(self, count: int, what: str) -> bytes:
        self.need(count, what)
        data = self.handle.read(count)
        self.pos += count
        return data

    def skip(self, count: int, what: str) -> None:
        self.need(count, what)
        self.handle.seek(count, 1)
        self.pos += count

    def skip_strings(self, count: int, what: str) -> None:
        """Skip ``count`` length-prefixed strings, reading the file a block at a time (a vocabulary is
        hundreds of thousands of strings; one read per string would dominate)."""
        self.need(count * 8, what)
        base, cursor, data = self.pos, 0, b""
        for _ in range(count):
            if cursor + 8 > len(data):
                base, cursor = base + cursor, 0
                self.handle.seek(base)
                data = self.handle.read(1 << 20)
                if len(data) < 8:
                    raise self.fail(f"{what} runs past the end of the {self.size}-byte file")
            (length,) = struct.unpack_from("<Q", data, cursor)
            cursor += 8 + length
            if base + cursor > self.size:
                raise self.fail(f"a string of {length} bytes in {what} runs past the end of the {self.size}-byte file")
        self.pos = base + cursor
        self.handle.seek(self.pos)

    def unpack(self, fmt: str, count: int, what: str) -> Any:
        return struct.unpack(fmt, self.read(count, what))[0]

    def u32(self, what: str) -> int:
        return int(self.unpack("<I", 4, what))

    def u64(self, what: str) -> int:
        return int(self.unpack("<Q", 8, what))

    def text(self, what: str, limit: int) -> str:
        length = self.u64(f"the length of {what}")
        if length > limit:
            raise self.fail(f"{what} is {length} bytes long, more than the {limit} allowed")
        try:
            return self.read(length, what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse and check a GGUF file's header without reading tensor data; ``CorruptFileError`` if malformed.

    Checks: magic and version; tensor and key counts against the file size; every string length against
    the bytes left; known value types and no nested arrays; metadata arrays of at most max(2^20, file bytes
    / 64) elements in all; no duplicate keys or tensor names;
    ``general.alignment`` a uint32 power of two up to 1 MiB; at most 4 dimensions per tensor, each above
    zero; a known ggml type whose block size divides the first dimension; each tensor's data aligned,
    inside the file, and not overlapping another's.
    """
    with open_regular(path, CorruptFileError, FIX, buffering=1 << 20) as handle:
        size = os.fstat(handle.fileno()).st_size
        cursor = _Cursor(handle, size, path)
        if size < 4 or cursor.read(4, "the magic") != GGUF_MAGIC:
            raise cursor.fail("does not start with the GGUF magic bytes")
        header = GGUFHeader(version=_read_version(cursor))
        tensor_count = cursor.u64("the tensor count")
        kv_count = cursor.u64("the metadata key count")
        room = size - cursor.pos
        if tensor_count > MAX_TENSORS or kv_count > MAX_KEYS:
            raise cursor.fail(
                f"declares {tensor_count} tensors and {kv_count} metadata keys; edgekit reads at most "
                f"{MAX_TENSORS} tensors and {MAX_KEYS} keys"
            )
        if tensor_count * _MIN_TENSOR_INFO + kv_count * _MIN_KV > room:
            raise cursor.fail(
                f"declares {tensor_count} tensors and {kv_count} metadata keys, more than the "
                f"{room} bytes after the header can hold"
            )
        for _ in range(kv_count):
            _read_kv(cursor, header.metadata)
        header.alignment = _alignment(cursor, header.metadata)
        infos = [_read_tensor_info(cursor) for _ in range(tensor_count)]
        header.data_offset = -(-cursor.pos // header.alignment) * header.alignment
    header.tensors = _place_tensors(cursor, infos, header.data_offset, header.alignment)
    return header


def _read_version(cursor: _Cursor) -> int:
    version = cursor.u32("the version")
    if version & 0xFFFF == 0 and version != 0:
        raise cursor.fail("is a big-endian GGUF file, which edgekit does not read")
    if version not in SUPPORTED_VERSIONS:
        raise cursor.fail(f"has GGUF version {version}; edgekit reads versions 2 and 3")
    return version


def _read_kv(cursor: _Cursor, metadata: dict[str, Any]) -> None:
    key = cursor.text("a metadata key", MAX_KEY)
    if key in metadata:
        raise cursor.fail(f"has the metadata key '{key}' twice")
    value_type = cursor.u32(f"the type of '{key}'")
    metadata[key] = _read_value(cursor, value_type, key)


def _read_value(cursor: _Cursor, value_type: int, key: str) -> Any:
    if value_type in _SCALARS:
        fmt, width = _SCALARS[value_type]
        return cursor.unpack(fmt, width, f"the value of '{key}'")
    if value_type == _STRING:
        length = cursor.u64(f"the length of the value of '{key}'")
        if length > KEPT_STRING:
            cursor.skip(length, f"the value of '{key}'")
            return None
        try:
            return cursor.read(length, f"the value of '{key}'").decode("utf-8")
        except UnicodeDecodeError:
            raise cursor.fail(f"the value of '{key}' is not UTF-8") from None
    if value_type == _ARRAY:
        element_type = cursor.u32(f"the element type of '{key}'")
        count = cursor.u64(f"the length of '{key}'")
        if element_type == _ARRAY:
            raise cursor.fail(f"the metadata key '{key}' holds nested arrays, which GGUF readers refuse")
        if element_type != _STRING and element_type not in _SCALARS:
            raise cursor.fail(f"the array '{key}' has unknown element type {element_type}")
        width = 8 if element_type == _STRING else _SCALARS[element_type][1]  # a string's length, at least
        cursor.need(count * width, f"the array '{key}'")
        cursor.array_elements += count
        budget = max(MIN_ARRAY_BUDGET, int(cursor.size * ARRAY_ELEMENTS_PER_FILE_BYTE))
        if cursor.array_elements > budget:  # before walking the array: a string array is walked element by element
            raise cursor.fail(
                f"its metadata arrays hold over {budget:,} elements (at '{key}'), more than a "
                f"{cursor.size:,}-byte model file's vocabulary can have"
            )
        if element_type == _STRING:
            cursor.skip_strings(count, f"the array '{key}' of {count} strings")
        else:
            cursor.skip(count * width, f"the array '{key}'")
        return None
    raise cursor.fail(f"the metadata key '{key}' has unknown value type {value_type}")


def _alignment(cursor: _Cursor, metadata: dict[str, Any]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value = metadata["general.alignment"]
    if not isinstance(value, int) or isinstance(value, bool):
        raise cursor.fail("general.alignment is not an integer")
    if value <= 0 or value & (value - 1) or value > MAX_ALIGNMENT:
        raise cursor.fail(f"general.alignment is {value}; it must be a power of two up to {MAX_ALIGNMENT}")
    return value


def _read_tensor_info(cursor: _Cursor) -> tuple[str, tuple[int, ...], int, int]:
    name = cursor.text("a tensor name", MAX_TENSOR_NAME)
    n_dims = cursor.u32(f"the dimension count of tensor '{name}'")
    if n_dims > MAX_DIMS:
        raise cursor.fail(f"tensor '{name}' declares {n_dims} dimensions; GGUF allows at most {MAX_DIMS}")
    shape = tuple(cursor.u64(f"a dimension of tensor '{name}'") for _ in range(n_dims))
    if any(dim == 0 for dim in shape):
        raise cursor.fail(f"tensor '{name}' has a zero dimension in its shape {list(shape)}")
    ggml_type = cursor.u32(f"the type of tensor '{name}'")
    offset = cursor.u64(f"the data offset of tensor '{name}'")
    return name, shape, ggml_type, offset


def _place_tensors(
    cursor: _Cursor, infos: list[tuple[str, tuple[int, ...], int, int]], data_offset: int, alignment: int
) -> list[GGUFTensor]:
    """Check each tensor's type, byte size and position against the file; return them with absolute offsets."""
    quant_sizes = _quant_sizes()
    available = cursor.size - data_offset
    tensors: list[GGUFTensor] = []
    names: set[str] = set()
    for name, shape, ggml_type, offset in infos:
        if name in names:
            raise cursor.fail(f"has two tensors named '{name}'")
        names.add(name)
        if ggml_type not in quant_sizes:
            raise cursor.fail(f"tensor '{name}' has unknown ggml type {ggml_type}")
        block, type_size = quant_sizes[ggml_type]
        # Python integers do not overflow: a crafted shape cannot wrap around to a small byte count.
        elements = math.prod(shape)
        first = shape[0] if shape else 1
        if first % block:
            raise cursor.fail(f"tensor '{name}' has a first dimension of {first}, not a multiple of {block}")
        n_bytes = elements // block * type_size
        if offset % alignment:
            raise cursor.fail(f"tensor '{name}' has data offset {offset}, not a multiple of {alignment}")
        if offset > available or n_bytes > available - offset:
            raise cursor.fail(
                f"tensor '{name}' of shape {list(shape)} needs {n_bytes} bytes at data offset {offset}, "
                f"past the end of the {cursor.size}-byte file"
            )
        tensors.append(GGUFTensor(name, shape, ggml_type, data_offset + offset, n_bytes))
    end = 0
    for tensor in sorted(tensors, key=lambda t: t.offset):
        if tensor.offset < end:
            raise cursor.fail(f"tensor '{tensor.name}' overlaps the data of the tensor before it")
        end = tensor.offset + tensor.n_bytes
    return tensors


def _quant_sizes() -> dict[int, tuple[int, int]]:
    """ggml type number -> (elements per block, bytes per block), from the ``gguf`` package's table."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(kind): (int(block), int(size)) for kind, (block, size) in GGML_QUANT_SIZES.items()}


def gguf_weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape as the Hugging Face model has it ([out, in]), under a Hugging Face-like name.

    Enough for estimating a build's memory and disk before any tensor is read: ``token_embd`` is the
    embedding, ``output`` the LM head and ``blk.N.*`` decoder layer N (``model.layers.N.*``).
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for tensor in read_gguf_header(path).tensors:
        name = tensor.name
        if name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif name == "output.weight":
            name = "lm_head.weight"
        elif name.startswith("blk."):
            name = "model.layers." + name[len("blk.") :]
        shapes[name] = tuple(reversed(tensor.shape))  # GGUF lists the fastest-varying dimension first
    return shapes
