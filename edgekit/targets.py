"""Device profiles: ``targets.yaml`` parsed into frozen, validated pydantic models.

Every rule about a targets file lives once, in these models: ``targets_json_schema`` is generated from them
(``edgekit targets --schema``), and ``GPTQConfig`` reuses their GPTQ rules. A file is checked whole: every
unknown key and every bad value is reported at once, each with its path (``targets.laptop-cpu.budget.max_kl``),
in one ``TargetError`` naming the file (the way llm-compressor's ``extra="forbid"`` recipes behave). YAML values
are not coerced: ``block_size: "32"`` and ``accuracy_level: true`` are errors, not 32 and 1.
"""

from __future__ import annotations

import enum
import re
import reprlib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    Strict,
    StringConstraints,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonDict
from pydantic_core import PydanticCustomError

from edgekit.errors import TargetError
from edgekit.safe_io import PLAIN_NAME, read_regular_file

SchemaVersion = Literal[1]
SCHEMA_VERSION: int = get_args(SchemaVersion)[0]
DEFAULT_TARGET = "laptop-cpu"
"""The target a build uses when none is named."""
MAX_TARGETS_BYTES = 1 << 20  # a real one is a few KB
BlockSizeValue = Literal[16, 32, 64, 128, 256]  # the INT4 block sizes onnxruntime's MatMulNBits accepts
BLOCK_SIZES: tuple[int, ...] = get_args(BlockSizeValue)
GPTQ_GROUP_SIZES = (32, 64, 128)
"""Block sizes a GPTQ variant can be grouped by: the group sizes edgekit's GPTQ solver (``GPTQConfig``) and the
builder's import of its checkpoints handle. Targets and ``GPTQConfig`` both check against this one tuple."""
_FIX = "see the targets.yaml reference in the README, or `edgekit targets --schema`"
_MAX_REPORTED = 30  # every problem of a real file fits; a garbage file still gives a readable line


class Provider(str, enum.Enum):
    """Execution providers a target may name, in edgekit's spelling."""

    CPU = "cpu"
    CUDA = "cuda"
    DML = "dml"


class Int4Method(str, enum.Enum):
    """How an INT4 variant is quantized."""

    RTN = "rtn"
    GPTQ = "gptq"
    RECIPE = "recipe"
    """A format per tensor, chosen by measured loss under the target's ``recipe`` objective."""


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


RECIPE_FORMAT = re.compile(r"^int(4|8)-b(16|32|64|128)-(sym|zp|asym)-(rtn|search|weighted|gptq)$")
"""A per-tensor format as targets.yaml spells it (``edgekit.quant.formats`` parses it)."""


def _method_of(spelling: str) -> str:
    """The method of a format ``RECIPE_FORMAT`` accepted (``rtn``, ``search``, ``weighted``, ``gptq``)."""
    match = RECIPE_FORMAT.match(spelling)
    return match[4] if match else ""


# --- field types: strict, with YAML's spellings of enums and lists ---------------------------------------------


def _yaml_string(value: Any) -> Any:
    # Lax enum validation (needed for YAML strings) would also take bytes; a name must be a string.
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "Input should be a string")
    return value


def _yaml_list(value: Any) -> Any:
    # YAML lists arrive as lists; a strict tuple field would refuse them, a lax one would also take sets.
    if not isinstance(value, (list, tuple)):
        raise PydanticCustomError("list_type", "Input should be a list")
    return tuple(value)


def _exact_int(value: Any) -> Any:
    # An int Literal would take `true` for 1 and 32.0 for 32; YAML's `true` and `32.0` are not block sizes.
    if type(value) is not int:
        raise PydanticCustomError("int_type", "Input should be an integer")
    return value


def _unique_methods(values: tuple[Any, ...]) -> tuple[Any, ...]:
    if len(set(values)) != len(values):
        raise PydanticCustomError("unique", "Input should list each method once")
    return values


def _recipe_format(value: Any) -> Any:
    if not isinstance(value, str) or not RECIPE_FORMAT.match(value):
        raise PydanticCustomError(
            "recipe_format",
            "Input should be a format like int4-b32-asym-weighted (int<4|8>-b<16|32|64|128>-"
            "<sym|zp|asym>-<rtn|search|weighted|gptq>)",
        )
    return value


# Enums read from YAML strings: lax (a strict enum accepts only members), strings only.
ProviderName = Annotated[Provider, Strict(False), BeforeValidator(_yaml_string)]
Int4MethodName = Annotated[Int4Method, Strict(False), BeforeValidator(_yaml_string)]
HeadPrecisionName = Annotated[HeadPrecision, Strict(False), BeforeValidator(_yaml_string)]
PrecisionName = Annotated[Precision, Strict(False), BeforeValidator(_yaml_string)]
BlockSize = Annotated[BlockSizeValue, BeforeValidator(_exact_int)]
Limit = Annotated[float, Field(ge=0)]


class _Strict(BaseModel):
    # strict: no str -> int or bool -> int coercion; allow_inf_nan: a `.nan` budget would pass or fail everything
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class AccuracyBudget(_Strict):
    """Limits a quantized variant must meet against the fp32 reference; unset limits are not checked."""

    max_kl_mean: Limit | None = Field(None, description="Largest mean KL divergence to the fp32 reference.")
    max_ppl_ratio: Limit | None = Field(None, description="Largest perplexity over the fp32 reference's.")
    min_top1_agreement: Limit | None = Field(
        None, description="Smallest share of positions whose top token matches the fp32 reference's."
    )


class GPTQSettings(_Strict):
    """How a target's ``int4-gptq`` variant is calibrated (the group size is the target's block size)."""

    sym: bool = Field(True, description="Symmetric quantization (a fixed zero point).")
    damp: float = Field(
        0.01, gt=0, lt=1, description="Added to the Hessian's diagonal, as a fraction of its mean diagonal."
    )
    act_order: bool = Field(
        True,
        description="Quantize columns in descending Hessian-diagonal order (static groups: no g_idx at run time).",
    )
    one_pass: bool = Field(
        False,
        description="One forward pass per decoder layer over all calibration batches at once (true-sequential "
        "order): faster, holding every batch's activations of a layer at once.",
    )


class RecipeSettings(_Strict):
    """How a target's ``int4-recipe`` variant chooses each tensor's format (see docs/recipes.md)."""

    max_model_bytes: int | None = Field(
        None, gt=0, description="Least loss whose model files (model.onnx + data) fit in this many bytes."
    )
    optimize: Literal["size", "loss"] | None = Field(
        None,
        description="size: fewest bytes whose predicted loss meets the target's budget (the default when "
        "max_model_bytes is not set; a verification run on calibration text confirms the margin). loss: least "
        "loss whose model files fit in the all-int4 RTN variant's bytes.",
    )
    min_decode_ratio: float = Field(
        0.9, gt=0, le=4, description="Decode speed at least this times the all-int4 RTN variant's, measured."
    )
    candidates: Annotated[
        tuple[Annotated[str, BeforeValidator(_recipe_format)], ...] | None,
        BeforeValidator(lambda v: v if v is None else _yaml_list(v)),
    ] = Field(None, description="Formats each tensor may take; the built-in set when not given.")

    @property
    def gptq_candidates(self) -> bool:
        """Whether any candidate is fitted by GPTQ (its calibration pass then keeps XᵀX)."""
        return any(_method_of(spelling) == "gptq" for spelling in self.candidates or ())

    @model_validator(mode="after")
    def _one_objective(self) -> RecipeSettings:
        if self.max_model_bytes is not None and self.optimize is not None:
            raise PydanticCustomError(
                "recipe_objective",
                "give max_model_bytes or optimize (size or loss), not both: max_model_bytes already asks for the "
                "least loss in that many bytes",
            )
        return self


# JSON Schema's spelling of the GPTQ/block-size rule (``Target._gptq_groups``), for editors.
_GPTQ_RULE_SCHEMA: JsonDict = {
    "if": {"required": ["int4_methods"], "properties": {"int4_methods": {"contains": {"const": "gptq"}}}},
    "then": {"properties": {"block_size": {"enum": list(GPTQ_GROUP_SIZES)}}},
}


class Target(_Strict):
    """One device profile from targets.yaml; ``name`` is its key in the file (empty for a bare profile)."""

    model_config = ConfigDict(json_schema_extra=_GPTQ_RULE_SCHEMA)

    _name: str = PrivateAttr("")
    description: str
    providers: Annotated[tuple[ProviderName, ...], Field(min_length=1), BeforeValidator(_yaml_list)] = Field(
        description="Providers to try, in order; the package's graphs are built for the first."
    )
    precision: PrecisionName = Field(Precision.INT4, description="Weight precision of the deployed variant.")
    block_size: BlockSize = Field(32, description="INT4 quantization block (and GPTQ group) size.")
    accuracy_level: int = Field(
        0, ge=0, le=4, description="MatMulNBits compute: 0 provider default, 1 fp32, 2 fp16, 3 bf16, 4 int8."
    )
    budget: AccuracyBudget = AccuracyBudget()
    int4_methods: Annotated[
        tuple[Int4MethodName, ...],
        Field(min_length=1, json_schema_extra={"uniqueItems": True}),
        BeforeValidator(_yaml_list),
        AfterValidator(_unique_methods),
    ] = Field((Int4Method.RTN,), description="INT4 variants to build; the last one is the variant the target deploys.")
    lm_head: HeadPrecisionName = Field(HeadPrecision.INT4, description="Precision of the LM head of INT4 variants.")
    gptq: GPTQSettings = GPTQSettings()
    recipe: RecipeSettings = RecipeSettings()

    @property
    def recipe_size_bound(self) -> int | None:
        """The model bytes the deployed recipe is held to; None without a recipe or without the bound."""
        return self.recipe.max_model_bytes if Int4Method.RECIPE in self.int4_methods else None

    @model_validator(mode="after")
    def _recipe_rules(self) -> Target:
        if Int4Method.RECIPE not in self.int4_methods:
            return self
        if self.precision is not Precision.INT4:
            raise PydanticCustomError("recipe_precision", "int4_methods recipe needs precision int4")
        if self.providers[0] is not Provider.CPU:
            raise PydanticCustomError(
                "recipe_provider",
                "int4_methods recipe builds CPU graphs: put cpu first in providers, or use rtn/gptq for a GPU target",
            )
        methods = list(self.int4_methods)
        if Int4Method.RTN not in methods or methods.index(Int4Method.RTN) > methods.index(Int4Method.RECIPE):
            raise PydanticCustomError(
                "recipe_baseline",
                "int4_methods recipe needs rtn before it (its speed is measured against the RTN variant): "
                "use [rtn, recipe]",
            )
        objective = self.recipe
        if objective.max_model_bytes is None and objective.optimize != "loss" and self.budget.max_kl_mean is None:
            raise PydanticCustomError(
                "recipe_budget",
                "a recipe without max_model_bytes optimizes size within budget.max_kl_mean: set one, or "
                "max_model_bytes, or optimize: loss",
            )
        return self

    @model_validator(mode="after")
    def _gptq_groups(self) -> Target:
        if Int4Method.GPTQ in self.int4_methods and self.block_size not in GPTQ_GROUP_SIZES:
            raise PydanticCustomError(
                "gptq_block_size",
                "GPTQ groups of block_size {block_size} are not supported: use a block_size of {allowed} with "
                "int4_methods gptq",
                {"block_size": self.block_size, "allowed": ", ".join(map(str, GPTQ_GROUP_SIZES))},
            )
        return self

    @property
    def name(self) -> str:
        """The target's key in its targets file."""
        return self._name

    @property
    def build_provider(self) -> Provider:
        """The provider the package's graphs are built for: the first in the chain."""
        return self.providers[0]


def with_max_model_bytes(target: Target, max_model_bytes: int) -> Target:
    """``target`` deploying a recipe that fits ``max_model_bytes`` (``--max-model-bytes``): rtn, then recipe.

    Raises ``ValidationError`` where the target cannot take a recipe (a GPU target, a non-INT4 precision).
    """
    methods = [m for m in target.int4_methods if m is not Int4Method.RECIPE]
    if Int4Method.RTN not in methods:
        methods.insert(0, Int4Method.RTN)
    return _with_recipe(target, [*methods, Int4Method.RECIPE], max_model_bytes=max_model_bytes, optimize=None)


def with_min_decode_ratio(target: Target, ratio: float) -> Target:
    """``target`` whose recipe must decode at least ``ratio`` times the RTN variant's speed
    (``--min-decode-ratio``); ``ValidationError`` for a ratio out of range."""
    return _with_recipe(target, target.int4_methods, min_decode_ratio=ratio)


def _with_recipe(target: Target, methods: Any, **recipe: Any) -> Target:
    """``target`` validated again with these INT4 methods and recipe settings, under its own name."""
    data = target.model_dump()
    data["int4_methods"] = list(methods)
    data["recipe"] = {**data["recipe"], **recipe}
    changed = Target.model_validate(data)
    changed._name = target.name
    return changed


class TargetsFile(_Strict):
    """A whole targets.yaml: its schema version and its targets by name."""

    model_config = ConfigDict(title="edgekit targets.yaml")

    schema_version: Annotated[SchemaVersion, BeforeValidator(_exact_int)]
    targets: dict[Annotated[str, StringConstraints(pattern=PLAIN_NAME)], Target] = Field(min_length=1)

    @model_validator(mode="after")
    def _name_targets(self) -> TargetsFile:
        # A target's name is its key, not a YAML field. Copies: a caller may pass one Target under two names.
        for name, target in list(self.targets.items()):
            named = target.model_copy()
            named._name = name
            self.targets[name] = named
        return self


# --- reading files ------------------------------------------------------------------------------------------


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
        parsed = yaml.load(text, Loader=_PlainYamlLoader)  # a SafeLoader without aliases
    except yaml.YAMLError as exc:
        raise TargetError(f"not valid YAML ({exc})", path=path, fix="fix the YAML syntax") from None
    except RecursionError:
        raise TargetError("is nested too deeply to be a targets file", path=path, fix=_FIX) from None
    return parse_targets(parsed, path)


class _PlainYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors and aliases: a targets file needs none, and aliases of
    aliases make a few hundred bytes into billions of values ("billion laughs")."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed", event.start_mark)
        return super().compose_node(parent, index)


def parse_targets(data: Any, path: str | Path = "targets.yaml") -> dict[str, Target]:
    """Validate the parsed YAML of a targets file into ``Target`` objects; one ``TargetError`` lists every problem."""
    if not isinstance(data, Mapping):
        raise TargetError("the top level must be a mapping with 'schema_version' and 'targets'", path=path, fix=_FIX)
    try:
        return dict(TargetsFile.model_validate(data).targets)
    except ValidationError as exc:
        raise TargetError(describe_validation_error(exc, TargetsFile), path=path, fix=_FIX) from None


def get_target(name: str, path: str | Path | None = None) -> Target:
    """Look up one target by name, with an error that lists the known ones."""
    targets = load_targets(path)
    if name not in targets:
        known = ", ".join(sorted(targets))
        raise TargetError(f"unknown target '{name}'", path=path or bundled_targets_path(), fix=f"use one of: {known}")
    return targets[name]


def targets_json_schema() -> dict[str, Any]:
    """JSON Schema of targets.yaml, generated from the models, for editors that validate YAML against a schema."""
    schema = TargetsFile.model_json_schema()
    schema["properties"]["targets"]["additionalProperties"] = False  # a name outside the pattern is an error
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


# --- one line for every problem -------------------------------------------------------------------------------


def describe_validation_error(exc: ValidationError, model: type[BaseModel]) -> str:
    """pydantic's errors about ``model`` as one line: every unknown key (with the keys allowed beside it) and
    every bad value, each with its dotted path (``targets.laptop-cpu.budget.max_kl``)."""
    entries: list[str | tuple[Any, ...]] = []  # a problem, or the path of a mapping with unknown keys
    unknown: dict[tuple[Any, ...], list[str]] = {}
    for error in exc.errors():
        loc = tuple(error["loc"])
        if error["type"] != "extra_forbidden":
            entries.append(f"{_where(loc)}: {_what(error)}")
        elif loc[:-1] in unknown:
            unknown[loc[:-1]].append(str(loc[-1]))
        else:
            unknown[loc[:-1]] = [str(loc[-1])]
            entries.append(loc[:-1])
    problems, listed = [], set()
    for entry in entries:
        if isinstance(entry, str):
            problems.append(entry)
            continue
        named = ", ".join(f"'{key}'" for key in unknown[entry])
        problem = f"{_where(entry)}: unknown key{'s' if len(unknown[entry]) > 1 else ''} {named}"
        allowed = ", ".join(sorted(_fields_at(model, entry)))
        # Each kind of mapping's keys once: five targets with the same typo need not list them five times.
        problems.append(f"{problem} (allowed: {allowed})" if allowed not in listed else problem)
        listed.add(allowed)
    more = len(problems) - _MAX_REPORTED
    return "; ".join(problems[:_MAX_REPORTED]) + (f"; and {more} more" if more > 0 else "")


def _where(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) if loc else "top level"


def _what(error: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "too_short" and error.get("ctx", {}).get("min_length") == 1:
        return "must not be empty"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"must be a mapping (got {_shown(error['input'])})"
    message = str(error["msg"])
    if message[1:2].islower():  # "Input should ..." reads on after the path; "GPTQ groups ..." keeps its case
        message = message[:1].lower() + message[1:]
    if isinstance(error["input"], Mapping):
        return message  # a rule about a whole mapping: its path says which
    return f"{message} (got {_shown(error['input'])})"


def _shown(value: Any) -> str:
    text = reprlib.repr(value)  # bounded: never renders a whole large value
    return text if len(text) <= 40 else f"{text[:37]}..."


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed in the mapping at ``loc`` of a ``model`` document (empty when it is not a model)."""
    current: Any = model
    for part in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        elif get_origin(current) is dict:
            current = get_args(current)[1]  # ``part`` is a key of the mapping: the value type is next
        else:
            return []
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []
