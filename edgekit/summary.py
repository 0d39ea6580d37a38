"""Human-readable output of builds, manifests and targets (rich tables on stdout).

Tables never cut a value: on a terminal long cells wrap (or fold, for words longer than the column), and
piped output is not limited to 80 columns at all, so a script reading it gets every value whole.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgekit.errors import PackageError, printable
from edgekit.targets import Precision

if TYPE_CHECKING:
    from edgekit.accuracy.gate import CheckResult
    from edgekit.pipeline import BuildResult
    from edgekit.runtimes.tuning import TuningRecord
    from edgekit.targets import Target


PIPED_WIDTH = 10_000
"""Console width when stdout is not a terminal: wide enough that no table is ever squeezed."""


def output_console() -> Console:
    """The console for a command's results: the terminal's width, or unlimited when piped."""
    return Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)


def _shown(value: object) -> str:
    """A value from a package or report as plain text for rich: no markup, no terminal escapes."""
    return escape(printable(str(value)))


def _table(title: str, columns: tuple[str, ...], right: tuple[str, ...] = ()) -> Table:
    """A table whose cells wrap or fold instead of being cut with an ellipsis."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, overflow="fold", justify="right" if column in right else "left")
    return table


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _variants_table(manifest: dict[str, Any]) -> Table:
    table = _table("variants", ("variant", "precision", "method", "provider", "block", "acc. level", "size"))
    default = manifest.get("default_variant")
    for name, entry in manifest.get("variants", {}).items():
        cells = (
            f"{name} *" if name == default else name,
            entry.get("precision") or "-",
            entry.get("method") or "-",
            entry.get("provider") or "-",
            entry.get("block_size") or "-",
            entry.get("accuracy_level") if entry.get("accuracy_level") is not None else "default",
            _mb(entry["bytes"]) if entry.get("bytes") is not None else "?",
        )
        table.add_row(*map(_shown, cells))
    return table


def _recipe_figures(recipe: dict[str, Any]) -> str:
    """How many tensors take each format, and what the build measured on calibration text."""
    tensors = recipe.get("tensors")
    counts: dict[str, int] = {}
    for spelling in tensors.values() if isinstance(tensors, dict) else []:
        counts[str(spelling)] = counts.get(str(spelling), 0) + 1
    text = ", ".join(f"{n} {spelling}" for spelling, n in sorted(counts.items(), key=lambda item: -item[1]))
    kl, ratio = recipe.get("calibration_kl"), recipe.get("decode_ratio")
    # The manifest is untrusted: only finite floats are formatted (a 400-digit integer overflows a float).
    if isinstance(kl, float) and math.isfinite(kl):
        text += f"; calibration KL {kl:.4f}"
    if isinstance(ratio, float) and math.isfinite(ratio):
        text += f", decode {ratio:.2f}x RTN"
    return text


def _validation_figures(validation: dict[str, Any]) -> str:
    """Max |Δlogit| and its share of the logits' scale, the bound and the noise it came from, top-1 agreement."""
    relative, noise = validation.get("max_rel_diff"), validation.get("noise")
    text = f"max |Δlogit| {validation['max_abs_diff']:.2e}"
    if relative is not None:
        text += f" ({relative:.1e} relative)"
    text += f", tolerance {validation['tolerance']:g}"
    if noise is not None:
        text += f" (PyTorch fp32 vs fp64: {noise:.1e})"
    prompts = len(validation.get("prompts", [])) or 1
    where = f"{prompts} prompts, {validation['tokens']} tokens"
    return f"{text}, top-1 agreement {validation['top1_agreement']:.1%} on {where}"


def print_build_summary(result: BuildResult, console: Console | None = None) -> None:
    """One screen after a build: variants, validation, step times, where things are, what to run next."""
    console = console or output_console()
    manifest = result.manifest
    validation = manifest["validation"]
    console.print(_variants_table(manifest))
    steps = _table("steps", ("step", "seconds", "peak RSS"), right=("seconds", "peak RSS"))
    for record in result.steps:
        steps.add_row(record.name, f"{record.seconds:.1f}", f"{record.peak_rss_mb:,.0f} MiB")
    console.print(steps)
    if "skipped" in validation:
        console.print(f"validation: skipped ({validation['skipped']})")
    else:
        console.print(f"validation: fp32 ONNX vs PyTorch {_validation_figures(validation)}")
    evaluation = manifest.get("evaluation")
    if evaluation:
        from edgekit.accuracy.report import format_metric

        protocol = evaluation["protocol"]
        console.print(f"accuracy on {protocol['text']} ({protocol['tokens_scored']:,} tokens scored):")
        if evaluation.get("reference", {}).get("kind") == "pytorch-streamed":
            console.print(f"  reference: {evaluation['reference']['description']}")
        for name, row in evaluation["variants"].items():
            verdict = evaluation["budgets"].get(manifest["target"], {}).get(name)
            console.print(
                f"  {name}: KL {format_metric('kl_mean', row['kl_mean'])}, top-1 "
                f"{format_metric('top1_agreement', row['top1_agreement'])}, PPL ratio "
                f"{format_metric('ppl_ratio', row['ppl_ratio'])}, budget {manifest['target']}: "
                f"{'pass' if verdict else 'FAIL'}"
            )
    for warning in result.warnings:
        console.print(f"note: {warning}")
    console.print(f"package: {result.out}  (* = deployed for {manifest['target']}; log: build.log)")
    console.print(f'next: edgekit run {result.out} --prompt "..."')


def print_manifest(root: Path, manifest: dict[str, Any], console: Console | None = None) -> None:
    """Readable form of a package's manifest; a field of a shape the schema allows but this view cannot show
    (a manifest rewritten by hand) is a one-line ``PackageError``, with nothing printed before it."""
    try:
        shown = _manifest_lines(root, manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise PackageError(
            f"has a field edgekit cannot show ({type(exc).__name__}: {str(exc)[:120]})",
            path=root / "manifest.json",
            fix="read it with `edgekit info --json`, or rebuild the package",
        ) from None
    console = console or output_console()
    for line in shown:
        console.print(line)


def _manifest_lines(root: Path, manifest: dict[str, Any]) -> list[Any]:
    """What ``print_manifest`` prints, line by line (strings of rich markup, and the variants table)."""
    source = manifest["source"]
    version = manifest.get("edgekit_version", "?")
    lines: list[Any] = [f"[bold]{_shown(root)}[/bold]  edgekit {_shown(version)}, schema {manifest['schema_version']}"]
    lines.append(f"source: {_shown(source['kind'])} {_shown(source['location'])}")
    for weight in source.get("weights", []):
        lines.append(f"  {_shown(weight['name'])}  sha256 {_shown(weight['sha256'])}")
    count = manifest.get("parameter_count")
    parameters = f"{count:,}" if count is not None else "?"
    lines.append(f"architecture: {_shown(manifest.get('architecture'))}, {parameters} parameters")
    lines.append(_variants_table(manifest))
    for name, entry in manifest.get("targets", {}).items():
        lines.append(_shown(f"target {name}: runs '{entry['variant']}' on {' -> '.join(map(str, entry['providers']))}"))
    for name, entry in manifest.get("variants", {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("recipe"), dict):
            lines.append(_shown(f"recipe {name}: {_recipe_figures(entry['recipe'])}"))
    validation = manifest.get("validation", {})
    if "skipped" in validation:
        lines.append(f"validation: skipped ({_shown(validation['skipped'])})")
    elif validation:
        lines.append(_shown(f"validation: {validation['variant']} vs PyTorch {_validation_figures(validation)}"))
    tools = ", ".join(f"{k} {v}" for k, v in manifest.get("tools", {}).items() if v)
    lines.append(f"tools: {_shown(tools)}")
    lines.append(f"files: {len(manifest.get('files', []))}, {_mb(sum(f['size'] for f in manifest.get('files', [])))}")
    return lines


def print_targets(targets: dict[str, Target], console: Console | None = None) -> None:
    """Table of targets, and which of their providers this machine can start."""
    from rich.markup import escape

    from edgekit.runtimes.providers import available_providers

    console = console or output_console()
    here = set(available_providers())
    title = f"targets (providers on this machine: {', '.join(sorted(here))})"
    table = _table(title, ("target", "providers", "weights", "block", "description"))
    for target in targets.values():
        chain = " -> ".join(p.value if p.value in here else f"[dim]{p.value} (absent)[/dim]" for p in target.providers)
        weights = target.precision.value
        if target.precision is Precision.INT4:
            methods = "+".join(m.value for m in target.int4_methods)
            weights = f"int4 {methods}, {target.lm_head.value} head"
        # A targets file is user text: "[...]" in a description is not rich markup.
        table.add_row(escape(target.name), chain, weights, str(target.block_size), escape(target.description))
    console.print(table)


@contextlib.contextmanager
def progress_callback(title: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr whose text the callback replaces (``window 3/20``)."""
    console = Console(stderr=True)
    with console.status(title) as status:
        yield lambda text: status.update(f"{title}: {text}")


def print_eval_report(report: dict[str, Any], console: Console | None = None) -> None:
    """The variants x metrics table of an evaluation report, and the budget verdicts."""
    from edgekit.accuracy.report import format_metric

    console = console or output_console()
    protocol = report["protocol"]
    columns = ("perplexity", "ppl_ratio", "kl_mean", "kl_p99", "top1_agreement", "bytes", "bits_per_weight")
    headers = ("perplexity", "PPL ratio", "mean KL", "KL p99", "top-1 agree", "size", "bits per weight")
    title = _shown(f"{protocol['text']}: {protocol['windows']} x {protocol['ctx']} tokens")
    table = _table(title, ("variant", *headers), right=headers)
    for name, row in report["variants"].items():
        table.add_row(_shown(name), *(_shown(format_metric(c, row.get(c))) for c in columns))
    console.print(table)
    for target, variants in report.get("budgets", {}).items():
        verdicts = ", ".join(f"{v} {'pass' if r['passed'] else 'FAIL'}" for v, r in variants.items())
        console.print(_shown(f"budget {target}: {verdicts}"))
    if "reference" in report:
        console.print(f"reference: {_shown(report['reference']['description'])}")
    console.print(f"reference cache: {_shown(report['reference_cache'])}")


def print_check(result: CheckResult, console: Console | None = None) -> None:
    """The table of ``edgekit check``: variant x metric, value, limit, pass/fail, and the verdict."""
    from edgekit.accuracy.report import decides, format_metric

    console = console or output_console()
    title = _shown(f"edgekit check {result.target} (deploys {result.variant})")
    table = _table(title, ("variant", "check", "metric", "value", "limit", "result"))
    for c in result.checks:
        outcome = "[green]pass[/green]" if c.passed else "[red]FAIL[/red]" if decides(c, result.variant) else "fail*"
        cells = (c.variant, c.kind, c.metric, format_metric(c.metric, c.value), format_metric(c.metric, c.limit))
        table.add_row(*map(_shown, cells), outcome)
    console.print(table)
    protocol = result.protocol
    if protocol:  # the last evaluation decides: say which one it was
        console.print(
            _shown(
                f"measured on {protocol.get('windows')} windows of {protocol.get('ctx')} tokens of "
                f"{protocol.get('text')} ({protocol.get('tokens_scored')} tokens scored)"
            ),
            highlight=False,
        )
    if any(not c.passed and not decides(c, result.variant) for c in result.checks):
        console.print(f"fail*: a variant {result.target} does not deploy; informational, not in the verdict")
    if not result.checks:
        console.print(f"target {result.target} sets no accuracy budget; nothing to check")
    console.print("PASS" if result.passed else "FAIL")


def print_bench(results: list[dict[str, Any]], console: Console | None = None) -> None:
    """One row per variant: TTFT, prefill and decode tokens/s (median, min..max), peak RSS, bytes."""
    console = console or output_console()
    if not results:
        return
    first = results[0]
    title = f"prompt {first['prompt_tokens']} tokens, {first['gen_tokens']} generated, {first['runs']} runs"
    numbers = ("TTFT s", "prefill tok/s", "decode tok/s", "peak RSS", "size")
    table = _table(title, ("variant", "provider", *numbers), right=numbers)

    def spread(stats: dict[str, float] | None, digits: int) -> str:
        if not stats:
            return "-"
        # The range goes under the median: together they are too wide for one line of an 80-column terminal.
        return f"{stats['median']:.{digits}f}\n({stats['min']:.{digits}f}..{stats['max']:.{digits}f})"

    for row in results:
        table.add_row(
            row["variant"],
            row["provider"],
            spread(row["ttft_s"], 3),
            spread(row["prefill_tps"], 0),
            spread(row["decode_tps"], 1),
            f"{row['peak_rss_mb']:,.0f} MiB",
            _mb(row["model_bytes"]) if row.get("model_bytes") else "-",
        )
    console.print(table)


def print_tuning(record: TuningRecord, console: Console | None = None) -> None:
    """One row per measured setting: prefill and decode tokens/s, speed against the default, the choice."""
    from edgekit.runtimes.tune import settings_table

    console = console or output_console()
    numbers = ("prefill tok/s", "decode tok/s", "vs default")
    title = f"{record.variant}, prompt {record.prompt_tokens} tokens, on {record.machine}"
    table = _table(title, ("settings", *numbers, "chosen"), right=numbers)
    for label, prefill, decode, ratio, chosen in settings_table(record):
        table.add_row(label, f"{prefill:.0f}", f"{decode:.1f}", f"{ratio:.2f}x", "*" if chosen else "")
    console.print(table)
