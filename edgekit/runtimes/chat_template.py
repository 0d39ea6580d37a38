"""The chat template of a package, rendered the way transformers renders it, in bounded time and size.

A chat template is Jinja code from the package's author. transformers renders it in an immutable Jinja
sandbox (no attribute escapes, no file access); edgekit uses the same environment (same filters and
globals, so the prompt text is the one ``apply_chat_template`` gives) and also bounds what a hostile
template can cost: rendering stops with an error after ``TIME_LIMIT_S`` seconds (a trace function on the
template's own frames checks the clock on every line, so even a loop with an empty body ends, and the
size of every value the template holds, which may not pass ``MAX_OUTPUT_CHARS``), calls and filters may not
take integer arguments over ``MAX_INT_ARGUMENT`` (``"x" * 10**9``, ``center(10**9)``), a product or sum
of strings or lists may not pass ``MAX_OUTPUT_CHARS`` (``"x" * 2**20 * 6000``), a format string may not
hold a width of seven digits (``"%2000000000s"|format("x")``), and the output may not exceed
``MAX_OUTPUT_CHARS``. transformers' own rendering of a source's template, at build time, runs under the same
clock and size bounds (``foreign_template_bounds``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

from edgekit.errors import PackageError, UsageError, first_line

TEMPLATE_FILE = "chat_template.jinja"
TIME_LIMIT_S = 2.0
MAX_OUTPUT_CHARS = 4 << 20
MAX_INT_ARGUMENT = 1 << 20
MAX_TEMPLATE_BYTES = 1 << 20
_TEMPLATE_NAME = "<edgekit chat template>"
_FOREIGN_TEMPLATE_NAME = "<template>"  # what jinja names a template transformers compiles from a string
_WIDE_FORMAT = re.compile(r"\d{7,}")  # a width or precision of a million characters or more
# Widths of a format string: "%-20s" (printf style) and "{0:>20}" (str.format style), each of which pads.
_FORMAT_WIDTHS = re.compile(r"%[-+ #0]*(\d+)|\{[^{}]*:[^{}\d]*(\d+)")
# transformers passes these to every template (``special_tokens_map``).
_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TemplateLimitError(RuntimeError):
    """A chat template ran past the time, argument or output bound."""


def read_chat_template(folder: Path) -> str | None:
    """The chat template a variant folder carries (``chat_template.jinja``, else tokenizer_config.json's)."""
    from edgekit.safe_io import read_regular_file

    path = folder / TEMPLATE_FILE
    if path.exists():
        return read_regular_file(path, MAX_TEMPLATE_BYTES, PackageError).decode("utf-8", errors="replace")
    config = _tokenizer_config(folder)
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: transformers uses the "default" one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def special_tokens(folder: Path) -> dict[str, str]:
    """The special-token strings a template may use (``bos_token``, ...), from tokenizer_config.json."""
    tokens: dict[str, str] = {}
    for key, value in _tokenizer_config(folder).items():
        if key in _SPECIAL_TOKENS:
            text = value.get("content") if isinstance(value, dict) else value
            if isinstance(text, str):
                tokens[key] = text
    return tokens


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    from edgekit.safe_io import read_regular_file

    path = folder / "tokenizer_config.json"
    if not path.exists():
        return {}
    try:
        config = json.loads(read_regular_file(path, 64 << 20, PackageError))
    except (ValueError, RecursionError):
        raise PackageError("is not valid JSON", path=path, fix="rebuild the package") from None
    return config if isinstance(config, dict) else {}


def require_compiles(template: str, path: Path) -> None:
    """Refuse a chat template file that does not compile, naming the file (before a model is loaded)."""
    import jinja2

    try:
        _environment().from_string(template)
    except jinja2.TemplateError as exc:
        raise UsageError(
            f"does not compile as a chat template ({first_line(exc, 200)})", path=path, fix=_FIX_TEMPLATE
        ) from None
    except RecursionError:  # jinja's parser recurses once per nested bracket
        raise UsageError("does not compile as a chat template (nested too deeply)", path=path,
                         fix=_FIX_TEMPLATE) from None  # fmt: skip


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    variables: Mapping[str, Any] | None = None,
    time_limit_s: float = TIME_LIMIT_S,
) -> str:
    """Render ``template`` for ``messages`` as transformers' ``apply_chat_template`` renders it (text).

    Raises ``UsageError`` with one line for a template that fails, raises ``raise_exception``, or passes
    a bound; the message says which.
    """
    import jinja2

    environment = _environment()
    try:
        compiled = environment.from_string(template)
    except jinja2.TemplateError as exc:
        raise UsageError(f"the chat template does not compile ({first_line(exc, 200)})", fix=_FIX_TEMPLATE) from None
    except RecursionError:  # jinja's parser recurses once per nested bracket
        raise UsageError("the chat template does not compile (nested too deeply)", fix=_FIX_TEMPLATE) from None
    context = {**(variables or {}), "messages": list(messages), "add_generation_prompt": add_generation_prompt}
    deadline = time.monotonic() + time_limit_s
    try:
        with _deadline(deadline):
            return _collect(compiled.generate(**context), deadline)
    except TemplateLimitError as exc:
        raise UsageError(f"the chat template was stopped: {exc}", fix=_FIX_TEMPLATE) from None
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise UsageError(f"the chat template failed ({first_line(exc, 200)})", fix=_FIX_TEMPLATE) from None
    except OverflowError as exc:  # the sandbox's own bound on range()
        raise UsageError(f"the chat template was stopped: {first_line(exc, 200)}", fix=_FIX_TEMPLATE) from None
    except (RecursionError, MemoryError):
        raise UsageError("the chat template ran out of resources", fix=_FIX_TEMPLATE) from None


_FIX_TEMPLATE = "pass another template with --chat-template FILE, or send the prompt as is with --raw"


def _collect(chunks: Iterator[str], deadline: float) -> str:
    parts: list[str] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_OUTPUT_CHARS:
            raise TemplateLimitError(f"its output passed {MAX_OUTPUT_CHARS} characters")
        if time.monotonic() > deadline:
            raise TemplateLimitError("it ran past its time limit")
        parts.append(chunk)
    return "".join(parts)


_SCAN_INTERVAL_S = 0.001


def _size(value: Any) -> int:
    """How many items a template value holds (a namespace: its largest attribute's), without copying it."""
    if isinstance(value, (str, bytes, list, tuple, dict)):
        return len(value)
    if type(value).__name__ == "Namespace":  # jinja2.utils.Namespace, without importing jinja per line
        attributes = getattr(value, "_Namespace__attrs", {})
        return max((_size(item) for item in attributes.values() if type(item).__name__ != "Namespace"), default=0)
    return 0


class _deadline:
    """Trace the template's frames line by line and raise once ``deadline`` has passed or a value the
    template holds has grown past ``MAX_OUTPUT_CHARS`` (``~`` doubling a string in a loop: no operator or
    filter to bound, and each step within every other bound). The values are the frame's own, so work in
    other threads (a server's generations) never counts."""

    def __init__(self, deadline: float, filenames: frozenset[str] = frozenset({_TEMPLATE_NAME})) -> None:
        self.deadline = deadline
        self.filenames = filenames
        self.previous: Any = None
        self.next_scan = 0.0

    def __enter__(self) -> None:
        self.previous = sys.gettrace()
        sys.settrace(self._global)

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self.previous)

    def _global(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        return self._local if frame.f_code.co_filename in self.filenames else None

    def _local(self, frame: FrameType, event: str, arg: Any) -> Callable[..., Any] | None:
        now = time.monotonic()
        if now > self.deadline:
            raise TemplateLimitError("it ran past its time limit")
        if now >= self.next_scan:  # a millisecond apart: a string doubles only a few times in one
            self.next_scan = now + _SCAN_INTERVAL_S
            for value in frame.f_locals.values():
                if (size := _size(value)) > MAX_OUTPUT_CHARS:
                    raise TemplateLimitError(f"it built a value of {size} items")
        return self._local


@contextlib.contextmanager
def foreign_template_bounds(time_limit_s: float = TIME_LIMIT_S) -> Iterator[None]:
    """Bound, by the same clock and size checks, a template another library renders (transformers'
    ``apply_chat_template`` at build time); ``TemplateLimitError`` when one is passed."""
    with _deadline(time.monotonic() + time_limit_s, frozenset({_FOREIGN_TEMPLATE_NAME, _TEMPLATE_NAME})):
        yield


def _check_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT_ARGUMENT:
            raise TemplateLimitError(f"it passed {value} to a call (the limit is {MAX_INT_ARGUMENT})")


def _check_size(operator: str, left: Any, right: Any) -> None:
    """A product or sum of strings or lists (or a format string) that would pass the output bound."""
    sized = (str, list, tuple)
    if operator == "*":
        for sequence, count in ((left, right), (right, left)):
            if isinstance(sequence, sized) and isinstance(count, int) and len(sequence) * count > MAX_OUTPUT_CHARS:
                raise TemplateLimitError(f"it made a sequence of {len(sequence) * count} items")
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        if len(left) + len(right) > MAX_OUTPUT_CHARS:
            raise TemplateLimitError(f"it made a sequence of {len(left) + len(right)} items")
    elif operator == "%" and isinstance(left, str):
        _check_format(left)


def _check_format(text: str) -> None:
    if _WIDE_FORMAT.search(text):
        raise TemplateLimitError("it formatted with a width of a million characters or more")
    widths = sum(int(a or b) for a, b in _FORMAT_WIDTHS.findall(text))
    if widths > MAX_OUTPUT_CHARS:  # each width under a million, a thousand of them still a gigabyte
        raise TemplateLimitError(f"it formatted with widths of {widths} characters in all")


def _check_join(separator: Any, items: Any) -> None:
    """A join whose result would pass the output bound (a long separator between a million items)."""
    if isinstance(items, str | list | tuple) and isinstance(separator, str):
        pieces = sum(len(item) if isinstance(item, str) else 1 for item in items)
        size = pieces + len(separator) * max(len(items) - 1, 0)
        if size > MAX_OUTPUT_CHARS:
            raise TemplateLimitError(f"it joined a string of {size} characters")


def _bounded(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)  # keeps jinja's pass-context marks: ``join``, ``map``, ``max`` need them
    def call(*args: Any, **kwargs: Any) -> Any:
        _check_arguments(args, kwargs)
        return function(*args, **kwargs)

    return call


def _bounded_replace(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(context: Any, value: Any, old: Any, new: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, str) and isinstance(old, str) and isinstance(new, str):
            grown = len(value) + (value.count(old) if old else len(value) + 1) * len(new)
            if grown > MAX_OUTPUT_CHARS:
                raise TemplateLimitError(f"it made a string of {grown} characters")
        return function(context, value, old, new, *args, **kwargs)

    return call


def _bounded_format(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def call(value: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(value, str):
            _check_format(value)
        return function(value, *args, **kwargs)

    return call


def _bounded_join(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)  # jinja's join takes the eval context first
    def call(context: Any, value: Any, d: Any = "", *args: Any, **kwargs: Any) -> Any:
        _check_join(d, value)
        return function(context, value, d, *args, **kwargs)

    return call


def _raise_exception(message: str) -> None:
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> Any:
    """transformers' chat-template environment, with calls, filters and operators bounded."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedEnvironment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            _check_arguments(args, kwargs)
            receiver = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # jinja wraps str.format
            if isinstance(receiver, str) and getattr(__obj, "__name__", "") in ("format", "format_map"):
                _check_format(receiver)
            if isinstance(receiver, str) and getattr(__obj, "__name__", "") == "join" and args:
                _check_join(receiver, args[0])
            return super().call(__context, __obj, *args, **kwargs)

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _check_arguments((left, right), {})
            _check_size(operator, left, right)
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise TemplateLimitError(f"it raised a number to the power {right}")
            return super().call_binop(context, operator, left, right)

    class GenerationBlock(jinja2.ext.Extension):
        """transformers' ``{% generation %}`` block (it marks assistant text); rendered as its body."""

        tags = {"generation"}  # noqa: RUF012 (jinja reads the class attribute)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    environment = BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, GenerationBlock]
    )
    environment.filters = {name: _bounded(f) for name, f in environment.filters.items()}
    environment.filters["tojson"] = _bounded(_tojson)
    environment.filters["format"] = _bounded_format(environment.filters["format"])
    environment.filters["replace"] = _bounded_replace(environment.filters["replace"])
    environment.filters["join"] = _bounded_join(environment.filters["join"])
    range_function: Callable[..., Any] = environment.globals["range"]  # type: ignore[assignment]
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["range"] = _bounded(range_function)
    return _Named(environment)


class _Named:
    """An environment whose templates compile under one file name, so the deadline tracer finds their frames."""

    def __init__(self, environment: Any) -> None:
        self.environment = environment

    def from_string(self, source: str) -> Any:
        code = self.environment.compile(source, name=None, filename=_TEMPLATE_NAME)
        return self.environment.template_class.from_code(self.environment, code, self.environment.make_globals(None))
