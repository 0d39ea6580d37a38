"""Progress of long work: one live line per step, and the seconds and peak memory each step took.

The console writes to a duplicate of the terminal's stderr taken when the reporter starts, so it keeps
showing while the builder's own output is redirected into the build log. Where that is not a terminal (a
CI log, a pipe), each step is a plain line when it starts and one when it ends, never cut to a width.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@dataclass
class StepRecord:
    """How long a step took and the process's peak resident memory during it."""

    name: str
    seconds: float
    peak_rss_mb: float

    def as_dict(self) -> dict[str, Any]:
        """The record as plain JSON-able data."""
        return asdict(self)


def current_rss_mb() -> float:
    """Resident memory of this process now, in MiB."""
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


class _PeakSampler(threading.Thread):
    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak = current_rss_mb()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peak = max(self.peak, current_rss_mb())

    def stop(self) -> float:
        self._stop_event.set()
        self.join()
        return max(self.peak, current_rss_mb())


class StepReporter:
    """Shows each step of a long job as it runs and records its time and peak memory."""

    def __init__(self, *, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.records: list[StepRecord] = []
        self.enabled = enabled
        self._stream = stream
        self._owned: IO[str] | None = None
        self._progress: Progress | None = None

    def __enter__(self) -> StepReporter:
        if self.enabled:
            stream = self._stream
            if stream is None:
                # A private copy of stderr: the builder's redirection of fd 2 must not swallow progress.
                stream = self._owned = os.fdopen(os.dup(2), "w", buffering=1)
            self.console = Console(file=stream, stderr=False)
            if not self.console.is_terminal:
                return self  # plain lines (``step``): a live display in a log is cut to 80 columns
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(bar_width=20),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
                # The builder's libraries must not print through the live display: their output is redirected
                # to the build log (``exporters/onnx_builder.output_to_log``), which a proxy would bypass.
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._owned is not None:
            self._owned.close()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[Callable[[str], None]]:
        """Run the body as one named step; it receives a function that shows a detail (``window 3/20``)."""
        task = self._progress.add_task(name, total=1) if self._progress is not None else None
        plain = self.enabled and self._progress is None
        if plain:
            self._plain(f"{name} ...")

        def detail(text: str) -> None:
            if self._progress is not None and task is not None:
                self._progress.update(task, description=f"{name} [dim]{text}[/dim]")

        sampler = _PeakSampler()
        sampler.start()
        start = time.perf_counter()
        failed = True
        try:
            yield detail
            failed = False
        finally:
            seconds = time.perf_counter() - start
            peak = sampler.stop()
            self.records.append(StepRecord(name, round(seconds, 2), round(peak, 1)))
            if self._progress is not None and task is not None:
                if failed:  # a step that failed is not shown done: its bar stays where it was
                    self._progress.update(task, description=f"{name} [red](failed)[/red]")
                    self._progress.stop_task(task)
                else:
                    self._progress.update(task, completed=1, description=f"{name} [dim]({peak:,.0f} MiB)[/dim]")
            elif plain:
                outcome = "failed after" if failed else "done in"
                self._plain(f"{name}: {outcome} {seconds:.1f} s (peak {peak:,.0f} MiB)")

    def _plain(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def print(self, *objects: Any) -> None:
        """Print below the progress lines (no-op when disabled); into a log, whole lines."""
        if self.enabled:
            self.console.print(*objects, soft_wrap=self._progress is None)
