"""OpenAI's request shapes for ``/v1/chat/completions`` and ``/v1/completions``, and its error body.

Requests are parsed strictly (no string-to-number coercion) and unknown fields are refused, as OpenAI
refuses them. Parameters this server does not implement (several choices, log probabilities, tools,
penalties, ...) are accepted only at their neutral value, so a client that sends ``n=1`` or
``presence_penalty=0`` out of habit still works, while one that asks for more gets a 400 naming it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgekit.runtimes.generation import MAX_INT32
from edgekit.safe_io import not_unicode

MAX_STOP_STRINGS = 4  # OpenAI's own limit
MAX_SEED = MAX_INT32  # what onnxruntime-genai's sampler takes


def _unicode(text: str) -> str:
    """``text``, unless it holds a lone surrogate (JSON's ``"\\ud800"``), which no tokenizer can encode."""
    odd = not_unicode(text)
    if odd is not None:
        raise ValueError(f"holds {odd!r}, which is not valid Unicode text")
    return text


class APIError(Exception):
    """An error the client caused or the server hit, sent as OpenAI's ``{"error": {...}}`` body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    """``stream_options``: whether the last chunk of a stream carries the token counts."""

    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool | None = None


class _Sampling(BaseModel):
    """The fields both endpoints share."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: Any = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end-user id for abuse tracking; nothing to track here
    # Accepted at their neutral value only (see UNSUPPORTED).
    n: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None

    @field_validator("model", "user")
    @classmethod
    def _text_field(cls, value: str | None) -> str | None:
        return value if value is None else _unicode(value)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Any) -> tuple[str, ...]:
        if value is None:
            return ()
        strings = [value] if isinstance(value, str) else value
        if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
            raise ValueError("expected a string or a list of strings")
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        return tuple(_unicode(s) for s in strings if s)

    def include_usage(self) -> bool:
        """Whether a stream ends with a chunk holding the usage counts."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatMessage(BaseModel):
    """One message of a conversation; content is text or a list of text parts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Any
    name: str | None = None
    # What the openai client echoes back when a caller appends a response message to the history.
    refusal: Any = None
    tool_calls: Any = None
    function_call: Any = None
    audio: Any = None
    annotations: Any = None

    @field_validator("content")
    @classmethod
    def _text(cls, value: Any) -> str:
        if isinstance(value, str):
            return _unicode(value)
        if isinstance(value, list):
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported")
                texts.append(part["text"])
            return _unicode("".join(texts))
        raise ValueError("expected a string or a list of text parts")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        return value if value is None else _unicode(value)

    @field_validator("refusal", "tool_calls", "function_call", "audio", "annotations")
    @classmethod
    def _absent(cls, value: Any) -> Any:
        if value not in (None, [], ""):
            raise ValueError("tools, audio and annotations are not supported by this server")
        return value

    def as_template_message(self) -> dict[str, str]:
        """The message as the chat template sees it (``developer`` is the newer name of ``system``)."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatCompletionRequest(_Sampling):
    """A ``POST /v1/chat/completions`` body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None  # meaningless without tools
    functions: Any = None
    function_call: Any = None
    response_format: Any = None

    def token_limit(self) -> int | None:
        """``max_completion_tokens``, OpenAI's newer name, else ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    """A ``POST /v1/completions`` body."""

    prompt: Any
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for this endpoint
    logprobs: Any = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> str:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise ValueError("expected one prompt string (token-id prompts and several prompts are not supported)")
        return _unicode(value)

    def token_limit(self) -> int | None:
        """``max_tokens`` (16 when not given, as OpenAI does)."""
        return self.max_tokens


def _is(*neutral: Any) -> Callable[[Any], bool]:
    return lambda value: any(value == n and type(value) is type(n) for n in neutral) or value is None


# Parameter -> (is its value neutral?, why another value is refused).
UNSUPPORTED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_is(1), "this server returns one choice per request; use n=1"),
    "presence_penalty": (_is(0, 0.0), "presence_penalty is not supported; use 0"),
    "frequency_penalty": (_is(0, 0.0), "frequency_penalty is not supported; use 0"),
    "logit_bias": (_is({}), "logit_bias is not supported"),
    "logprobs": (_is(False, 0), "logprobs are not supported"),
    "top_logprobs": (_is(0), "top_logprobs are not supported"),
    "tools": (_is([]), "tools (function calling) are not supported by this server"),
    "tool_choice": (_is("none"), "tools (function calling) are not supported by this server"),
    "functions": (_is([]), "functions (function calling) are not supported by this server"),
    "function_call": (_is("none"), "functions (function calling) are not supported by this server"),
    "response_format": (_is({"type": "text"}), "only response_format {'type': 'text'} is supported"),
    "echo": (_is(False), "echo is not supported"),
    "suffix": (_is(""), "suffix (insertion) is not supported"),
    "best_of": (_is(1), "best_of is not supported; use 1"),
}


def parse_request(kind: type[_Sampling], data: Any) -> Any:
    """Validate a JSON body as ``kind``; raise ``APIError`` (400) naming the first bad parameter."""
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    if "model" not in data:
        raise APIError(400, "you must provide a model parameter", param="model")
    try:
        request = kind.model_validate(data)
    except ValidationError as exc:
        raise _api_error(exc) from None
    for name in type(request).model_fields:
        check = UNSUPPORTED.get(name)
        if check is not None and not check[0](getattr(request, name)):
            raise APIError(400, check[1], param=name, code="unsupported_parameter")
    return request


def _api_error(exc: ValidationError) -> APIError:
    error = exc.errors(include_url=False)[0]
    param = param_path(error["loc"])
    if error["type"] == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")  # fmt: skip
    expected = _EXPECTED.get(error["type"])
    if expected is not None:
        got = _json_type(error.get("input"))
        return APIError(400, f"Invalid type for '{param}': expected {expected}, but got {got} instead.",
                        param=param, code="invalid_type")  # fmt: skip
    if error["type"] == "missing":
        return APIError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    message = str(error["msg"]).removeprefix("Value error, ")
    return APIError(400, f"Invalid value for '{param}': {message}.", param=param, code="invalid_value")


# pydantic's error types for a wrong JSON type, and how OpenAI words what it expected.
_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean", "string_type": "a string",
             "list_type": "an array", "dict_type": "an object", "model_type": "an object",
             "model_attributes_type": "an object"}  # fmt: skip


def _json_type(value: Any) -> str:
    names = [(bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "an array"),
             (dict, "an object")]  # fmt: skip
    if value is None:
        return "null"
    return next((name for kind, name in names if isinstance(value, kind)), "another type")


def param_path(loc: Sequence[int | str]) -> str:
    """``("messages", 0, "content")`` -> ``messages[0].content``, as OpenAI names nested parameters."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
