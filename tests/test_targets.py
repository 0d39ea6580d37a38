"""targets.yaml: the bundled profiles, every kind of typo, the JSON Schema, and `edgekit targets`."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from edgekit.cli import main
from edgekit.errors import TargetError, UsageError
from edgekit.targets import (
    GPTQSettings,
    Precision,
    Provider,
    bundled_targets_path,
    get_target,
    load_targets,
    targets_json_schema,
)

EXPECTED_CHAINS = {
    "laptop-cpu": ("cpu",),
    "laptop-cpu-rtn": ("cpu",),
    "laptop-cpu-gptq": ("cpu",),
    "laptop-cpu-recipe": ("cpu",),
    "laptop-cpu-fast": ("cpu",),
    "laptop-dml": ("dml", "cpu"),
    "edge-cuda": ("cuda", "cpu"),
    "edge-arm-cpu": ("cpu",),
}


def bundled_data() -> dict[str, Any]:
    return yaml.safe_load(bundled_targets_path().read_text(encoding="utf-8"))


def write_targets(tmp_path: Path, data: Any, name: str = "targets.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def mutated(change) -> dict[str, Any]:
    data = copy.deepcopy(bundled_data())
    change(data)
    return data


# --- the bundled file ------------------------------------------------------------------------------


def test_bundled_targets_yaml_parses_with_the_expected_provider_chains() -> None:
    targets = load_targets()
    assert {name: tuple(p.value for p in t.providers) for name, t in targets.items()} == EXPECTED_CHAINS
    for name, target in targets.items():
        assert target.name == name
        assert target.description
        assert target.precision is Precision.INT4
        assert target.block_size == 32
        assert target.build_provider is target.providers[0]
    assert targets["laptop-dml"].build_provider is Provider.DML
    assert targets["edge-cuda"].build_provider is Provider.CUDA
    # CPU targets carry the int8 head the demo model's numbers chose; GPU targets the int4 head.
    heads = {name: t.lm_head.value for name, t in targets.items()}
    assert heads == {
        "laptop-cpu": "int8",
        "laptop-cpu-rtn": "int8",
        "laptop-cpu-gptq": "int8",
        "laptop-cpu-recipe": "int8",
        "laptop-cpu-fast": "int8",
        "laptop-dml": "int4",
        "edge-cuda": "int4",
        "edge-arm-cpu": "int8",
    }
    assert [m.value for m in targets["laptop-cpu-gptq"].int4_methods] == ["rtn", "gptq"]
    assert [m.value for m in targets["laptop-cpu-rtn"].int4_methods] == ["rtn"]
    assert [m.value for m in targets["laptop-cpu"].int4_methods] == ["rtn", "recipe"]
    assert targets["laptop-cpu"].recipe.optimize == "loss"
    assert [m.value for m in targets["laptop-cpu-recipe"].int4_methods] == ["rtn", "recipe"]
    # The speed-first profile is laptop-cpu with a higher decode bound, nothing else changed.
    fast, default = targets["laptop-cpu-fast"], targets["laptop-cpu"]
    assert fast.recipe.min_decode_ratio > default.recipe.min_decode_ratio
    assert fast.model_dump(exclude={"description", "recipe"}) == default.model_dump(exclude={"description", "recipe"})


def test_get_target_returns_the_named_profile() -> None:
    target = get_target("edge-cuda")
    assert target.name == "edge-cuda"
    assert target.providers == (Provider.CUDA, Provider.CPU)


def test_get_target_of_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(TargetError) as info:
        get_target("raspberry-pi")
    message = str(info.value)
    assert "unknown target 'raspberry-pi'" in message
    for name in EXPECTED_CHAINS:
        assert name in message
    assert str(bundled_targets_path()) in message
    assert info.value.exit_code == 2


def test_get_target_from_a_custom_file(tmp_path: Path) -> None:
    path = write_targets(
        tmp_path,
        {"schema_version": 1, "targets": {"tiny-box": {"description": "d", "providers": ["cpu"]}}},
    )
    target = get_target("tiny-box", path)
    assert target.providers == (Provider.CPU,)
    assert target.block_size == 32  # the default
    with pytest.raises(TargetError) as info:
        get_target("laptop-cpu", path)
    assert "tiny-box" in str(info.value)
    assert str(path) in str(info.value)


# --- every kind of mistake is an error naming the key or value and the file ---------------------------


def _set(target: str, key: str, value: Any):
    def change(data: dict[str, Any]) -> None:
        data["targets"][target][key] = value

    return change


def _delete(target: str, key: str):
    def change(data: dict[str, Any]) -> None:
        del data["targets"][target][key]

    return change


def _replace_target(target: str, value: Any):
    def change(data: dict[str, Any]) -> None:
        data["targets"][target] = value

    return change


def _top(key: str, value: Any):
    def change(data: dict[str, Any]) -> None:
        data[key] = value

    return change


def _nan_budget(data: dict[str, Any]) -> None:
    data["targets"]["laptop-cpu"]["budget"] = {"max_kl_mean": float("nan")}


# case -> (change, phrases the one-line error must hold). Paths are dotted, from the top of the file.
BAD_FILES = {
    "unknown top-level key": (_top("tragets", {}), ["top level: unknown key 'tragets'", "schema_version, targets"]),
    "wrong schema_version": (_top("schema_version", 2), ["schema_version: input should be 1", "got 2"]),
    "unknown target key": (
        _set("laptop-cpu", "blocksize", 64),
        ["targets.laptop-cpu: unknown key 'blocksize'", "block_size"],  # the allowed keys are listed
    ),
    "removed memory_limit_mb": (
        _set("laptop-cpu", "memory_limit_mb", 8192),
        ["targets.laptop-cpu: unknown key 'memory_limit_mb'"],
    ),
    "unknown provider": (
        _set("edge-cuda", "providers", ["cuda", "tpu"]),
        ["targets.edge-cuda.providers.1", "'cpu', 'cuda' or 'dml'", "got 'tpu'"],
    ),
    "unknown precision": (
        _set("laptop-cpu", "precision", "int3"),
        ["targets.laptop-cpu.precision", "'fp32', 'fp16' or 'int4'", "got 'int3'"],
    ),
    "bad block_size": (
        _set("laptop-dml", "block_size", 48),
        ["targets.laptop-dml.block_size", "16, 32, 64, 128 or 256", "got 48"],
    ),
    "block_size as a string": (
        _set("laptop-dml", "block_size", "32"),
        ["targets.laptop-dml.block_size", "integer", "got '32'"],
    ),
    "bad accuracy_level": (
        _set("edge-arm-cpu", "accuracy_level", 7),
        ["targets.edge-arm-cpu.accuracy_level", "less than or equal to 4", "got 7"],
    ),
    "negative budget value": (
        _set("laptop-cpu", "budget", {"max_kl_mean": -0.5}),
        ["targets.laptop-cpu.budget.max_kl_mean", "greater than or equal to 0", "got -0.5"],
    ),
    "non-number budget value": (
        _set("laptop-cpu", "budget", {"max_ppl_ratio": "low"}),
        ["targets.laptop-cpu.budget.max_ppl_ratio", "valid number", "got 'low'"],
    ),
    "nan budget value": (_nan_budget, ["targets.laptop-cpu.budget.max_kl_mean", "finite number"]),
    "unknown budget key": (
        _set("laptop-cpu", "budget", {"max_kl": 0.1}),
        ["targets.laptop-cpu.budget: unknown key 'max_kl'", "max_kl_mean"],
    ),
    "non-mapping budget": (_set("edge-cuda", "budget", [0.1]), ["targets.edge-cuda.budget: must be a mapping"]),
    "missing providers": (_delete("laptop-cpu", "providers"), ["targets.laptop-cpu.providers", "missing"]),
    "missing description": (_delete("edge-cuda", "description"), ["targets.edge-cuda.description", "missing"]),
    "description not a string": (_set("edge-cuda", "description", 42), ["targets.edge-cuda.description", "string"]),
    "empty providers": (_set("laptop-cpu", "providers", []), ["targets.laptop-cpu.providers: must not be empty"]),
    "providers not a list": (_set("laptop-cpu", "providers", "cpu"), ["targets.laptop-cpu.providers", "a list"]),
    "int4 method twice": (
        _set("laptop-cpu", "int4_methods", ["rtn", "rtn"]),
        ["targets.laptop-cpu.int4_methods", "each method once"],
    ),
    "unknown int4 method": (
        _set("laptop-cpu", "int4_methods", ["awq"]),
        ["targets.laptop-cpu.int4_methods.0", "'rtn', 'gptq' or 'recipe'"],
    ),
    "unknown lm_head": (_set("laptop-cpu", "lm_head", "int2"), ["targets.laptop-cpu.lm_head", "'int4', 'int8' or"]),
    "target not a mapping": (_replace_target("laptop-cpu", "cpu"), ["targets.laptop-cpu: must be a mapping"]),
    "empty targets": (_top("targets", {}), ["targets: must not be empty"]),
    "unknown gptq key": (
        _set("laptop-cpu", "gptq", {"dampening": 0.1}),
        ["targets.laptop-cpu.gptq: unknown key 'dampening'", "damp"],
    ),
    "gptq sym not a boolean": (
        _set("laptop-cpu", "gptq", {"sym": "yes"}),
        ["targets.laptop-cpu.gptq.sym", "valid boolean", "got 'yes'"],
    ),
    "gptq one_pass not a boolean": (
        _set("laptop-cpu", "gptq", {"one_pass": 1}),
        ["targets.laptop-cpu.gptq.one_pass", "valid boolean", "got 1"],
    ),
    "gptq damp out of range": (
        _set("laptop-cpu", "gptq", {"damp": 1.5}),
        ["targets.laptop-cpu.gptq.damp", "less than 1", "got 1.5"],
    ),
    "gptq damp zero": (_set("laptop-cpu", "gptq", {"damp": 0}), ["targets.laptop-cpu.gptq.damp", "greater than 0"]),
    "gptq not a mapping": (_set("laptop-cpu", "gptq", 0.01), ["targets.laptop-cpu.gptq: must be a mapping"]),
    "gptq with block_size 16": (
        _set("laptop-cpu-gptq", "block_size", 16),
        ["targets.laptop-cpu-gptq: GPTQ groups of block_size 16", "use a block_size of 32, 64, 128"],
    ),
}
# What JSON Schema cannot say: it has no NaN (JSON cannot even write one).
SCHEMA_CANNOT_EXPRESS = {"nan budget value"}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_a_mistake_in_targets_yaml_is_a_target_error_naming_the_key_and_the_file(case: str, tmp_path: Path) -> None:
    change, phrases = BAD_FILES[case]
    path = write_targets(tmp_path, mutated(change))
    with pytest.raises(TargetError) as info:
        load_targets(path)
    message = str(info.value)
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2
    assert str(path) in message, message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    assert "\n" not in message


@pytest.mark.parametrize("case", sorted(set(BAD_FILES) - SCHEMA_CANNOT_EXPRESS))
def test_the_json_schema_rejects_what_the_parser_rejects(case: str) -> None:
    change, _ = BAD_FILES[case]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(mutated(change), targets_json_schema())


# Values YAML turns into booleans (`yes`, `true`) are not numbers; the JSON Schema says so, and the
# parser must agree instead of reading `true` as 1.
BOOLEAN_VALUES = {
    "accuracy_level: true": _set("laptop-cpu", "accuracy_level", True),
    "block_size: true": _set("laptop-cpu", "block_size", True),
    "budget value true": _set("laptop-cpu", "budget", {"max_kl_mean": True}),
    "gptq damp: true": _set("laptop-cpu", "gptq", {"damp": True}),
    "schema_version: true": _top("schema_version", True),
}


@pytest.mark.parametrize("case", sorted(BOOLEAN_VALUES))
def test_a_boolean_where_a_number_belongs_is_rejected_by_schema_and_parser(case: str, tmp_path: Path) -> None:
    data = mutated(BOOLEAN_VALUES[case])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, targets_json_schema())
    path = write_targets(tmp_path, data)
    with pytest.raises(TargetError) as info:
        load_targets(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_and_a_missing_file_are_target_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("schema_version: 1\ntargets: {laptop-cpu: [unclosed\n", encoding="utf-8")
    with pytest.raises(TargetError) as info:
        load_targets(broken)
    assert str(broken) in str(info.value)
    assert "YAML" in str(info.value)

    missing = tmp_path / "nope.yaml"
    with pytest.raises(TargetError) as info:
        load_targets(missing)
    assert str(missing) in str(info.value)

    not_mapping = write_targets(tmp_path, ["laptop-cpu"], "list.yaml")
    with pytest.raises(TargetError) as info:
        load_targets(not_mapping)
    assert str(not_mapping) in str(info.value)


# --- JSON Schema -----------------------------------------------------------------------------------


def test_the_json_schema_is_valid_and_accepts_the_bundled_file() -> None:
    schema = targets_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(bundled_data(), schema)


def test_the_json_schema_rejects_an_unknown_key() -> None:
    data = mutated(_set("laptop-cpu", "blocksize", 32))
    with pytest.raises(jsonschema.ValidationError) as info:
        jsonschema.validate(data, targets_json_schema())
    assert "blocksize" in str(info.value.message)


def test_the_json_schema_knows_every_key_the_parser_accepts() -> None:
    from edgekit.targets import Target

    schema = targets_json_schema()
    targets = schema["properties"]["targets"]
    assert targets["patternProperties"] == {r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$": {"$ref": "#/$defs/Target"}}
    assert targets["additionalProperties"] is False
    assert set(schema["$defs"]["Target"]["properties"]) == set(Target.model_fields)
    assert "memory_limit_mb" not in schema["$defs"]["Target"]["properties"]  # never enforced: removed


# --- the CLI ---------------------------------------------------------------------------------------


def test_edgekit_targets_lists_every_target_and_says_cpu_is_available(runner) -> None:
    result = runner.invoke(main, ["targets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in EXPECTED_CHAINS:
        assert name in result.stdout
    assert "providers on this machine:" in result.stdout
    here = result.stdout.split("providers on this machine:", 1)[1].split(")", 1)[0]
    assert "cpu" in [p.strip() for p in here.split(",")]
    assert "dml" in result.stdout and "cuda" in result.stdout


def test_edgekit_targets_with_a_targets_file(runner, tmp_path: Path) -> None:
    path = write_targets(
        tmp_path,
        {"schema_version": 1, "targets": {"my-board": {"description": "mine", "providers": ["cpu"]}}},
    )
    result = runner.invoke(main, ["targets", "--targets-file", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "my-board" in result.stdout
    assert "laptop-cpu" not in result.stdout


def test_edgekit_targets_with_a_bad_targets_file_exits_2(runner, tmp_path: Path) -> None:
    path = write_targets(tmp_path, mutated(_set("laptop-cpu", "colour", "red")))
    result = runner.invoke(main, ["targets", "--targets-file", str(path)])
    assert result.exit_code == 2
    assert "colour" in result.stderr
    assert str(path) in result.stderr
    assert result.stderr.startswith("edgekit: error:")


def test_edgekit_targets_schema_prints_the_json_schema(runner) -> None:
    result = runner.invoke(main, ["targets", "--schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.stdout)
    assert schema == targets_json_schema()
    assert schema["required"] == ["schema_version", "targets"]


def test_gptq_needs_a_block_size_it_can_group_by(tmp_path: Path) -> None:
    data = mutated(_set("laptop-cpu", "int4_methods", ["rtn", "gptq"]))
    data["targets"]["laptop-cpu"]["block_size"] = 16
    with pytest.raises(TargetError, match=r"laptop-cpu.*block_size 16.*use a block_size of 32, 64, 128"):
        load_targets(write_targets(tmp_path, data))


def test_gptq_settings_reach_the_target(tmp_path: Path) -> None:
    data = mutated(_set("laptop-cpu", "gptq", {"sym": False, "damp": 0.05, "act_order": False, "one_pass": True}))
    gptq = load_targets(write_targets(tmp_path, data))["laptop-cpu"].gptq
    assert (gptq.sym, gptq.damp, gptq.act_order, gptq.one_pass) == (False, 0.05, False, True)
    assert load_targets()["laptop-cpu"].gptq == GPTQSettings()


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        # "billion laughs": 10 levels of aliases made a 408-byte file into 10^9 values (minutes, gigabytes)
        (
            "a: &a [x, x, x, x, x, x, x, x, x]\n"
            + "".join(
                f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefghi", "bcdefghij", strict=True)
            )
            + "schema_version: *j\ntargets: {}\n",
            "aliases",
        ),
        ("schema_version: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
    ],
    ids=["alias-bomb", "deep-nesting"],
)
def test_a_hostile_targets_file_is_refused_at_once(text: str, phrase: str, tmp_path: Path) -> None:
    from edgekit.targets import load_targets

    path = tmp_path / "targets.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TargetError, match=phrase):
        load_targets(path)


@pytest.mark.parametrize("name", ["my target", "[bold]x", "\x1b[31mred", "-flag", "x" * 65])
def test_a_target_name_outside_letters_digits_and_dot_dash_underscore_is_refused(tmp_path: Path, name: str) -> None:
    """A target's name goes into packages' manifests, rich tables and JUnit files."""
    data = mutated(lambda d: d["targets"].update({name: d["targets"]["laptop-cpu"]}))
    with pytest.raises(TargetError, match="targets"):
        load_targets(write_targets(tmp_path, data))
