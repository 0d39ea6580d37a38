"""``edgekit bench``: time to first token, prefill and decode speed, and memory, per variant.

Decode speed excludes the first generated token, as llama-bench's ``tg`` does; prefill speed is the
prompt length over the time to the first token. Each variant runs in its own loaded model, ``runs`` times;
the table reports the median and the spread (min..max).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import UsageError
from edgekit.package.manifest import read_manifest
from edgekit.progress import current_rss_mb
from edgekit.runtimes.model import GenerationConfig, Model, load


@dataclass(frozen=True)
class BenchSettings:
    """What one benchmark run does."""

    prompt_tokens: int = 512
    """Prompt length, in random ordinary tokens."""
    gen_tokens: int = 128
    runs: int = 5
    """Timed runs per variant, after one warm-up run."""
    threads: int | None = None
    """onnxruntime's intra-op threads; ``None``: what ``edgekit tune`` recorded for the variant on this machine,
    else one per physical core this process may use (``cpu_threads``)."""
    seed: int = 0


def random_prompt(vocab: int, count: int, seed: int = 0) -> list[int]:
    """``count`` random ordinary token ids: from 100 (above a vocabulary's special tokens) to 30000, or from
    a quarter of a vocabulary too small for that (a character-level one of a few dozen tokens)."""
    low = 100 if vocab > 200 else vocab // 4
    high = max(low + 1, min(vocab, 30000))
    return [int(t) for t in np.random.default_rng(seed).integers(low, high, size=count)]


def time_generation(model: Model, prompt: list[int], gen_tokens: int) -> tuple[float, float | None]:
    """One generation: (prompt tokens/s to the first new token, new tokens/s after the first; None where the
    model ended the generation at its first token, so there is no decode to time)."""
    started = time.perf_counter()
    stream = model.token_stream(prompt, GenerationConfig(max_new_tokens=gen_tokens))
    next(stream)
    first = time.perf_counter()
    produced = sum(1 for _ in stream)
    decode = produced / (time.perf_counter() - first) if produced else None
    return len(prompt) / (first - started), decode


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_variant(package: Path, variant: str, settings: BenchSettings, target: str | None = None) -> dict[str, Any]:
    """Benchmark one variant: one warm-up, then ``settings.runs`` timed runs."""
    with load(package, target, variant=variant, threads=settings.threads) as model:
        if settings.prompt_tokens >= model.context_length:  # before a prompt of that size is made
            raise UsageError(
                f"a {settings.prompt_tokens}-token prompt does not fit the {model.context_length}-token context",
                fix=f"pass --prompt-tokens below {model.context_length}",
            )
        # The same random ordinary ids for every variant.
        prompt = random_prompt(model.vocab_size, settings.prompt_tokens, settings.seed)
        ttft, prefill, decode = [], [], []
        for run in range(settings.runs + 1):
            prompt_tps, decode_tps = time_generation(model, prompt, settings.gen_tokens)
            if run == 0:
                continue  # warm-up: allocations, prepacking
            ttft.append(settings.prompt_tokens / prompt_tps)
            prefill.append(prompt_tps)
            if decode_tps is not None:
                decode.append(decode_tps)
        return {
            "variant": variant,
            "provider": model.info.provider,
            "runs_on": model.info.describe(),
            "prefill_chunk": model.info.prefill_chunk,
            "prompt_tokens": settings.prompt_tokens,
            "gen_tokens": settings.gen_tokens,
            "runs": settings.runs,
            "ttft_s": _stats(ttft),
            "prefill_tps": _stats(prefill),
            "decode_tps": _stats(decode) if decode else None,
            "peak_rss_mb": round(current_rss_mb(), 1),
        }


def bench_package(
    package: str | Path,
    *,
    variants: list[str] | None = None,
    target: str | None = None,
    settings: BenchSettings = BenchSettings(),
    progress: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Benchmark the named variants (default: all) of a package; one result per variant."""
    root = Path(package)
    manifest = read_manifest(root)
    names = variants or list(manifest["variants"])
    results = []
    for name in names:
        if progress:
            progress(name)
        result = bench_variant(root, name, settings, target)
        result["model_bytes"] = manifest["variants"][name]["bytes"] if name in manifest["variants"] else None
        results.append(result)
    return results
