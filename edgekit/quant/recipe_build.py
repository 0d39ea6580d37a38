"""Build a package's ``int4-recipe`` variant: measure, search, build, verify on calibration text, time, repeat.

1. The fp32 export runs the calibration windows once: reference log-probs, and each linear's input
   statistics (the weighted search's importance).
2. Sensitivity: every tensor's loss per candidate format (``sensitivity``), or the cached table.
3. Search: the recipe for the objective (least loss in ``max_model_bytes``, or fewest bytes within the
   budget's KL) under a decode-cost bound derived from ``min_decode_ratio``.
4. Build the variant by rewriting the fp32 graph, then check it as the runtime runs it: KL and top-1 on
   calibration windows (never the evaluation text) and decode speed against the RTN variant, alternating.
   A miss tightens the bound that was missed (the loss target scaled by what the prediction got wrong,
   the cost bound by the measured speed) and the search runs again, at most ``_ROUNDS`` times.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from edgekit.errors import ExportError, RecipeBudgetError, UsageError
from edgekit.exporters.decoder_session import DecoderSession
from edgekit.exporters.last_position import keep_last_position
from edgekit.exporters.parallel_matmuls import join_parallel_matmuls
from edgekit.quant.block_quant import QuantizedMatrix
from edgekit.quant.decode_timing import decode_ratio
from edgekit.quant.formats import DEFAULT_CANDIDATES, PROBE_FORMAT, TensorFormat, parse_format
from edgekit.quant.gptq_grid import grid_format, quantize_linear
from edgekit.quant.graph_rewrite import (
    Linear,
    find_linears,
    model_file_bytes,
    rewrite_model,
    weight_matrix,
    write_variant,
)
from edgekit.quant.probe_session import CalibrationReference, ProbeSession, kl_divergence32, log_softmax32
from edgekit.quant.search import BUDGET_FIX, Objective, Option, Recipe, choose
from edgekit.quant.sensitivity import (
    SensitivityTable,
    candidate_formats,
    measure_sensitivity,
    read_table,
    unquantizable_fix,
    write_table,
)

_ROUNDS = 3
_LOSS_MARGIN = 0.8  # the first search aims this far under the KL budget; verification adjusts it
_PROBE_WINDOWS = 2  # windows the per-group probes run on (the slowest part: one forward per group) ...
_PROBE_CTX = 256  # ... each cut to its first 256 tokens, the second half scored
_VERIFY_WINDOWS = 4
# An asymmetric linear's share of its activation's block means (pool, pad, concat), as read bytes: set from
# pairwise decode timings of the demo model, every linear asymmetric against none, less what the offset
# columns' bytes account for.
_ASYM_OVERHEAD_BYTES = 40960
_ZERO_POINT_OVERHEAD_BYTES = 20480  # MatMulNBits' zero-point path over its default, as read bytes
_GRAPH_BYTES = 512  # per linear: the rewritten graph's nodes and shape constants ...
_ASYM_GRAPH_BYTES = 1024  # ... or, for an asymmetric linear, that and its share of the block means' nodes
_OVERSHOOT_MARGIN = 1.25  # a round over the byte budget makes the next one aim this much further under
# The speed bound aims this far above min_decode_ratio: a round measured just over it can measure under it
# on a rerun (the bench, the user's machine), and one measured this far above the aim loosens the bound.
_SPEED_MARGIN = 0.03


@dataclass(frozen=True)
class RecipeRequest:
    """What a build asks of its recipe variant."""

    max_model_bytes: int | None
    max_kl: float | None
    min_top1: float | None
    min_decode_ratio: float
    accuracy_level: int
    head_baseline: TensorFormat | None
    """The RTN variant's LM head format (None: float), for the decode-cost bound."""
    candidates: tuple[TensorFormat, ...] = DEFAULT_CANDIDATES


@dataclass
class RecipeOutcome:
    """The chosen recipe and what checking it found."""

    formats: dict[str, str]
    predicted_kl: float
    calibration_kl: float
    calibration_top1: float
    model_bytes: int
    decode_ratio: float | None
    round: int
    """Which round of the search built this recipe."""
    sensitivity_reused: bool
    notes: list[str] = field(default_factory=list)
    rounds_built: int = 1
    """How many rounds the search built in all (set on the kept one)."""

    def as_manifest(self) -> dict[str, Any]:
        """The manifest's ``recipe`` entry of the variant."""
        return {
            "tensors": self.formats,
            "predicted_kl": round(self.predicted_kl, 6),
            "calibration_kl": round(self.calibration_kl, 6),
            "calibration_top1": round(self.calibration_top1, 6),
            "model_bytes": self.model_bytes,
            "decode_ratio": None if self.decode_ratio is None else round(self.decode_ratio, 4),
            "search_rounds": self.rounds_built,
            "kept_round": self.round,
            "sensitivity_reused": self.sensitivity_reused,
        }


def build_recipe_variant(
    fp32_dir: Path,
    out_dir: Path,
    work: Path,
    baseline_dir: Path | None,
    request: RecipeRequest,
    windows: np.ndarray,
    key: dict[str, str],
    cache_paths: list[Path],
    progress: Callable[[str], None] = lambda _: None,
) -> RecipeOutcome:
    """Search and build the recipe variant of ``fp32_dir`` into ``out_dir`` (rounds are built in ``work``).

    ``windows`` are calibration windows (never the evaluation text); ``key`` identifies the sensitivity table
    in ``cache_paths`` (read from the first that holds it, written to all).
    """
    model = onnx.load(str(fp32_dir / "model.onnx"), load_external_data=False)  # weights read one at a time
    linears = find_linears(model)
    _require_candidates(linears, request.candidates)
    scored = slice(windows.shape[1] // 2, windows.shape[1] - 1)
    progress("fp32 pass over the calibration text")
    probe = ProbeSession(fp32_dir, linears)
    reference = probe.reference(windows, scored, keep=_VERIFY_WINDOWS, hessians=_hessian_activations(linears, request))

    def weight_of(linear: Linear) -> np.ndarray:
        return weight_matrix(model, linear, fp32_dir)

    table, reused = _sensitivity_table(
        probe, reference, windows, weight_of, request, key, cache_paths, progress, linears
    )
    del probe
    fit = _memoized_fit(weight_of, reference, fp32_dir, request.candidates)
    options = _options(table, linears, request.candidates)
    max_cost = _baseline_cost(linears, request.head_baseline) / (request.min_decode_ratio + _SPEED_MARGIN)
    search = _Rounds(options, request, _fixed_bytes(fp32_dir, linears), max_cost)
    built: list[tuple[RecipeOutcome, Path]] = []
    for round_number in range(1, _ROUNDS + 1):
        try:
            recipe = search.next_recipe()
        except RecipeBudgetError:
            if not built:
                raise
            break  # the bounds a missed round tightened leave nothing: keep the best round built
        progress(f"round {round_number}: build {len(recipe.choices)} tensors, predicted KL {recipe.loss:.4f}")
        folder = work / f"recipe-round-{round_number}"
        _build(fp32_dir, folder, recipe, request.accuracy_level, fit)
        outcome = _check(folder, baseline_dir, recipe, reference, windows, scored, request, round_number, reused)
        progress(
            f"round {round_number}: calibration KL {outcome.calibration_kl:.4f}, {outcome.model_bytes:,} bytes"
            + ("" if outcome.decode_ratio is None else f", decode {outcome.decode_ratio:.2f}x RTN")
        )
        built.append((outcome, folder))
        if not search.learn(recipe, outcome):
            break
    return _keep_best(built, search, out_dir)


def _memoized_fit(
    weight_of: Callable[[Linear], np.ndarray],
    reference: CalibrationReference,
    fp32_dir: Path,
    candidates: tuple[TensorFormat, ...],
) -> Callable[[Linear, TensorFormat], QuantizedMatrix]:
    """Quantize a linear to a format once per build (rounds reuse the tensors they share); a GPTQ format
    reuses its weighted twin's fit as its grid, and keeps it when the twin is a candidate too."""
    quantized: dict[tuple[str, str], QuantizedMatrix] = {}

    def fit(linear: Linear, fmt: TensorFormat) -> QuantizedMatrix:
        cache_key = (linear.weight, fmt.spelling)
        if cache_key not in quantized:
            importance = reference.importance.get(linear.activation) if linear.activation else None
            hessian = reference.hessians.get(linear.activation) if linear.activation else None
            try:
                weight = weight_of(linear)
                twin = grid_format(fmt)
                grid = quantized.get((linear.weight, twin.spelling)) if fmt.needs_hessian else None
                if grid is None and fmt.needs_hessian and twin in candidates:
                    grid = quantized[(linear.weight, twin.spelling)] = quantize_linear(weight, twin, importance)
                quantized[cache_key] = quantize_linear(weight, fmt, importance, hessian, grid)
            except (ValueError, torch.linalg.LinAlgError) as exc:  # one line, not a traceback
                raise ExportError(
                    f"{linear.name} cannot be quantized to {fmt.spelling}: {exc}",
                    path=fp32_dir,
                    fix=unquantizable_fix(fmt),
                ) from None
        return quantized[cache_key]

    return fit


def require_candidates(fp32_dir: Path, candidates: tuple[TensorFormat, ...]) -> None:
    """``UsageError`` when some linear of the fp32 export fits none of ``candidates`` (reads the graph only)."""
    _require_candidates(find_linears(onnx.load(str(fp32_dir / "model.onnx"), load_external_data=False)), candidates)


def _require_candidates(linears: list[Linear], candidates: tuple[TensorFormat, ...]) -> None:
    """Refuse, before any weight is read, candidates of which none fits some linear (blocks must divide K)."""
    for linear in linears:
        if linear.tied_to is None and not candidate_formats(linear, candidates, probe=False):
            named = ", ".join(fmt.spelling for fmt in candidates)
            raise UsageError(
                f"no recipe candidate fits {linear.name}: its {linear.cols} inputs are not a whole number of "
                f"blocks of any of {named}",
                fix="add a format whose block size divides every linear's input size (block 32 or 16) to "
                "recipe.candidates",
            )


def _hessian_activations(linears: list[Linear], request: RecipeRequest) -> frozenset[str]:
    """The activations whose full XᵀX a GPTQ candidate that fits one of their linears needs."""
    return frozenset(
        lin.activation
        for lin in linears
        if lin.activation is not None
        and lin.tied_to is None
        and any(fmt.needs_hessian for fmt in candidate_formats(lin, request.candidates, probe=False))
    )


def _keep_best(built: list[tuple[RecipeOutcome, Path]], search: _Rounds, out_dir: Path) -> RecipeOutcome:
    """Rename the best round to ``out_dir`` and delete the others; none within ``max_model_bytes`` is an error."""
    chosen, folder = min(built, key=lambda item: search.rank(item[0]))
    limit = search.request.max_model_bytes
    fits = limit is None or chosen.model_bytes <= limit
    for _, other in built:
        if other != folder or not fits:
            shutil.rmtree(other, ignore_errors=True)
    if not fits:
        assert limit is not None
        raise RecipeBudgetError(
            f"no recipe built fits in {limit:,} bytes: the smallest built has "
            f"{min(o.model_bytes for o, _ in built):,} bytes of model files",
            fix=BUDGET_FIX,
        )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    folder.rename(out_dir)
    chosen.notes.extend(search.shortfalls(chosen))
    chosen.rounds_built = len(built)
    return chosen


def _sensitivity_table(
    probe: ProbeSession,
    reference: CalibrationReference,
    windows: np.ndarray,
    weight_of: Callable[[Linear], np.ndarray],
    request: RecipeRequest,
    key: dict[str, str],
    cache_paths: list[Path],
    progress: Callable[[str], None],
    linears: list[Linear],
) -> tuple[SensitivityTable, bool]:
    """The cached table for ``key`` (and True), or one measured now; written to every cache path that takes it.

    The first path (the package's copy) must be written; the others (the user's cache) may be read-only.
    """
    cached = (read_table(path, key) for path in cache_paths)
    table = next((t for t in cached if t is not None and t.fits(linears, request.candidates)), None)
    reused = table is not None
    if table is None:
        ctx = min(_PROBE_CTX, windows.shape[1])
        probe_windows, probe_scored = windows[:_PROBE_WINDOWS, :ctx], slice(ctx // 2, ctx - 1)
        probe_reference = probe.reference(probe_windows, probe_scored, importance=False)
        probe_reference.importance = reference.importance
        probe_reference.hessians = reference.hessians
        table = measure_sensitivity(
            probe, probe_reference, probe_windows, probe_scored, weight_of, request.candidates, key, progress
        )
    for index, path in enumerate(cache_paths):
        try:
            write_table(path, table)
        except OSError:
            if index == 0:
                raise
    return table, reused


class _Rounds:
    """The search's bounds, adjusted after each round by what the built variant measured."""

    def __init__(self, options: dict[str, list[Option]], request: RecipeRequest, fixed: int, max_cost: float) -> None:
        self.options = options
        self.request = request
        self.fixed = fixed
        self.max_cost = max_cost
        self.max_loss = None if request.max_kl is None else request.max_kl * _LOSS_MARGIN
        self.max_bytes = request.max_model_bytes

    def next_recipe(self) -> Recipe:
        """The recipe for the current bounds (``RecipeBudgetError`` when none meets them)."""
        by_bytes = self.request.max_model_bytes is not None
        objective = Objective(
            max_bytes=self.max_bytes,
            max_loss=None if by_bytes else self.max_loss,
            max_cost=self.max_cost,
            fixed_bytes=self.fixed,
        )
        return choose(self.options, objective)

    def learn(self, recipe: Recipe, outcome: RecipeOutcome) -> bool:
        """Adjust the bounds to what ``outcome`` measured; whether another round is worth building."""
        again = False
        budget = self.request.max_model_bytes
        if budget is not None and self.max_bytes is not None and outcome.model_bytes > budget:
            # The graph grew more than estimated: aim under the budget by the overshoot, and some.
            self.max_bytes -= int((outcome.model_bytes - budget) * _OVERSHOOT_MARGIN) + 1
            again = True
        ratio, target = outcome.decode_ratio, self.request.min_decode_ratio
        if ratio is not None:
            # Cost scales with time: the bound that would have given the aimed speed exactly.
            aim = target + _SPEED_MARGIN
            bound_binds = recipe.cost >= 0.95 * self.max_cost
            if ratio < target or (ratio > aim + _SPEED_MARGIN and bound_binds):
                self.max_cost = recipe.cost * ratio / aim
                again = True
        if self.request.max_model_bytes is None and self.max_loss is not None and self.request.max_kl is not None:
            measured = max(outcome.calibration_kl, 1e-12)
            if not _meets_accuracy(outcome, self.request):
                # The prediction was off by measured / predicted: aim under the budget by that much more.
                self.max_loss = min(self.max_loss * 0.7, self.request.max_kl * _LOSS_MARGIN * recipe.loss / measured)
                again = True
            elif measured < 0.6 * self.request.max_kl:
                self.max_loss = self.request.max_kl * _LOSS_MARGIN * recipe.loss / measured
                again = True
        return again

    def rank(self, outcome: RecipeOutcome) -> tuple[int, float]:
        """Sort key of a built round: rounds that meet every check first, then by the objective."""
        misses = len(self.shortfalls(outcome))
        if self.request.max_model_bytes is not None:
            return misses, outcome.calibration_kl
        return misses, float(outcome.model_bytes)

    def shortfalls(self, outcome: RecipeOutcome) -> list[str]:
        """What ``outcome`` misses of the request, in words."""
        missed = []
        budget = self.request.max_model_bytes
        if budget is not None and outcome.model_bytes > budget:
            missed.append(f"{outcome.model_bytes:,} bytes of model files, over max_model_bytes {budget:,}")
        if outcome.decode_ratio is not None and outcome.decode_ratio < self.request.min_decode_ratio:
            missed.append(
                f"decode {outcome.decode_ratio:.2f}x RTN, under min_decode_ratio {self.request.min_decode_ratio}"
            )
        if self.request.max_model_bytes is None and not _meets_accuracy(outcome, self.request):
            missed.append(
                f"calibration KL {outcome.calibration_kl:.4f} / top-1 {outcome.calibration_top1:.3f} miss the budget"
            )
        return missed


def _options(
    table: SensitivityTable, linears: list[Linear], candidates: tuple[TensorFormat, ...]
) -> dict[str, list[Option]]:
    options: dict[str, list[Option]] = {}
    for linear in linears:
        if linear.tied_to is not None:
            continue
        entry = table.tensor(linear.name)
        # The probe format is always measured; it is a choice only where the candidates name it.
        formats = [f for f in candidate_formats(linear, candidates, probe=False) if f.spelling in entry.proxy]
        options[linear.name] = [
            Option(fmt, _file_bytes(linear, fmt), entry.predicted_loss(fmt), _cost(linear, fmt)) for fmt in formats
        ]
    return options


def _file_bytes(linear: Linear, fmt: TensorFormat) -> int:
    """The linear's bytes in the model files: codes, scales (and offsets), and its nodes in the graph."""
    return fmt.file_bytes(linear.rows, linear.cols) + (_ASYM_GRAPH_BYTES if fmt.offsets else _GRAPH_BYTES)


def _cost(linear: Linear, fmt: TensorFormat | None) -> float:
    """Bytes a decode step reads for this linear (fp32 scales at run time), plus the extra work of offsets
    or zero points.

    An untied embedding's Gather reads one row a step: nothing a format changes measurably.
    """
    if linear.activation is None and linear.tied_to is None:
        return 0.0
    weights = linear.rows * linear.cols
    if fmt is None:
        return 4.0 * weights
    stored = linear.rows * fmt.stored_columns(linear.cols)  # an asymmetric matrix's offset columns included
    blocks = stored / fmt.block_size
    read = stored * fmt.bits / 8 + 4 * blocks
    if fmt.zero_point:
        return read + blocks * fmt.bits / 8 + _ZERO_POINT_OVERHEAD_BYTES
    if fmt.offsets:
        return read + _ASYM_OVERHEAD_BYTES
    return read


def _baseline_cost(linears: list[Linear], head: TensorFormat | None) -> float:
    """The decode cost of the all-int4 RTN variant: symmetric block-32 linears and the target's head."""
    total = 0.0
    for linear in linears:
        if linear.tied_to is not None:
            continue
        is_head = linear.name == "lm_head"
        total += _cost(linear, head if is_head else PROBE_FORMAT)
    return total


def _fixed_bytes(fp32_dir: Path, linears: list[Linear]) -> int:
    """Model-file bytes no choice changes: the fp32 files less their linears' float weights."""
    files = model_file_bytes(fp32_dir)
    distinct = {lin.weight: lin.rows * lin.cols for lin in linears}
    return files - 4 * sum(distinct.values())


def _build(
    fp32_dir: Path,
    out_dir: Path,
    recipe: Recipe,
    level: int,
    fit: Callable[[Linear, TensorFormat], QuantizedMatrix],
) -> None:
    from onnx.external_data_helper import load_external_data_for_model

    graph = onnx.load(str(fp32_dir / "model.onnx"), load_external_data=False)
    rewrite_model(graph, recipe.formats(), level, fit)
    keep_last_position(graph)  # as every CPU variant: the head on the last position (exporters/last_position.py)
    load_external_data_for_model(graph, str(fp32_dir))  # what the rewrite kept: norms, rotary tables
    join_parallel_matmuls(graph)  # and linears of one input in one kernel call (exporters/parallel_matmuls.py)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    write_variant(graph, fp32_dir, out_dir)


def _check(
    out_dir: Path,
    baseline_dir: Path | None,
    recipe: Recipe,
    reference: CalibrationReference,
    windows: np.ndarray,
    scored: slice,
    request: RecipeRequest,
    round_number: int,
    reused: bool,
) -> RecipeOutcome:
    session = DecoderSession(out_dir)
    kls, agree = [], []
    for ids, ref in zip(windows, reference.logprobs, strict=False):
        logprobs = log_softmax32(session.logits(ids[None])[0][scored])
        kls.append(kl_divergence32(ref, logprobs))
        agree.append(ref.argmax(-1) == logprobs.argmax(-1))
    del session
    ratio = None
    if baseline_dir is not None and request.min_decode_ratio > 0:
        ratio = decode_ratio(baseline_dir, out_dir)
    size = model_file_bytes(out_dir)
    return RecipeOutcome(
        formats={name: option.fmt.spelling for name, option in recipe.choices.items()},
        predicted_kl=recipe.loss,
        calibration_kl=float(np.concatenate(kls).mean()),
        calibration_top1=float(np.concatenate(agree).mean()),
        model_bytes=size,
        decode_ratio=ratio,
        round=round_number,
        sensitivity_reused=reused,
    )


def _meets_accuracy(outcome: RecipeOutcome, request: RecipeRequest) -> bool:
    if request.max_kl is not None and outcome.calibration_kl > request.max_kl:
        return False
    return request.min_top1 is None or outcome.calibration_top1 >= request.min_top1


def recipe_formats(entry: dict[str, Any]) -> dict[str, TensorFormat]:
    """A manifest ``recipe`` entry's formats, parsed (``ValueError`` naming a bad one)."""
    return {name: parse_format(spelling) for name, spelling in entry["tensors"].items()}
