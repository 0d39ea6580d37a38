"""Blockwise quantization of one weight matrix into a ``TensorFormat``: codes, scales and offsets.

Layout (onnxruntime's MatMulNBits): the matrix is [N, K] (output rows, input columns), blocked along K.
Symmetric blocks decode as ``scale * (code - 2^(bits-1))``, the scale chosen so that the value of largest
magnitude maps to ``-2^(bits-1)`` (MLAS's rule, which onnxruntime's own quantizer uses). Asymmetric
blocks add an offset, ``scale * (code - 2^(bits-1)) + offset``: fitted as a minimum and a scale, then the
offset rounded to its row's grid (``offset_digits``) and the codes chosen again; zero-point blocks decode
as ``scale * (code - zero_point)``, the zero point an integer code. Scales are rounded to float16 (what the
file stores) before the codes are chosen, so the codes fit the values the graph will use.

The searches fit each block by least squares, optionally weighting each input column by the mean square of
the activations it multiplies (``importance``: the diagonal of XᵀX, llama.cpp's "imatrix"): a column that
carries large activations contributes more output error per unit of weight error. Torch runs the arithmetic
(threaded, vectorised over all blocks at once); rows are processed in chunks to bound memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from edgekit.quant import offset_digits
from edgekit.quant.formats import QuantMethod, TensorFormat

_ROWS_PER_CHUNK = 4096
_SYM_GRID = np.linspace(0.75, 1.05, 13)  # scale factors tried around the absmax scale (1.0 is RTN)
_ASYM_STEPS = 16  # llama.cpp's make_qkx2_quants tries ~20 inverse scales around (levels / range)
_ASYM_DELTA = 0.1


@dataclass
class QuantizedMatrix:
    """Codes [N, K_padded] (one uint8 per weight, unpacked), float16 scales [N, blocks], and for an asymmetric
    format its offsets (integer levels [N, blocks] on float16 steps [N], see ``offset_digits``), for a
    zero-point format its zero points [N, blocks] (uint8, unpacked)."""

    fmt: TensorFormat
    codes: np.ndarray
    scales: np.ndarray
    offset_levels: np.ndarray | None
    offset_steps: np.ndarray | None
    cols: int
    """K before padding to whole blocks."""
    zero_points: np.ndarray | None = None

    @property
    def columns(self) -> int:
        """Columns of the stored matrix: K padded to whole blocks, then an asymmetric matrix's offset columns."""
        return self.fmt.stored_columns(self.cols)

    def offsets(self) -> np.ndarray | None:
        """Each block's offset [N, blocks] (fp32), or None for a format without."""
        if self.offset_levels is None or self.offset_steps is None:
            return None
        return self.offset_levels.astype(np.float32) * self.offset_steps.astype(np.float32)[:, None]

    def dequantize(self) -> np.ndarray:
        """The fp32 matrix [N, K] the graph computes with."""
        offsets = self.offsets()
        return _decode(
            torch.from_numpy(self.codes),
            torch.from_numpy(self.scales.astype(np.float32)),
            None if offsets is None else torch.from_numpy(offsets),
            self.fmt,
            None if self.zero_points is None else torch.from_numpy(self.zero_points.astype(np.float32)),
        ).numpy()[:, : self.cols]

    def packed_codes(self) -> np.ndarray:
        """Codes as MatMulNBits stores them: [N, blocks, block_size * bits / 8], two 4-bit codes per byte.
        An asymmetric matrix's offset columns follow its weights' (``offset_digits``)."""
        codes = self.codes
        if self.offset_levels is not None:
            codes = np.concatenate(
                [codes, offset_digits.digit_codes(self.offset_levels, self.fmt.bits, self.fmt.block_size)], 1
            )
        rows = codes.shape[0]
        blocks = codes.reshape(rows, -1, self.fmt.block_size)
        if self.fmt.bits == 8:
            return np.ascontiguousarray(blocks)
        return np.ascontiguousarray(blocks[..., 0::2] | (blocks[..., 1::2] << 4)).astype(np.uint8)

    def packed_scales(self) -> np.ndarray:
        """Scales as MatMulNBits reads them, [N, blocks], float16; an asymmetric matrix's offset columns' follow."""
        if self.offset_steps is None:
            return self.scales
        blocks = self.scales.shape[1]
        extra = offset_digits.digit_scales(self.offset_steps, self.fmt.bits, self.fmt.block_size, blocks)
        return np.concatenate([self.scales, extra.astype(np.float16)], 1)

    def packed_zero_points(self) -> np.ndarray:
        """Zero points as MatMulNBits stores them: [N, ceil(blocks * bits / 8)], two 4-bit points per byte
        (the first block in the low half), padded with the default point."""
        assert self.zero_points is not None
        if self.fmt.bits == 8:
            return np.ascontiguousarray(self.zero_points)
        rows, blocks = self.zero_points.shape
        padded = np.full((rows, blocks + blocks % 2), 2 ** (self.fmt.bits - 1), dtype=np.uint8)
        padded[:, :blocks] = self.zero_points
        return np.ascontiguousarray(padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)


def quantize_matrix(weight: np.ndarray, fmt: TensorFormat, importance: np.ndarray | None = None) -> QuantizedMatrix:
    """Quantize ``weight`` [N, K] into ``fmt``; ``importance`` [K] weights the searches' error per column.

    A GPTQ format gets its grid here (the weighted search's); ``gptq_grid.quantize_linear`` then solves its
    codes."""
    rows, cols = weight.shape
    padded = -(-cols // fmt.block_size) * fmt.block_size
    w = torch.zeros((rows, padded), dtype=torch.float32)
    w[:, :cols] = torch.from_numpy(np.array(weight, dtype=np.float32))  # a copy: the input may be read-only
    imp = torch.ones(padded, dtype=torch.float32)
    if importance is not None and fmt.method in (QuantMethod.WEIGHTED, QuantMethod.GPTQ):
        imp[:cols] = torch.from_numpy(_regularised(importance))
    imp[cols:] = 0.0
    codes = np.empty((rows, padded), dtype=np.uint8)
    blocks = padded // fmt.block_size
    scales = np.empty((rows, blocks), dtype=np.float16)
    offset_levels = np.empty((rows, blocks), dtype=np.int16) if fmt.offsets else None
    offset_steps = np.empty(rows, dtype=np.float16) if fmt.offsets else None
    zero_points = np.empty((rows, blocks), dtype=np.uint8) if fmt.zero_point else None
    for start in range(0, rows, _ROWS_PER_CHUNK):
        chunk = w[start : start + _ROWS_PER_CHUNK].reshape(-1, blocks, fmt.block_size)
        weights = imp.reshape(1, blocks, fmt.block_size).expand_as(chunk)
        if fmt.zero_point:
            c, s, z = _fit_zero_point(chunk, weights, fmt)
            assert zero_points is not None
            zero_points[start : start + len(chunk)] = z.numpy()
        elif fmt.asymmetric:
            c, s, levels, steps = _fit_offsets(chunk, weights, fmt)
            assert offset_levels is not None and offset_steps is not None
            offset_levels[start : start + len(chunk)] = levels
            offset_steps[start : start + len(chunk)] = steps
        else:
            c, s = _fit_symmetric(chunk, weights, fmt)
        codes[start : start + len(chunk)] = c.reshape(len(chunk), -1).numpy()
        scales[start : start + len(chunk)] = s.numpy()
    return QuantizedMatrix(fmt, codes, scales, offset_levels, offset_steps, cols, zero_points)


def weighted_error(
    weight: np.ndarray,
    quantized: QuantizedMatrix,
    importance: np.ndarray | None = None,
    hessian: np.ndarray | None = None,
) -> float:
    """sum_nk importance_k * (dequantized - weight)_nk^2: the output error a column-independent model predicts.

    With ``hessian`` (the activations' XᵀX / tokens, [K, K]) the whole quadratic form, sum_n e_n H e_nᵀ: the
    output's mean squared error on the calibration text, the error GPTQ minimizes (its diagonal is
    ``importance``'s model)."""
    diff = torch.from_numpy(quantized.dequantize()) - torch.from_numpy(np.asarray(weight, dtype=np.float32))
    if hessian is not None:  # float32 product (no copy of a float32 XᵀX), summed in float64
        product = diff @ torch.from_numpy(np.asarray(hessian, dtype=np.float32))
        return float((product.double() * diff.double()).sum())
    sq = (diff.double() ** 2).sum(0)
    if importance is not None:
        sq = sq * torch.from_numpy(np.asarray(importance, dtype=np.float64))
    return float(sq.sum())


def _regularised(importance: np.ndarray) -> np.ndarray:
    # A column no calibration token exercised still gets some weight (its error is not free on other text).
    imp = np.asarray(importance, dtype=np.float64)
    floor = 1e-3 * float(imp.mean()) if imp.size and imp.mean() > 0 else 1.0
    return np.maximum(imp, floor).astype(np.float32)


def _half(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def _fit_symmetric(blocks: torch.Tensor, weights: torch.Tensor, fmt: TensorFormat) -> tuple[torch.Tensor, torch.Tensor]:
    half = 2 ** (fmt.bits - 1)
    index = blocks.abs().argmax(-1, keepdim=True)
    peak = torch.gather(blocks, -1, index)[..., 0]
    base = torch.where(peak == 0, torch.ones_like(peak), peak / -half)
    factors = [1.0] if fmt.method is QuantMethod.RTN else list(_SYM_GRID)
    best_err = torch.full(base.shape, float("inf"))
    best_scale = _half(base)
    for factor in factors:
        for scale in _sym_candidates(blocks, weights, _half(base * factor), half, refit=factor != 1.0):
            err = _sym_error(blocks, weights, scale, half)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
    codes = _sym_codes(blocks, best_scale, half)
    return codes, best_scale.to(torch.float16)


def _sym_candidates(
    blocks: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor, half: int, refit: bool
) -> list[torch.Tensor]:
    """The scale itself and, for the searches, its least-squares refit for the codes it gives."""
    if not refit:
        return [scale]
    q = _sym_codes(blocks, scale, half).to(torch.float32) - half
    num = (weights * q * blocks).sum(-1)
    den = (weights * q * q).sum(-1)
    fitted = torch.where(den > 0, num / den.clamp_min(1e-30), scale)
    fitted = torch.where(fitted == 0, scale, fitted)
    return [scale, _half(fitted)]


def _sym_codes(blocks: torch.Tensor, scale: torch.Tensor, half: int) -> torch.Tensor:
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.round(blocks / safe[..., None]) + half).clamp(0, 2 * half - 1).to(torch.uint8)


def _sym_error(blocks: torch.Tensor, weights: torch.Tensor, scale: torch.Tensor, half: int) -> torch.Tensor:
    decoded = (_sym_codes(blocks, scale, half).to(torch.float32) - half) * scale[..., None]
    return (weights * (decoded - blocks) ** 2).sum(-1)


def _fit_asymmetric(
    blocks: torch.Tensor, weights: torch.Tensor, fmt: TensorFormat
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's float16 (scale, minimum): the least weighted error of the starts tried."""
    levels = 2**fmt.bits - 1
    low, high = blocks.min(-1).values, blocks.max(-1).values
    span = (high - low).clamp_min(1e-30)
    rtn_scale = _half(torch.where(high > low, span / levels, torch.ones_like(span)))
    best = (_half(low), rtn_scale)
    best_err = _asym_error(blocks, weights, *best, levels)
    if fmt.method is not QuantMethod.RTN:
        for minimum, scale in _search_starts(blocks, weights, low, span, rtn_scale, levels):
            err = _asym_error(blocks, weights, minimum, scale, levels)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = (torch.where(better, minimum, best[0]), torch.where(better, scale, best[1]))
    minimum, scale = best
    return scale.to(torch.float16), minimum.to(torch.float16)


def _fit_offsets(
    blocks: torch.Tensor, weights: torch.Tensor, fmt: TensorFormat
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """The asymmetric fit, each block's offset (the default zero point's value) rounded to its row's grid
    (``offset_digits``), and the codes chosen again for the rounded offsets."""
    levels_count = 2**fmt.bits - 1
    half = 2 ** (fmt.bits - 1)
    scale, minimum = _fit_asymmetric(blocks, weights, fmt)
    # A constant block (a zero row, a pruned block) is its offset alone: its fallback scale of 1 would put
    # the offset 2^(bits-1) away from its value and stretch its whole row's grid.
    constant = blocks.amax(-1) == blocks.amin(-1)
    scale = torch.where(constant, torch.zeros_like(scale), scale)
    scale32 = scale.to(torch.float32)
    offsets = torch.where(constant, blocks[..., 0], minimum.to(torch.float32) + scale32 * half)
    levels, steps = offset_digits.round_offsets(offsets.numpy(), fmt.bits)
    rounded = torch.from_numpy(levels.astype(np.float32) * steps.astype(np.float32)[:, None])
    codes = _asym_codes(blocks, rounded - scale32 * half, scale32, levels_count)
    return codes, scale, levels, steps


def _fit_zero_point(
    blocks: torch.Tensor, weights: torch.Tensor, fmt: TensorFormat
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per block, the least weighted error of the starts tried.

    Codes run from 0 to ``2^bits - 1`` and the zero point is one of them, so a block's grid always holds 0:
    every start spans the block's values and zero (onnxruntime's quantizers' rule), or a block of one sign
    would clip at its zero point. The searches also try the asymmetric fit's starts (the minimum rounded to
    a whole code) and refit each start's scale by least squares for its zero point.
    """
    levels = 2**fmt.bits - 1
    low = blocks.min(-1).values.clamp(max=0.0)
    high = blocks.max(-1).values.clamp(min=0.0)
    span = high - low
    rtn_scale = _half(torch.where(span > 0, span / levels, torch.ones_like(span)))
    rtn_scale = torch.where(rtn_scale > 0, rtn_scale, torch.ones_like(rtn_scale))  # under fp16's least step
    starts = [(low, rtn_scale)]
    if fmt.method is not QuantMethod.RTN:
        starts += _search_starts(blocks, weights, low, span.clamp_min(1e-30), rtn_scale, levels)
    best_err = torch.full(low.shape, float("inf"))
    best_scale, best_zero = rtn_scale, torch.zeros_like(low)
    for minimum, scale in starts:
        scale = torch.where(scale > 0, scale, rtn_scale)
        zero = torch.round(-minimum / scale).clamp(0, levels)
        candidates = [scale]
        if fmt.method is not QuantMethod.RTN:
            q = _zp_codes(blocks, scale, zero, levels) - zero[..., None]
            num, den = (weights * q * blocks).sum(-1), (weights * q * q).sum(-1)
            fitted = _half(torch.where(den > 0, num / den.clamp_min(1e-30), scale))
            candidates.append(torch.where(fitted > 0, fitted, scale))
        for candidate in candidates:
            decoded = (_zp_codes(blocks, candidate, zero, levels) - zero[..., None]) * candidate[..., None]
            err = (weights * (decoded - blocks) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, candidate, best_scale)
            best_zero = torch.where(better, zero, best_zero)
    codes = _zp_codes(blocks, best_scale, best_zero, levels).to(torch.uint8)
    return codes, best_scale.to(torch.float16), best_zero.to(torch.uint8)


def _search_starts(
    blocks: torch.Tensor,
    weights: torch.Tensor,
    low: torch.Tensor,
    span: torch.Tensor,
    fallback: torch.Tensor,
    levels: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """llama.cpp's make_qkx2_quants: (minimum, scale) for inverse scales around levels/span from ``low``,
    each refit by weighted least squares."""
    starts = []
    for step in range(_ASYM_STEPS + 1):
        inverse = (levels - 1.0 + _ASYM_DELTA * step) / span
        codes = torch.round((blocks - low[..., None]) * inverse[..., None]).clamp(0, levels)
        starts.append(_least_squares(blocks, weights, codes, low, fallback))
    return starts


def _zp_codes(blocks: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.round(blocks / safe[..., None]) + zero[..., None]).clamp(0, levels)


def _least_squares(
    blocks: torch.Tensor, weights: torch.Tensor, codes: torch.Tensor, low: torch.Tensor, fallback: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares (minimum, scale) for fixed codes, rounded to float16."""
    sw = weights.sum(-1)
    sq, sx = (weights * codes).sum(-1), (weights * blocks).sum(-1)
    sqq, sqx = (weights * codes * codes).sum(-1), (weights * codes * blocks).sum(-1)
    det = sqq * sw - sq * sq
    ok = det.abs() > 1e-20 * (sqq * sw).clamp_min(1e-30)
    scale = torch.where(ok, (sw * sqx - sq * sx) / torch.where(ok, det, torch.ones_like(det)), fallback)
    minimum = torch.where(ok, (sqq * sx - sq * sqx) / torch.where(ok, det, torch.ones_like(det)), low)
    scale = torch.where(scale > 0, scale, fallback)
    return _half(minimum), _half(scale)


def _asym_codes(blocks: torch.Tensor, minimum: torch.Tensor, scale: torch.Tensor, levels: int) -> torch.Tensor:
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.round((blocks - minimum[..., None]) / safe[..., None]).clamp(0, levels).to(torch.uint8)


def _asym_error(
    blocks: torch.Tensor, weights: torch.Tensor, minimum: torch.Tensor, scale: torch.Tensor, levels: int
) -> torch.Tensor:
    decoded = _asym_codes(blocks, minimum, scale, levels).to(torch.float32) * scale[..., None] + minimum[..., None]
    return (weights * (decoded - blocks) ** 2).sum(-1)


def _decode(
    codes: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None,
    fmt: TensorFormat,
    zero_points: torch.Tensor | None = None,
) -> torch.Tensor:
    rows = codes.shape[0]
    q = codes.reshape(rows, -1, fmt.block_size).to(torch.float32)
    if zero_points is not None:
        values = (q - zero_points[..., None]) * scales[..., None]
    elif offsets is None:
        values = (q - 2 ** (fmt.bits - 1)) * scales[..., None]
    else:
        values = (q - 2 ** (fmt.bits - 1)) * scales[..., None] + offsets[..., None]
    return values.reshape(rows, -1)
