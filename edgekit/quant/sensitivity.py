"""How much loss each tensor adds in each candidate format: measured for groups, split and scaled by a proxy.

The loss a tensor adds is measured, not guessed: groups of linears (one kind of linear over a run of
consecutive layers, the LM head alone) are quantized in the probe format and run forward on calibration
windows; the KL against the fp32 model is the group's loss. Within a group the loss is split by each
tensor's proxy (its weighted squared error, sum over columns of importance * error^2, importance being the
calibration activations' mean square per column), and another format's loss is the tensor's measured
share scaled by the ratio of that format's proxy to the probe format's. The raw proxy alone ranks tensors
of different kinds and depths poorly (a value projection's error costs more KL per unit than a late
output projection's); measured per group and scaled within a tensor, it does not have to.

The table is cached (``eval/sensitivity.json`` in the package and the user cache), keyed by the source's
weights, the calibration text and the settings, so a second build with another budget reuses it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgekit.errors import EdgekitError, ExportError
from edgekit.quant.block_quant import QuantizedMatrix, quantize_matrix, weighted_error
from edgekit.quant.formats import PROBE_FORMAT, QuantMethod, TensorFormat, parse_format
from edgekit.quant.gptq_grid import grid_format, quantize_linear
from edgekit.quant.graph_rewrite import Linear, stored_layout
from edgekit.quant.probe_session import CalibrationReference, ProbeSession
from edgekit.safe_io import read_regular_file, write_text_atomic

SENSITIVITY_VERSION = 3
MAX_TABLE_BYTES = 64 << 20  # a table holds a few numbers per tensor: 64 MiB is thousands of layers
_LAYER = re.compile(r"(?P<prefix>.*?layers\.)(?P<index>\d+)(?P<suffix>/.*)")
_PROXY_ROWS = 128  # rows sampled per tensor for the proxy: the ratio between formats converges long before
_GROUPS_PER_KIND = 5  # runs of consecutive layers measured together, per kind of linear


class TensorLoss(BaseModel):
    """One tensor's measured share of loss at the probe format and its proxy in every candidate format."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    rows: int = Field(gt=0)
    cols: int = Field(gt=0)
    group: str
    probe_loss: float = Field(ge=0)
    proxy: dict[str, Annotated[float, Field(ge=0)]]
    """Format spelling -> weighted squared error on the sampled rows (the probe format included)."""

    def predicted_loss(self, fmt: TensorFormat) -> float:
        """The KL this tensor adds in ``fmt``: its measured share, scaled by the proxies' ratio."""
        base = self.proxy[PROBE_FORMAT.spelling]
        if base <= 0:
            return 0.0
        return self.probe_loss * self.proxy[fmt.spelling] / base

    def formats(self) -> list[TensorFormat]:
        """The candidate formats this tensor was measured in."""
        return [parse_format(spelling) for spelling in self.proxy]


class SensitivityTable(BaseModel):
    """Every quantizable tensor's loss per format, with what it was measured on."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    version: int = SENSITIVITY_VERSION
    key: dict[str, str]
    """Source weights' digest, calibration text's digest, windows, probe format, edgekit version."""
    group_losses: dict[str, float]
    tensors: list[TensorLoss]

    def tensor(self, name: str) -> TensorLoss:
        """The entry named ``name``."""
        return next(t for t in self.tensors if t.name == name)

    def fits(self, linears: list[Linear], candidates: tuple[TensorFormat, ...]) -> bool:
        """Whether the table describes these linears: each once, its shape, the probe format and every
        fitting candidate measured. A cached table is untrusted input: one that does not fit is remeasured."""
        entries = {t.name: t for t in self.tensors}
        for linear in linears:
            if linear.tied_to is not None:
                continue
            entry = entries.get(linear.name)
            if entry is None or (entry.rows, entry.cols) != (linear.rows, linear.cols):
                return False
            wanted = {f.spelling for f in candidate_formats(linear, candidates)}
            if PROBE_FORMAT.spelling not in entry.proxy or not wanted <= set(entry.proxy):
                return False
        return True


def candidate_formats(linear: Linear, candidates: tuple[TensorFormat, ...], probe: bool = True) -> list[TensorFormat]:
    """The candidates that fit ``linear`` (blocks that divide its input size: no padded columns), and with
    ``probe`` the probe format, which every tensor is measured in.

    An embedding multiplies no activation, so it has no XᵀX: a GPTQ candidate becomes the same grid by the
    weighted search there."""
    fitting: list[TensorFormat] = []
    for fmt in candidates:
        if linear.cols % fmt.block_size:
            continue
        if fmt.needs_hessian and linear.activation is None:
            fmt = replace(fmt, method=QuantMethod.WEIGHTED)
        if fmt not in fitting:
            fitting.append(fmt)
    if probe and PROBE_FORMAT not in fitting and linear.cols % PROBE_FORMAT.block_size == 0:
        fitting.append(PROBE_FORMAT)
    return fitting


def group_of(linear: Linear, layers: int) -> str:
    """``attn/qkv_proj@0-5``: the linear's kind and its run of layers; a linear outside the layers is its own group."""
    match = _LAYER.match(linear.name)
    if match is None:
        return linear.name
    index = int(match["index"])
    span = max(1, -(-layers // _GROUPS_PER_KIND))
    start = index // span * span
    return f"{match['prefix']}*{match['suffix']}@{start}-{min(start + span, layers) - 1}"


def measure_sensitivity(
    probe: ProbeSession,
    reference: CalibrationReference,
    windows: np.ndarray,
    scored: slice,
    weights: Callable[[Linear], np.ndarray],
    candidates: tuple[TensorFormat, ...],
    key: dict[str, str],
    progress: Callable[[str], None] | None = None,
) -> SensitivityTable:
    """Measure every group's loss at the probe format, and every tensor's proxies; ``weights`` gives [N, K]."""
    linears = [lin for lin in probe.linears if lin.tied_to is None]
    layers = 1 + max((int(m["index"]) for lin in linears if (m := _LAYER.match(lin.name))), default=0)
    rng = np.random.default_rng(0)  # one stream, drawn tensor by tensor in order
    proxies = {
        lin.name: _proxies(lin, probe, reference, weights, candidates, rng) for lin in _counted(linears, progress)
    }
    groups: dict[str, list[Linear]] = {}
    for linear in linears:
        groups.setdefault(group_of(linear, layers), []).append(linear)
    group_losses: dict[str, float] = {}
    for number, (group, members) in enumerate(groups.items(), 1):
        if progress:
            progress(f"probe {number}/{len(groups)}: {group}")
        # One group's quantized weights at a time: all of them at once would be a second fp32 model.
        overrides = {
            lin.weight: stored_layout(lin, quantize_matrix(weights(lin), PROBE_FORMAT).dequantize()) for lin in members
        }
        group_losses[group] = max(0.0, probe.kl(windows, scored, reference, overrides))
        del overrides
    tensors = []
    for group, members in groups.items():
        total = sum(proxies[lin.name][PROBE_FORMAT.spelling] for lin in members) or 1.0
        for lin in members:
            share = proxies[lin.name][PROBE_FORMAT.spelling] / total
            tensors.append(
                TensorLoss(
                    name=lin.name,
                    rows=lin.rows,
                    cols=lin.cols,
                    group=group,
                    probe_loss=group_losses[group] * share,
                    proxy=proxies[lin.name],
                )
            )
    return SensitivityTable(key=key, group_losses=group_losses, tensors=tensors)


def _counted(linears: list[Linear], progress: Callable[[str], None] | None) -> Iterator[Linear]:
    for number, linear in enumerate(linears, 1):
        if progress:
            progress(f"proxies {number}/{len(linears)}")
        yield linear


def _proxies(
    linear: Linear,
    probe: ProbeSession,
    reference: CalibrationReference,
    weights: Callable[[Linear], np.ndarray],
    candidates: tuple[TensorFormat, ...],
    rng: np.random.Generator,
) -> dict[str, float]:
    """Format spelling -> the error in that format of ``linear``'s rows sampled with ``rng``."""
    importance = reference.importance.get(linear.activation) if linear.activation else None
    hessian = reference.hessians.get(linear.activation) if linear.activation else None
    rows = np.sort(rng.choice(linear.rows, min(_PROXY_ROWS, linear.rows), replace=False))
    sample = weights(linear)[rows]
    # With XᵀX, every format's proxy is its full quadratic error (what GPTQ minimizes), so formats that
    # spread their error across columns and those that do not are compared on one measure.
    formats = candidate_formats(linear, candidates)
    try:
        fits: dict[TensorFormat, QuantizedMatrix] = {}
        for fmt in sorted(formats, key=lambda f: f.needs_hessian):  # grids first: GPTQ solves reuse them
            fits[fmt] = quantize_linear(sample, fmt, importance, hessian, fits.get(grid_format(fmt)))
        proxies = {fmt.spelling: weighted_error(sample, fits[fmt], importance, hessian) for fmt in formats}
        if not all(np.isfinite(value) for value in proxies.values()):
            raise ValueError("its calibration statistics are not finite")
    except (ValueError, torch.linalg.LinAlgError) as exc:  # one line, not a traceback
        raise ExportError(
            f"{linear.name} cannot be quantized: {exc}",
            path=probe.model_dir,
            fix=unquantizable_fix(*formats),
        ) from None
    return proxies


def unquantizable_fix(*formats: TensorFormat) -> str:
    """What to do when a linear cannot be fitted in ``formats``."""
    if any(fmt.needs_hessian for fmt in formats):
        return "remove the gptq formats from recipe.candidates, or calibrate on other text (--calibration)"
    return "build with -t laptop-cpu-rtn, or check the source's weights"


def read_table(path: Path, key: dict[str, str]) -> SensitivityTable | None:
    """A cached table for ``key``, or None (missing, another key, or not a valid table: it is remeasured)."""
    if not path.is_file():
        return None
    try:
        table = SensitivityTable.model_validate_json(read_regular_file(path, MAX_TABLE_BYTES))
    except (ValidationError, EdgekitError, OSError):
        return None
    return table if table.version == SENSITIVITY_VERSION and table.key == key else None


def write_table(path: Path, table: SensitivityTable) -> None:
    """Write ``table`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, table.model_dump_json(indent=1))
