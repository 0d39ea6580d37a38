"""``edgekit build``: checkpoint in, verified package out.

The steps: resolve and check the source (no weights read), stage it (dequantizing a GGUF file or a
pre-quantized checkpoint's reference, calibrating GPTQ when the target asks for it), export every variant
with onnxruntime-genai's builder, check the fp32 reference against PyTorch, write the manifest, measure
every variant against the reference, and rename the finished package into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

from edgekit import __version__
from edgekit.errors import (
    EdgekitError,
    ExportError,
    MissingDependencyError,
    OutputExistsError,
    SourceError,
    ValidationError,
)
from edgekit.exporters.memory_estimate import check_build_resources
from edgekit.exporters.onnx_builder import output_to_log, run_builder
from edgekit.exporters.registry import Architecture
from edgekit.exporters.sources import (
    CheckedFolder,
    SourceSpec,
    check_folder,
    classify_source,
    download_hub_snapshot,
    stage_folder,
)
from edgekit.exporters.streaming import run_streaming_builder
from edgekit.exporters.tokenizer_rule import tokenizer_rule
from edgekit.exporters.validate import ParityResult, check_reference
from edgekit.exporters.weight_files import check_gguf, parameter_count
from edgekit.exporters.zero_points import drop_default_zero_points
from edgekit.package import read_manifest, scratch_folder, sha256_file, staged_output, write_manifest
from edgekit.progress import StepRecord, StepReporter
from edgekit.quant.corpus import Corpus, builtin_corpus
from edgekit.quant.evaluate import DEFAULT_CTX, DEFAULT_WINDOWS
from edgekit.quant.gate import evaluate_and_record
from edgekit.quant.schemes import (
    PREQUANTIZED_METHODS,
    REFERENCE_VARIANT,
    VariantSpec,
    plan_variants,
    prequantized_variants,
    uses_gptq,
)
from edgekit.runtimes.chat_template import read_chat_template
from edgekit.targets import HeadPrecision, Int4Method, Precision, Target, get_target
from edgekit.tokenizer_record import TokenizerRule

BUILD_LOG = "build.log"
_TOOLS = ("onnxruntime", "onnxruntime-genai", "onnx", "transformers", "torch", "gguf", "numpy")


@dataclass
class BuildResult:
    """What a build produced."""

    out: Path
    manifest: dict[str, Any]
    steps: list[StepRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EvalSettings:
    """How a build evaluates its variants (``None`` in place of this: it does not)."""

    corpus: Corpus | None = None
    """The text to score; the built-in corpus's evaluation part by default."""
    windows: int = DEFAULT_WINDOWS
    ctx: int = DEFAULT_CTX


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration of GPTQ variants: text, sample count and length, seed."""

    corpus: Corpus | None = None
    """The text to calibrate on; the built-in corpus's calibration part by default."""
    samples: int = 128
    seq_len: int = 512
    seed: int = 0


def build(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    target: str = "laptop-cpu",
    *,
    force: bool = False,
    allow_pickle: bool = False,
    targets_file: str | os.PathLike[str] | None = None,
    progress: bool = True,
    evaluation: EvalSettings | None = EvalSettings(),
    calibration: CalibrationSettings | None = None,
    streaming: bool = False,
) -> BuildResult:
    """Build a package at ``out`` from a Hugging Face folder, a GGUF file or a hub id, for ``target``.

    ``evaluation`` scores every variant against the fp32 reference and judges it against every target's
    budget (``None`` skips it). ``streaming`` exports one decoder layer at a time from disk
    (``exporters/streaming.py``): memory that does not grow with the model, the target's variants only
    (no fp32 reference, so no validation and no evaluation). Before any weight is read the build's peak
    memory and disk are estimated, and a machine short of either is refused with the numbers.
    """
    _require_export_extra()
    targets_path = None if targets_file is None else Path(targets_file)
    profile = get_target(target, targets_path)
    spec = classify_source(source)
    out_path = Path(out)
    if spec.path is not None and (out_path.resolve() == spec.path or out_path.resolve() in spec.path.parents):
        raise OutputExistsError(
            "is the source checkpoint or holds it; --force would delete the source",
            path=out_path,
            fix="choose an output folder outside the checkpoint",
        )
    # Everything that can be checked without reading weights is checked before anything is written.
    prechecked = _precheck(spec, allow_pickle)
    with (
        staged_output(out_path, force=force) as staging,
        scratch_folder(out_path) as work,
        StepReporter(enabled=progress) as reporter,
        _log_kept_on_failure(staging, out_path),
    ):
        result = _build_into(
            spec,
            prechecked,
            profile,
            staging,
            work,
            reporter,
            allow_pickle,
            evaluation,
            targets_path,
            calibration,
            streaming,
        )
    result.out = out_path.absolute()
    return result


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
        from edgekit.exporters.gguf_import import gguf_architecture

        check_gguf(spec.path)
        gguf_architecture(spec.path)
    return None


def _make_gptq_checkpoint(
    hf_folder: Path,
    out: Path,
    target: Target,
    settings: CalibrationSettings,
    detail: Callable[[str], None],
    log_path: Path,
    rule: TokenizerRule,
) -> None:
    from edgekit.quant.gptq import GPTQConfig
    from edgekit.quant.gptq_checkpoint import calibration_tokens, write_gptq_checkpoint

    corpus = settings.corpus or builtin_corpus("calibration")
    bos = rule.bos_token_id if rule.add_bos_token else None
    tokens = calibration_tokens(
        hf_folder / "tokenizer.json", corpus, settings.samples, settings.seq_len, settings.seed, bos
    )
    with output_to_log(log_path):
        config = GPTQConfig(
            group_size=target.block_size,
            sym=target.gptq.sym,
            damp=target.gptq.damp,
            act_order=target.gptq.act_order,
            one_pass=target.gptq.one_pass,
        )
        write_gptq_checkpoint(hf_folder, out, config, tokens, progress=detail)


def _plan_sources(
    hf_folder: Path,
    checked: CheckedFolder,
    target: Target,
    work: Path,
    reporter: StepReporter,
    settings: CalibrationSettings,
    log_path: Path,
    streaming: bool,
    rule: TokenizerRule,
) -> tuple[list[VariantSpec], dict[str, Path]]:
    """The variants to export and the folder each is exported from (``hf_folder`` unless named).

    A pre-quantized source (GPTQ, AWQ) gives its own INT4 variant, and an fp32 reference dequantized
    from it (not when streamed: the packed linears are exported as they are). Otherwise, GPTQ variants
    come from a checkpoint calibrated here, one layer at a time, the rest from the source.
    """
    if checked.quantization is not None and streaming:
        return prequantized_variants(target, checked.quantization), {}
    if checked.quantization is not None:
        from edgekit.exporters.quantized_sources import dequantize_checkpoint

        reference_folder = work / "dequantized"
        with reporter.step(f"dequantize the {checked.quantization} checkpoint for the fp32 reference"):
            staged_config = json.loads((hf_folder / "config.json").read_text(encoding="utf-8"))
            dequantize_checkpoint(hf_folder, reference_folder, staged_config, checked.quantization)
            # Packed int32 words are not parameters: count the dequantized weights.
            checked.parameter_count = parameter_count(sorted(reference_folder.glob("*.safetensors")))
        return prequantized_variants(target, checked.quantization), {REFERENCE_VARIANT: reference_folder}
    folders: dict[str, Path] = {}
    if uses_gptq(target):
        gptq_folder = work / "gptq-hf"
        with reporter.step(f"GPTQ ({settings.samples} x {settings.seq_len} calibration tokens)") as detail:
            _make_gptq_checkpoint(hf_folder, gptq_folder, target, settings, detail, log_path, rule)
        folders = {v.name: gptq_folder for v in plan_variants(target) if v.method == Int4Method.GPTQ.value}
    return plan_variants(target), folders


def _build_into(
    spec: SourceSpec,
    prechecked: CheckedFolder | None,
    target: Target,
    staging: Path,
    work: Path,
    reporter: StepReporter,
    allow_pickle: bool,
    evaluation: EvalSettings | None,
    targets_file: Path | None,
    calibration: CalibrationSettings | None,
    streaming: bool = False,
) -> BuildResult:
    log_path = staging / BUILD_LOG
    log_path.touch()
    with output_to_log(log_path):  # transformers' and the builder's progress bars belong in the log
        hf_folder, checked, source_files = _prepare_source(spec, prechecked, work, reporter, allow_pickle)
        rule = _tokenizer_rule(spec, hf_folder)
    variants: dict[str, dict[str, Any]] = {}
    settings = calibration or CalibrationSettings()
    # before any weight is read
    check_build_resources(hf_folder, checked, target, staging, streaming, settings.samples * settings.seq_len)
    plan, folders = _plan_sources(hf_folder, checked, target, work, reporter, settings, log_path, streaming, rule)
    if streaming:
        plan = [variant for variant in plan if variant.name != REFERENCE_VARIANT]
        if checked.quantization is not None:
            evaluation = None  # packed linears cannot be run in PyTorch as the reference
        checked.warnings.append(
            "streamed build: no fp32 reference, so no validation against PyTorch; "
            + ("no evaluation" if evaluation is None else "variants are evaluated against the checkpoint streamed")
        )
    for variant in plan:
        # The builder's own loader cannot read every architecture's packed checkpoints (Qwen3.5's);
        # the streamed export repacks each packed linear the builder's way and can.
        streamed = streaming or (variant.method in PREQUANTIZED_METHODS and checked.architecture.prequantized_streamed)
        if streamed and variant.lm_head == HeadPrecision.INT8.value:
            # The streamed export quantizes every MatMul alike; on a large model the head is a small part.
            variant = replace(variant, lm_head=HeadPrecision.INT4.value)
            checked.warnings.append(f"streamed export: {variant.name}'s int8 LM head (the target's) is built int4")
        export = run_streaming_builder if streamed else run_builder
        with reporter.step(f"export {variant.name} ({variant.precision}, {variant.provider})"):
            export(
                folders.get(variant.name, hf_folder),
                staging / variant.name,
                precision=variant.precision,
                provider=variant.provider,
                options=variant.builder_options(tied_embeddings=bool(checked.config.get("tie_word_embeddings"))),
                cache_dir=work / "builder-cache",
                log_path=log_path,
            )
            checked.architecture.adapt_export(staging / variant.name)
            if variant.precision == Precision.INT4.value:
                drop_default_zero_points(staging / variant.name)
        variants[variant.name] = _variant_entry(variant, staging)
    parity = None
    if not streaming:
        with reporter.step("validate fp32 ONNX against PyTorch"), output_to_log(log_path):
            architecture = checked.architecture
            parity = check_reference(
                folders.get(REFERENCE_VARIANT, hf_folder),
                staging / REFERENCE_VARIANT,
                architecture.builder_class,
                architecture.tolerance,
            )
    has_template = read_chat_template(staging / plan[-1].name) is not None
    if not has_template:
        checked.warnings.append(
            "the source has no chat template: `edgekit run --raw` and Model.generate work, chat needs "
            "--chat-template FILE"
        )
    tokenizer = {**rule.as_dict(), "chat_template": has_template}
    manifest = _manifest(spec, target, checked, source_files, variants, parity, reporter.records, tokenizer)
    with reporter.step("write manifest"):
        write_manifest(staging, manifest)
    if evaluation is not None:
        windows = evaluation.windows
        # A streamed build's reference is the checkpoint run in PyTorch one layer at a time.
        against = "the checkpoint in PyTorch, layer by layer" if streaming else "fp32"
        with reporter.step(f"evaluate variants against {against} ({windows} windows of {evaluation.ctx})") as detail:
            evaluate_and_record(
                staging,
                corpus=evaluation.corpus,
                windows=windows,
                ctx=evaluation.ctx,
                targets_file=targets_file,
                progress=detail,
                verify=False,
                reference_checkpoint=hf_folder if streaming else None,
            )
        manifest = read_manifest(staging)
    return BuildResult(staging, manifest, reporter.records, checked.warnings)


def _tokenizer_rule(spec: SourceSpec, hf_folder: Path) -> TokenizerRule:
    """The source's BOS rule: a GGUF file's own metadata, else what the folder's tokenizer does."""
    metadata = None
    if spec.kind == "gguf" and spec.path is not None:
        from edgekit.exporters.gguf_header import read_gguf_header

        metadata = read_gguf_header(spec.path).metadata
    return tokenizer_rule(hf_folder, metadata)


def _prepare_source(
    spec: SourceSpec, prechecked: CheckedFolder | None, work: Path, reporter: StepReporter, allow_pickle: bool
) -> tuple[Path, CheckedFolder, list[Path]]:
    """Stage the source as a Hugging Face folder the builder can read (dequantizing or downloading it)."""
    if spec.kind == "gguf":
        assert spec.path is not None
        from edgekit.exporters.gguf_import import import_gguf

        with reporter.step("dequantize GGUF to fp32 (transformers) and verify"):
            imported = import_gguf(spec.path, work / "gguf-hf")
        checked = check_folder(work / "gguf-hf")
        checked.warnings.append(f"verified {imported.tensors_checked} tensors against the GGUF file")
        source_files = [spec.path]
    elif prechecked is not None:
        checked, source_files = prechecked, prechecked.weight_files
    else:
        with reporter.step(f"download {spec.origin}"):
            folder = download_hub_snapshot(spec.origin)
            checked = check_folder(folder, allow_pickle=allow_pickle)
        source_files = checked.weight_files
    with reporter.step("stage checkpoint for the builder"):
        staged = stage_folder(checked, work / "staged")
        if not checked.parameter_count:
            checked.parameter_count = parameter_count(sorted(staged.glob("*.safetensors")))
    return staged, checked, source_files


def _variant_entry(variant: VariantSpec, root: Path) -> dict[str, Any]:
    folder = root / variant.name
    return {
        "path": variant.name,
        "precision": variant.precision,
        "method": variant.method,
        "provider": variant.provider,
        "block_size": variant.block_size,
        "accuracy_level": variant.accuracy_level,
        "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
    }


def _manifest(
    spec: SourceSpec,
    target: Target,
    checked: CheckedFolder,
    source_files: list[Path],
    variants: dict[str, dict[str, Any]],
    parity: ParityResult | None,
    steps: list[StepRecord],
    tokenizer: dict[str, Any],
) -> dict[str, Any]:
    architecture: Architecture = checked.architecture
    deployed = list(variants)[-1]
    return {
        "edgekit_version": __version__,
        "source": {
            "kind": spec.kind,
            "location": spec.origin,
            "weights": [{"name": p.name, "sha256": sha256_file(p, SourceError)} for p in source_files],
        },
        "architecture": architecture.model_type,
        "parameter_count": checked.parameter_count,
        "target": target.name,
        "default_variant": deployed,
        "targets": {target.name: {"variant": deployed, "providers": [p.value for p in target.providers]}},
        "variants": variants,
        "tokenizer": tokenizer,
        "validation": {"skipped": "streamed build: no fp32 reference"}
        if parity is None
        else {
            "variant": REFERENCE_VARIANT,
            "prompt": parity.prompt,
            "tokens": parity.tokens,
            "max_abs_diff": parity.max_abs_diff,
            "tolerance": parity.tolerance,
            "top1_agreement": parity.top1_agreement,
        },
        "tools": {"python": platform.python_version(), **{name: _version(name) for name in _TOOLS}},
        "build_steps": [record.as_dict() for record in steps],
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _require_export_extra() -> None:
    missing = [name for name in ("torch", "transformers", "safetensors") if _version(name) is None]
    if missing:
        raise MissingDependencyError(
            f"building needs {', '.join(missing)}, which are not installed",
            fix="pip install 'edgekit[export]' (with torch==2.13.0 for the CPU build)",
        )
