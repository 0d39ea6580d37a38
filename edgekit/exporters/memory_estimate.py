"""How much memory and disk a build will need, worked out from the weight files' headers before any weight is read.

The per-parameter costs below were fit to measured peaks (``benchmarks/bench_scale.py``; the figures and
their machine are in docs/streaming.md and docs/benchmarks.md), rounded up so the estimate stays above them:

- a whole-model build peaks in its validation against PyTorch, in a process that still holds what
  onnxruntime-genai's export left (the builder holds the PyTorch model and the whole float graph before
  quantizing), or, when it searches a per-tensor recipe, in that search; both per parameter, on top of
  the libraries (the measured peaks behind the constants: docs/streaming.md).
- the streamed export (``exporters/streaming.py``) holds one decoder layer (bf16 as stored) and one
  block of rows in fp32 with the quantizer's buffers, plus the same libraries: 4 bytes per parameter of
  the largest layer and a quarter GiB for the blocks.
- GPTQ (``quant/gptq_checkpoint.py``) reads one decoder layer at a time too; it holds that layer in fp32
  with the solver's copies (3 x 4 bytes per parameter), the calibration activations (4 bytes per token and
  hidden unit) and the layer's Hessians (4 bytes per entry, taken twice for the inputs shared or not,
  and two more copies of the widest while it is factored).

A build refuses to start when the machine's available memory or the output's filesystem is short, and
says how much is needed and which option lowers it.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import ResourceError, UsageError
from edgekit.sources.checkpoint import CheckedFolder
from edgekit.sources.registry import Architecture
from edgekit.sources.weight_files import read_safetensors_header
from edgekit.targets import Int4Method, Target
from edgekit.variants import VariantSpec, reference_variant

GIB = 1024**3
BASE_BYTES = 1 * GIB
"""Python, torch, transformers, onnxruntime and the builder, loaded."""
WHOLE_BYTES_PER_PARAM = 21.0
RECIPE_BYTES_PER_PARAM = 28.0
"""A whole-model build that searches a per-tensor recipe (``quant/recipe_build.py``): onnxruntime holds the
fp32 export with its weights as inputs, the calibration logits and activations, then the rounds' quantized
tensors and sessions, in a process that still holds what validation left; see docs/streaming.md."""
STREAMED_BYTES_PER_LAYER_PARAM = 4.0
STREAMED_BLOCK_BYTES = GIB // 4
"""One block of embedding or LM-head rows: bf16 read, fp32 copy, transposed copy, quantized output."""
STREAMED_RECIPE_BYTES_PER_PARAM = 4.0
STREAMED_RECIPE_BYTES_PER_TOKEN = 24 * 1024
"""A streamed build's recipe search, per parameter and per vocabulary entry: the fp32 export it searches on
is on disk, and its onnxruntime session, the weights overridable inputs, maps them from the file (page cache the kernel
can drop, not counted here); what is counted is the quantized fits the rounds reuse, the rounds' variants
and their sessions and the calibration activations (per parameter), and the calibration windows' logits
and reference log-probabilities (per vocabulary entry); fitted above two measured peaks,
docs/benchmarks.md ("Large models: recipes streamed")."""
RECIPE_ROUNDS = 3
"""The most rounds a recipe search builds (``quant.recipe_build._ROUNDS``; a test keeps the two equal)."""
_LAYER = re.compile(r"\.layers\.(\d+)\.")
_SKIPPED = ("visual.", "vision_tower.", "mtp.")  # never exported by the text builders


@dataclass(frozen=True)
class BuildEstimate:
    """Peak memory and disk of one build, in bytes."""

    parameters: int
    largest_layer: int
    """Parameters of the largest decoder layer."""
    peak_memory: int
    disk: int
    streaming: bool


def _weights(weight_files: Sequence[Path]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files:
        for info in read_safetensors_header(path.resolve()):
            if not any(part in info.name for part in _SKIPPED):
                shapes[info.name] = info.shape
    return shapes


def _variant_bytes(shapes: dict[str, tuple[int, ...]], variant: VariantSpec, tied: bool) -> int:
    """Bytes of one exported variant: quantized linear weights, fp32 (or fp16) for everything else."""
    float_bytes = 2 if variant.precision == "fp16" else 4
    if variant.precision not in ("int4", "int8"):
        return sum(math.prod(shape) for shape in shapes.values()) * float_bytes
    bits = 8 if variant.precision == "int8" else 4
    per_quantized = bits / 8 + float_bytes / (variant.block_size or 32)
    head_bytes = float_bytes if variant.lm_head == "float" else per_quantized
    total = 0.0
    for name, shape in shapes.items():
        count = math.prod(shape)
        if "embed_tokens" in name:
            # tied: one table serves the head and the lookup (GatherBlockQuantized on the INT4 head);
            # untied: the lookup table stays float (only MatMuls are quantized)
            total += count * (head_bytes if tied else float_bytes)
        elif name.startswith("lm_head"):
            total += count * head_bytes
        elif len(shape) == 2 and _LAYER.search(name):
            total += count * per_quantized
        else:
            total += count * float_bytes
    return int(total)


def estimate_build(
    weight_files: Sequence[Path],
    variants: Sequence[VariantSpec],
    *,
    streaming: bool,
    tied: bool,
    calibration_tokens: int = 0,
    gptq_one_pass: bool = False,
) -> BuildEstimate:
    """Estimate the peak memory and the disk of exporting ``variants`` from safetensors ``weight_files``."""
    return estimate_from_shapes(
        _weights(weight_files),
        variants,
        streaming=streaming,
        tied=tied,
        calibration_tokens=calibration_tokens,
        gptq_one_pass=gptq_one_pass,
    )


def estimate_from_shapes(
    shapes: dict[str, tuple[int, ...]],
    variants: Sequence[VariantSpec],
    *,
    streaming: bool,
    tied: bool,
    calibration_tokens: int = 0,
    gptq_one_pass: bool = False,
    recipe_hessians: bool = False,
) -> BuildEstimate:
    """Estimate the peak memory and the disk of exporting ``variants`` of a model with these weight shapes.

    ``calibration_tokens`` (samples x sequence length) when the build runs GPTQ first: its peak counts
    too when it is the higher one. ``gptq_one_pass``: GPTQ runs one pass per layer, holding every
    calibration batch's activations of a layer at once. ``recipe_hessians``: the recipe search has GPTQ
    candidates, so its calibration pass keeps XᵀX of every linear's input.
    """
    shapes = {name: shape for name, shape in shapes.items() if not any(part in name for part in _SKIPPED)}
    parameters = sum(math.prod(shape) for shape in shapes.values())
    layers: dict[str, int] = {}
    inputs: dict[str, set[int]] = {}
    squares = 0  # sum of K^2 over the layers' matrices: bounds the XᵀX a recipe's GPTQ candidates keep
    for name, shape in shapes.items():
        match = _LAYER.search(name)
        if match:
            layers[match.group(1)] = layers.get(match.group(1), 0) + math.prod(shape)
            if len(shape) == 2:
                inputs.setdefault(match.group(1), set()).add(shape[1])
                squares += shape[1] ** 2
    largest = max(layers.values(), default=parameters)
    recipe = any(v.method == Int4Method.RECIPE.value for v in variants)
    # float32 XᵀX entries; counted per matrix, so inputs that q/k/v or gate/up share count more than once
    hessians = 4 * squares if recipe and recipe_hessians else 0
    if streaming:
        peak = BASE_BYTES + STREAMED_BYTES_PER_LAYER_PARAM * largest + STREAMED_BLOCK_BYTES
        if recipe:
            vocabulary = max((s[0] for name, s in shapes.items() if "embed_tokens" in name and len(s) == 2), default=0)
            search = STREAMED_RECIPE_BYTES_PER_PARAM * parameters + STREAMED_RECIPE_BYTES_PER_TOKEN * vocabulary
            peak = max(peak, BASE_BYTES + search + hessians)
    else:
        per_param = RECIPE_BYTES_PER_PARAM if recipe else WHOLE_BYTES_PER_PARAM
        peak = BASE_BYTES + per_param * parameters + hessians
    if calibration_tokens:
        peak = max(peak, _gptq_peak(shapes, inputs, largest, calibration_tokens, gptq_one_pass))
    # A recipe search keeps every round it builds until it picks one; streamed, it also writes the fp32
    # export it searches on to scratch space.
    disk = sum(_variant_bytes(shapes, v, tied) * (RECIPE_ROUNDS if v.method == Int4Method.RECIPE.value else 1)
               for v in variants)  # fmt: skip
    if streaming and recipe:
        disk += _variant_bytes(shapes, reference_variant(), tied)
    return BuildEstimate(parameters, largest, int(peak), disk, streaming)


def _gptq_peak(
    shapes: dict[str, tuple[int, ...]],
    inputs: dict[str, set[int]],
    largest: int,
    calibration_tokens: int,
    one_pass: bool,
) -> int:
    """The peak of a GPTQ pass over ``calibration_tokens`` (``inputs``: each layer's input widths)."""
    hidden = max((shape[1] for name, shape in shapes.items() if "embed_tokens" in name and len(shape) == 2), default=0)
    widest = max((max(dims) for dims in inputs.values()), default=hidden)
    if one_pass:
        # Every token's activations at the layer's widest stop: before down_proj, the layer's input,
        # the residual, the MLP's input and the intermediate; before o_proj, about six hidden-wide
        # tensors. 6 bytes a float32, not 4: with every batch's tensors alive, freed blocks fragment
        # the heap (measured peaks were well above what the live tensors add up to). One Hessian
        # at a time, factored with a few copies of its size alive.
        activations = 6 * calibration_tokens * max(6 * hidden, 3 * hidden + widest)
        hessians = 16 * widest**2
    else:
        # One hidden-wide tensor per token between layers. Every input's Hessian accumulates at once
        # (4 bytes an entry, inputs shared or not counted twice), then the widest is factored with
        # two more of its size alive.
        activations = 4 * calibration_tokens * hidden
        hessians = max((sum(8 * n * n for n in dims) + 8 * max(dims) ** 2 for dims in inputs.values()), default=0)
    return BASE_BYTES + 12 * largest + activations + hessians


def available_memory() -> int:
    """Memory this process can still use: MemAvailable, or the cgroup's limit minus its usage when lower."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def free_disk(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def check_resources(
    estimate: BuildEstimate,
    out: Path,
    *,
    source: Path,
    streamed: BuildEstimate | None = None,
    memory: int | None = None,
    disk: int | None = None,
) -> None:
    """Raise ``ResourceError`` when the machine lacks the estimated memory or ``out``'s disk lacks the space.

    ``streamed`` is the estimate of the same build with ``--streaming``: named as the fix when it fits.
    ``memory`` and ``disk`` default to what this machine has now.
    """
    memory = available_memory() if memory is None else memory
    disk = free_disk(out) if disk is None else disk
    if estimate.peak_memory > memory:
        how = "streamed, one decoder layer at a time" if estimate.streaming else "whole model in memory"
        if streamed is not None and not estimate.streaming and streamed.peak_memory <= memory:
            fix = (
                f"pass --streaming (peak about {streamed.peak_memory / GIB:.1f} GiB; the package then has no "
                "fp32 variant), or free memory"
            )
        else:
            fix = "free memory or build on a machine with more"
        raise ResourceError(
            f"this build needs about {estimate.peak_memory / GIB:.1f} GiB of memory ({how}, "
            f"{estimate.parameters / 1e9:.2f}B parameters) but {memory / GIB:.1f} GiB is available",
            path=source,
            fix=fix,
        )
    if estimate.disk > disk:
        raise ResourceError(
            f"the package needs about {estimate.disk / 1e9:.1f} GB of disk but {disk / 1e9:.1f} GB is free there",
            path=out,
            fix="free disk space, or write the package (-o) to another disk",
        )


@dataclass(frozen=True)
class ResourcePlan:
    """How a build will run on this machine: streamed or not, and whether it was switched to streaming."""

    streaming: bool
    switched: bool
    """True when the whole-model build would not fit in memory and the streamed one does."""
    whole: BuildEstimate
    streamed: BuildEstimate
    recipe_dropped: BuildEstimate | None = None
    """The estimate of the build that runs (whole or streamed) with the recipe search, when that did not fit
    and the build without it does."""
    recipe_streams: bool = False
    """A whole build drops its recipe where a streamed one (``--streaming``) would keep it."""


def check_build_resources(
    hf_folder: Path, checked: CheckedFolder, target: Target, out: Path, streaming: bool, calibration_tokens: int = 0
) -> ResourcePlan:
    """The check of a Hugging Face folder's build, before any weight is read (see ``plan_resources``)."""
    config = checked.config
    text = checked.architecture.text_section(config)
    tied = bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    shapes = _weights(sorted(hf_folder.glob("*.safetensors")))
    quantized = checked.quantization is not None
    return plan_resources(shapes, checked.architecture, target, out, checked.folder, streaming=streaming, tied=tied,
                          calibration_tokens=0 if quantized else calibration_tokens, recipe=not quantized)  # fmt: skip


def check_gguf_resources(
    path: Path, architecture: Architecture, target: Target, out: Path, streaming: bool, calibration_tokens: int = 0
) -> ResourcePlan:
    """The check of a GGUF file's build, from its header alone, before any tensor is dequantized.

    The import writes the model as fp32 safetensors into the build's scratch space beside OUT (one tensor
    at a time), so that disk is counted too.
    """
    from edgekit.sources.gguf_header import gguf_weight_shapes

    shapes = gguf_weight_shapes(path)
    tied = "lm_head.weight" not in shapes
    scratch = 4 * sum(math.prod(shape) for shape in shapes.values())
    return plan_resources(shapes, architecture, target, out, path, streaming=streaming, tied=tied,
                          calibration_tokens=calibration_tokens, scratch_disk=scratch)  # fmt: skip


def plan_resources(
    shapes: dict[str, tuple[int, ...]],
    architecture: Architecture,
    target: Target,
    out: Path,
    source: Path,
    *,
    streaming: bool,
    tied: bool,
    calibration_tokens: int = 0,
    scratch_disk: int = 0,
    memory: int | None = None,
    recipe: bool = True,
) -> ResourcePlan:
    """Can this build stream, and does it fit here; a whole-model build that does not fit is streamed instead.

    ``calibration_tokens`` is the GPTQ calibration's size (samples x sequence length) when the target asks
    for GPTQ. A build that fits neither way is refused (``ResourceError``) with both numbers. ``recipe``: False
    for a source no recipe is made from (a pre-quantized checkpoint).
    """
    from edgekit.sources.registry import streamable_architectures
    from edgekit.variants import plan_variants, target_variants, uses_gptq

    if streaming and architecture.streamed_builder is None:
        raise UsageError(
            f"--streaming cannot build this: architecture '{architecture.model_type}' has no streamed export yet",
            path=source,
            fix=f"build without --streaming (streamed: {', '.join(streamable_architectures())})",
        )
    tokens = calibration_tokens if uses_gptq(target) else 0
    if tokens:
        _require_gptq_groups(shapes, target, source)

    def estimate(variants: Sequence[VariantSpec], streamed: bool) -> BuildEstimate:
        return estimate_from_shapes(shapes, variants, streaming=streamed, tied=tied, calibration_tokens=tokens,
                                    gptq_one_pass=target.gptq.one_pass,
                                    recipe_hessians=target.recipe.gptq_candidates)  # fmt: skip

    memory = available_memory() if memory is None else memory
    whole, whole_dropped = _without_recipe_if_short(estimate, plan_variants(target), False, memory, recipe)
    streamed, streamed_dropped = _without_recipe_if_short(estimate, target_variants(target), True, memory, recipe)
    can_stream = architecture.streamed_builder is not None  # --streaming is a fix only where it builds
    # Only the whole build's search is short and the streamed one fits: a size bound, which only a recipe
    # keeps, streams; otherwise the whole build runs without the recipe and its warning names --streaming.
    recipe_streams = (
        can_stream and whole_dropped is not None and streamed_dropped is None and streamed.peak_memory <= memory
    )
    if recipe_streams and whole_dropped is not None and target.recipe_size_bound is not None:
        whole, whole_dropped = whole_dropped, None
    switch = not streaming and whole.peak_memory > memory >= streamed.peak_memory
    if switch and can_stream:
        check_resources(_with_disk(streamed, scratch_disk), out, source=source, memory=memory)
        return ResourcePlan(True, True, whole, streamed, streamed_dropped)
    chosen = streamed if streaming else whole
    check_resources(_with_disk(chosen, scratch_disk), out, source=source, memory=memory,
                    streamed=streamed if can_stream else None)  # fmt: skip
    dropped = streamed_dropped if streaming else whole_dropped
    return ResourcePlan(streaming, False, whole, streamed, dropped, recipe_streams and not streaming)


def _without_recipe_if_short(
    estimate: Callable[[Sequence[VariantSpec], bool], BuildEstimate],
    variants: list[VariantSpec],
    streamed: bool,
    memory: int,
    recipe: bool,
) -> tuple[BuildEstimate, BuildEstimate | None]:
    """The build's estimate, and the one with the recipe search where only the search does not fit in
    ``memory`` (the build then runs without it and deploys what it built; it warns)."""
    plain = [v for v in variants if v.method != Int4Method.RECIPE.value]
    full = estimate(variants if recipe else plain, streamed)
    if recipe and full.peak_memory > memory and len(plain) < len(variants):
        without = estimate(plain, streamed)
        if without.peak_memory <= memory:
            return without, full
    return full, None


def _require_gptq_groups(shapes: dict[str, tuple[int, ...]], target: Target, source: Path) -> None:
    """GPTQ quantizes a decoder linear in groups of ``block_size`` inputs: every input count must be a
    multiple (the RTN export pads; GPTQ's groups cannot)."""
    for name, shape in shapes.items():
        if _LAYER.search(name) and name.endswith(".weight") and len(shape) == 2 and shape[1] % target.block_size:
            raise UsageError(
                f"{name} has {shape[1]} inputs, not a multiple of the GPTQ group size of target "
                f"'{target.name}' ({target.block_size})",
                path=source,
                fix="build for a target without GPTQ (-t laptop-cpu-rtn), or one whose block_size divides it",
            )


def _with_disk(estimate: BuildEstimate, extra: int) -> BuildEstimate:
    return BuildEstimate(estimate.parameters, estimate.largest_layer, estimate.peak_memory, estimate.disk + extra,
                         estimate.streaming)  # fmt: skip
