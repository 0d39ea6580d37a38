"""Cheap structural checks of weight files, done before any library is allowed to read them.

A truncated or crafted file must give a typed error that names it, quickly and in little memory, instead
of a crash deep inside a loader. These checks read headers only, never tensor data.
"""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgekit.errors import CorruptFileError
from edgekit.safe_io import open_regular, require_regular, strict_json_loads
from edgekit.sources.gguf_header import FIX as GGUF_FIX
from edgekit.sources.gguf_header import GGUFHeader, read_gguf_header

# safetensors' own loader caps the header at 100 MB; a real header is a few hundred KB (about 120 bytes per
# tensor). Tiny JSON entries take about ten times their size as Python objects, so edgekit's cap is lower:
# 16 MiB, some 130,000 tensors in one file.
MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
_FIX_REDOWNLOAD = "download or copy the file again; it is truncated or not a safetensors file"


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of one tensor as a weight file's header declares it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = field(default=0, compare=False)
    """Where the tensor's bytes start in the file (header included); 0 where unknown."""
    nbytes: int = field(default=0, compare=False)
    """How many bytes it takes there."""


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Validate a safetensors file's header against its size and return its tensors.

    Checks the declared header length, that the header is a JSON object, its ``__metadata__`` (strings to
    strings), each tensor's dtype, that its byte range matches its shape, and that the ranges tile the data
    section exactly (no overlap, no gap, no truncation).
    """
    with open_regular(path, CorruptFileError, _FIX_REDOWNLOAD) as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(8)
        if len(head) < 8:
            raise CorruptFileError("shorter than a safetensors header", path=path, fix=_FIX_REDOWNLOAD)
        (header_len,) = struct.unpack("<Q", head)
        if header_len > MAX_SAFETENSORS_HEADER or 8 + header_len > size:
            raise CorruptFileError(
                f"declares a {header_len}-byte header in a {size}-byte file", path=path, fix=_FIX_REDOWNLOAD
            )
        raw = handle.read(header_len)
    try:
        header = strict_json_loads(raw)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise CorruptFileError(f"header is not JSON ({exc})", path=path, fix=_FIX_REDOWNLOAD) from None
    except (RecursionError, MemoryError):  # a crafted header nested thousands deep or made of tiny items
        raise CorruptFileError(
            "header is nested too deeply or too large to parse", path=path, fix=_FIX_REDOWNLOAD
        ) from None
    if not isinstance(header, dict):
        raise CorruptFileError("header is not a JSON object", path=path, fix=_FIX_REDOWNLOAD)
    data_size = size - 8 - header_len
    tensors: list[TensorInfo] = []
    ranges: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            _check_metadata(path, entry)
            continue
        info, begin, end = _parse_tensor_entry(path, name, entry)
        tensors.append(replace(info, offset=8 + header_len + begin, nbytes=end - begin))
        ranges.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(ranges):
        if begin != position:
            problem = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise CorruptFileError(f"tensor '{name}' {problem}", path=path, fix=_FIX_REDOWNLOAD)
        position = end
    if position != data_size:
        raise CorruptFileError(
            f"tensors need {position} bytes of data but the file holds {data_size}",
            path=path,
            fix=_FIX_REDOWNLOAD,
        )
    return tensors


def tensor_infos(paths: list[Path]) -> list[TensorInfo]:
    """Every tensor the headers of the given safetensors files declare (each header checked)."""
    return [info for path in paths for info in read_safetensors_header(path.resolve())]


def parameter_count(paths: list[Path]) -> int:
    """Total number of tensor elements declared in the headers of the given safetensors files."""
    return element_count(tensor_infos(paths))


def element_count(infos: list[TensorInfo]) -> int:
    """Total number of elements of these tensors."""
    return sum(math.prod(info.shape) for info in infos)


_LAYER_NAME = re.compile(r"(?:^|\.)layers\.(\d{1,9})\.")  # not int() of a 5,000-digit index
_NOT_DECODER = ("mtp.", "visual.", "vision_tower.", "model.visual.", "model.vision_tower.")


def layer_indices(infos: list[TensorInfo]) -> set[int]:
    """The decoder layer indices these tensors belong to (vision and MTP excluded)."""
    indices = set()
    for info in infos:
        match = _LAYER_NAME.search(info.name)
        if match and not info.name.startswith(_NOT_DECODER):
            indices.add(int(match.group(1)))
    return indices


def embedding_shapes(infos: list[TensorInfo]) -> dict[str, tuple[int, ...]]:
    """The shapes of the decoder's token embeddings (``*embed_tokens.weight``) among these tensors."""
    return {
        info.name: info.shape
        for info in infos
        if info.name.endswith("embed_tokens.weight") and not info.name.startswith(_NOT_DECODER)
    }


def _check_metadata(path: Path, metadata: object) -> None:
    """The safetensors format's ``__metadata__``: null or text keys to text values (what the library reads)."""
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise CorruptFileError(
            "header's __metadata__ is not a map of strings to strings", path=path, fix=_FIX_REDOWNLOAD
        )


def _parse_tensor_entry(path: Path, name: str, entry: object) -> tuple[TensorInfo, int, int]:
    if not isinstance(entry, dict):
        raise CorruptFileError(f"tensor '{name}' has a malformed header entry", path=path, fix=_FIX_REDOWNLOAD)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:  # a list or dict is not even hashable
        raise CorruptFileError(f"tensor '{name}' has unknown dtype {dtype!r}", path=path, fix=_FIX_REDOWNLOAD)
    # Dimensions past 2^63 are refused by the safetensors library itself, once the build loads the file.
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < 1 << 63 for d in shape):
        raise CorruptFileError(f"tensor '{name}' has a malformed shape", path=path, fix=_FIX_REDOWNLOAD)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise CorruptFileError(f"tensor '{name}' has malformed data_offsets", path=path, fix=_FIX_REDOWNLOAD)
    # Python integers do not overflow, so a crafted shape cannot wrap around to a small byte count.
    expected = math.prod(shape) * _DTYPE_BYTES[dtype]
    if expected != offsets[1] - offsets[0]:
        raise CorruptFileError(
            f"tensor '{name}' of shape {shape} needs {expected} bytes but spans {offsets[1] - offsets[0]}",
            path=path,
            fix=_FIX_REDOWNLOAD,
        )
    return TensorInfo(name, dtype, tuple(shape)), offsets[0], offsets[1]


@functools.lru_cache(maxsize=2)
def _gguf_reader(path: str, size: int, mtime_ns: int) -> Any:
    from gguf import GGUFReader

    checked_gguf_header(Path(path))  # the gguf reader trusts the file's counts; check them first
    try:
        return GGUFReader(path)
    except ImportError:
        raise
    except Exception as exc:  # the reader fails with bare IndexError/ValueError on damaged files
        raise CorruptFileError(
            f"cannot be parsed as GGUF ({type(exc).__name__}: {exc})", path=path, fix=GGUF_FIX
        ) from None


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` for ``path``, shared between callers while the file is unchanged.

    The header is checked by ``read_gguf_header`` first, so a crafted file is a ``CorruptFileError``.

    Parsing the metadata of a real file takes seconds (a tokenizer's vocabulary is tens of thousands of
    fields), so the check, the architecture lookup and the import verification read it once.
    """
    stat = path.stat()
    return _gguf_reader(str(path), stat.st_size, stat.st_mtime_ns)


def checked_gguf_header(path: Path) -> GGUFHeader:
    """``read_gguf_header`` of ``path``, shared between callers while the file is unchanged (walking a real
    file's vocabulary takes a noticeable fraction of a second, and the build asks several times)."""
    stat = path.stat()
    return _gguf_header(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _gguf_header(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    return read_gguf_header(Path(path))


def release_gguf_pages(reader: Any) -> None:
    """Drop the pages of ``reader``'s file mapping that reading tensors brought in (they are read again on use).

    A GGUF file is memory-mapped: every tensor read stays resident as file-backed memory, so a whole import
    would show the whole file in the process's RSS (and count against a container's memory limit).
    """
    mapping = getattr(getattr(reader, "data", None), "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError):
            mapping.madvise(mmap.MADV_DONTNEED)


def check_gguf(path: Path) -> None:
    """Check a GGUF file's header with edgekit's bounds-checked reader, then that ``gguf`` opens it.

    ``read_gguf_header`` refuses crafted counts, lengths, shapes and offsets before the ``gguf`` package's
    reader (which trusts them) sees the file.
    """
    size = _file_size(path)
    reader = open_gguf(path)
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise CorruptFileError(
                f"tensor '{tensor.name}' ends at byte {end}, past the end of the {size}-byte file",
                path=path,
                fix=GGUF_FIX,
            )


def _file_size(path: Path) -> int:
    return require_regular(path, CorruptFileError)
