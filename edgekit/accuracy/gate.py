"""``edgekit eval`` and ``edgekit check``: record accuracy in the package, and gate CI on it."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.accuracy.budget import (
    BASELINE_METRICS,
    BUDGET_METRICS,
    Check,
    budget_verdicts,
    judge_baseline,
    judge_budget,
)
from edgekit.accuracy.evaluate import DEFAULT_CTX, DEFAULT_WINDOWS, EVAL_DIR, Progress, evaluate_package
from edgekit.accuracy.report import REPORT_JSON, write_report
from edgekit.accuracy.texts import Corpus
from edgekit.errors import PackageError, UsageError
from edgekit.package.manifest import read_manifest, write_manifest
from edgekit.package.staging import scratch_folder
from edgekit.package.verify import verify_files
from edgekit.safe_io import strict_json_loads
from edgekit.targets import Target, get_target, load_targets
from edgekit.variants import REFERENCE_VARIANT, deploy_variant

DEFAULT_BASELINE_TOLERANCE = 0.05


def evaluate_and_record(
    package: str | Path,
    *,
    corpus: Corpus | None = None,
    windows: int = DEFAULT_WINDOWS,
    ctx: int = DEFAULT_CTX,
    targets_file: str | Path | None = None,
    progress: Progress | None = None,
    verify: bool = True,
    reference_checkpoint: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate every variant, judge it against every target's budget, and record both in the package.

    Writes ``eval/report.json``, ``report.md``, ``report.png`` and the reference cache, and adds an
    ``evaluation`` section to the manifest (whose file list is rewritten). The package is verified
    first, so a tampered file is never blessed by the new file list. A package without an fp32 variant
    (a streamed build) is measured against ``reference_checkpoint``, the checkpoint folder it was built
    from, run in PyTorch one layer at a time; with ``verify`` its weights are checked against the manifest.
    """
    root = Path(package)
    manifest = read_manifest(root)
    if verify:
        verify_files(root, manifest)
    with _eval_folder_restored_on_failure(root):
        report = evaluate_package(
            root,
            corpus=corpus,
            windows=windows,
            ctx=ctx,
            progress=progress,
            reference_checkpoint=reference_checkpoint,
            verify_checkpoint=verify,
        )
        # Only targets this package can deploy are judged, the ones `edgekit check` accepts.
        report["budgets"] = budget_verdicts(report, deployable_targets(manifest, load_targets(targets_file)))
        manifest["evaluation"] = {
            "report": f"{EVAL_DIR}/{REPORT_JSON}",
            "protocol": report["protocol"],
            "reference": report["reference"],
            "variants": report["variants"],
            "budgets": {
                target: {variant: verdict["passed"] for variant, verdict in variants.items()}
                for target, variants in report["budgets"].items()
            },
        }
        try:
            write_report(root / EVAL_DIR, report)
            write_manifest(root, manifest)
        except OSError as exc:
            raise UsageError(f"the package cannot be updated ({exc.strerror or exc})", path=root,
                             fix="make it writable, or evaluate a copy") from None  # fmt: skip
    return report


@contextlib.contextmanager
def _eval_folder_restored_on_failure(root: Path) -> Iterator[None]:
    """``eval/`` put back as it was when what runs inside fails or is interrupted: the manifest lists its
    files, and a half-done evaluation's files (a new reference cache, the old one deleted) would make the
    package fail its own verification, ``edgekit eval`` included."""
    folder = root / EVAL_DIR
    with contextlib.ExitStack() as stack:
        try:  # beside the package (the same file system: the cache is linked, not copied), else anywhere
            backup = stack.enter_context(scratch_folder(root))
        except OSError:
            backup = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgekit-eval-")))
        kept: list[str] = []
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.is_file() and not path.is_symlink():
                if path.suffix == ".npz":  # the cache is replaced, never rewritten in place: a link keeps it
                    with contextlib.suppress(OSError):  # another file system: copied below
                        os.link(path, backup / path.name)
                if not (backup / path.name).exists():
                    shutil.copy2(path, backup / path.name)
                kept.append(path.name)
        try:
            yield
        except BaseException:
            # Best effort, one file at a time: the error that stopped the evaluation is the one to report.
            for path in folder.iterdir() if folder.is_dir() else []:
                if path.name not in kept and (path.is_file() or path.is_symlink()):
                    with contextlib.suppress(OSError):
                        path.unlink()
            for name in kept:
                with contextlib.suppress(OSError):
                    shutil.move(backup / name, folder / name)
            raise


@dataclass
class CheckResult:
    """The verdict of ``edgekit check`` for one target."""

    target: str
    variant: str
    passed: bool
    checks: list[Check] = field(default_factory=list)
    protocol: dict[str, Any] = field(default_factory=dict)
    """The stored evaluation's protocol (text, windows, ctx): the last ``edgekit eval``'s, not always the build's."""


def check_package(
    package: str | Path,
    target: str,
    *,
    targets_file: str | Path | None = None,
    baseline: str | Path | None = None,
    baseline_tolerance: float = DEFAULT_BASELINE_TOLERANCE,
) -> CheckResult:
    """Judge a package's stored evaluation against ``target``'s budget (and a baseline report).

    Passes when the variant the package deploys for ``target`` meets every limit of the budget and, with
    ``baseline``, no variant got worse than the baseline's by more than ``baseline_tolerance``. Budgets are
    read from targets.yaml now, so a changed budget applies without re-evaluating. The whole package
    (every variant and the report) is verified against its manifest first: a package with a changed,
    missing or unlisted file never passes.
    """
    if (
        isinstance(baseline_tolerance, bool)
        or not isinstance(baseline_tolerance, int | float)
        or not (0 <= baseline_tolerance < math.inf)
    ):  # NaN compares false with everything: it would fail every baseline check
        raise UsageError(f"the baseline tolerance must be a finite number of at least 0, not {baseline_tolerance!r}",
                         fix="pass --baseline-tolerance 0.05 (5% worse at most)")  # fmt: skip
    root = Path(package)
    manifest = read_manifest(root)
    verify_files(root, manifest)
    report = _load_report(root / EVAL_DIR / REPORT_JSON, missing_fix=f"run `edgekit eval {root}` first")
    profile = get_target(target, None if targets_file is None else Path(targets_file))
    chosen = _chosen_variant(root, manifest, profile, report)
    checks: list[Check] = []
    for variant, metrics in report["variants"].items():
        if variant != REFERENCE_VARIANT:
            checks.extend(judge_budget(variant, metrics, profile.budget))
    passed = all(c.passed for c in checks if c.variant == chosen)
    if baseline is not None:
        old = _load_report(Path(baseline), missing_fix="pass a report.json written by `edgekit eval`")
        _require_same_protocol(report, old, Path(baseline))
        for variant, metrics in report["variants"].items():
            if variant in old["variants"] and variant != REFERENCE_VARIANT:
                baseline_checks = judge_baseline(variant, metrics, old["variants"][variant], baseline_tolerance)
                checks.extend(baseline_checks)
                passed = passed and all(c.passed for c in baseline_checks)
    return CheckResult(target, chosen, passed, checks, dict(report.get("protocol", {})))


def deployed_variant(manifest: dict[str, Any], target: Target) -> str | None:
    """The variant of this package ``target`` runs, or None when the package holds none built for it.

    The manifest's record for the targets a package was built for; otherwise the variant the target would
    deploy, when the package has one of that name built for the target's first provider (another targets
    file may name a stricter budget for the same variant; a DirectML target cannot run a CPU build).
    """
    recorded = manifest.get("targets", {}).get(target.name)
    if recorded:
        return str(recorded["variant"])
    name = deploy_variant(target).name
    entry = manifest.get("variants", {}).get(name)
    return name if entry and entry.get("provider") == target.build_provider.value else None


def deployable_targets(manifest: dict[str, Any], targets: dict[str, Target]) -> dict[str, Target]:
    """The targets of ``targets`` this package can deploy (``deployed_variant`` is not None)."""
    return {name: target for name, target in targets.items() if deployed_variant(manifest, target) is not None}


def _chosen_variant(root: Path, manifest: dict[str, Any], profile: Target, report: dict[str, Any]) -> str:
    name = deployed_variant(manifest, profile)
    if name is None or name not in report["variants"]:
        built_for = ", ".join(manifest.get("targets", {})) or "no target"
        raise UsageError(
            f"has no evaluated variant for target '{profile.name}' (built for {built_for})",
            path=root,
            fix=f"check a target it can deploy (see `edgekit eval`), or rebuild it with --target {profile.name}",
        )
    return name


def _load_report(path: Path, *, missing_fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise PackageError("no evaluation report", path=path, fix=missing_fix)
    try:
        report = strict_json_loads(path.read_bytes())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, a duplicate key, an integer of over 20 digits
        raise PackageError(f"is not valid JSON ({exc})", path=path, fix=missing_fix) from None
    except RecursionError:
        raise PackageError("is nested too deeply to be a report", path=path, fix=missing_fix) from None
    if not isinstance(report, dict) or not _report_shaped(report):
        raise PackageError("is not an edgekit evaluation report", path=path, fix=missing_fix)
    return report


def _report_shaped(report: dict[str, Any]) -> bool:
    """The report's protocol is a mapping and every variant's metrics that budgets and baselines read are numbers."""
    variants, protocol = report.get("variants"), report.get("protocol")
    if not isinstance(variants, dict) or not isinstance(protocol, dict):
        return False

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    return all(
        isinstance(metrics, dict)
        and all(number(metrics[name]) for name in BASELINE_METRICS if name in metrics)
        and (name == REFERENCE_VARIANT or all(number(metrics.get(metric)) for metric in BUDGET_METRICS))
        for name, metrics in variants.items()
    )


def _require_same_protocol(report: dict[str, Any], baseline: dict[str, Any], path: Path) -> None:
    keys = ("text_sha256", "ctx", "windows", "bos")
    ours = {k: report["protocol"].get(k, False if k == "bos" else None) for k in keys}
    theirs = {k: baseline.get("protocol", {}).get(k, False if k == "bos" else None) for k in keys}
    if ours != theirs:
        raise UsageError(
            f"was measured with another protocol ({theirs}) than this package's report ({ours})",
            path=path,
            fix="evaluate both with the same --text, --windows and --ctx",
        )
