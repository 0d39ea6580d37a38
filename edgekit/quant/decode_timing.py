"""Decode-step time of model folders, side by side: alternating rounds, one process, the same threads.

A step is one token through the decoder with an empty cache: the linears' cost (what a recipe changes) at
batch 1, without the attention over a long past, which is the same for every variant of a model.
Short alternating chunks put every folder under the same machine noise. A folder's time is the lower
quartile of its chunks (noise on a shared machine mostly adds time); a ratio of two folders is the
median of the ratios of chunks run back to back: a slow spell that spans a pair cancels out of it, and
a few chunks that ran unusually slow or fast on one side move the median little.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from edgekit.exporters.decoder_session import DecoderSession
from edgekit.runtimes.cpu_threads import physical_cores

_WARMUP_STEPS = 3
_CHUNK_STEPS = 8


def chunk_seconds(
    folders: list[Path], rounds: int = 7, steps: int = 64, threads: int | None = None
) -> list[list[float]]:
    """Seconds per decode step of each folder, per chunk: ``rounds`` x ``steps`` steps each, alternating."""
    sessions = [DecoderSession(folder, threads or physical_cores()) for folder in folders]
    token = np.array([[100]], dtype=np.int64)
    for session in sessions:
        for _ in range(_WARMUP_STEPS):
            session.run(token, ["logits"])
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(max(1, rounds * steps // _CHUNK_STEPS)):
        for index, session in enumerate(sessions):
            start = time.perf_counter()
            for _ in range(_CHUNK_STEPS):
                session.run(token, ["logits"])
            times[index].append((time.perf_counter() - start) / _CHUNK_STEPS)
    return times


def step_seconds(folders: list[Path], rounds: int = 7, steps: int = 64, threads: int | None = None) -> list[float]:
    """Seconds per decode step of each folder: the lower quartile of its alternating chunks."""
    times = chunk_seconds(folders, rounds, steps, threads)
    return [statistics.quantiles(values, n=4)[0] if len(values) > 1 else values[0] for values in times]


def decode_ratio(baseline: Path, candidate: Path, rounds: int = 7) -> float:
    """Decode speed of ``candidate`` over ``baseline``'s (above 1: the candidate is faster): the median of
    back-to-back chunk pairs' ratios."""
    base, other = chunk_seconds([baseline, candidate], rounds)
    return statistics.median(b / o for b, o in zip(base, other, strict=True))
