"""The steps of ``edgekit build``, each a function of one ``BuildContext`` that it fills in as it goes.

prepare the source -> check memory and disk -> plan the variants (GPTQ, a pre-quantized checkpoint's
reference) -> export them -> validate the fp32 export against PyTorch -> write the manifest -> evaluate.
``pipeline.build`` sets up the context (the staged output folder, scratch space, progress) and runs them
in that order; nothing in a step mutates what an earlier step returned, it adds to the context.
"""

from __future__ import annotations

import contextlib
import json
import platform
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

from edgekit.accuracy.gate import evaluate_and_record
from edgekit.accuracy.texts import Corpus, builtin_corpus
from edgekit.build_context import BuildContext, EvalSettings, PreparedSource
from edgekit.errors import EdgekitError, ResourceError, SourceError, UsageError
from edgekit.exporters.last_position import keep_last_position_in_folder
from edgekit.exporters.memory_estimate import check_build_resources, check_gguf_resources
from edgekit.exporters.onnx_builder import output_to_log, run_builder
from edgekit.exporters.parallel_matmuls import join_parallel_matmuls_in_folder
from edgekit.exporters.streaming import run_streaming_builder
from edgekit.exporters.tokenizer_parity import TokenizerParity, check_tokenizer_parity
from edgekit.exporters.validate import validate_export
from edgekit.exporters.zero_points import drop_default_zero_points
from edgekit.package.manifest import sha256_file, write_manifest
from edgekit.runtimes.chat_template import read_chat_template
from edgekit.sources.checkpoint import check_folder, download_hub_snapshot, stage_folder
from edgekit.sources.tokenizer_rule import source_tokenizer_rule
from edgekit.sources.weight_files import parameter_count
from edgekit.targets import HeadPrecision, Int4Method, Precision, Target
from edgekit.variants import (
    PREQUANTIZED_METHODS,
    REFERENCE_VARIANT,
    VariantSpec,
    plan_variants,
    prequantized_variants,
    reference_variant,
    uses_gptq,
)
from edgekit.version import __version__

_TOOLS = ("onnxruntime", "onnxruntime-genai", "onnx", "transformers", "torch", "gguf", "numpy")


def locate_source(context: BuildContext) -> None:
    """The checked source folder: the user's (checked already), or a hub download; a GGUF file needs nothing here."""
    spec = context.spec
    if spec.kind == "hub":
        context.log_path.touch()
        with context.reporter.step(f"download {spec.origin}"), output_to_log(context.log_path):
            folder = download_hub_snapshot(spec.origin)
        context.prechecked = check_folder(folder, allow_pickle=context.options.allow_pickle)


def check_resources(context: BuildContext) -> None:
    """Refuse, before any weight is read, a build this machine's memory or the output's disk cannot hold.

    A whole-model build that would not fit in memory, where the streamed export would, is built streamed
    instead, and the progress display says so. A GGUF file is judged from its header alone.
    """
    settings, target, spec = context.options.calibration, context.target, context.spec
    tokens = settings.samples * settings.seq_len
    streaming = context.options.streaming
    if spec.kind == "gguf" and spec.path is not None:
        from edgekit.sources.gguf_import import gguf_architecture

        plan = check_gguf_resources(spec.path, gguf_architecture(spec.path), target, context.staging, streaming, tokens)
    else:
        checked = context.prechecked
        assert checked is not None
        if checked.quantization is not None:
            why = f"a {checked.quantization} checkpoint is deployed as it is, with no recipe"
            refuse_size_bound(target, why, UsageError, "drop --max-model-bytes (or the target's max_model_bytes)")
        plan = check_build_resources(checked.folder, checked, target, context.staging, streaming, tokens)
    chosen = plan.streamed if context.options.streaming or plan.switched else plan.whole
    how = "streamed" if chosen.streaming else "whole model"
    context.reporter.print(
        f"[dim]estimate ({how}, {chosen.parameters / 1e9:.2f}B parameters): peak {chosen.peak_memory / 2**30:.1f} "
        f"GiB of memory, {chosen.disk / 1e9:.1f} GB of disk[/dim]"
    )
    if plan.recipe_dropped is not None:
        fix = "drop --max-model-bytes (or the target's max_model_bytes), or build on a machine with more memory"
        refuse_size_bound(target, "the recipe search does not fit in this machine's memory", ResourceError, fix)
        streams = "build with --streaming, whose search fits, or " if plan.recipe_streams else "build "
        context.recipe_dropped = (
            f"the recipe search needs about {plan.recipe_dropped.peak_memory / 2**30:.1f} GiB of memory, more than "
            f"is available, so no int4-recipe ({streams}on a machine with more memory, or for a target without "
            "recipe in its int4_methods, such as laptop-cpu-rtn)"
        )
    if plan.switched:
        note = (
            f"streamed export: the whole-model build needs about {plan.whole.peak_memory / 2**30:.1f} GiB of memory, "
            f"more than is available; streamed, about {plan.streamed.peak_memory / 2**30:.1f} GiB"
        )
        context.warnings.append(note)
        context.reporter.print(f"[yellow]{note}[/yellow]")
        context.options = replace(context.options, streaming=True)


def prepare_source(context: BuildContext) -> None:
    """Stage the source as a Hugging Face folder the builder can read (a GGUF file written out tensor by tensor)."""
    spec, reporter = context.spec, context.reporter
    context.log_path.touch()
    with output_to_log(context.log_path):  # transformers' and the builder's progress bars belong in the log
        if spec.kind == "gguf":
            assert spec.path is not None
            from edgekit.sources.gguf_import import import_gguf

            with reporter.step("convert GGUF to fp32 safetensors, tensor by tensor, and verify"):
                imported = import_gguf(spec.path, context.work / "gguf-hf")
            checked = check_folder(context.work / "gguf-hf")
            context.warnings.append(f"verified {imported.tensors_checked} tensors against the GGUF file")
            files = [spec.path]
        else:
            assert context.prechecked is not None
            checked, files = context.prechecked, context.prechecked.weight_files
        context.warnings.extend(checked.warnings)
        with reporter.step("stage checkpoint for the builder"):
            staged = stage_folder(checked, context.work / "staged")
            parameters = checked.parameter_count or parameter_count(sorted(staged.glob("*.safetensors")))
        rule = source_tokenizer_rule(staged, gguf=spec.path if spec.kind == "gguf" else None, origin=spec.origin)
    context.source = PreparedSource(staged, checked, files, parameters, rule)


@contextlib.contextmanager
def named_by_source(context: BuildContext) -> Iterator[None]:
    """A source error about a file of the build's scratch folder names the user's file instead: the staged
    copy of a checkpoint's file (a link to it), or the GGUF file whose metadata transformers wrote out."""
    work = context.work.absolute()
    try:
        yield
    except SourceError as exc:
        where = Path(exc.path).absolute() if exc.path is not None else None
        if where is None or not where.is_relative_to(work) or context.spec.path is None:
            raise
        if context.spec.kind == "gguf":  # a fix about the folder's own files does not apply to a GGUF file
            fix = _GGUF_FIX if not exc.fix or ".json" in exc.fix or ".jinja" in exc.fix else exc.fix
            raise type(exc)(f"{exc.problem} (in what transformers made of the file's metadata)",
                            path=context.spec.path, fix=fix) from None  # fmt: skip
        staged = work / "staged"
        path = context.spec.path / where.relative_to(staged) if where.is_relative_to(staged) else context.spec.path
        raise type(exc)(exc.problem, path=path, fix=exc.fix) from None


_GGUF_FIX = "convert the checkpoint again with a current llama.cpp, or build from the Hugging Face folder"


def plan_variants_step(context: BuildContext) -> None:
    """The variants to export and the folder each comes from: GPTQ calibrated here, a pre-quantized reference."""
    source, target = context.prepared, context.target
    method = source.checked.quantization
    if method is not None:
        context.plan = prequantized_variants(target, method)
        if Int4Method.RECIPE in target.int4_methods:
            context.warnings.append(f"a {method} checkpoint is deployed as it is: no int4-recipe is made from it")
        if not context.options.streaming:  # the packed linears' fp32 function, for validation and evaluation
            context.folders = {REFERENCE_VARIANT: _dequantized_reference(context, method)}
    else:
        context.plan = plan_variants(target)
        if uses_gptq(target):
            gptq_folder = context.work / "gptq-hf"
            settings = context.options.calibration
            with context.reporter.step(f"GPTQ ({settings.samples} x {settings.seq_len} calibration tokens)") as detail:
                _make_gptq_checkpoint(context, gptq_folder, detail)
            context.folders = {v.name: gptq_folder for v in context.plan if v.method == Int4Method.GPTQ.value}
    if context.recipe_dropped is not None:  # set by plan_resources when the search alone does not fit
        context.warnings.append(context.recipe_dropped)
        context.plan = [variant for variant in context.plan if variant.method != Int4Method.RECIPE.value]
    if context.options.streaming:
        # No fp32 variant in the package: a recipe is searched on a streamed fp32 export made for it alone.
        context.plan = [variant for variant in context.plan if variant.name != REFERENCE_VARIANT]
        evaluation = "no evaluation" if _evaluation(context) is None else "variants evaluated against the checkpoint"
        context.warnings.append(f"streamed build: no fp32 reference, so no validation against PyTorch; {evaluation}")


def refuse_size_bound(target: Target, why: str, error: type[EdgekitError], fix: str) -> None:
    """Refuse, before any weight is read, a build that cannot make ``target``'s recipe (``why``) when the
    recipe is held to ``max_model_bytes``: no other variant is, so the package would break the bound."""
    if (limit := target.recipe_size_bound) is not None:
        raise error(f"{why}, and only a recipe can be held to max_model_bytes ({limit:,})", fix=fix)


def export_variants(context: BuildContext) -> None:
    """Export every planned variant with the builder (or the streamed export), into the staged package."""
    source = context.prepared
    recipe_planned = any(variant.method == Int4Method.RECIPE.value for variant in context.plan)
    for variant in context.plan:
        if variant.method == Int4Method.RECIPE.value:
            continue  # made from the exported fp32 graph by build_recipe
        # The builder's own loader cannot read every architecture's packed checkpoints (Qwen3.5's);
        # the streamed export repacks each packed linear the builder's way and can.
        prequantized = variant.method in PREQUANTIZED_METHODS and source.checked.architecture.prequantized_streamed
        streamed = context.options.streaming or prequantized
        if streamed and variant.lm_head == HeadPrecision.INT8.value:
            # The streamed export quantizes every MatMul alike; on a large model the head is a small part.
            variant = replace(variant, lm_head=HeadPrecision.INT4.value)
            context.warnings.append(f"streamed export: {variant.name}'s int8 LM head (the target's) is built int4")
        folder = context.staging / variant.name
        with context.reporter.step(f"export {variant.name} ({variant.precision}, {variant.provider})"):
            _export(context, variant, folder, streamed)
            if variant.precision == Precision.INT4.value:
                drop_default_zero_points(folder)
            if variant.name != REFERENCE_VARIANT and variant.provider == "cpu":
                keep_last_position_in_folder(folder)  # the reference stays as exported: validation compares it whole
                # The join reads the whole variant into memory (exporters/parallel_matmuls.py): streamed, only
                # where a recipe search (which holds more) follows, so the recipe is timed against a joined RTN.
                if not streamed or recipe_planned:
                    join_parallel_matmuls_in_folder(folder)
        context.variants[variant.name] = _variant_entry(variant, folder)


def _export(context: BuildContext, variant: VariantSpec, folder: Path, streamed: bool) -> None:
    """Export ``variant`` of the prepared source into ``folder``, with the builder or streamed."""
    source = context.prepared
    export = run_streaming_builder if streamed else run_builder
    export(
        context.folders.get(variant.name, source.folder),
        folder,
        precision=variant.precision,
        provider=variant.provider,
        options=variant.builder_options(tied_embeddings=bool(source.checked.config.get("tie_word_embeddings"))),
        cache_dir=context.work / "builder-cache",
        log_path=context.log_path,
    )
    source.checked.architecture.adapt_export(folder)


def validate(context: BuildContext) -> None:
    """Compare the fp32 export with PyTorch on short and long prompts, within a bound from the model's own float noise.

    A streamed build has no fp32 export to compare.
    """
    if context.options.streaming:
        return
    architecture = context.prepared.checked.architecture
    with context.reporter.step("validate fp32 ONNX against PyTorch"), output_to_log(context.log_path):
        try:
            context.parity = validate_export(
                context.folders.get(REFERENCE_VARIANT, context.prepared.folder),
                context.staging / REFERENCE_VARIANT,
                architecture.builder_class,
                architecture.tolerance,
            )
        except SourceError as exc:  # found in the staged copy: name the user's source instead
            raise SourceError(exc.problem, path=context.spec.origin, fix=exc.fix) from None


def build_recipe(context: BuildContext) -> None:
    """Make the ``int4-recipe`` variant: each tensor's format chosen by measured loss (``recipe_step.py``)."""
    variant = next((v for v in context.plan if v.method == Int4Method.RECIPE.value), None)
    if variant is None:
        return
    if not context.options.streaming:
        _build_recipe_from(context, variant, context.staging / REFERENCE_VARIANT)
        return
    # A streamed build's fp32 export exists for the search alone, written to disk a layer at a time; the
    # search's session, whose weights are overridable inputs, maps them from the file (quant/probe_session.py).
    fp32_dir = context.work / "recipe-fp32"
    try:
        with context.reporter.step("export fp32 (streamed) to search the recipe on"):
            _export(context, reference_variant(), fp32_dir, streamed=True)
        _build_recipe_from(context, variant, fp32_dir)
    finally:
        shutil.rmtree(fp32_dir, ignore_errors=True)


def _build_recipe_from(context: BuildContext, variant: VariantSpec, fp32_dir: Path) -> None:
    from edgekit.quant.recipe_build import require_candidates
    from edgekit.recipe_step import CALIBRATION_CTX, CALIBRATION_WINDOWS, make_recipe_variant, recipe_candidates

    try:
        require_candidates(fp32_dir, recipe_candidates(context.target))
    except UsageError as exc:  # no format fits some linear (inputs not a whole number of blocks)
        refuse_size_bound(context.target, exc.problem, UsageError, exc.fix or "")
        context.warnings.append(f"no {variant.name}: {exc.problem}; the RTN variant, whose export pads, is deployed")
        context.plan = [v for v in context.plan if v is not variant]
        return
    config = json.loads((fp32_dir / "genai_config.json").read_text(encoding="utf-8"))
    ctx = min(CALIBRATION_CTX, int(config["model"]["context_length"]))
    corpus, windows = _calibration_windows(context, fp32_dir / "tokenizer.json", CALIBRATION_WINDOWS, ctx)
    folder = context.staging / variant.name
    rtn = f"int4-{Int4Method.RTN.value}"
    with context.reporter.step(f"search and build {variant.name} (per-tensor formats)") as detail:
        outcome = make_recipe_variant(
            fp32_dir,
            context.staging / rtn,
            folder,
            context.work / "recipe",
            context.target,
            windows.numpy(),
            (corpus, context.options.calibration.seed),
            detail,
            rtn_head=HeadPrecision(context.variants[rtn]["lm_head"]),  # as built: a streamed export's is int4
        )
    context.warnings.extend(f"{variant.name}: {note}" for note in outcome.notes)
    head = outcome.formats.get("lm_head")
    entry = {**_variant_entry(variant, folder), "block_size": None, "lm_head": head, "recipe": outcome.as_manifest()}
    context.variants[variant.name] = entry
    # The manifest lists variants in plan order: the deployed one last.
    context.variants = {v.name: context.variants[v.name] for v in context.plan if v.name in context.variants}


def check_tokenizer(context: BuildContext) -> None:
    """Check every variant's tokenizer and chat template, as the runtime uses them, against the source's."""
    source = context.prepared
    checked: dict[bytes, TokenizerParity] = {}
    title = "check tokenizer and chat template against the source's"
    with context.reporter.step(title), output_to_log(context.log_path):
        for name in context.variants:
            folder = context.staging / name
            # Variants usually carry the same tokenizer files: check each distinct set once.
            files = (folder / f for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"))
            key = b"\0".join(f.read_bytes() if f.is_file() else b"" for f in files)
            if key not in checked:
                checked[key] = check_tokenizer_parity(source.folder, folder, source.rule)
            context.tokenizer_parity = checked[key]


def record_manifest(context: BuildContext) -> None:
    """Write ``manifest.json``: source and its hashes, variants, tokenizer rule, validation, tools, steps."""
    has_template = read_chat_template(context.staging / context.plan[-1].name) is not None
    if not has_template:
        context.warnings.append(
            "the source has no chat template: `edgekit run --raw` and Model.generate work, chat needs "
            "--chat-template FILE"
        )
    with context.reporter.step("write manifest"):
        write_manifest(context.staging, _manifest(context, has_template))


def evaluate(context: BuildContext) -> None:
    """Score every variant against the reference and record the results and budget verdicts."""
    evaluation = _evaluation(context)
    if evaluation is None:
        return
    streaming = context.options.streaming
    # A streamed build's reference is the checkpoint run in PyTorch one layer at a time.
    against = "the checkpoint in PyTorch, layer by layer" if streaming else "fp32"
    title = f"evaluate variants against {against} ({evaluation.windows} windows of {evaluation.ctx})"
    with context.reporter.step(title) as detail:
        evaluate_and_record(
            context.staging,
            corpus=evaluation.corpus,
            windows=evaluation.windows,
            ctx=evaluation.ctx,
            targets_file=context.options.targets_file,
            progress=detail,
            verify=False,
            reference_checkpoint=context.prepared.folder if streaming else None,
        )


BUILD_STEPS: tuple[Callable[[BuildContext], None], ...] = (
    locate_source,
    check_resources,
    prepare_source,
    plan_variants_step,
    export_variants,
    validate,
    build_recipe,
    check_tokenizer,
    record_manifest,
    evaluate,
)
"""The steps of a build, in order."""


def _evaluation(context: BuildContext) -> EvalSettings | None:
    """The evaluation to run: none for a streamed pre-quantized source (its packed linears cannot run in PyTorch)."""
    if context.options.streaming and context.prepared.checked.quantization is not None:
        return None
    return context.options.evaluation


def _dequantized_reference(context: BuildContext, method: str) -> Path:
    from edgekit.sources.prequantized import dequantize_checkpoint

    source = context.prepared
    folder = context.work / "dequantized"
    with context.reporter.step(f"dequantize the {method} checkpoint for the fp32 reference"):
        staged_config = json.loads((source.folder / "config.json").read_text(encoding="utf-8"))
        dequantize_checkpoint(source.folder, folder, staged_config, method)
    # Packed int32 words are not parameters: count the dequantized weights.
    context.source = replace(source, parameters=parameter_count(sorted(folder.glob("*.safetensors"))))
    return folder


def _calibration_windows(context: BuildContext, tokenizer: Path, samples: int, seq_len: int) -> tuple[Corpus, Any]:
    """The calibration text (the caller's, else the built-in corpus's calibration part) and ``samples`` seeded
    windows of ``seq_len`` tokens of it, each starting with BOS where the source's tokenizer adds one."""
    from edgekit.quant.gptq_checkpoint import calibration_tokens

    rule, settings = context.prepared.rule, context.options.calibration
    corpus = settings.corpus or builtin_corpus("calibration")
    bos = rule.bos_token_id if rule.add_bos_token else None
    return corpus, calibration_tokens(tokenizer, corpus, samples, seq_len, settings.seed, bos)


def _make_gptq_checkpoint(context: BuildContext, out: Path, detail: Callable[[str], None]) -> None:
    from edgekit.quant.gptq import GPTQConfig
    from edgekit.quant.gptq_checkpoint import write_gptq_checkpoint

    source, settings, target = context.prepared, context.options.calibration, context.target
    _, tokens = _calibration_windows(context, source.folder / "tokenizer.json", settings.samples, settings.seq_len)
    with output_to_log(context.log_path):
        # Every GPTQ setting a target can give, by name: a new one in GPTQSettings reaches GPTQConfig or fails here.
        config = GPTQConfig(group_size=target.block_size, **target.gptq.model_dump())
        write_gptq_checkpoint(source.folder, out, config, tokens, progress=detail)


def _variant_entry(variant: VariantSpec, folder: Path) -> dict[str, Any]:
    return {
        "path": variant.name,
        "precision": variant.precision,
        "method": variant.method,
        "provider": variant.provider,
        "block_size": variant.block_size,
        "accuracy_level": variant.accuracy_level,
        "lm_head": variant.lm_head if variant.precision == Precision.INT4.value else None,
        "bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
    }


def _manifest(context: BuildContext, has_template: bool) -> dict[str, Any]:
    source, target, parity = context.prepared, context.target, context.parity
    deployed = list(context.variants)[-1]
    validation: dict[str, Any] = {"skipped": "streamed build: no fp32 reference"}
    if parity is not None:
        # Per prompt and overall: max |diff|, max relative diff, top-1; the bound and what it came from.
        validation = {"variant": REFERENCE_VARIANT, **parity.as_dict()}
    return {
        "edgekit_version": __version__,
        "source": {
            "kind": context.spec.kind,
            "location": context.spec.origin,
            "weights": [{"name": p.name, "sha256": sha256_file(p, SourceError)} for p in source.files],
        },
        "architecture": source.checked.architecture.model_type,
        "parameter_count": source.parameters,
        "target": target.name,
        "default_variant": deployed,
        "targets": {target.name: {"variant": deployed, "providers": [p.value for p in target.providers]}},
        "variants": context.variants,
        "tokenizer": {
            **source.rule.as_dict(),
            "chat_template": has_template,
            **({"parity": context.tokenizer_parity.as_dict()} if context.tokenizer_parity else {}),
        },
        "validation": validation,
        "tools": {"python": platform.python_version(), **{name: tool_version(name) for name in _TOOLS}},
        "build_steps": [record.as_dict() for record in context.reporter.records],
    }


def tool_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
