"""GPTQ as a recipe method: the weighted search fits each block's grid, GPTQ's column solve picks the codes.

The weighted search (``block_quant``) chooses every block's scale and offset or zero point from the
weights and the diagonal of the calibration activations' XᵀX. GPTQ then keeps those grids (static groups,
so the stored layout is exactly the format's) and chooses the codes one input column at a time, in
descending order of the column's activation energy, feeding each column's rounding error forward to the
columns not yet chosen through the full XᵀX (``gptq.solve_columns``). The result is a ``QuantizedMatrix``
of the same format and bytes as the weighted search's, with less output error on text like the
calibration windows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
from torch import Tensor

from edgekit.quant.block_quant import QuantizedMatrix, quantize_matrix
from edgekit.quant.formats import QuantMethod, TensorFormat
from edgekit.quant.gptq import inverse_factor, solve_columns

DAMP = 0.01
"""Added to XᵀX's diagonal as a fraction of its mean (the GPTQ paper's default)."""


def quantize_linear(
    weight: np.ndarray,
    fmt: TensorFormat,
    importance: np.ndarray | None = None,
    hessian: np.ndarray | None = None,
    grid: QuantizedMatrix | None = None,
) -> QuantizedMatrix:
    """``weight`` [N, K] in ``fmt`` by any method; a GPTQ format needs ``hessian``, XᵀX / tokens [K, K].

    ``importance`` (XᵀX's diagonal) weights the searches; a GPTQ format without it takes XᵀX's diagonal.
    ``grid``: the weighted search's fit of ``weight`` in ``grid_format(fmt)`` with the same importance,
    where the caller has it already (GPTQ then only solves the codes).
    """
    if not fmt.needs_hessian:
        return quantize_matrix(weight, fmt, importance)
    cols = weight.shape[1]
    if hessian is None:
        raise ValueError(f"{fmt.spelling} needs calibration statistics (XᵀX of the linear's inputs)")
    if hessian.shape != (cols, cols):
        raise ValueError(f"XᵀX of shape {hessian.shape} does not match a weight of {cols} input columns")
    if grid is None:
        weights = np.diagonal(hessian).copy() if importance is None else importance
        grid = quantize_matrix(weight, grid_format(fmt), weights)
    elif grid.fmt != grid_format(fmt) or (grid.codes.shape[0], grid.cols) != weight.shape:
        raise ValueError(
            f"a {grid.fmt.spelling} grid of {grid.codes.shape[0]} x {grid.cols} is not {fmt.spelling}'s "
            f"for a {weight.shape[0]} x {weight.shape[1]} weight"
        )
    return replace(grid, fmt=fmt, codes=_solve_codes(weight, grid, hessian))


def grid_format(fmt: TensorFormat) -> TensorFormat:
    """The format whose weighted search fits ``fmt``'s grid: ``fmt`` itself, or a GPTQ format's weighted twin."""
    return replace(fmt, method=QuantMethod.WEIGHTED) if fmt.needs_hessian else fmt


def _solve_codes(weight: np.ndarray, grid: QuantizedMatrix, hessian: np.ndarray) -> np.ndarray:
    """Codes [N, K_padded] for ``grid``'s scales and offsets, chosen by GPTQ's column solve."""
    # Static groups make any column order valid: the most active inputs first, their errors then spread
    # over the columns that matter less (stable, so runs are deterministic).
    diagonal = torch.from_numpy(np.diagonal(hessian).astype(np.float32))
    order = torch.argsort(diagonal, descending=True, stable=True)
    Wt = torch.from_numpy(np.array(weight, dtype=np.float32)).t()[order].contiguous()
    round_column = _grid_rounding(grid)
    column_group = (order // grid.fmt.block_size).tolist()
    # No local name keeps the prepared XᵀX: ``inverse_factor`` consumes it, so at most two K x K are alive.
    hinv = inverse_factor(_prepared(hessian, order), DAMP)
    codes_t = solve_columns(Wt, hinv, column_group, round_column)
    codes = grid.codes.copy()  # columns padded to whole blocks keep the fit's codes (their weights are zero)
    codes[:, order.numpy()] = codes_t.t().numpy()
    return codes


def _prepared(hessian: np.ndarray, order: Tensor) -> Tensor:
    """XᵀX in ``order``, float32, its dead inputs (no calibration token reached them) cut off from the rest.

    A dead input's diagonal becomes the live inputs' mean, so it is rounded alone, feeds nothing to the
    others, and leaves the damping (relative to the mean diagonal) as the live inputs set it."""
    H = torch.from_numpy(np.array(hessian, dtype=np.float32))[order][:, order]
    if not bool(torch.isfinite(H).all()):
        raise ValueError("XᵀX holds values that are not finite: the calibration pass overflowed")
    diagonal = torch.diagonal(H)
    dead = diagonal <= 0
    live = diagonal[~dead]
    fill = float(live.mean()) if live.numel() else 1.0
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    H[dead, dead] = fill
    return H


def _grid_rounding(grid: QuantizedMatrix) -> Callable[[Tensor, int], tuple[Tensor, Tensor]]:
    """``round_column(column, block)``: a column's codes on its block's grid and the values they decode to."""
    fmt = grid.fmt
    levels = 2**fmt.bits - 1
    scales = torch.from_numpy(grid.scales.astype(np.float32)).t().contiguous()  # [blocks, N]
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    if grid.zero_points is not None:
        zeros = torch.from_numpy(grid.zero_points.astype(np.float32)).t().contiguous()
    else:
        zeros = torch.full_like(scales, float(2 ** (fmt.bits - 1)))
    offsets_np = grid.offsets()
    offsets = torch.zeros_like(scales) if offsets_np is None else torch.from_numpy(offsets_np).t().contiguous()

    def round_column(column: Tensor, block: int) -> tuple[Tensor, Tensor]:
        code = torch.clamp(torch.round((column - offsets[block]) / safe[block]) + zeros[block], 0, levels)
        return code, (code - zeros[block]) * scales[block] + offsets[block]

    return round_column
