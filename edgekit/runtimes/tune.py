"""Measure a package variant under each candidate runtime setting and record the fastest (``edgekit tune``).

One model is loaded at a time (a laptop need not hold several copies): every round loads each candidate in
turn, alternating the order, warms it up with one generation and times the next. The prompt is random
ordinary tokens, the same for every candidate.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgekit.errors import UsageError
from edgekit.runtimes.bench import random_prompt, time_generation
from edgekit.runtimes.cpu_threads import physical_cores, usable_cpus
from edgekit.runtimes.model import Model, load
from edgekit.runtimes.tuning import (
    Measurement,
    RuntimeSettings,
    TuningRecord,
    candidates,
    choose,
    machine_class,
    write_tuning,
)


@dataclass(frozen=True)
class TuneSettings:
    """How ``tune_package`` measures."""

    rounds: int = 3
    """Timed rounds per candidate (each after a warm-up generation)."""
    prompt_tokens: int = 512
    """Prompt length, in random ordinary tokens (shortened to fit the context)."""
    gen_tokens: int = 64
    """Tokens generated per timed run."""


@dataclass(frozen=True)
class TuneResult:
    """What ``tune_package`` measured and chose, and where the record went (None: not recorded)."""

    record: TuningRecord
    path: Path | None


def tune_package(
    package: str | Path,
    *,
    variant: str | None = None,
    target: str | None = None,
    settings: TuneSettings = TuneSettings(),
    record: bool = True,
    progress: Callable[[str], None] | None = None,
) -> TuneResult:
    """Measure every candidate setting for the variant ``load`` would pick; record the fastest for this machine.

    The default (one thread per physical core, arena on, the prompt in pieces of at most
    ``tuning.DEFAULT_PREFILL_CHUNK``) is kept unless a candidate's geometric mean of prefill and decode speed
    beats it by more than ``tuning.MARGIN``. A variant that starts on a GPU provider is not measured in
    prompt pieces (it takes the prompt whole). ``record=False`` only measures.
    """
    rounds, prompt_tokens, gen_tokens = settings.rounds, settings.prompt_tokens, settings.gen_tokens
    if rounds < 1 or prompt_tokens < 1 or gen_tokens < 2:
        raise UsageError(
            "rounds and prompt tokens must be at least 1, generated tokens at least 2",
            fix="pass --rounds 3 --prompt-tokens 512 --gen-tokens 64",
        )
    cores, logical = physical_cores(), len(usable_cpus())
    options = candidates(cores, logical)
    samples: list[list[tuple[float, float | None]]] = [[] for _ in options]
    prompt: list[int] = []
    name, fingerprint = "", ""
    for number in range(rounds):
        step = 1 if number % 2 == 0 else -1  # the first round runs the default first
        index = 0 if step == 1 else len(options) - 1
        while 0 <= index < len(options):
            if progress is not None:
                progress(f"round {number + 1}/{rounds}: {options[index].label()}")
            with load(package, target, variant=variant, settings=options[index]) as model:
                if not prompt:
                    prompt = _prompt(model, prompt_tokens, gen_tokens)
                    name, fingerprint = model.info.variant, model.info.variant_sha256
                    if model.info.provider != "cpu":  # pieces would run as the default does
                        options = candidates(cores, logical, pieces=False)
                        samples = [[] for _ in options]
                time_generation(model, prompt, gen_tokens)  # warm-up: allocations, prepacking
                samples[index].append(time_generation(model, prompt, gen_tokens))
            index += step
    measured = [_measurement(candidate, runs) for candidate, runs in zip(options, samples, strict=True)]
    result = TuningRecord(
        variant_sha256=fingerprint,
        variant=name,
        machine=machine_class(),
        prompt_tokens=len(prompt),
        settings=choose(measured),
        measured=measured,
    )
    return TuneResult(result, write_tuning(result) if record else None)


def _measurement(candidate: RuntimeSettings, runs: list[tuple[float, float | None]]) -> Measurement:
    """A candidate's medians; runs the model ended at its first token have no decode speed and are left out."""
    decodes = [decode for _, decode in runs if decode is not None]
    if not decodes:
        raise UsageError(
            f"every timed generation with {candidate.label()} ended at its first token (end of sequence), "
            "so there is no decode speed to compare",
            fix="pass a longer --prompt-tokens, or tune another variant",
        )
    return Measurement(
        settings=candidate, prefill_tps=statistics.median(p for p, _ in runs), decode_tps=statistics.median(decodes)
    )


def _prompt(model: Model, prompt_tokens: int, gen_tokens: int) -> list[int]:
    """Random ordinary token ids (``bench.random_prompt``), as many as fit with ``gen_tokens``."""
    room = model.context_length - gen_tokens - 1
    if room < 1:
        raise UsageError(
            f"{gen_tokens} generated tokens leave no room for a prompt in a {model.context_length}-token context",
            fix="pass fewer --gen-tokens",
        )
    return random_prompt(model.vocab_size, min(prompt_tokens, room))


def settings_table(result: TuningRecord) -> list[tuple[str, float, float, float, bool]]:
    """Rows for display: (settings, prefill tok/s, decode tok/s, score relative to the default, chosen)."""
    default = result.measured[0].score
    return [
        (m.settings.label(), m.prefill_tps, m.decode_tps, m.score / default, m.settings == result.settings)
        for m in result.measured
    ]


__all__ = ["RuntimeSettings", "TuneResult", "TuneSettings", "settings_table", "tune_package"]
