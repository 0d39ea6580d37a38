"""Read a safetensors checkpoint one tensor (or one block of rows) at a time, in memory that does not grow.

The whole-model path hands the builder a fully loaded PyTorch model; a 9B checkpoint does not fit that way
on a small machine. ``CheckpointReader`` indexes the shards' headers once, then reads each tensor's bytes
with ``os.pread`` straight into the tensor's own buffer: no copy of a shard is ever resident, and nothing is
memory-mapped, so the process's RSS holds only the tensors a caller keeps (pages of a memory-mapped shard
would count towards RSS for as long as the map lives). Rows of a 2-D tensor can be read in blocks, which is
how an embedding table or LM head of a billion values is converted in a few hundred MB.

This is the reader a layer-by-layer consumer (streamed export, GPTQ from disk) uses: ``tensor(name)``,
``rows(name, start, stop)`` and ``iter_tensors(prefix)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgekit.errors import CorruptFileError, SourceError
from edgekit.sources.weight_files import read_safetensors_header

if TYPE_CHECKING:
    import torch

_TORCH_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
    "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64", "F64": "float64",
    "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn",
}  # fmt: skip


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes are: shard file, absolute byte offset, dtype and shape."""

    path: Path
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        """Bytes per element."""
        return self.nbytes // max(1, math.prod(self.shape))


class CheckpointReader:
    """Tensor-at-a-time access to the ``*.safetensors`` shards of a Hugging Face folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        shards = sorted(folder.glob("*.safetensors"))
        if not shards:
            raise SourceError("no weight files (*.safetensors) in this folder", path=folder)
        self._index: dict[str, TensorLocation] = {}
        for shard in shards:
            shard = shard.resolve()
            # The checked header's offsets, not a second read: the file could change in between.
            for info in read_safetensors_header(shard):
                self._index[info.name] = TensorLocation(shard, info.offset, info.nbytes, info.dtype, info.shape)

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint, sorted."""
        return sorted(self._index)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def location(self, name: str) -> TensorLocation:
        """The shard, offset, dtype and shape of ``name``; an error naming the folder when it is absent."""
        try:
            return self._index[name]
        except KeyError:
            raise CorruptFileError(
                f"the checkpoint has no tensor '{name}'",
                path=self.folder,
                fix="the safetensors shards do not match config.json; download the checkpoint again",
            ) from None

    def tensor(self, name: str) -> torch.Tensor:
        """The whole tensor ``name``, in its stored dtype, read into memory of its own."""
        location = self.location(name)
        rows = location.shape[0] if location.shape else 1
        return self._read(location, 0, rows)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` (along the first axis) of tensor ``name``, read without the rest."""
        location = self.location(name)
        if not location.shape or not 0 <= start <= stop <= location.shape[0]:
            raise ValueError(f"rows {start}:{stop} out of range for '{name}' of shape {location.shape}")
        return self._read(location, start, stop)

    def iter_tensors(self, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` for every tensor whose name starts with ``prefix``, one at a time, by shard order."""
        selected = [n for n in self._index if n.startswith(prefix)]
        for name in sorted(selected, key=lambda n: (str(self._index[n].path), self._index[n].offset)):
            yield name, self.tensor(name)

    def _read(self, location: TensorLocation, start: int, stop: int) -> torch.Tensor:
        import torch

        row_elems = math.prod(location.shape[1:]) if location.shape else 1
        row_bytes = row_elems * location.itemsize
        nbytes = (stop - start) * row_bytes
        shape = ((stop - start), *location.shape[1:]) if location.shape else ()
        dtype = getattr(torch, _TORCH_DTYPES[location.dtype])
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buffer.numpy().data)
        fd = os.open(location.path, os.O_RDONLY)
        try:
            done, offset = 0, location.offset + start * row_bytes
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise CorruptFileError("ends inside a tensor", path=location.path)
                done += got
        finally:
            os.close(fd)
        return buffer.view(dtype).reshape(shape)
