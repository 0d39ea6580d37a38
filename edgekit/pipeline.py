"""``edgekit build``: checkpoint in, verified package out.

The steps (``build_steps.py``): resolve and check the source (no weights read), stage it (dequantizing a
GGUF file or a pre-quantized checkpoint's reference, calibrating GPTQ when the target asks for it), export
every variant with onnxruntime-genai's builder, check the fp32 reference against PyTorch, write the
manifest, measure every variant against the reference, and rename the finished package into place.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.build_context import BUILD_LOG, BuildContext, BuildOptions, CalibrationSettings, EvalSettings
from edgekit.build_steps import BUILD_STEPS, named_by_source, tool_version
from edgekit.errors import (
    EdgekitError,
    ExportError,
    MissingDependencyError,
    OutputExistsError,
    UsageError,
    ValidationError,
)
from edgekit.package.manifest import read_manifest
from edgekit.package.staging import scratch_folder, staged_output
from edgekit.progress import StepRecord, StepReporter
from edgekit.sources.checkpoint import CheckedFolder, SourceSpec, check_folder, classify_source
from edgekit.sources.weight_files import check_gguf
from edgekit.targets import (
    DEFAULT_TARGET,
    Int4Method,
    Target,
    bundled_targets_path,
    describe_validation_error,
    get_target,
    with_max_model_bytes,
    with_min_decode_ratio,
)

DEFAULT_EVALUATION = EvalSettings()
"""A build's evaluation unless told otherwise: the built-in corpus, the default protocol."""

__all__ = ["BuildResult", "CalibrationSettings", "EvalSettings", "build", "failed_log_path"]


@dataclass
class BuildResult:
    """What a build produced."""

    out: Path
    manifest: dict[str, Any]
    steps: list[StepRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def build(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    target: str = DEFAULT_TARGET,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    targets_file: str | os.PathLike[str] | None = None,
    progress: bool = True,
    evaluation: EvalSettings | None = DEFAULT_EVALUATION,
    calibration: CalibrationSettings | None = None,
    streaming: bool = False,
    max_model_bytes: int | None = None,
    min_decode_ratio: float | None = None,
) -> BuildResult:
    """Build a package at ``out`` from a Hugging Face folder, a GGUF file or a hub id, for ``target``.

    ``evaluation`` scores every variant against the fp32 reference and judges it against the budget of
    every target the package can deploy (``None`` skips it). ``streaming`` exports one decoder layer at a
    time from disk (``exporters/streaming.py``): the export's memory does not grow with the model, the
    package holds the target's variants only, no fp32 reference (so no validation against PyTorch; the
    variants are evaluated against the checkpoint run in PyTorch layer by layer; a recipe is searched on
    an fp32 export streamed to scratch space). Before any weight is read the build's peak memory and
    disk are estimated, and a machine short of either is refused with the numbers. ``max_model_bytes``
    deploys a per-tensor recipe whose model files fit in that many bytes (docs/recipes.md);
    ``min_decode_ratio`` sets the recipe's speed bound (decode at least that times the RTN variant's).
    """
    _require_export_extra()
    targets_path = None if targets_file is None else Path(targets_file)
    profile = get_target(target, targets_path)
    if max_model_bytes is not None:
        profile = _with_size_budget(profile, max_model_bytes, targets_path)
    if min_decode_ratio is not None:
        profile = _with_speed_bound(profile, min_decode_ratio, targets_path)
    spec = classify_source(source)
    out_path = Path(out)
    if spec.path is not None and (out_path.resolve() == spec.path or out_path.resolve() in spec.path.parents):
        raise OutputExistsError(
            "is the source checkpoint or holds it; --force would delete the source",
            path=out_path,
            fix="choose an output folder outside the checkpoint",
        )
    options = BuildOptions(allow_pickle, evaluation, calibration or CalibrationSettings(), streaming, targets_path)
    # Everything that can be checked without reading weights is checked before anything is written.
    prechecked = _precheck(spec, allow_pickle)
    with (
        staged_output(out_path, force=force) as staging,
        scratch_folder(out_path) as work,
        StepReporter(enabled=progress) as reporter,
        _log_kept_on_failure(staging, out_path),
    ):
        context = BuildContext(spec, profile, options, staging, work, reporter, prechecked)
        with named_by_source(context):
            for step in BUILD_STEPS:
                step(context)
        result = BuildResult(staging, read_manifest(staging), reporter.records, context.warnings)
    result.out = out_path.absolute()
    return result


def _with_size_budget(profile: Target, max_model_bytes: int, targets_path: Path | None) -> Target:
    """``profile`` deploying a recipe within ``max_model_bytes``, or a one-line error where it cannot take one."""
    from pydantic import ValidationError as SchemaError

    try:
        return with_max_model_bytes(profile, max_model_bytes)
    except SchemaError as exc:
        problem = describe_validation_error(exc, Target).replace("\n", "; ")
        raise UsageError(
            f"--max-model-bytes on target '{profile.name}': {problem}",
            path=targets_path or bundled_targets_path(),
            fix="use a CPU int4 target (laptop-cpu), or leave --max-model-bytes out",
        ) from None


def _with_speed_bound(profile: Target, ratio: float, targets_path: Path | None) -> Target:
    """``profile`` whose recipe decodes at least ``ratio`` times RTN's, or a one-line error."""
    from pydantic import ValidationError as SchemaError

    path = targets_path or bundled_targets_path()
    if Int4Method.RECIPE not in profile.int4_methods:
        raise UsageError(
            f"--min-decode-ratio on target '{profile.name}': the target builds no per-tensor recipe",
            path=path,
            fix="add --max-model-bytes N, or use a recipe target (laptop-cpu-recipe)",
        )
    try:
        return with_min_decode_ratio(profile, ratio)
    except SchemaError as exc:
        problem = describe_validation_error(exc, Target).replace("\n", "; ")
        fix = "give a ratio above 0, at most 4"
        raise UsageError(f"--min-decode-ratio {ratio}: {problem}", fix=fix) from None  # the option, not the file


def failed_log_path(out: Path) -> Path:
    """Where the log of a failed build of ``out`` is kept: ``OUT.failed-build.log`` beside it."""
    out = out.absolute()
    return out.with_name(f"{out.name}.failed-build.log")


@contextlib.contextmanager
def _log_kept_on_failure(staging: Path, out: Path) -> Iterator[None]:
    """Keep the log of a build whose work failed beside OUT (the staging folder is deleted); point the error at it.

    Only export and validation failures keep it: bad input (a ``UsageError``) or a machine too small
    (``ResourceError``) is refused before the builder runs, and its one-line error says all there is.
    """
    kept = failed_log_path(out)
    try:
        yield
    except EdgekitError as exc:
        log = staging / BUILD_LOG
        if not isinstance(exc, (ExportError, ValidationError)) or not log.is_file():
            raise
        os.replace(log, kept)
        if exc.path is not None and Path(exc.path).absolute().is_relative_to(staging):
            raise type(exc)(exc.problem, path=kept, fix=exc.fix or "see the build log") from None
        fix = f"{exc.fix or 'see the build log'}; the build log is kept at {kept}"
        raise type(exc)(exc.problem, path=exc.path, fix=fix) from None
    kept.unlink(missing_ok=True)  # an older failure's log no longer describes OUT


def _precheck(spec: SourceSpec, allow_pickle: bool) -> CheckedFolder | None:
    """Checks that need no weights: the folder's config, architecture and file headers, or the GGUF layout."""
    if spec.kind == "folder":
        assert spec.path is not None
        return check_folder(spec.path, allow_pickle=allow_pickle)
    if spec.kind == "gguf":
        assert spec.path is not None
        from edgekit.sources.gguf_import import gguf_architecture

        check_gguf(spec.path)
        gguf_architecture(spec.path)
    return None


def _require_export_extra() -> None:
    missing = [name for name in ("torch", "transformers", "safetensors") if tool_version(name) is None]
    if missing:
        raise MissingDependencyError(
            f"building needs {', '.join(missing)}, which are not installed",
            fix='pip install torch==2.13.0 (the CPU build), then pip install ".[export]" in a clone of edgekit',
        )
