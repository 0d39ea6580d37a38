"""The settings of one generation, shared by the runtime, the CLI's option defaults and the server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from edgekit.errors import UsageError


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
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be a positive integer, not {self.max_new_tokens!r}")
        if not 0 <= self.temperature <= 100 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UsageError("temperature must be in 0..100, top_p in (0, 1] and top_k at least 0")


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
