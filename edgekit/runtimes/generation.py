"""The settings of one generation, shared by the runtime, the CLI's option defaults and the server."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from numbers import Integral, Real

from edgekit.errors import UsageError

MAX_INT32 = 2**31 - 1
"""The largest seed and top_k onnxruntime-genai's search options take (a C++ int)."""


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings for one generation; the defaults decode greedily."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # numpy's scalars are Integral and Real too; each value is kept as the plain Python number.
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, not {self.max_new_tokens!r}")
        for name in ("temperature", "top_p"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), Real):
                raise UsageError(f"{name} must be a number, not {getattr(self, name)!r}")
            object.__setattr__(self, name, float(getattr(self, name)))
        if not 0 <= self.temperature <= 100 or not 0 < self.top_p <= 1:
            raise UsageError("temperature must be in 0..100 and top_p in (0, 1]")
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_INT32:
            raise UsageError(f"top_k must be an integer in 0..{MAX_INT32} (0: off), not {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_INT32):
            raise UsageError(f"seed must be an integer in 0..{MAX_INT32}, not {self.seed!r}")
        for name in ("max_new_tokens", "top_k", "seed"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else self.stop
        texts = None if isinstance(stop, bytes | Mapping) or not isinstance(stop, Iterable) else tuple(stop)
        if texts is None or not all(isinstance(text, str) for text in texts):
            raise UsageError(f"stop must be a string or a sequence of strings, not {self.stop!r}")
        # An empty stop string would end every generation before its first character (the server drops them too).
        object.__setattr__(self, "stop", tuple(text for text in texts if text))


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def cut_at_stop(
    pieces: Iterator[str], stop: tuple[str, ...], on_stop: Callable[[], None] | None = None
) -> Iterator[str]:
    """Pass text through until the first stop string, holding back what might be a stop string's start.

    ``on_stop`` is called when a stop string ends the text (the server records it as the finish reason).
    """
    held = ""
    longest = max(len(s) for s in stop)
    for piece in pieces:
        held += piece
        cut = min((i for i in (held.find(s) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            if on_stop is not None:
                on_stop()
            if held[:cut]:
                yield held[:cut]
            return
        safe = len(held) - (longest - 1)
        if safe > 0:
            yield held[:safe]
            held = held[safe:]
    if held:
        yield held
