"""Write a safetensors file one tensor (or one block of a tensor) at a time, in memory that does not grow.

``safetensors.torch.save_file`` needs every tensor in memory at once; a checkpoint converted from a GGUF
file or copied around a GPTQ run would then be held whole. The format is a JSON header of names, dtypes,
shapes and byte ranges followed by the raw bytes, so once the shapes are known the bytes can be written as
they are produced. Written by hand because the ``safetensors`` library has no incremental writer.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import ExportError

ITEM_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1, "I8": 1, "BOOL": 1, "U32": 4, "I16": 2}


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of the file to write: its name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return math.prod(self.shape) * ITEM_SIZE[self.dtype]


def write_safetensors(
    path: Path, slots: list[TensorSlot], produce: Callable[[TensorSlot], Iterable[bytes | memoryview]]
) -> None:
    """Write ``slots`` to ``path``; ``produce(slot)`` yields each tensor's bytes in order, in pieces of any size.

    Raises ``ExportError`` when a producer yields more or fewer bytes than its slot's shape needs.
    """
    header: dict[str, object] = {}
    offset = 0
    for slot in slots:
        header[slot.name] = {
            "dtype": slot.dtype,
            "shape": list(slot.shape),
            "data_offsets": [offset, offset + slot.nbytes],
        }
        offset += slot.nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for slot in slots:
            written = 0
            for piece in produce(slot):
                view = memoryview(piece).cast("B")
                handle.write(view)
                written += view.nbytes
            if written != slot.nbytes:
                raise ExportError(f"wrote {written} bytes for the {slot.nbytes}-byte tensor '{slot.name}'", path=path)
