"""One home per rule and per default (issue "One step of redesign"): the targets.yaml models, the JSON Schema
generated from them, GPTQConfig's reuse of their GPTQ rules, and the CLI's defaults read from the library."""

from __future__ import annotations

import copy
import dataclasses
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import jsonschema
import pydantic
import pytest
import yaml

from edgekit.cli import LibraryDefault, main
from edgekit.errors import TargetError
from edgekit.targets import (
    BLOCK_SIZES,
    GPTQ_GROUP_SIZES,
    GPTQSettings,
    Int4Method,
    Provider,
    Target,
    TargetsFile,
    bundled_targets_path,
    load_targets,
    parse_targets,
    targets_json_schema,
)


def bundled_data() -> dict[str, Any]:
    return yaml.safe_load(bundled_targets_path().read_text(encoding="utf-8"))


def one_target(**body: Any) -> dict[str, Any]:
    return {"schema_version": 1, "targets": {"box": {"description": "d", "providers": ["cpu"], **body}}}


# --- the models --------------------------------------------------------------------------------------------


def test_every_problem_of_a_file_is_reported_at_once_with_its_path() -> None:
    data = copy.deepcopy(bundled_data())
    data["tragets"] = {}
    laptop = data["targets"]["laptop-cpu"]
    laptop["blocksize"] = 64
    laptop["colour"] = "red"
    laptop["budget"] = {"max_kl": 0.1, "max_ppl_ratio": "low"}
    data["targets"]["edge-cuda"]["providers"] = ["cuda", "tpu"]
    data["targets"]["edge-arm-cpu"]["gptq"] = {"damp": 2.0, "sym": "yes"}
    data["targets"]["laptop-dml"]["accuracy_level"] = True
    with pytest.raises(TargetError) as info:
        parse_targets(data, "my-targets.yaml")
    message = str(info.value)
    for phrase in (
        "my-targets.yaml:",
        "top level: unknown key 'tragets'",
        "targets.laptop-cpu: unknown keys 'blocksize', 'colour'",
        "targets.laptop-cpu.budget: unknown key 'max_kl'",
        "targets.laptop-cpu.budget.max_ppl_ratio",
        "targets.edge-cuda.providers.1",
        "targets.edge-arm-cpu.gptq.damp",
        "targets.edge-arm-cpu.gptq.sym",
        "targets.laptop-dml.accuracy_level",
    ):
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert "\n" not in message
    assert info.value.exit_code == 2


def test_the_allowed_keys_are_listed_once_per_kind_of_mapping() -> None:
    data = copy.deepcopy(bundled_data())
    for body in data["targets"].values():
        body["memory_limit_mb"] = 8192  # a file written for an older edgekit
    with pytest.raises(TargetError) as info:
        parse_targets(data)
    message = str(info.value)
    assert message.count("unknown key 'memory_limit_mb'") == len(data["targets"])
    assert message.count("allowed:") == 1


@pytest.mark.parametrize(
    "key, value",
    [
        ("block_size", "32"),
        ("block_size", 32.0),
        ("block_size", True),
        ("accuracy_level", "4"),
        ("accuracy_level", 4.0),
        ("providers", "cpu"),
        ("providers", {"cpu"}),
        ("int4_methods", "rtn"),
        ("precision", 4),
        ("description", 3.5),
        ("gptq", {"act_order": "true"}),
        ("gptq", {"damp": "0.01"}),
        ("budget", {"max_kl_mean": "0.4"}),
        ("budget", {"min_top1_agreement": float("inf")}),
        ("budget", None),
    ],
)
def test_yaml_values_are_never_coerced(key: str, value: Any) -> None:
    with pytest.raises(TargetError, match=rf"targets\.box\.{key}"):
        parse_targets(one_target(**{key: value}))


def test_a_profile_with_only_the_required_keys_gets_the_defaults() -> None:
    target = parse_targets(one_target())["box"]
    assert target.name == "box"
    assert target.providers == (Provider.CPU,)
    assert (target.block_size, target.accuracy_level, target.int4_methods) == (32, 0, (Int4Method.RTN,))
    assert target.budget.max_kl_mean is None
    assert target.gptq == GPTQSettings()


def test_targets_are_frozen_and_named_by_their_key() -> None:
    targets = load_targets()
    laptop = targets["laptop-cpu"]
    with pytest.raises(pydantic.ValidationError):
        laptop.block_size = 64  # type: ignore[misc]
    with pytest.raises(pydantic.ValidationError):
        laptop.budget.max_kl_mean = 9.0  # type: ignore[misc]
    assert len({laptop, targets["laptop-cpu"]}) == 1  # hashable
    assert [t.name for t in targets.values()] == list(targets)
    # One Target object given under two names becomes two targets, each with its own name.
    shared = Target.model_validate({"description": "d", "providers": ["cpu"]})
    assert shared.name == ""
    both = TargetsFile.model_validate({"schema_version": 1, "targets": {"a": shared, "b": shared}}).targets
    assert (both["a"].name, both["b"].name, shared.name) == ("a", "b", "")


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_gptq_is_allowed_exactly_with_the_gptq_group_sizes(block_size: int) -> None:
    data = one_target(block_size=block_size, int4_methods=["rtn", "gptq"])
    if block_size in GPTQ_GROUP_SIZES:
        assert parse_targets(data)["box"].block_size == block_size
    else:
        with pytest.raises(TargetError, match=rf"targets\.box: GPTQ groups of block_size {block_size}"):
            parse_targets(data)
    assert parse_targets(one_target(block_size=block_size))["box"].block_size == block_size  # RTN takes any


# --- GPTQConfig reuses the models' rules ---------------------------------------------------------------------


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_gptq_config_and_targets_agree_on_group_sizes(block_size: int) -> None:
    from edgekit.quant.gptq import GPTQConfig

    if block_size in GPTQ_GROUP_SIZES:
        assert GPTQConfig(group_size=block_size).group_size == block_size
    else:
        with pytest.raises(ValueError, match="group_size"):
            GPTQConfig(group_size=block_size)


@pytest.mark.parametrize("settings", [{"damp": 0.0}, {"damp": 1.0}, {"sym": 1}, {"act_order": "n"}, {"one_pass": None}])
def test_gptq_config_refuses_what_targets_refuse(settings: dict[str, Any]) -> None:
    from edgekit.quant.gptq import GPTQConfig

    (key,) = settings
    with pytest.raises(TargetError, match=rf"targets\.box\.gptq\.{key}"):
        parse_targets(one_target(gptq=settings))
    with pytest.raises(ValueError, match=rf"GPTQ {key}"):
        GPTQConfig(**settings)


def test_every_target_gptq_setting_is_a_gptq_config_field() -> None:
    """The build passes ``target.gptq.model_dump()`` to GPTQConfig: a new setting must exist on both."""
    from edgekit.quant.gptq import GPTQConfig

    settings = GPTQSettings(sym=False, damp=0.05, act_order=False, one_pass=True)
    config = GPTQConfig(group_size=64, **settings.model_dump())
    assert {name: getattr(config, name) for name in GPTQSettings.model_fields} == settings.model_dump()
    assert GPTQSettings().model_dump() == {f: getattr(GPTQConfig(), f) for f in GPTQSettings.model_fields}


# --- the JSON Schema is generated from the models ------------------------------------------------------------


def test_every_bundled_target_validates_against_the_generated_schema() -> None:
    schema = targets_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema")
    data = bundled_data()
    jsonschema.validate(data, schema)
    for name, body in data["targets"].items():
        jsonschema.validate({"schema_version": 1, "targets": {name: body}}, schema)


@pytest.mark.parametrize(
    "body",
    [
        {"block_size": 16, "int4_methods": ["gptq"]},
        {"block_size": 256, "int4_methods": ["rtn", "gptq"]},
        {"colour": "red"},
        {"memory_limit_mb": 4096},
        {"int4_methods": ["gptq", "gptq"]},
        {"gptq": {"damp": 1}},
        {"budget": {"max_kl_mean": -1}},
        {"accuracy_level": 5},
    ],
)
def test_what_the_models_refuse_the_schema_refuses(body: dict[str, Any]) -> None:
    data = one_target(**body)
    with pytest.raises(TargetError):
        parse_targets(data)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, targets_json_schema())


def test_the_schema_accepts_gptq_with_its_group_sizes_and_rtn_with_any_block() -> None:
    schema = targets_json_schema()
    for block_size in GPTQ_GROUP_SIZES:
        jsonschema.validate(one_target(block_size=block_size, int4_methods=["gptq"]), schema)
    for block_size in BLOCK_SIZES:
        jsonschema.validate(one_target(block_size=block_size), schema)


def test_edgekit_targets_schema_prints_the_models_schema(runner) -> None:
    import json

    result = runner.invoke(main, ["targets", "--schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == targets_json_schema()
    assert json.loads(result.stdout)["$defs"]["Target"]["then"]["properties"]["block_size"]["enum"] == list(
        GPTQ_GROUP_SIZES
    )


def test_edgekit_targets_has_no_memory_column(runner) -> None:
    result = runner.invoke(main, ["targets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "memory" not in result.stdout
    assert "block" in result.stdout


# --- every CLI default comes from the library ----------------------------------------------------------------


def _library_defaults() -> dict[tuple[str, str], Any]:
    from edgekit.accuracy.gate import check_package, evaluate_and_record
    from edgekit.package.archive import DEFAULT_COMPRESS_LEVEL
    from edgekit.pipeline import CalibrationSettings, EvalSettings
    from edgekit.runtimes.bench import BenchSettings
    from edgekit.runtimes.generation import GenerationConfig
    from edgekit.runtimes.tune import TuneSettings
    from edgekit.serve.options import DEFAULT_PORT, ServeOptions

    evaluation, calibration, bench = EvalSettings(), CalibrationSettings(), BenchSettings()
    generation = GenerationConfig()
    evaluate = inspect.signature(evaluate_and_record).parameters
    return {
        ("build", "eval_windows"): evaluation.windows,
        ("build", "eval_ctx"): evaluation.ctx,
        ("build", "calib_samples"): calibration.samples,
        ("build", "calib_seq_len"): calibration.seq_len,
        ("build", "seed"): calibration.seed,
        ("eval", "windows"): evaluate["windows"].default,
        ("eval", "ctx"): evaluate["ctx"].default,
        ("check", "baseline_tolerance"): inspect.signature(check_package).parameters["baseline_tolerance"].default,
        ("bench", "prompt_tokens"): bench.prompt_tokens,
        ("bench", "gen_tokens"): bench.gen_tokens,
        ("bench", "runs"): bench.runs,
        ("bench", "threads"): bench.threads,
        ("run", "max_new_tokens"): generation.max_new_tokens,
        ("run", "temperature"): generation.temperature,
        ("run", "top_p"): generation.top_p,
        ("run", "top_k"): generation.top_k,
        ("tune", "rounds"): TuneSettings.rounds,
        ("tune", "prompt_tokens"): TuneSettings.prompt_tokens,
        ("tune", "gen_tokens"): TuneSettings.gen_tokens,
        ("serve", "port"): DEFAULT_PORT,
        ("serve", "max_concurrency"): ServeOptions.max_concurrency,
        ("serve", "max_queue"): ServeOptions.max_queue,
        ("serve", "max_tokens"): ServeOptions.max_tokens,
        ("serve", "timeout"): ServeOptions.timeout_s,
        ("serve", "max_body_bytes"): ServeOptions.max_body_bytes,
        ("pack", "level"): DEFAULT_COMPRESS_LEVEL,
    }


def _option(command: str, name: str) -> click.Option:
    (option,) = [p for p in main.commands[command].params if p.name == name]
    assert isinstance(option, click.Option)
    return option


def test_each_cli_default_equals_the_librarys() -> None:
    for (command, name), expected in _library_defaults().items():
        ctx = click.Context(main.commands[command])
        assert _option(command, name).get_default(ctx) == expected, f"{command} --{name}"


def test_no_cli_option_holds_a_number_of_its_own() -> None:
    """A numeric default in the CLI is either read from the library or listed above against it."""
    known = set(_library_defaults())
    for command_name, command in main.commands.items():
        for param in command.params:
            default = param.default
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                assert (command_name, param.name) in known, f"{command_name} --{param.name}: {default!r}"
            if isinstance(default, LibraryDefault):
                assert (command_name, param.name) in known, f"{command_name} --{param.name} is not tested"


def test_help_shows_the_library_defaults(runner) -> None:
    from edgekit.runtimes.cpu_threads import physical_cores

    result = runner.invoke(main, ["bench", "--help"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "(dynamic)" not in text
    assert f"else one per physical core this process may use ({physical_cores()} here)" in text
    assert "onnxruntime's choice" not in text
    result = runner.invoke(main, ["build", "--help"])
    text = " ".join(result.output.split())
    defaults = _library_defaults()
    assert f"Windows to score. [default: {defaults['build', 'eval_windows']};" in text
    assert f"GPTQ samples. [default: {defaults['build', 'calib_samples']};" in text


def test_the_defaults_reach_the_library_unchanged(runner, monkeypatch, tmp_path: Path) -> None:
    """Commands run without options hand the library exactly its own defaults."""
    import edgekit.accuracy.gate
    import edgekit.pipeline
    import edgekit.runtimes.bench
    import edgekit.summary

    defaults = _library_defaults()  # before the library's functions are replaced
    seen: dict[str, Any] = {}
    monkeypatch.setattr(edgekit.pipeline, "build", lambda *a, **k: seen.update(build=k))
    monkeypatch.setattr(edgekit.runtimes.bench, "bench_package", lambda *a, **k: seen.update(bench=k["settings"]))
    monkeypatch.setattr(edgekit.accuracy.gate, "evaluate_and_record", lambda *a, **k: seen.update(eval=k))
    passed = SimpleNamespace(passed=True)
    monkeypatch.setattr(edgekit.accuracy.gate, "check_package", lambda *a, **k: seen.update(check=k) or passed)
    for printer in ("print_build_summary", "print_bench", "print_eval_report", "print_check"):
        monkeypatch.setattr(edgekit.summary, printer, lambda *a, **k: None)

    for args in (["build", "src", "-o", str(tmp_path / "out")], ["bench", "pkg"], ["eval", "pkg"]):
        result = runner.invoke(main, args)
        assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["check", "pkg", "-t", "laptop-cpu"])
    assert result.exit_code == 0, result.output

    from edgekit.pipeline import CalibrationSettings, EvalSettings
    from edgekit.runtimes.bench import BenchSettings

    assert seen["build"]["evaluation"] == EvalSettings()
    assert seen["build"]["calibration"] == CalibrationSettings()
    assert seen["bench"] == BenchSettings()
    assert (seen["eval"]["windows"], seen["eval"]["ctx"]) == (defaults["eval", "windows"], defaults["eval", "ctx"])
    assert seen["check"]["baseline_tolerance"] == defaults["check", "baseline_tolerance"]
    assert dataclasses.asdict(seen["bench"])["threads"] is None  # the runtime picks one per physical core
