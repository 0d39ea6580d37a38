"""Per-tensor quantization formats: bits, block size, symmetric or asymmetric, and a method.

A format is spelled ``int4-b32-zp-weighted``: ``int<bits>``, ``b<block>``, a kind, the method. In the file
every block stores a float16 scale; the graph casts the scales to fp32 once, when onnxruntime folds constants
at session start, so MatMulNBits runs exactly as with fp32 scales. The kinds:

- ``sym``: ``scale * (code - 2^(bits-1))``, MatMulNBits' default zero point;
- ``zp``: ``scale * (code - zero_point)`` with an integer zero point per block, stored as MatMulNBits'
  own ``zero_points`` input (``bits`` bits per block): an off-centre block at a small cost in the kernel;
- ``asym``: ``scale * (code - 2^(bits-1)) + offset`` with a float offset per block, on an 8-bit grid of
  its row (``offset_digits``): carried as extra input columns of the same MatMulNBits, which multiply the
  activation's block means, so a Q4_1 or Q4_K grid is kept to within half a grid step, at some cost per step
  (the longer rows, and a pooling of each activation).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from edgekit.quant import offset_digits

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128)
_SCALE_BITS = 16  # float16 scales in the file
_SPELLING = re.compile(r"^int(?P<bits>\d+)-b(?P<block>\d+)-(?P<kind>sym|asym|zp)-(?P<method>[a-z]+)$")


class QuantMethod(str, enum.Enum):
    """How a tensor's blocks are fitted."""

    RTN = "rtn"
    """Round to nearest from the block's extremes (absmax, or min/max)."""
    SEARCH = "search"
    """Search each block's scale (and offset) for the least squared error."""
    WEIGHTED = "weighted"
    """The same search, each input channel's error weighted by its calibration activations' mean square."""
    GPTQ = "gptq"
    """The weighted search's grid, then GPTQ's column solve: codes chosen one input column at a time, each
    column's error fed forward through the calibration activations' full XᵀX (``gptq_grid``)."""


@dataclass(frozen=True, order=True)
class TensorFormat:
    """How one weight matrix is stored: ``bits`` codes in blocks of ``block_size`` along its input axis."""

    bits: int = 4
    block_size: int = 32
    asymmetric: bool = False
    method: QuantMethod = QuantMethod.RTN
    zero_point: bool = False
    """Asymmetric with an integer zero point per block (``zp``) rather than a float offset (``asym``)."""

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, not {self.bits}")
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block size must be one of {BLOCK_SIZES}, not {self.block_size}")
        if not isinstance(self.method, QuantMethod):
            raise ValueError(f"unknown method {self.method!r}")
        if self.zero_point and not self.asymmetric:
            raise ValueError("a zero-point format is asymmetric")

    @property
    def offsets(self) -> bool:
        """Whether blocks carry float offsets (as extra input columns, not the kernel's zero points)."""
        return self.asymmetric and not self.zero_point

    @property
    def needs_hessian(self) -> bool:
        """Whether fitting this format needs the calibration activations' full XᵀX (GPTQ), not just its diagonal."""
        return self.method is QuantMethod.GPTQ

    @property
    def kind(self) -> str:
        """``sym``, ``zp`` or ``asym``."""
        return "zp" if self.zero_point else "asym" if self.asymmetric else "sym"

    @property
    def spelling(self) -> str:
        """``int4-b32-asym-weighted``: the format as targets.yaml, the CLI and the manifest write it."""
        return f"int{self.bits}-b{self.block_size}-{self.kind}-{self.method.value}"

    @property
    def bits_per_weight(self) -> float:
        """File bits per weight: the code plus the block's float16 scale (and zero point, or offset: 8 bits on
        its row's grid, before the offset columns are padded to whole blocks)."""
        return self.bits + self._extra_bits_per_block() / self.block_size

    def stored_columns(self, cols: int) -> int:
        """Columns stored for a matrix of ``cols`` inputs: whole blocks, then any offset columns."""
        blocks = -(-cols // self.block_size)
        if not self.offsets:
            return blocks * self.block_size
        return blocks * self.block_size + offset_digits.digits(self.bits) * offset_digits.segment(
            blocks, self.block_size
        )

    def file_bytes(self, rows: int, cols: int) -> int:
        """Bytes this format stores for a [rows, cols] matrix blocked along ``cols`` (padded to whole blocks)."""
        stored = self.stored_columns(cols)
        codes = rows * stored * self.bits // 8
        scales = rows * (stored // self.block_size) * _SCALE_BITS // 8
        if self.zero_point:  # MatMulNBits packs each row's zero points into whole bytes
            return codes + scales + rows * -(-(stored // self.block_size) * self.bits // 8)
        return codes + scales

    def _extra_bits_per_block(self) -> int:
        if self.zero_point:
            return _SCALE_BITS + self.bits
        return _SCALE_BITS + (8 if self.offsets else 0)

    def __str__(self) -> str:
        return self.spelling


def parse_format(text: str) -> TensorFormat:
    """``int4-b32-asym-weighted`` -> ``TensorFormat``; ``ValueError`` naming what is wrong otherwise."""
    match = _SPELLING.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(
            f"'{text}' is not a format: write int<4|8>-b<16|32|64|128>-<sym|zp|asym>-<rtn|search|weighted|gptq>"
        )
    methods = {m.value: m for m in QuantMethod}
    if match["method"] not in methods:
        raise ValueError(f"'{text}': unknown method '{match['method']}' (use one of: {', '.join(methods)})")
    try:
        kind, method = match["kind"], methods[match["method"]]
        return TensorFormat(int(match["bits"]), int(match["block"]), kind != "sym", method, kind == "zp")
    except ValueError as exc:
        raise ValueError(f"'{text}': {exc}") from None


DEFAULT_CANDIDATES: tuple[TensorFormat, ...] = (
    TensorFormat(4, 128, False, QuantMethod.WEIGHTED),
    TensorFormat(4, 64, False, QuantMethod.WEIGHTED),
    TensorFormat(4, 128, True, QuantMethod.WEIGHTED),
    TensorFormat(4, 32, False, QuantMethod.WEIGHTED),
    TensorFormat(4, 64, True, QuantMethod.WEIGHTED),
    TensorFormat(4, 32, True, QuantMethod.WEIGHTED),
    TensorFormat(4, 128, True, QuantMethod.WEIGHTED, zero_point=True),
    TensorFormat(4, 64, True, QuantMethod.WEIGHTED, zero_point=True),
    TensorFormat(4, 32, True, QuantMethod.WEIGHTED, zero_point=True),
    TensorFormat(8, 32, False, QuantMethod.RTN),
)
"""The formats the search chooses among for each linear when calibration statistics exist."""

DATA_FREE_CANDIDATES: tuple[TensorFormat, ...] = tuple(
    TensorFormat(f.bits, f.block_size, f.asymmetric, QuantMethod.SEARCH if f.bits == 4 else f.method, f.zero_point)
    for f in DEFAULT_CANDIDATES
)
"""The same formats fitted without activation statistics."""

PROBE_FORMAT = TensorFormat(4, 32, False, QuantMethod.RTN)
"""The format whose loss is measured per tensor group; other formats' losses are scaled from it."""
