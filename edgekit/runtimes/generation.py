"""The settings of one generation, shared by the runtime, the CLI's option defaults and the server."""

from __future__ import annotations

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
