"""What a package's ``genai_config.json`` may say: the keys and values edgekit's builds write, nothing else.

onnxruntime-genai acts on far more than edgekit writes: ``session_options.custom_ops_library`` loads a
native library, ``enable_profiling`` and ``ep_context_file_path`` write files wherever they point,
``config_entries`` sets any onnxruntime session entry, and some providers' options name libraries or
cache folders. A package is a stranger's file, so its config is parsed against this schema (frozen
models, unknown keys forbidden, values typed and bounded) before onnxruntime-genai sees it; every key
outside it is refused with its path. onnxruntime-genai itself loads a custom-ops library only from the
model's own folder, which is exactly where a hostile package puts one; edgekit's graphs need none, so
edgekit offers no way to load one at all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from edgekit.errors import PackageError
from edgekit.safe_io import DuplicateKeyError, strict_json_loads

GENAI_CONFIG = "genai_config.json"
MAX_GENAI_CONFIG_BYTES = 1 << 20  # a real one is a few KB
_FIX = "rebuild the package with `edgekit build`; edgekit loads only the settings its builds write"

# Bounds far above any real model, low enough that no value makes the runtime allocate without limit.
Count = Annotated[int, Field(ge=1, le=1 << 16)]
Size = Annotated[int, Field(ge=1, le=1 << 24)]
TokenId = Annotated[int, Field(ge=0, le=1 << 24)]
TokenIds = TokenId | Annotated[list[TokenId], Field(max_length=64)]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:/-]{1,128}$")]
# onnxruntime-genai formats a ``*_names`` value with the layer index (snprintf): exactly one ``%d``, nothing
# else a format could read (``%s`` crashed it, ``%n`` writes memory).
LayerNames = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:/-]{0,64}%d[A-Za-z0-9_.:/-]{0,64}$")]
Flag = Literal["0", "1"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class CudaOptions(_Strict):
    """The CUDA provider options the builder writes."""

    enable_cuda_graph: Flag = "0"


class DmlOptions(_Strict):
    """The DirectML provider options the builder writes."""

    enable_graph_capture: Flag = "1"


class ProviderEntry(_Strict):
    """One ``provider_options`` entry: exactly one of the providers edgekit builds for."""

    cuda: CudaOptions | None = None
    dml: DmlOptions | None = None

    @model_validator(mode="after")
    def _one_provider(self) -> ProviderEntry:
        if (self.cuda is None) == (self.dml is None):
            raise ValueError("each provider_options entry names exactly one provider (cuda or dml)")
        return self


class SessionOptions(_Strict):
    """Session options: a log id, provider options, and the CUDA kernel switches the builder sets."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, populate_by_name=True)

    log_id: Annotated[str, StringConstraints(pattern=r"^[\w.-]{0,64}$")] = "onnxruntime-genai"
    provider_options: Annotated[list[ProviderEntry], Field(max_length=4)] = []
    fpa_intb_gemm: Literal["1"] | None = Field(None, alias="ep.cuda.fpa_intb_gemm")
    disabled_optimizers: Literal["MatMulNBitsFusion"] | None = Field(
        None, alias="optimization.disable_specified_optimizers"
    )
    device_allocator: Literal["1"] | None = Field(None, alias="session.use_device_allocator_for_initializers")


class SlidingWindow(_Strict):
    """The sliding-window cache of models with local attention layers (Gemma 3)."""

    window_size: Size
    slide_key_value_cache: bool = False
    slide_inputs: bool = False
    layers: Annotated[list[Annotated[int, Field(ge=0, le=1 << 16)]], Field(max_length=1 << 16)] = []
    cache_slack: Annotated[int, Field(ge=0, le=1 << 24)] = 0


class Decoder(_Strict):
    """The decoder graph: its file, shapes, input and output names, and session options."""

    session_options: SessionOptions = SessionOptions()
    filename: Annotated[str, StringConstraints(pattern=r"^[\w.-]{1,128}\.onnx$")]  # a graph, not its data file
    head_size: Count
    hidden_size: Size
    num_attention_heads: Count
    num_hidden_layers: Count
    num_key_value_heads: Count
    inputs: Annotated[dict[Name, Name | LayerNames], Field(max_length=64)]
    outputs: Annotated[dict[Name, Name | LayerNames], Field(max_length=64)]
    sliding_window: SlidingWindow | None = None

    @model_validator(mode="after")
    def _layer_names_only_where_formatted(self) -> Decoder:
        for names in (self.inputs, self.outputs):
            for key, value in names.items():
                if ("%" in value) != key.endswith("_names"):
                    raise ValueError(f"'{key}' must {'' if key.endswith('_names') else 'not '}hold one %d")
        return self


class ModelSection(_Strict):
    """The ``model`` section: token ids, context length, vocabulary, and the decoder."""

    bos_token_id: TokenIds | None = None
    eos_token_id: TokenIds
    pad_token_id: TokenIds | None = None
    bot_token_id: TokenId | None = None
    eot_token_id: TokenId | None = None
    bor_token_id: TokenId | None = None
    eor_token_id: TokenId | None = None
    context_length: Size
    decoder: Decoder
    type: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,64}$")]
    vocab_size: Size


Probability = Annotated[float | int, Field(ge=0, le=1)]
Factor = Annotated[float | int, Field(ge=0, le=1e6)]


class Search(_Strict):
    """Default search settings; edgekit's runtime sets its own for every generation."""

    diversity_penalty: Factor = 0.0
    do_sample: bool = False
    early_stopping: bool = True
    length_penalty: Factor = 1.0
    max_length: Size | None = None
    min_length: Annotated[int, Field(ge=0, le=1 << 24)] = 0
    no_repeat_ngram_size: Annotated[int, Field(ge=0, le=1 << 10)] = 0
    num_beams: Annotated[int, Field(ge=1, le=64)] = 1
    num_return_sequences: Annotated[int, Field(ge=1, le=64)] = 1
    past_present_share_buffer: bool = False
    repetition_penalty: Factor = 1.0
    temperature: Factor = 1.0
    top_k: Annotated[int, Field(ge=0, le=1 << 24)] = 50
    top_p: Probability = 1.0
    chunk_size: Size | None = None


class GenaiConfig(_Strict):
    """A whole ``genai_config.json`` as edgekit's builds write it."""

    model: ModelSection
    search: Search = Search()


def parse_genai_config(data: bytes, path: str | Path) -> GenaiConfig:
    """Parse ``genai_config.json`` bytes against the schema; ``PackageError`` naming every refused key."""
    if len(data) > MAX_GENAI_CONFIG_BYTES:
        raise PackageError(f"is larger than {MAX_GENAI_CONFIG_BYTES} bytes", path=path, fix=_FIX)
    try:
        document = strict_json_loads(data)
    except DuplicateKeyError as exc:
        raise PackageError(f"is ambiguous: {exc}", path=path, fix=_FIX) from None
    except (ValueError, RecursionError):
        raise PackageError("is not valid JSON", path=path, fix=_FIX) from None
    try:
        return GenaiConfig.model_validate(document)
    except ValidationError as exc:
        raise PackageError(describe_errors(exc), path=path, fix=_FIX) from None


def read_genai_config(folder: Path) -> GenaiConfig:
    """The checked ``genai_config.json`` of a variant folder."""
    from edgekit.safe_io import read_regular_file

    path = folder / GENAI_CONFIG
    return parse_genai_config(read_regular_file(path, MAX_GENAI_CONFIG_BYTES), path)


def describe_errors(exc: ValidationError, limit: int = 5) -> str:
    """pydantic's errors as one line: each offending key path and what is wrong with it."""
    parts = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(part) for part in error["loc"]) or "the top level"
        if error["type"] == "extra_forbidden":
            parts.append(f"key '{where}' is not allowed")
        else:
            parts.append(f"'{where}': {error['msg']}")
    more = len(exc.errors()) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def as_plain_data(config: GenaiConfig) -> dict[str, Any]:
    """The config as JSON data again, with the aliased session keys spelled as in the file."""
    return config.model_dump(by_alias=True, exclude_none=True)
