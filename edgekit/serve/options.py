"""The server's options and their defaults: no web stack imported, so the CLI can read them for its help."""

from __future__ import annotations

from dataclasses import dataclass

from edgekit.errors import UsageError
from edgekit.safe_io import not_unicode

DEFAULT_PORT = 8000


@dataclass(frozen=True)
class ServeOptions:
    """The server's limits and switches (``edgekit serve`` exposes the common ones)."""

    model_name: str | None = None
    """The id clients send as ``model`` (default: the package folder's name)."""
    target: str | None = None
    api_key: str | None = None
    """When set, /v1/* and /metrics need ``Authorization: Bearer <api_key>``."""
    max_concurrency: int = 4
    max_queue: int = 64
    max_tokens: int = 1024
    timeout_s: float | None = 300.0
    max_body_bytes: int = 1 << 20
    cors_origins: tuple[str, ...] = ()
    """Origins whose pages may call the API from a browser; none by default."""
    chat_page: bool = True

    def __post_init__(self) -> None:
        counts = {"max_concurrency": self.max_concurrency, "max_tokens": self.max_tokens,
                  "max_body_bytes": self.max_body_bytes}  # fmt: skip
        for name, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be a positive integer, not {value!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise UsageError(f"max_queue must be an integer of at least 0, not {self.max_queue!r}")
        timeout = self.timeout_s
        number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
        if timeout is not None and (not number or not timeout > 0):
            raise UsageError(f"timeout_s must be a positive number of seconds (or None for no limit), not {timeout!r}")
        for name in ("model_name", "target", "api_key"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise UsageError(f"{name} must be a string, not {getattr(self, name)!r}")
        key = self.api_key
        if key is not None and not (key.isascii() and key.isprintable() and key.strip() == key != ""):
            # HTTP headers arrive as Latin-1 and their values trimmed: such a key could never match a client's.
            raise UsageError("the API key must be printable ASCII, without spaces at either end",
                             fix="choose a key of letters, digits and symbols")  # fmt: skip
        if self.model_name is not None:
            check_model_name(self.model_name, "the model name", "pass a --model-name of UTF-8 text")
        if isinstance(self.cors_origins, str):
            raise UsageError("cors_origins must be a sequence of origins, not one string",
                             fix=f"use ({self.cors_origins!r},)")  # fmt: skip


def check_model_name(name: str, what: str, fix: str) -> None:
    """A ``UsageError`` unless ``name`` (the id clients send as ``model``) is text UTF-8 can encode: every
    JSON answer carries it."""
    if not_unicode(name) is not None:
        raise UsageError(f"{what} {name!r} is not valid Unicode", fix=fix)
