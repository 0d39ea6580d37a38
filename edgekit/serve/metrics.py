"""The server's counters, written in Prometheus' text exposition format (no client library needed).

Counters only grow; histograms keep cumulative buckets, as Prometheus expects. The decode thread and
the event loop both record, so every change holds one lock.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
DURATION_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Histogram:
    """Cumulative buckets, a sum and a count, as one Prometheus histogram."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Add one observation."""
        for position, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[position] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        """The ``_bucket``, ``_sum`` and ``_count`` samples."""
        out = [f'{name}_bucket{{le="{_number(b)}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        return [*out, f"{name}_sum {_number(self.total)}", f"{name}_count {self.count}"]


class Metrics:
    """What ``GET /metrics`` reports: requests, tokens, latency, speed, and the queue."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.decode_rate = Histogram(RATE_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)

    def count_request(self, endpoint: str, status: int) -> None:
        """One finished HTTP request to ``endpoint`` with ``status``."""
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def record_generation(self, prompt_tokens: int, completion_tokens: int, ttft: float | None,
                          decode_seconds: float | None, total_seconds: float) -> None:  # fmt: skip
        """One generation's token counts and timings (``ttft`` None when it made no text)."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.duration.observe(total_seconds)
            if ttft is not None:
                self.ttft.observe(ttft)
            # The first token belongs to the prefill; the decode rate counts the ones after it.
            if decode_seconds and completion_tokens > 1:
                self.decode_rate.observe((completion_tokens - 1) / decode_seconds)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        """The exposition text; ``gauges`` maps a name to (help text, value) read at scrape time."""
        with self._lock:
            blocks = [
                _block("edgekit_requests_total", "counter", "HTTP requests served, by endpoint and status.",
                       [f'edgekit_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                        for (e, s), n in sorted(self.requests.items())]),
                _block("edgekit_prompt_tokens_total", "counter", "Prompt tokens read.",
                       [f"edgekit_prompt_tokens_total {self.prompt_tokens}"]),
                _block("edgekit_completion_tokens_total", "counter", "Tokens generated.",
                       [f"edgekit_completion_tokens_total {self.completion_tokens}"]),
                _histogram("edgekit_time_to_first_token_seconds", "From arrival to the first text.", self.ttft),
                _histogram("edgekit_decode_tokens_per_second", "Decode speed per request, after its first token.",
                           self.decode_rate),
                _histogram("edgekit_generation_seconds", "From arrival to the last token.", self.duration),
            ]  # fmt: skip
        for name, (help_text, value) in gauges.items():
            blocks.append(_block(name, "gauge", help_text, [f"{name} {_number(value)}"]))
        return "\n".join(blocks) + "\n"


def _block(name: str, kind: str, help_text: str, samples: list[str]) -> str:
    return "\n".join([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples])


def _histogram(name: str, help_text: str, histogram: Histogram) -> str:
    return _block(name, "histogram", help_text, histogram.lines(name))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def gauge_reader(**readers: tuple[str, Callable[[], float]]) -> Callable[[], dict[str, tuple[str, float]]]:
    """A callable that reads each gauge's current value (``name=(help, reader)``)."""
    return lambda: {name: (help_text, reader()) for name, (help_text, reader) in readers.items()}
