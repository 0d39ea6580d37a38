"""`edgekit eval`, `edgekit check` and evaluation during `edgekit build`: budgets, CI outputs, baselines."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgekit.accuracy.evaluate import EVAL_DIR
from edgekit.accuracy.gate import check_package, evaluate_and_record
from edgekit.cli import main
from edgekit.package.manifest import read_manifest, write_manifest
from edgekit.package.verify import verify_files
from edgekit.targets import load_targets

WINDOWS = 4
CTX = 64
WIDE = {"COLUMNS": "200"}


def copy_package(source: Path, destination: Path) -> Path:
    return Path(shutil.copytree(source, destination))


def write_targets(path: Path, budget: dict[str, float], name: str = "laptop-cpu-rtn") -> Path:
    body = {
        "schema_version": 1,
        "targets": {name: {"description": "test", "providers": ["cpu"], "precision": "int4", "budget": budget}},
    }
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


def damage_checkpoint(source: Path, destination: Path, scale: float = 0.5) -> Path:
    """A copy of a checkpoint with large gaussian noise added to every Linear weight."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, destination)
    generator = torch.Generator().manual_seed(1234)
    for path in destination.glob("*.safetensors"):
        tensors = load_file(str(path))
        for name, tensor in tensors.items():
            if name.endswith("proj.weight") or name == "lm_head.weight":
                tensors[name] = tensor + scale * torch.randn(tensor.shape, generator=generator)
        save_file(tensors, str(path), metadata={"format": "pt"})
    return destination


def failing_rows(output: str) -> int:
    return sum(1 for line in output.splitlines() if line.startswith("│") and "FAIL" in line)


@pytest.fixture(scope="module")
def evaluated_package(tiny_llama_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama package, evaluated with a small protocol (read only)."""
    root = copy_package(tiny_llama_package, tmp_path_factory.mktemp("evaluated") / "pkg")
    evaluate_and_record(root, windows=WINDOWS, ctx=CTX)
    return root


@pytest.fixture(scope="module")
def damaged_package(tiny_checkpoints, tiny_llama_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama package whose int4-rtn variant is the export of a badly damaged checkpoint."""
    from edgekit.pipeline import build

    work = tmp_path_factory.mktemp("damaged")
    damaged = damage_checkpoint(tiny_checkpoints("llama"), work / "checkpoint")
    build(damaged, work / "damaged-pkg", "laptop-cpu-rtn", progress=False, evaluation=None)
    root = copy_package(tiny_llama_package, work / "pkg")
    shutil.rmtree(root / "int4-rtn")
    shutil.copytree(work / "damaged-pkg" / "int4-rtn", root / "int4-rtn")
    write_manifest(root, read_manifest(root))
    evaluate_and_record(root, windows=WINDOWS, ctx=CTX)
    return root


@pytest.fixture(scope="module")
def no_eval_package(tiny_checkpoints, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("noeval") / "pkg"
    result = CliRunner().invoke(main, ["build", str(tiny_checkpoints("llama")), "-o", str(out), "-q", "--no-eval"])
    assert result.exit_code == 0, result.output
    return out


def table_variants(output: str) -> list[str]:
    """The first cell of each body row of the rich table printed by `edgekit eval`."""
    return [line.split("│")[1].strip() for line in output.splitlines() if line.startswith("│")]


def report_of(root: Path) -> dict[str, Any]:
    return json.loads((root / EVAL_DIR / "report.json").read_text(encoding="utf-8"))


# --- budgets ------------------------------------------------------------------------------------------


def test_damaged_weights_lose_far_more_accuracy(evaluated_package: Path, damaged_package: Path) -> None:
    good = report_of(evaluated_package)["variants"]["int4-rtn"]
    bad = report_of(damaged_package)["variants"]["int4-rtn"]
    assert report_of(damaged_package)["protocol"] == report_of(evaluated_package)["protocol"]
    assert good["kl_mean"] < 0.01
    assert bad["kl_mean"] > 0.5
    assert bad["kl_mean"] > 100 * good["kl_mean"]
    assert bad["ppl_ratio"] > 1.5 > good["ppl_ratio"]
    assert bad["top1_agreement"] < good["top1_agreement"]


def test_fixed_kl_budget_fails_the_damaged_variant_only(
    evaluated_package: Path, damaged_package: Path, tmp_path: Path
) -> None:
    targets = write_targets(tmp_path / "targets.yaml", {"max_kl_mean": 0.05})
    good = check_package(evaluated_package, "laptop-cpu-rtn", targets_file=targets)
    assert good.passed and good.variant == "int4-rtn"
    assert [(c.variant, c.metric, c.passed) for c in good.checks] == [("int4-rtn", "kl_mean", True)]
    bad = check_package(damaged_package, "laptop-cpu-rtn", targets_file=targets)
    assert not bad.passed
    assert [(c.variant, c.metric, c.passed) for c in bad.checks] == [("int4-rtn", "kl_mean", False)]
    assert bad.checks[0].limit == 0.05


def test_budget_from_measured_values_passes_the_good_variant_and_fails_the_damaged(
    evaluated_package: Path, damaged_package: Path, tmp_path: Path
) -> None:
    good = report_of(evaluated_package)["variants"]["int4-rtn"]
    budget = {
        "max_kl_mean": good["kl_mean"] * 3,
        "max_ppl_ratio": good["ppl_ratio"] + 0.02,
        "min_top1_agreement": good["top1_agreement"] - 0.1,
    }
    targets = write_targets(tmp_path / "targets.yaml", budget)
    passed = check_package(evaluated_package, "laptop-cpu-rtn", targets_file=targets)
    assert passed.passed
    assert len(passed.checks) == 3 and all(c.passed for c in passed.checks)
    failed = check_package(damaged_package, "laptop-cpu-rtn", targets_file=targets)
    assert not failed.passed
    assert {c.metric: c.passed for c in failed.checks} == {
        "kl_mean": False,
        "ppl_ratio": False,
        "top1_agreement": False,
    }


def test_budget_is_read_at_check_time(evaluated_package: Path, tmp_path: Path) -> None:
    kl = report_of(evaluated_package)["variants"]["int4-rtn"]["kl_mean"]
    loose = write_targets(tmp_path / "loose.yaml", {"max_kl_mean": kl * 2})
    tight = write_targets(tmp_path / "tight.yaml", {"max_kl_mean": kl / 2})
    assert check_package(evaluated_package, "laptop-cpu-rtn", targets_file=loose).passed
    assert not check_package(evaluated_package, "laptop-cpu-rtn", targets_file=tight).passed


def test_target_defined_only_in_the_targets_file_can_be_checked(evaluated_package: Path, tmp_path: Path) -> None:
    targets = write_targets(tmp_path / "targets.yaml", {"max_kl_mean": 0.05}, name="strict-cpu")
    result = check_package(evaluated_package, "strict-cpu", targets_file=targets)
    assert result.passed and result.variant == "int4-rtn"


def test_evaluation_records_verdicts_in_the_manifest(damaged_package: Path, tmp_path: Path) -> None:
    root = copy_package(damaged_package, tmp_path / "pkg")
    targets = write_targets(tmp_path / "targets.yaml", {"max_kl_mean": 0.05}, name="strict")
    evaluate_and_record(root, windows=WINDOWS, ctx=CTX, targets_file=targets)
    manifest = read_manifest(root)
    assert manifest["evaluation"]["budgets"] == {"strict": {"fp32": True, "int4-rtn": False}}
    verify_files(root, manifest)


# --- edgekit check through the CLI -------------------------------------------------------------------


def test_check_exits_0_on_pass(runner, evaluated_package: Path, tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    result = runner.invoke(main, ["check", str(evaluated_package), "-t", "laptop-cpu-rtn", "--junit", str(junit)])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
    assert f"measured on {WINDOWS} windows of {CTX} tokens of " in result.output  # which evaluation decided
    suite = ET.parse(junit).getroot()
    assert suite.get("failures") == "0"
    assert int(suite.get("tests")) == 3
    assert suite.findall(".//failure") == []


def test_check_exits_1_on_fail_with_junit_and_markdown(runner, damaged_package: Path, tmp_path: Path) -> None:
    targets = write_targets(
        tmp_path / "targets.yaml", {"max_kl_mean": 0.05, "max_ppl_ratio": 1e9, "min_top1_agreement": 0.5}
    )
    junit, markdown = tmp_path / "junit.xml", tmp_path / "summary.md"
    args = ["check", str(damaged_package), "-t", "laptop-cpu-rtn", "--targets-file", str(targets)]
    result = runner.invoke(main, [*args, "--junit", str(junit), "--markdown", str(markdown)], env=WIDE)
    assert result.exit_code == 1, result.output
    api = check_package(damaged_package, "laptop-cpu-rtn", targets_file=targets)
    expected_failures = sum(not c.passed for c in api.checks)
    assert expected_failures == 2  # kl_mean and top1 fail, ppl_ratio passes

    root = ET.parse(junit).getroot()
    failures = root.findall(".//failure")
    for element in (root, root.find("testsuite")):
        assert element is not None
        assert int(element.get("failures")) == len(failures) == expected_failures
        assert int(element.get("tests")) == len(api.checks) == 3
    assert len(root.findall(".//testcase")) == 3
    assert failing_rows(result.output) == expected_failures
    assert result.output.rstrip().endswith("FAIL")
    failed_cases = {case.get("name") for case in root.iter("testcase") if case.find("failure") is not None}
    assert failed_cases == {"kl_mean", "top1_agreement"}

    text = markdown.read_text(encoding="utf-8")
    assert "FAIL" in text and "PASS" not in text
    assert "| variant | check | metric | value | limit | result |" in text
    assert text.count("**fail**") == expected_failures
    assert "| int4-rtn | budget | kl_mean |" in text


def test_check_markdown_says_pass(runner, evaluated_package: Path, tmp_path: Path) -> None:
    markdown = tmp_path / "summary.md"
    result = runner.invoke(main, ["check", str(evaluated_package), "-t", "laptop-cpu-rtn", "--markdown", str(markdown)])
    assert result.exit_code == 0, result.output
    text = markdown.read_text(encoding="utf-8")
    assert "PASS" in text and "FAIL" not in text
    assert "| int4-rtn | budget | kl_mean |" in text


def test_check_exit_2_on_unknown_target(runner, evaluated_package: Path) -> None:
    result = runner.invoke(main, ["check", str(evaluated_package), "-t", "no-such-target"])
    assert result.exit_code == 2
    assert "unknown target 'no-such-target'" in result.output


def test_check_exit_2_without_target_option(runner, evaluated_package: Path) -> None:
    result = runner.invoke(main, ["check", str(evaluated_package)])
    assert result.exit_code == 2


def test_check_exit_2_on_package_without_eval_report(runner, no_eval_package: Path) -> None:
    result = runner.invoke(main, ["check", str(no_eval_package), "-t", "laptop-cpu-rtn"])
    assert result.exit_code == 2, result.output
    assert "no evaluation report" in result.output
    assert "edgekit eval" in result.output


def test_check_exit_2_on_missing_package(runner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["check", str(tmp_path / "nowhere"), "-t", "laptop-cpu-rtn"])
    assert result.exit_code == 2
    assert str(tmp_path / "nowhere") in result.output


def test_check_exit_2_on_baseline_that_is_not_json(runner, evaluated_package: Path, tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    baseline.write_text("this is { not json", encoding="utf-8")
    result = runner.invoke(main, ["check", str(evaluated_package), "-t", "laptop-cpu-rtn", "--baseline", str(baseline)])
    assert result.exit_code == 2
    assert "not valid JSON" in result.output and str(baseline) in result.output


def test_check_exit_2_on_missing_baseline(runner, evaluated_package: Path, tmp_path: Path) -> None:
    baseline = tmp_path / "absent.json"
    result = runner.invoke(main, ["check", str(evaluated_package), "-t", "laptop-cpu-rtn", "--baseline", str(baseline)])
    assert result.exit_code == 2
    assert str(baseline) in result.output


@pytest.mark.parametrize(("key", "value"), [("ctx", 32), ("windows", 2), ("text_sha256", "0" * 64)])
def test_check_exit_2_on_baseline_with_another_protocol(
    runner, evaluated_package: Path, tmp_path: Path, key: str, value: Any
) -> None:
    old = report_of(evaluated_package)
    old["protocol"][key] = value
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(old), encoding="utf-8")
    result = runner.invoke(main, ["check", str(evaluated_package), "-t", "laptop-cpu-rtn", "--baseline", str(baseline)])
    assert result.exit_code == 2, result.output
    assert "another protocol" in result.output


# --- baselines ---------------------------------------------------------------------------------------


def test_identical_baseline_passes(runner, evaluated_package: Path, tmp_path: Path) -> None:
    baseline = Path(shutil.copy(evaluated_package / EVAL_DIR / "report.json", tmp_path / "baseline.json"))
    result = runner.invoke(
        main, ["check", str(evaluated_package), "-t", "laptop-cpu-rtn", "--baseline", str(baseline)], env=WIDE
    )
    assert result.exit_code == 0, result.output
    api = check_package(evaluated_package, "laptop-cpu-rtn", baseline=baseline)
    baseline_checks = [c for c in api.checks if c.kind == "baseline"]
    assert {c.metric for c in baseline_checks} == {"kl_mean", "kl_p99", "ppl_ratio", "top1_agreement"}
    assert all(c.passed for c in baseline_checks)
    assert all(c.variant == "int4-rtn" for c in baseline_checks)


def baseline_with_kl(package: Path, folder: Path, divisor: float) -> Path:
    old = report_of(package)
    old["variants"]["int4-rtn"]["kl_mean"] /= divisor
    path = folder / f"baseline-{divisor}.json"
    path.write_text(json.dumps(old), encoding="utf-8")
    return path


def test_regression_against_baseline_fails(runner, evaluated_package: Path, tmp_path: Path) -> None:
    baseline = baseline_with_kl(evaluated_package, tmp_path, 100)
    junit = tmp_path / "junit.xml"
    args = ["check", str(evaluated_package), "-t", "laptop-cpu-rtn", "--baseline", str(baseline), "--junit", str(junit)]
    result = runner.invoke(main, args, env=WIDE)
    assert result.exit_code == 1, result.output
    api = check_package(evaluated_package, "laptop-cpu-rtn", baseline=baseline)
    assert not api.passed
    failed = [(c.kind, c.variant, c.metric) for c in api.checks if not c.passed]
    assert failed == [("baseline", "int4-rtn", "kl_mean")]
    assert failing_rows(result.output) == 1
    failures = ET.parse(junit).getroot().findall(".//failure")
    assert len(failures) == 1
    assert "baseline" in failures[0].get("message", "")


def test_baseline_tolerance_is_honoured(runner, evaluated_package: Path, tmp_path: Path) -> None:
    # the current kl_mean is 1.5x the baseline's: a 50% worsening
    baseline = baseline_with_kl(evaluated_package, tmp_path, 1.5)
    args = ["check", str(evaluated_package), "-t", "laptop-cpu-rtn", "--baseline", str(baseline)]
    assert runner.invoke(main, args).exit_code == 1
    assert runner.invoke(main, [*args, "--baseline-tolerance", "0.4"]).exit_code == 1
    assert runner.invoke(main, [*args, "--baseline-tolerance", "0.6"]).exit_code == 0
    assert runner.invoke(main, [*args, "--baseline-tolerance", "-1"]).exit_code == 2


# --- edgekit eval through the CLI --------------------------------------------------------------------


def test_eval_cli_prints_the_table_and_records_it(runner, tiny_llama_package: Path, tmp_path: Path) -> None:
    root = copy_package(tiny_llama_package, tmp_path / "pkg")
    result = runner.invoke(main, ["eval", str(root), "--windows", "4", "--ctx", "64"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert table_variants(result.output) == ["fp32", "int4-rtn"]
    for word in ("mean KL", "PPL ratio", "top-1 agree", "4 x 64", "reference cache: stored"):
        assert word in result.output, word
    report = report_of(root)
    assert (report["protocol"]["windows"], report["protocol"]["ctx"]) == (4, 64)
    manifest = read_manifest(root)
    assert manifest["evaluation"]["protocol"] == report["protocol"]
    verify_files(root, manifest)


def test_eval_table_keeps_variant_names_in_an_80_column_log(runner, evaluated_package: Path, tmp_path: Path) -> None:
    root = copy_package(evaluated_package, tmp_path / "pkg")
    result = runner.invoke(main, ["eval", str(root), "--windows", "4", "--ctx", "64"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert table_variants(result.output) == ["fp32", "int4-rtn"]


def test_eval_cli_on_text_files(runner, evaluated_package: Path, tmp_path: Path) -> None:
    from edgekit.accuracy.texts import builtin_corpus

    root = copy_package(evaluated_package, tmp_path / "pkg")
    text = builtin_corpus("evaluation").text[:6000]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text(json.dumps({"text": text[:3000]}) + "\n" + json.dumps({"text": text[3000:]}) + "\n", "utf-8")
    result = runner.invoke(main, ["eval", str(root), "--text", str(jsonl), "--windows", "2", "--ctx", "64"])
    assert result.exit_code == 0, result.output
    assert report_of(root)["protocol"]["text"] == str(jsonl)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{broken\n', encoding="utf-8")
    result = runner.invoke(main, ["eval", str(root), "--text", str(bad), "--windows", "2", "--ctx", "64"])
    assert result.exit_code == 2
    assert "line 2" in result.output and str(bad) in result.output

    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    result = runner.invoke(main, ["eval", str(root), "--text", str(empty), "--windows", "2", "--ctx", "64"])
    assert result.exit_code == 2
    assert str(empty) in result.output

    short = tmp_path / "short.txt"
    short.write_text("too short", encoding="utf-8")
    result = runner.invoke(main, ["eval", str(root), "--text", str(short), "--windows", "2", "--ctx", "64"])
    assert result.exit_code == 2
    assert "smaller --ctx" in result.output
    verify_files(root, read_manifest(root))


def test_eval_refuses_a_tampered_package(runner, evaluated_package: Path, tmp_path: Path) -> None:
    root = copy_package(evaluated_package, tmp_path / "pkg")
    target = root / "int4-rtn" / "model.onnx.data"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    before = (root / "manifest.json").read_bytes()
    result = runner.invoke(main, ["eval", str(root), "--windows", "4", "--ctx", "64"])
    assert result.exit_code == 2, result.output
    assert str(target) in result.output
    assert "sha256" in result.output
    assert (root / "manifest.json").read_bytes() == before


def test_eval_exit_2_on_missing_package(runner, tmp_path: Path) -> None:
    result = runner.invoke(main, ["eval", str(tmp_path / "nowhere"), "--windows", "1", "--ctx", "64"])
    assert result.exit_code == 2
    assert str(tmp_path / "nowhere") in result.output


# --- evaluation during edgekit build ------------------------------------------------------------------


def test_build_records_budget_verdicts_and_reports(runner, tiny_checkpoints, tmp_path: Path) -> None:
    out = tmp_path / "pkg"
    args = ["build", str(tiny_checkpoints("llama")), "-o", str(out), "-q", "-t", "laptop-cpu-rtn"]
    args += ["--eval-windows", "2", "--eval-ctx", "64"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    evaluation = manifest["evaluation"]
    assert evaluation["report"] == "eval/report.json"
    assert (evaluation["protocol"]["windows"], evaluation["protocol"]["ctx"]) == (2, 64)
    budgets = evaluation["budgets"]
    # Only the targets this laptop-cpu-rtn package can deploy are judged (and `check` accepts exactly those).
    assert set(budgets) == {"laptop-cpu-rtn", "edge-arm-cpu"}
    for target, verdicts in budgets.items():
        assert set(verdicts) == set(manifest["variants"]), target
        assert all(isinstance(v, bool) for v in verdicts.values()), target
    assert budgets["laptop-cpu-rtn"] == {"fp32": True, "int4-rtn": True}
    report = report_of(out)
    assert report["variants"].keys() == evaluation["variants"].keys()
    assert "int4-rtn" in (out / EVAL_DIR / "report.md").read_text(encoding="utf-8")
    assert (out / EVAL_DIR / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((out / EVAL_DIR).glob("reference-*.npz"))) == 1
    verify_files(out, manifest)


def test_build_no_eval_writes_no_evaluation(no_eval_package: Path) -> None:
    manifest = read_manifest(no_eval_package)
    assert "evaluation" not in manifest
    # The default target's recipe keeps its sensitivity table there (a later build reuses it); nothing else.
    assert [p.name for p in (no_eval_package / EVAL_DIR).iterdir()] == ["sensitivity.json"]
    verify_files(no_eval_package, manifest)


def test_eval_judges_exactly_the_targets_check_accepts(evaluated_package: Path, runner) -> None:
    """`eval` printed budgets for targets a package cannot deploy, which `check` then refused (exit 2)."""
    judged = set(report_of(evaluated_package)["budgets"])
    assert judged == {"laptop-cpu-rtn", "edge-arm-cpu"}
    for target in load_targets():
        result = runner.invoke(main, ["check", str(evaluated_package), "-t", target])
        assert (result.exit_code != 2) == (target in judged), (target, result.output)


def test_junit_fails_only_the_checks_that_decide_the_verdict(tmp_path: Path) -> None:
    from edgekit.accuracy.budget import Check
    from edgekit.accuracy.report import write_junit

    checks = [
        Check("int4-recipe", "kl_mean", 0.03, 0.4, True),
        Check("int4-rtn", "kl_mean", 0.5, 0.4, False),  # not deployed: informational
        Check("int4-rtn", "kl_mean", 0.5, 0.3, False, kind="baseline"),  # a regression decides for any variant
    ]
    path = tmp_path / "junit.xml"
    write_junit(path, "laptop-cpu", checks, deployed="int4-recipe")
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite is not None
    for element in (root, suite):
        assert (element.get("failures"), element.get("skipped")) == ("1", "1")
    from edgekit.accuracy.report import check_markdown

    text = check_markdown("laptop-cpu", "int4-recipe", True, checks)
    assert text.count("**fail**") == 1 and text.count("fail (informational)") == 1
    cases = {case.get("classname"): case for case in root.iter("testcase")}
    assert cases["baseline.int4-rtn"].find("failure") is not None
    skipped = cases["budget.int4-rtn"].find("skipped")
    assert skipped is not None and "deploys int4-recipe" in (skipped.get("message") or "")
    assert cases["budget.int4-recipe"].find("failure") is None and cases["budget.int4-recipe"].find("skipped") is None


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.update(protocol=None),
        lambda r: r["variants"]["int4-rtn"].update(kl_mean="0.1"),
        lambda r: r["variants"]["int4-rtn"].pop("top1_agreement"),
        lambda r: r["variants"].update({"int4-rtn": [1]}),
        lambda r: r.pop("protocol"),
    ],
    ids=["protocol-null", "metric-a-string", "metric-missing", "variant-a-list", "protocol-missing"],
)
def test_a_malformed_baseline_report_is_one_line(runner, evaluated_package: Path, tmp_path: Path, edit) -> None:
    """A report whose fields have the wrong types gave a traceback (a red-team pass); here as a baseline,
    which is read the same way as the package's own."""
    report = report_of(evaluated_package)
    edit(report)
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(report))
    result = runner.invoke(
        main, ["check", str(evaluated_package), "-t", "laptop-cpu-rtn", "--baseline", str(baseline)], env=WIDE
    )
    assert result.exit_code == 2, result.output
    assert "is not an edgekit evaluation report" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize("stop", ["manifest", "report"])
def test_an_evaluation_stopped_before_its_manifest_leaves_the_package_as_it_was(
    evaluated_package: Path, tmp_path: Path, monkeypatch, stop: str
) -> None:
    """A Ctrl-C (or a read-only manifest) after the new reference cache had replaced the old one left files
    the manifest did not list and one it listed gone: every later `check` and `eval` refused the package."""
    import edgekit.accuracy.gate as gate

    root = copy_package(evaluated_package, tmp_path / "pkg")
    before = {p.name: p.read_bytes() for p in (root / EVAL_DIR).iterdir()}
    manifest = (root / "manifest.json").read_bytes()

    def interrupted(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    monkeypatch.setattr(gate, "write_manifest" if stop == "manifest" else "write_report", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_and_record(root, windows=WINDOWS + 1, ctx=CTX)  # another protocol: a new cache
    assert {p.name: p.read_bytes() for p in (root / EVAL_DIR).iterdir()} == before
    assert (root / "manifest.json").read_bytes() == manifest
    verify_files(root, read_manifest(root))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pkg"]  # the backup beside it is gone too


def test_a_package_that_cannot_be_updated_is_one_line(evaluated_package: Path, tmp_path: Path, monkeypatch) -> None:
    import edgekit.accuracy.gate as gate
    from edgekit.errors import UsageError

    root = copy_package(evaluated_package, tmp_path / "pkg")

    def refused(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(gate, "write_manifest", refused)
    with pytest.raises(UsageError, match="the package cannot be updated \\(Operation not permitted\\)"):
        evaluate_and_record(root, windows=WINDOWS + 1, ctx=CTX)
    verify_files(root, read_manifest(root))


@pytest.mark.parametrize("tolerance", ["nan", "inf", "-0.1"])
def test_a_baseline_tolerance_that_is_not_a_finite_share_is_refused(runner, evaluated_package: Path,
                                                                     tolerance: str) -> None:  # fmt: skip
    """NaN was accepted, and then failed every baseline check (NaN compares false with everything)."""
    report = evaluated_package / EVAL_DIR / "report.json"
    result = runner.invoke(main, ["check", str(evaluated_package), "-t", "laptop-cpu", "--baseline", str(report),
                                  "--baseline-tolerance", tolerance])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and ("baseline tolerance" in result.output or "-0.1" in result.output)
