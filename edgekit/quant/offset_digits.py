"""Float block offsets carried as extra input columns of MatMulNBits: an asymmetric linear in one kernel.

An asymmetric block decodes as ``scale * (code - 2^(bits-1)) + offset``. MatMulNBits applies only integer
zero points, and its float zero points take a slow unpacked path, so the offsets ride in the same kernel as
extra columns: ``y = x W_sym^T + sum_b mean_b(x) * block_size * offset_b``. The graph appends each block's
mean to ``x`` (pooled once per activation and shared by the linears that read it) and every weight row holds
its offsets as codes in those columns.

One code of ``bits`` bits is too coarse for an offset, so each offset is ``digits`` codes in as many column
segments, their scales a factor ``2^bits`` apart: a row's offsets lie on a grid of ``steps[row]`` with at
most ``limit`` steps either side of zero (119 for 4-bit codes, two digits; 127 for 8-bit, one digit).
The grid's step is the row's largest offset over ``limit``; an offset is a block's centre, small next to
the weights' spread in trained layers, so its rounding is a small part of a block's error.
"""

from __future__ import annotations

import numpy as np

_FLOAT16_MAX = 65504.0


def digits(bits: int) -> int:
    """Codes per offset: enough ``bits``-bit digits for an 8-bit offset grid."""
    return -(-8 // bits)


def limit(bits: int) -> int:
    """The largest offset level: digits of ``bits`` bits around the default zero point reach it both ways."""
    base, half = 2**bits, 2 ** (bits - 1)
    return (half - 1) * (base ** digits(bits) - 1) // (base - 1)


def round_offsets(offsets: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """``offsets`` [N, blocks] (fp32) on each row's grid: integer levels [N, blocks] and float16 steps [N]."""
    top = limit(bits)
    peak = np.abs(offsets).max(axis=1) if offsets.size else np.zeros(len(offsets), np.float32)
    if not np.all(np.isfinite(peak)) or peak.max(initial=0.0) / top * block_limit(bits) > _FLOAT16_MAX:
        raise ValueError("block offsets beyond what float16 scales can hold: the weights are not a model's")
    steps = (peak / top).astype(np.float16)
    short = steps.astype(np.float32) * top < peak  # rounded down to float16: the largest offset would clip
    steps = np.where(short, np.nextafter(steps, np.float16(np.inf)), steps)
    steps = np.where(steps > 0, steps, np.float16(1.0)).astype(np.float16)  # a row without offsets
    levels = np.clip(np.rint(offsets / steps.astype(np.float32)[:, None]), -top, top).astype(np.int16)
    return levels, steps


def block_limit(bits: int) -> int:
    """The largest factor a digit scale puts on a step: the largest block (128) times the top digit's weight."""
    return 128 * 2 ** (bits * (digits(bits) - 1))


def segment(blocks: int, block_size: int) -> int:
    """Columns of one digit segment: the block means padded to whole blocks."""
    return -(-blocks // block_size) * block_size


def digit_codes(levels: np.ndarray, bits: int, block_size: int) -> np.ndarray:
    """The offset columns' codes [N, digits * segment], most significant digit first; padding decodes to 0."""
    rows, blocks = levels.shape
    base, half, count = 2**bits, 2 ** (bits - 1), digits(bits)
    width = segment(blocks, block_size)
    shifted = levels.astype(np.int64) + half * (base**count - 1) // (base - 1)  # every digit's code, in base 2^bits
    codes = np.full((rows, count * width), half, dtype=np.uint8)
    for index in range(count):
        digit = shifted // base ** (count - 1 - index) % base
        codes[:, index * width : index * width + blocks] = digit
    return codes


def digit_scales(steps: np.ndarray, bits: int, block_size: int, blocks: int) -> np.ndarray:
    """The offset columns' block scales [N, digits * segment / block_size] (fp32): the input is a block mean,
    so a level's weight is ``step * block_size``, times ``2^bits`` per more significant digit."""
    count = digits(bits)
    per_digit = segment(blocks, block_size) // block_size
    unit = steps.astype(np.float32) * block_size
    factors = np.repeat([float(2 ** (bits * (count - 1 - i))) for i in range(count)], per_digit)
    return unit[:, None] * factors[None, :]
