"""Decode-step time of model folders, side by side: alternating rounds, one process, the same threads.

A step is one token through the decoder with an empty cache: the linears' cost (what a recipe changes) at
batch 1, without the attention over a long past, which is the same for every variant of a model.
Alternating rounds put every folder under the same machine noise; the median of the rounds is reported.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from edgekit.exporters.decoder_session import DecoderSession
from edgekit.runtimes.cpu_threads import physical_cores

_WARMUP_STEPS = 3


def step_seconds(folders: list[Path], rounds: int = 7, steps: int = 64, threads: int | None = None) -> list[float]:
    """Median seconds per decode step of each folder, measured in ``rounds`` alternating rounds."""
    sessions = [DecoderSession(folder, threads or physical_cores()) for folder in folders]
    token = np.array([[100]], dtype=np.int64)
    for session in sessions:
        for _ in range(_WARMUP_STEPS):
            session.run(token, ["logits"])
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for index, session in enumerate(sessions):
            start = time.perf_counter()
            for _ in range(steps):
                session.run(token, ["logits"])
            times[index].append((time.perf_counter() - start) / steps)
    return [statistics.median(values) for values in times]


def decode_ratio(baseline: Path, candidate: Path, rounds: int = 7) -> float:
    """Decode speed of ``candidate`` over ``baseline``'s (above 1: the candidate is faster)."""
    base, other = step_seconds([baseline, candidate], rounds)
    return base / other
