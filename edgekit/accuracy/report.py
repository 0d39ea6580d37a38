"""Evaluation reports and CI outputs: JSON, markdown, a PNG chart, and JUnit XML.

The chart needs matplotlib (part of the ``export`` extra); without it the report says so and goes on.
"""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgekit.accuracy.budget import Check
from edgekit.safe_io import write_output_text, write_text_atomic

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "report.png"
_COLUMNS = ("perplexity", "ppl_ratio", "kl_mean", "kl_p99", "top1_agreement", "bytes", "bits_per_weight")


def format_metric(metric: str, value: Any) -> str:
    """A metric value as people read it."""
    if value is None:
        return "-"
    if metric == "top1_agreement":
        return f"{value:.1%}"
    if metric == "bytes":
        return f"{value / 1e6:,.1f} MB"
    if metric in ("kl_mean", "kl_p99"):
        return f"{value:.4f}"
    if metric == "bits_per_weight":
        return f"{value:.2f}"
    return f"{value:.3f}"


def markdown_table(report: dict[str, Any]) -> str:
    """The variants x metrics table of a report, in markdown."""
    lines = ["| variant | " + " | ".join(_COLUMNS) + " |", "|---" * (len(_COLUMNS) + 1) + "|"]
    for name, row in report["variants"].items():
        lines.append(f"| {name} | " + " | ".join(format_metric(c, row.get(c)) for c in _COLUMNS) + " |")
    return "\n".join(lines)


def write_report(eval_dir: Path, report: dict[str, Any]) -> list[Path]:
    """Write report.json, report.md and (with matplotlib) report.png into ``eval_dir``."""
    eval_dir.mkdir(parents=True, exist_ok=True)
    written = [eval_dir / REPORT_JSON, eval_dir / REPORT_MD]
    write_text_atomic(eval_dir / REPORT_JSON, json.dumps(report, indent=2) + "\n")
    protocol = report["protocol"]
    text = [
        "# edgekit evaluation",
        "",
        f"Text `{protocol['text']}` (sha256 {protocol['text_sha256'][:16]}…, {protocol['text_tokens']:,} tokens); "
        f"{protocol['windows']} windows of {protocol['ctx']} tokens, positions {protocol['scored_positions']} "
        f"scored: {protocol['tokens_scored']:,} tokens. KL is KL(reference || variant) per token, in nats.",
        "",
        f"Reference: {_reference_description(report)}.",
        "",
        markdown_table(report),
        "",
    ]
    write_text_atomic(eval_dir / REPORT_MD, "\n".join(text))
    if _write_chart(eval_dir / REPORT_PNG, report):
        written.append(eval_dir / REPORT_PNG)
    return written


def _reference_description(report: dict[str, Any]) -> str:
    """What the reference was (reports written before it was recorded used the fp32 ONNX variant)."""
    return str(report.get("reference", {}).get("description", "the package's fp32 ONNX variant"))


def _write_chart(path: Path, report: dict[str, Any]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for name, row in report["variants"].items():
        if row["bytes"] is None:  # a reference that is not in the package (streamed from the checkpoint)
            continue
        axes.scatter(row["bytes"] / 1e6, row["kl_mean"], s=40)
        axes.annotate(name, (row["bytes"] / 1e6, row["kl_mean"]), textcoords="offset points", xytext=(5, 5))
    axes.set_xlabel("variant size (MB)")
    axes.set_ylabel("mean KL(reference || variant), nats")
    axes.set_title("accuracy lost against size")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    # A fixed creation date in the metadata keeps the file identical across identical runs.
    figure.savefig(path, metadata={"Software": "edgekit", "Creation Time": None})
    plt.close(figure)
    return True


def write_junit(path: Path, target: str, checks: Sequence[Check], deployed: str) -> None:
    """JUnit XML with one test case per variant and metric. A check that decides the verdict (the
    ``deployed`` variant's budget, every baseline check) and failed carries a <failure>; another variant's
    failed budget check is <skipped>, so the file agrees with the exit code."""
    counted = [decides(c, deployed) for c in checks]
    failures = sum(not c.passed and d for c, d in zip(checks, counted, strict=True))
    skipped = sum(not c.passed and not d for c, d in zip(checks, counted, strict=True))
    suite = ET.Element(
        "testsuite",
        name=f"edgekit.check.{target}",
        tests=str(len(checks)),
        failures=str(failures),
        errors="0",
        skipped=str(skipped),
    )
    for check, decisive in zip(checks, counted, strict=True):
        case = ET.SubElement(suite, "testcase", classname=f"{check.kind}.{check.variant}", name=check.metric)
        if check.passed:
            continue
        if decisive:
            failure = ET.SubElement(case, "failure", message=_check_sentence(check))
            failure.text = _check_sentence(check)
        else:
            reason = f"informational: {target} deploys {deployed}, not {check.variant}; {_check_sentence(check)}"
            ET.SubElement(case, "skipped", message=reason)
    suites = ET.Element("testsuites", tests=str(len(checks)), failures=str(failures), skipped=str(skipped))
    suites.append(suite)
    document = io.BytesIO()
    ET.ElementTree(suites).write(document, encoding="utf-8", xml_declaration=True)
    write_output_text(path, document.getvalue().decode("utf-8"))


def check_markdown(target: str, variant: str, passed: bool, checks: Sequence[Check]) -> str:
    """A summary for a CI job page: the verdict and the table of checks."""
    verdict = "PASS" if passed else "FAIL"
    lines = [
        f"## edgekit check: {target} — {verdict}",
        "",
        f"Variant chosen for `{target}`: `{variant}`.",
        "",
        "| variant | check | metric | value | limit | result |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        result = "pass" if c.passed else "**fail**" if decides(c, variant) else "fail (informational)"
        lines.append(
            f"| {c.variant} | {c.kind} | {c.metric} | {format_metric(c.metric, c.value)} | "
            f"{format_metric(c.metric, c.limit)} | {result} |"
        )
    return "\n".join(lines) + "\n"


def decides(check: Check, deployed: str) -> bool:
    """Whether ``check`` counts in the verdict: the deployed variant's budget, and every baseline check."""
    return check.kind != "budget" or check.variant == deployed


def _check_sentence(check: Check) -> str:
    relation = "at least" if check.metric == "top1_agreement" else "at most"
    return (
        f"{check.variant} {check.metric} = {format_metric(check.metric, check.value)}, "
        f"{check.kind} allows {relation} {format_metric(check.metric, check.limit)}"
    )
