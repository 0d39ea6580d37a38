"""Judging evaluation results: accuracy budgets from targets.yaml, and regressions against a baseline."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from edgekit.targets import AccuracyBudget

# metric -> (budget field, True when a larger value is worse)
BUDGET_METRICS: dict[str, tuple[str, bool]] = {
    "kl_mean": ("max_kl_mean", True),
    "ppl_ratio": ("max_ppl_ratio", True),
    "top1_agreement": ("min_top1_agreement", False),
}
# Metrics a baseline comparison watches, and whether larger is worse.
BASELINE_METRICS: dict[str, bool] = {"kl_mean": True, "kl_p99": True, "ppl_ratio": True, "top1_agreement": False}


@dataclass(frozen=True)
class Check:
    """One metric of one variant against one limit."""

    variant: str
    metric: str
    value: float
    limit: float | None
    passed: bool
    kind: str = "budget"  # "budget" or "baseline"

    def as_dict(self) -> dict[str, Any]:
        """Plain data for reports."""
        return asdict(self)


def judge_budget(variant: str, metrics: dict[str, Any], budget: AccuracyBudget) -> list[Check]:
    """The variant's metrics against every limit the budget sets (unset limits are not checked)."""
    checks = []
    for metric, (field, larger_is_worse) in BUDGET_METRICS.items():
        limit = getattr(budget, field)
        if limit is None:
            continue
        value = float(metrics[metric])
        passed = value <= limit if larger_is_worse else value >= limit
        checks.append(Check(variant, metric, value, limit, passed))
    return checks


def judge_baseline(variant: str, metrics: dict[str, Any], baseline: dict[str, Any], tolerance: float) -> list[Check]:
    """Fail a metric that got worse than the baseline's by more than ``tolerance`` (relative).

    A lower-is-better metric may grow to ``old * (1 + tolerance)``; top-1 agreement may fall to
    ``old * (1 - tolerance)``. The limit in each check is that bound.
    """
    checks = []
    for metric, larger_is_worse in BASELINE_METRICS.items():
        if metric not in baseline or metric not in metrics:
            continue
        old, value = float(baseline[metric]), float(metrics[metric])
        limit = old * (1 + tolerance) if larger_is_worse else old * (1 - tolerance)
        # An exactly-zero baseline (the reference itself) allows a tiny absolute slack for float noise.
        if larger_is_worse and old == 0:
            limit = 1e-6
        passed = value <= limit if larger_is_worse else value >= limit
        checks.append(Check(variant, metric, value, limit, passed, kind="baseline"))
    return checks


def budget_verdicts(report: dict[str, Any], targets: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """For every target: whether each variant of the report meets its budget, with the checks."""
    verdicts: dict[str, dict[str, Any]] = {}
    for name, target in targets.items():
        per_variant = {}
        for variant, metrics in report["variants"].items():
            checks = judge_budget(variant, metrics, target.budget)
            per_variant[variant] = {"passed": all(c.passed for c in checks), "checks": [c.as_dict() for c in checks]}
        verdicts[name] = per_variant
    return verdicts
