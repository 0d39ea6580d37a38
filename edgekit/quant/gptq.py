"""GPTQ (Frantar et al., 2022) weight quantization on the CPU: the solver (the driver over a decoder is gptq_layers).

The solver follows the reference ``fasterquant``: dead input columns are zeroed, the Hessian is damped by
a fraction of its mean diagonal, its inverse is factored by Cholesky (upper), and columns are quantized in
blocks, each column's rounding error fed back into the columns not yet quantized.

Act-order uses *static groups*: every group's scale and zero point comes from the original weight, one
group per ``group_size`` contiguous input columns in the original order, before any permutation or error
feedback. Columns are then visited in descending ``diag(H)`` order, each rounded with its own group's
parameters. The group of input column ``i`` is therefore ``i // group_size`` and the checkpoint's g_idx is
trivial: onnxruntime's MatMulNBits keeps its prepacked fast path, which it skips when a g_idx is given.

Scales are rounded to float16 when they are chosen, because the GPTQ checkpoint stores them in float16:
codes are computed against the scale the runtime will use, and ``QuantizedWeight.dequantized`` is exactly
the weight the checkpoint represents.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from pydantic import ValidationError
from torch import Tensor

from edgekit.sources.registry import registered_architectures
from edgekit.targets import GPTQ_GROUP_SIZES, GPTQSettings, describe_validation_error

Progress = Callable[[str], None]

_BITS = (4, 8)
# Name suffixes of the linears GPTQ leaves in float, of every registered architecture (the registry's
# ``gptq_kept_dense``; e.g. Qwen3.5's linear-attention gates, which the builder refuses pre-quantized).
# One tuple for all: a suffix names a module only its own architecture has.
KEPT_DENSE: tuple[str, ...] = tuple(
    sorted({suffix for arch in registered_architectures() for suffix in arch.gptq_kept_dense})
)
# Smallest and largest normal float16: scales are stored in float16, so they must survive the cast.
_FP16_TINY = float(torch.finfo(torch.float16).tiny)
_FP16_MAX = float(torch.finfo(torch.float16).max)


@dataclass(frozen=True)
class GPTQConfig:
    """How GPTQ quantizes: bit width, grouping, symmetry, damping, column order and block size."""

    bits: int = 4
    group_size: int = 32
    """Input columns that share one scale and zero point (contiguous, in the original order)."""
    sym: bool = True
    damp: float = 0.01
    """Added to the Hessian's diagonal, as a fraction of its mean diagonal."""
    act_order: bool = True
    """Quantize columns in descending diag(H) order (with static groups, so g_idx stays trivial)."""
    block_size: int = 128
    """Columns per lazy batch update; only speed depends on it."""
    one_pass: bool = False
    """Run each decoder layer once over all calibration batches, quantizing each linear group as they reach
    it (true-sequential order), instead of twice batch by batch: faster, but every batch's activations of
    the layer are held at once (see ``edgekit.quant.gptq_layers``)."""

    def __post_init__(self) -> None:
        if self.bits not in _BITS:
            raise ValueError(f"GPTQ bits must be one of {_BITS}, not {self.bits!r}")
        if self.group_size not in GPTQ_GROUP_SIZES:
            raise ValueError(f"GPTQ group_size must be one of {GPTQ_GROUP_SIZES}, not {self.group_size!r}")
        # The settings a target may give (sym, damp, act_order, one_pass) have their rules in one place.
        try:
            GPTQSettings(sym=self.sym, damp=self.damp, act_order=self.act_order, one_pass=self.one_pass)
        except ValidationError as exc:
            raise ValueError(f"GPTQ {describe_validation_error(exc, GPTQSettings)}") from None
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"GPTQ block_size must be a positive integer, not {self.block_size!r}")

    @property
    def maxq(self) -> int:
        """The largest code: 2**bits - 1."""
        return (1 << self.bits) - 1


@dataclass(frozen=True)
class QuantizedWeight:
    """One quantized weight matrix, in the original column order.

    ``codes`` [out, in] and ``zeros`` [out, groups] are uint8, ``scales`` [out, groups] float32 holding
    float16-exact values, and ``dequantized`` [out, in] float32 is ``scales * (codes - zeros)`` per group:
    bit for bit the weight a GPTQ checkpoint of these tensors represents.
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    dequantized: Tensor
    bits: int
    group_size: int

    def rows(self, start: int, stop: int) -> QuantizedWeight:
        """Output rows ``start:stop`` (to split a fused q/k/v or gate/up solve back into modules).

        Views, not copies: the parts of a stacked solve share its storage, which lives as long as any part.
        """
        return QuantizedWeight(
            self.codes[start:stop],
            self.scales[start:stop],
            self.zeros[start:stop],
            self.dequantized[start:stop],
            self.bits,
            self.group_size,
        )


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """``scales * (codes - zeros)`` with each group's parameters repeated over its columns, in float32."""
    out, columns = codes.shape
    # In place on the one float32 copy: a 9B model's stacked gate/up weight is 400 MB per copy.
    grouped = codes.to(torch.float32).reshape(out, columns // group_size, group_size)
    grouped.sub_(zeros.to(torch.float32).unsqueeze(-1)).mul_(scales.to(torch.float32).unsqueeze(-1))
    return grouped.reshape(out, columns)


def group_parameters(weight: Tensor, config: GPTQConfig) -> tuple[Tensor, Tensor]:
    """Scale and zero point of every contiguous group of ``group_size`` input columns: [out, groups] each.

    Asymmetric: ``scale = (max - min) / maxq`` over a range that includes 0, ``zero = round(-min / scale)``.
    Symmetric: ``scale = 2 * max|w| / maxq``, ``zero = (maxq + 1) / 2``. Scales are rounded to float16 (as
    stored) and kept within float16's normal range, which also guards all-zero groups (scale 0).
    """
    out, columns = weight.shape
    if columns % config.group_size:
        raise ValueError(f"{columns} input columns are not a multiple of group_size {config.group_size}")
    grouped = weight.to(torch.float32).reshape(out, columns // config.group_size, config.group_size)
    # Like the reference Quantizer, the range always includes 0 so that 0 is representable.
    low = grouped.amin(dim=-1).clamp(max=0.0)
    high = grouped.amax(dim=-1).clamp(min=0.0)
    scales = 2.0 * torch.maximum(low.abs(), high) / config.maxq if config.sym else (high - low) / config.maxq
    scales = scales.clamp(min=_FP16_TINY, max=_FP16_MAX).to(torch.float16).to(torch.float32)
    if config.sym:
        zeros = torch.full_like(scales, (config.maxq + 1) // 2)
    else:
        zeros = torch.round(-low / scales).clamp(0, config.maxq)
    return scales, zeros.to(torch.uint8)


def _round_to_codes(weight: Tensor, scales: Tensor, zeros: Tensor, maxq: int) -> Tensor:
    """Codes of ``weight`` under per-element (broadcast) scales and zeros, as float32 in [0, maxq]."""
    return torch.clamp(torch.round(weight / scales) + zeros, 0, maxq)


def rtn_quantize_weight(weight: Tensor, config: GPTQConfig) -> QuantizedWeight:
    """Round-to-nearest quantization with GPTQ's grouping and parameters (the baseline GPTQ improves on)."""
    scales, zeros = group_parameters(weight, config)
    out, columns = weight.shape
    groups = columns // config.group_size
    grouped = weight.to(torch.float32).reshape(out, groups, config.group_size)
    codes = _round_to_codes(grouped, scales.unsqueeze(-1), zeros.to(torch.float32).unsqueeze(-1), config.maxq)
    codes_u8 = codes.reshape(out, columns).to(torch.uint8)
    return QuantizedWeight(
        codes_u8, scales, zeros, dequantize(codes_u8, scales, zeros, config.group_size), config.bits, config.group_size
    )


class HessianAccumulator:
    """The sum of ``X^T X`` over every input row a linear layer saw: GPTQ's H, up to a scale.

    A plain sum, not the reference's running average of ``2 X^T X / n``: GPTQ's result does not change
    when H is scaled (damping is relative to its mean diagonal), and the sum is cheaper and exact to
    reproduce. H is symmetric, so only its upper block triangle is accumulated (block rows of
    ``X_i^T X[:, i:]``) and mirrored once at the end: with 4 block rows that is 5/8 of a full product,
    and the Hessians are about a third of GPTQ's arithmetic.
    """

    def __init__(self, features: int) -> None:
        self._sum = torch.zeros(features, features, dtype=torch.float32)
        blocks = 4 if features >= 1024 else 2
        step = -(-features // blocks)
        self._starts = list(range(0, features, step))
        self._step = step
        self.rows = 0

    def add(self, inputs: Tensor) -> None:
        """Add the rows of ``inputs`` (any leading shape, last dim = in features)."""
        rows = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)
        for start in self._starts:
            stop = start + self._step
            self._sum[start:stop, start:].addmm_(rows[:, start:stop].t(), rows[:, start:])
        self.rows += rows.shape[0]

    def matrix(self) -> Tensor:
        """The full symmetric [features, features] float32 matrix (the accumulator is spent: add no more).

        Built in place, so a 12288-wide Hessian (600 MB) costs one extra copy, not three.
        """
        full = self._sum.triu_()
        full += full.triu(1).t()
        return full


def quantize_weight(weight: Tensor, hessian: Tensor, config: GPTQConfig) -> QuantizedWeight:
    """GPTQ-quantize ``weight`` [out, in] given the Hessian ``hessian`` [in, in] of its inputs.

    The reference ``fasterquant`` with static groups (see the module docstring). Rows are independent
    given H, so weights that share an input (q/k/v, gate/up) can be solved as one stacked matrix.
    The column loop runs on one thread: it is thousands of tiny tensor ops, and on worker threads each
    pays a fork/join that costs more than the op. The Cholesky factorizations and the lazy batch updates,
    large enough to gain from every core, run on all threads.
    """
    _out, columns = weight.shape
    if hessian.shape != (columns, columns):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match {columns} input columns")
    W = weight.to(torch.float32).clone()
    H = hessian.to(torch.float32).clone()
    # Inputs that were always zero carry no information: pin H's diagonal and quantize the column to 0.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scales, zeros = group_parameters(W, config)
    group_of_column = torch.arange(columns) // config.group_size
    perm = None
    if config.act_order:
        # Stable sort, so ties (e.g. dead columns) keep their order and runs are deterministic.
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm]  # two steps, so that no more than one n x n temporary is alive at a time
        H = H[:, perm]
        group_of_column = group_of_column[perm]
    # Work on the transpose so that one input column is one contiguous row.
    Wt = W.t().contiguous()
    del W
    group_scales = scales.t().contiguous()  # [groups, out]: a column's parameters are one row
    group_zeros = zeros.t().to(torch.float32).contiguous()

    def round_column(column: Tensor, group: int) -> tuple[Tensor, Tensor]:
        scale, zero = group_scales[group], group_zeros[group]
        code = _round_to_codes(column, scale, zero, config.maxq)
        return code, scale * (code - zero)

    Hinv = inverse_factor(H, config.damp)
    codes_t = solve_columns(Wt, Hinv, group_of_column.tolist(), round_column, config.block_size)
    codes = codes_t.t()
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    codes_u8 = codes.contiguous()
    weights = dequantize(codes_u8, scales, zeros, config.group_size)
    return QuantizedWeight(codes_u8, scales, zeros, weights, config.bits, config.group_size)


def inverse_factor(H: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor of the damped H^-1, the form the reference solver reads its updates from.

    GPTQ is invariant to scaling H. Normalizing its mean diagonal to 1 keeps H^-1 and the error updates near
    unit scale; a raw sum over many tokens gives tiny entries whose products underflow to subnormal floats,
    which x86 computes far more slowly. Each step drops the matrix before it, so at most two n x n matrices
    are alive (``H`` is consumed: the caller must not use it afterwards).
    """
    H.div_(torch.mean(torch.diag(H)))
    H.diagonal().add_(damp)
    lower = torch.linalg.cholesky(H)
    del H
    inverse = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(inverse, upper=True)


def solve_columns(
    Wt: Tensor,
    Hinv: Tensor,
    column_group: list[int],
    round_column: Callable[[Tensor, int], tuple[Tensor, Tensor]],
    lazy_block: int = 128,
) -> Tensor:
    """Quantize ``Wt`` [in, out] column by column (rows here), feeding each error forward; the codes [in, out].

    ``Hinv`` is ``inverse_factor``'s upper factor; ``round_column(column, group)`` gives a column's codes
    and the values they decode to on its group's grid, so any grid (GPTQ's own, a recipe's searched one)
    shares this loop. ``Wt`` is updated in place; ``lazy_block`` columns are updated at once.
    """
    columns = Wt.shape[0]
    codes_t = torch.empty(Wt.shape, dtype=torch.uint8)  # codes are small integers: a quarter of float32
    for start in range(0, columns, lazy_block):
        stop = min(start + lazy_block, columns)
        block = Wt[start:stop].clone()
        errors = torch.empty_like(block)
        hinv_block = Hinv[start:stop, start:stop]
        with _single_thread():
            for i in range(stop - start):
                column = block[i]
                code, decoded = round_column(column, column_group[start + i])
                codes_t[start + i] = code
                error = (column - decoded) / hinv_block[i, i]
                errors[i] = error
                # Feed the error forward to the block's remaining columns (rank-1 update).
                block[i + 1 :].addr_(hinv_block[i, i + 1 :], error, alpha=-1.0)
        # Lazy batch update of every later column with the whole block's errors at once.
        Wt[stop:].addmm_(Hinv[start:stop, stop:].t(), errors, alpha=-1.0)
    return codes_t


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
