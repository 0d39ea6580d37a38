"""Per-tensor quantization formats: bits, block size, symmetric or with per-block offsets, and a method.

A format is spelled ``int4-b32-asym-weighted``: ``int<bits>``, ``b<block>``, ``sym`` or ``asym``, method. In
the file every block stores a float16 scale (and, asymmetric, a float16 offset); the graph casts them to fp32
once, when onnxruntime folds constants at session start, so MatMulNBits runs exactly as with fp32 scales.
An asymmetric block decodes as ``scale * (code - 2^(bits-1)) + offset``: a float offset, so a block whose
values sit off-centre (a Q4_1 or Q4_K grid, most real weight rows) is represented without an integer zero
point's rounding.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128)
_SCALE_BITS = 16  # float16 scales and offsets in the file
_SPELLING = re.compile(r"^int(?P<bits>\d+)-b(?P<block>\d+)-(?P<kind>sym|asym)-(?P<method>[a-z]+)$")


class QuantMethod(str, enum.Enum):
    """How a tensor's blocks are fitted."""

    RTN = "rtn"
    """Round to nearest from the block's extremes (absmax, or min/max)."""
    SEARCH = "search"
    """Search each block's scale (and offset) for the least squared error."""
    WEIGHTED = "weighted"
    """The same search, each input channel's error weighted by its calibration activations' mean square."""


@dataclass(frozen=True, order=True)
class TensorFormat:
    """How one weight matrix is stored: ``bits`` codes in blocks of ``block_size`` along its input axis."""

    bits: int = 4
    block_size: int = 32
    asymmetric: bool = False
    method: QuantMethod = QuantMethod.RTN

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, not {self.bits}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size must be one of {BLOCK_SIZES}, not {self.block_size}")
        if not isinstance(self.method, QuantMethod):
            raise ValueError(f"unknown method {self.method!r}")

    @property
    def spelling(self) -> str:
        """``int4-b32-asym-weighted``: the format as targets.yaml, the CLI and the manifest write it."""
        kind = "asym" if self.asymmetric else "sym"
        return f"int{self.bits}-b{self.block_size}-{kind}-{self.method.value}"

    @property
    def bits_per_weight(self) -> float:
        """File bits per weight: the code plus the block's float16 scale (and offset)."""
        per_block = _SCALE_BITS * (2 if self.asymmetric else 1)
        return self.bits + per_block / self.block_size

    def file_bytes(self, rows: int, cols: int) -> int:
        """Bytes this format stores for a [rows, cols] matrix blocked along ``cols`` (padded to whole blocks)."""
        blocks = -(-cols // self.block_size)
        codes = rows * blocks * self.block_size * self.bits // 8
        return codes + rows * blocks * (_SCALE_BITS // 8) * (2 if self.asymmetric else 1)

    def __str__(self) -> str:
        return self.spelling


def parse_format(text: str) -> TensorFormat:
    """``int4-b32-asym-weighted`` -> ``TensorFormat``; ``ValueError`` naming what is wrong otherwise."""
    match = _SPELLING.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"'{text}' is not a format: write int<4|8>-b<16|32|64|128>-<sym|asym>-<rtn|search|weighted>")
    methods = {m.value: m for m in QuantMethod}
    if match["method"] not in methods:
        raise ValueError(f"'{text}': unknown method '{match['method']}' (use one of: {', '.join(methods)})")
    try:
        return TensorFormat(int(match["bits"]), int(match["block"]), match["kind"] == "asym", methods[match["method"]])
    except ValueError as exc:
        raise ValueError(f"'{text}': {exc}") from None


DEFAULT_CANDIDATES: tuple[TensorFormat, ...] = (
    TensorFormat(4, 128, False, QuantMethod.WEIGHTED),
    TensorFormat(4, 64, False, QuantMethod.WEIGHTED),
    TensorFormat(4, 128, True, QuantMethod.WEIGHTED),
    TensorFormat(4, 32, False, QuantMethod.WEIGHTED),
    TensorFormat(4, 64, True, QuantMethod.WEIGHTED),
    TensorFormat(4, 32, True, QuantMethod.WEIGHTED),
    TensorFormat(8, 32, False, QuantMethod.RTN),
)
"""The formats the search chooses among for each linear when calibration statistics exist."""

DATA_FREE_CANDIDATES: tuple[TensorFormat, ...] = tuple(
    TensorFormat(f.bits, f.block_size, f.asymmetric, QuantMethod.SEARCH if f.bits == 4 else f.method)
    for f in DEFAULT_CANDIDATES
)
"""The same formats fitted without activation statistics."""

PROBE_FORMAT = TensorFormat(4, 32, False, QuantMethod.RTN)
"""The format whose loss is measured per tensor group; other formats' losses are scaled from it."""
