"""Device profiles: ``targets.yaml`` parsed into frozen, validated objects.

A typo in targets.yaml is an error that names the key and the file, never a silently ignored setting
(the way llm-compressor's ``extra="forbid"`` recipes behave).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from edgekit.errors import TargetError
from edgekit.safe_io import read_regular_file

SCHEMA_VERSION = 1
MAX_TARGETS_BYTES = 1 << 20  # a real one is a few KB


class Provider(str, enum.Enum):
    """Execution providers a target may name, in edgekit's spelling."""

    CPU = "cpu"
    CUDA = "cuda"
    DML = "dml"


class Int4Method(str, enum.Enum):
    """How an INT4 variant is quantized."""

    RTN = "rtn"
    GPTQ = "gptq"


class HeadPrecision(str, enum.Enum):
    """Precision of the LM head in INT4 variants (``float``: the model's own, unquantized)."""

    INT4 = "int4"
    INT8 = "int8"
    FLOAT = "float"


class Precision(str, enum.Enum):
    """Weight precision of a target's deployed variant."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT4 = "int4"


@dataclass(frozen=True)
class AccuracyBudget:
    """Limits a quantized variant must meet against the fp32 reference; unset limits are not checked."""

    max_kl_mean: float | None = None
    max_ppl_ratio: float | None = None
    min_top1_agreement: float | None = None


@dataclass(frozen=True)
class GPTQSettings:
    """How a target's ``int4-gptq`` variant is calibrated (the group size is the target's block size)."""

    sym: bool = True
    damp: float = 0.01
    """Added to the Hessian's diagonal, as a fraction of its mean diagonal."""
    act_order: bool = True
    """Quantize columns in descending Hessian-diagonal order (static groups: no g_idx at run time)."""
    one_pass: bool = False
    """One forward pass per decoder layer over all calibration batches at once (true-sequential order):
    about a fifth faster, holding every batch's activations of a layer at once."""


@dataclass(frozen=True)
class Target:
    """One device profile from targets.yaml."""

    name: str
    description: str
    providers: tuple[Provider, ...]
    precision: Precision = Precision.INT4
    block_size: int = 32
    accuracy_level: int = 0
    memory_limit_mb: int | None = None
    budget: AccuracyBudget = field(default_factory=AccuracyBudget)
    int4_methods: tuple[Int4Method, ...] = (Int4Method.RTN,)
    """INT4 variants to build; the last one is the variant the target deploys."""
    lm_head: HeadPrecision = HeadPrecision.INT4
    gptq: GPTQSettings = field(default_factory=GPTQSettings)

    @property
    def build_provider(self) -> Provider:
        """The provider the package's graphs are built for: the first in the chain."""
        return self.providers[0]


_TARGET_KEYS = {f.name for f in dataclasses.fields(Target)} - {"name"}
_BUDGET_KEYS = {f.name for f in dataclasses.fields(AccuracyBudget)}
_GPTQ_KEYS = {f.name for f in dataclasses.fields(GPTQSettings)}
_BLOCK_SIZES = (16, 32, 64, 128, 256)
_GPTQ_GROUP_SIZES = (32, 64, 128)


def bundled_targets_path() -> Path:
    """The targets.yaml shipped with edgekit (inside the wheel, or at the repo root in a checkout)."""
    packaged = resources.files("edgekit").joinpath("targets.yaml")
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "targets.yaml"


def load_targets(path: str | Path | None = None) -> dict[str, Target]:
    """Read and validate a targets file (the bundled one by default); returns targets by name."""
    path = Path(path) if path is not None else bundled_targets_path()
    data = read_regular_file(path, MAX_TARGETS_BYTES, TargetError, "pass a targets.yaml file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TargetError(f"is not UTF-8 text ({exc})", path=path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TargetError(f"not valid YAML ({exc})", path=path, fix="fix the YAML syntax") from exc
    return parse_targets(data, path)


def parse_targets(data: Any, path: str | Path = "targets.yaml") -> dict[str, Target]:
    """Validate the parsed YAML of a targets file into ``Target`` objects."""
    if not isinstance(data, Mapping):
        raise TargetError("the top level must be a mapping with 'schema_version' and 'targets'", path=path)
    _reject_unknown(data, {"schema_version", "targets"}, "top level", path)
    if data.get("schema_version") != SCHEMA_VERSION:
        raise TargetError(f"schema_version must be {SCHEMA_VERSION}, got {data.get('schema_version')!r}", path=path)
    entries = data.get("targets")
    if not isinstance(entries, Mapping) or not entries:
        raise TargetError("'targets' must be a non-empty mapping of target names to profiles", path=path)
    return {str(name): _parse_target(str(name), body, path) for name, body in entries.items()}


def get_target(name: str, path: str | Path | None = None) -> Target:
    """Look up one target by name, with an error that lists the known ones."""
    targets = load_targets(path)
    if name not in targets:
        known = ", ".join(sorted(targets))
        raise TargetError(f"unknown target '{name}'", path=path or bundled_targets_path(), fix=f"use one of: {known}")
    return targets[name]


def _parse_target(name: str, body: Any, path: str | Path) -> Target:
    where = f"target '{name}'"
    if not isinstance(body, Mapping):
        raise TargetError(f"{where} must be a mapping", path=path)
    _reject_unknown(body, _TARGET_KEYS, where, path)
    for required in ("description", "providers"):
        if required not in body:
            raise TargetError(f"{where} lacks the required key '{required}'", path=path)
    providers = body["providers"]
    if not isinstance(providers, list) or not providers:
        raise TargetError(f"{where}: 'providers' must be a non-empty list", path=path)
    precision = _enum(Precision, body.get("precision", "int4"), f"{where}: precision", path)
    block_size = body.get("block_size", 32)
    if isinstance(block_size, bool) or block_size not in _BLOCK_SIZES:
        raise TargetError(f"{where}: block_size {block_size!r} is not one of {list(_BLOCK_SIZES)}", path=path)
    accuracy_level = body.get("accuracy_level", 0)
    if isinstance(accuracy_level, bool) or accuracy_level not in (0, 1, 2, 3, 4):
        raise TargetError(f"{where}: accuracy_level {accuracy_level!r} is not 0..4", path=path)
    memory = body.get("memory_limit_mb")
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0):
        raise TargetError(f"{where}: memory_limit_mb must be a positive integer", path=path)
    methods = _parse_methods(body.get("int4_methods", ["rtn"]), where, path)
    if Int4Method.GPTQ in methods and block_size not in _GPTQ_GROUP_SIZES:
        raise TargetError(
            f"{where}: GPTQ groups of block_size {block_size} are not supported",
            path=path,
            fix=f"use a block_size of {', '.join(map(str, _GPTQ_GROUP_SIZES))} with int4_methods gptq",
        )
    return Target(
        name=name,
        description=str(body["description"]),
        providers=tuple(_enum(Provider, p, f"{where}: provider", path) for p in providers),
        precision=precision,
        block_size=block_size,
        accuracy_level=accuracy_level,
        memory_limit_mb=memory,
        budget=_parse_budget(body.get("budget") or {}, where, path),
        int4_methods=methods,
        lm_head=_enum(HeadPrecision, body.get("lm_head", "int4"), f"{where}: lm_head", path),
        gptq=_parse_gptq(body.get("gptq") or {}, where, path),
    )


def _parse_gptq(body: Any, where: str, path: str | Path) -> GPTQSettings:
    if not isinstance(body, Mapping):
        raise TargetError(f"{where}: 'gptq' must be a mapping", path=path)
    _reject_unknown(body, _GPTQ_KEYS, f"{where} gptq", path)
    for key in ("sym", "act_order", "one_pass"):
        if key in body and not isinstance(body[key], bool):
            raise TargetError(f"{where}: gptq '{key}' must be true or false", path=path)
    damp = body.get("damp", GPTQSettings.damp)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
        raise TargetError(f"{where}: gptq 'damp' must be a number between 0 and 1", path=path)
    return GPTQSettings(
        sym=body.get("sym", GPTQSettings.sym),
        damp=float(damp),
        act_order=body.get("act_order", GPTQSettings.act_order),
        one_pass=body.get("one_pass", GPTQSettings.one_pass),
    )


def _parse_methods(methods: Any, where: str, path: str | Path) -> tuple[Int4Method, ...]:
    if not isinstance(methods, list) or not methods:
        raise TargetError(f"{where}: 'int4_methods' must be a non-empty list", path=path)
    parsed = tuple(_enum(Int4Method, m, f"{where}: int4 method", path) for m in methods)
    if len(set(parsed)) != len(parsed):
        raise TargetError(f"{where}: 'int4_methods' lists a method twice", path=path)
    return parsed


def _parse_budget(body: Any, where: str, path: str | Path) -> AccuracyBudget:
    if not isinstance(body, Mapping):
        raise TargetError(f"{where}: 'budget' must be a mapping", path=path)
    _reject_unknown(body, _BUDGET_KEYS, f"{where} budget", path)
    values: dict[str, float] = {}
    for key, value in body.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise TargetError(f"{where}: budget '{key}' must be a non-negative number", path=path)
        values[str(key)] = float(value)
    return AccuracyBudget(**values)


def _enum(kind: type[enum.Enum], value: Any, where: str, path: str | Path) -> Any:
    try:
        return kind(value)
    except ValueError:
        known = ", ".join(member.value for member in kind)
        raise TargetError(f"{where} '{value}' is unknown", path=path, fix=f"use one of: {known}") from None


def _reject_unknown(body: Mapping[str, Any], allowed: set[str], where: str, path: str | Path) -> None:
    unknown = sorted(set(map(str, body)) - allowed)
    if unknown:
        raise TargetError(
            f"{where} has unknown key '{unknown[0]}'",
            path=path,
            fix=f"allowed keys: {', '.join(sorted(allowed))}",
        )


def targets_json_schema() -> dict[str, Any]:
    """JSON Schema of targets.yaml, for editors that validate YAML against a schema."""
    budget = {
        "type": "object",
        "additionalProperties": False,
        "properties": {key: {"type": "number", "minimum": 0} for key in sorted(_BUDGET_KEYS)},
    }
    target = {
        "type": "object",
        "additionalProperties": False,
        "required": ["description", "providers"],
        "properties": {
            "description": {"type": "string"},
            "providers": {"type": "array", "minItems": 1, "items": {"enum": [p.value for p in Provider]}},
            "precision": {"enum": [p.value for p in Precision]},
            "block_size": {"enum": list(_BLOCK_SIZES)},
            "accuracy_level": {"enum": [0, 1, 2, 3, 4]},
            "memory_limit_mb": {"type": "integer", "minimum": 1},
            "int4_methods": {
                "type": "array",
                "minItems": 1,
                "uniqueItems": True,
                "items": {"enum": [m.value for m in Int4Method]},
            },
            "lm_head": {"enum": [h.value for h in HeadPrecision]},
            "budget": budget,
            "gptq": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "sym": {"type": "boolean"},
                    "act_order": {"type": "boolean"},
                    "one_pass": {"type": "boolean"},
                    "damp": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                },
            },
        },
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "edgekit targets.yaml",
        "type": "object",
        "additionalProperties": False,
        "required": ["schema_version", "targets"],
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "targets": {"type": "object", "minProperties": 1, "additionalProperties": target},
        },
    }
