"""``edgekit tune``: measure the runtime settings a package can run with on this machine; record the fastest.

A record is kept per package (its manifest's hash), variant and machine class (CPU model, the instruction
sets that matter, usable cores) in the user's cache, never in the package: a package stays what its
manifest says, and a copy moved to another machine class finds no record and runs with the defaults.
``load`` applies a record it finds. A record is read as untrusted input (pydantic, bounded values, and a
thread count the process can use); one that fails any check is ignored.

The candidates are runtime choices that need no rebuild: onnxruntime's intra-op thread count, its CPU
memory arena, and how many prompt tokens each decoder pass takes on the CPU. A candidate replaces the
default only when it is faster by more than ``MARGIN`` on the geometric mean of prefill and decode speed,
measured in alternating rounds, so noise does not pick it.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgekit.errors import EdgekitError
from edgekit.runtimes.cpu_threads import physical_cores, usable_cpus
from edgekit.safe_io import read_regular_file, user_cache_path, write_text_atomic

MARGIN = 0.05
"""How much faster than the default a candidate must be to be recorded."""
DEFAULT_PREFILL_CHUNK = 256
"""Prompt tokens per decoder pass on the CPU unless a record says otherwise (docs/benchmarks.md, "Prefill in
chunks": a prompt in pieces of this size was faster than one pass on one machine and no slower on another)."""
_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8")
_MAX_RECORD_BYTES = 1 << 20


class RuntimeSettings(BaseModel):
    """The runtime choices a tuning record holds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threads: Annotated[int, Field(ge=1, le=4096)]
    """onnxruntime's intra-op threads."""
    cpu_mem_arena: bool = True
    """onnxruntime's CPU memory arena (``enable_cpu_mem_arena``)."""
    prefill_chunk: Annotated[int, Field(ge=16, le=1 << 20)] | None = DEFAULT_PREFILL_CHUNK
    """Prompt tokens per decoder pass on the CPU provider; None: the whole prompt in one pass. Each pass
    attends to the cache the earlier ones wrote, so the result is the one-pass result up to float rounding."""

    def label(self) -> str:
        """``2 threads, arena on, prompt by 256``: how the settings are shown."""
        threads = f"{self.threads} thread{'s' * (self.threads != 1)}, arena {'on' if self.cpu_mem_arena else 'off'}"
        return f"{threads}, prompt {'in one pass' if self.prefill_chunk is None else f'by {self.prefill_chunk}'}"


Speed = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class Measurement(BaseModel):
    """One candidate's median speeds over the rounds."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    settings: RuntimeSettings
    prefill_tps: Speed
    decode_tps: Speed

    @property
    def score(self) -> float:
        """The geometric mean of prefill and decode speed: neither phase alone decides."""
        return math.sqrt(self.prefill_tps * self.decode_tps)


class TuningRecord(BaseModel):
    """What ``edgekit tune`` found for one package variant on one machine class."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[3] = 3
    """3 since the prompt's pieces became a setting: earlier records were measured in one pass, and are ignored."""
    variant_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    """The variant's fingerprint (``package.manifest.variant_fingerprint``), not the whole manifest's hash:
    an evaluation that rewrites the manifest leaves the record standing."""
    variant: Annotated[str, Field(min_length=1, max_length=200)]
    machine: Annotated[str, Field(max_length=1000)]
    prompt_tokens: Annotated[int, Field(ge=1)]
    settings: RuntimeSettings
    measured: Annotated[list[Measurement], Field(min_length=1, max_length=64)]


def machine_class() -> str:
    """The CPU model, the instruction sets that matter to the kernels, and the cores this process may use."""
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        info = ""
    lines = info.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    present = " ".join(flag for flag in _FLAGS if flag in flags) or "-"
    return f"{model} | {present} | {physical_cores()} cores, {len(usable_cpus())} logical"


def record_path(variant_sha256: str, variant: str, machine: str) -> Path:
    """Where the record for this package variant on this machine class lives in the user's cache."""
    digest = hashlib.sha256(f"{variant_sha256}\0{variant}\0{machine}".encode()).hexdigest()[:32]
    return user_cache_path("tuning", f"{digest}.json")


def read_tuning(variant_sha256: str, variant: str) -> RuntimeSettings | None:
    """The recorded settings for this package variant on this machine class; None where none is usable."""
    machine = machine_class()
    path = record_path(variant_sha256, variant, machine)
    try:
        record = TuningRecord.model_validate_json(read_regular_file(path, _MAX_RECORD_BYTES))
    except (EdgekitError, ValidationError):
        return None  # none, unreadable, not a regular file, too large, or not a valid record
    if (record.variant_sha256, record.variant, record.machine) != (variant_sha256, variant, machine):
        return None
    if record.settings.threads > len(usable_cpus()):
        return None  # the process's CPUs were narrowed since (taskset, a container limit)
    return record.settings


def write_tuning(record: TuningRecord) -> Path:
    """Store ``record`` in the user's cache (replacing an earlier one); return its path."""
    path = record_path(record.variant_sha256, record.variant, record.machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, record.model_dump_json(indent=2) + "\n")
    return path


def candidates(cores: int, logical: int, pieces: bool = True) -> list[RuntimeSettings]:
    """The settings to measure; the first is the default (one thread per physical core, arena on, the prompt
    by ``DEFAULT_PREFILL_CHUNK``).

    Then the arena off, the prompt in one pass and in half the default's pieces, and the other thread counts
    worth a try: every logical CPU (hyper-threads), and half the cores (a hybrid laptop's performance cores,
    a machine others share). ``pieces=False`` (a GPU provider, which takes the prompt whole) leaves out the
    two prompt candidates, which would run as the default does, and says "in one pass" in every candidate.
    """
    others = sorted({logical, max(1, cores // 2)} - {cores}, reverse=True)
    chunk = DEFAULT_PREFILL_CHUNK if pieces else None
    prompt = [RuntimeSettings(threads=cores, prefill_chunk=c) for c in (None, DEFAULT_PREFILL_CHUNK // 2)]
    return [
        RuntimeSettings(threads=cores, prefill_chunk=chunk),
        RuntimeSettings(threads=cores, cpu_mem_arena=False, prefill_chunk=chunk),
        *(prompt if pieces else []),
        *(RuntimeSettings(threads=count, prefill_chunk=chunk) for count in others),
    ]


def choose(measured: list[Measurement], margin: float = MARGIN) -> RuntimeSettings:
    """The fastest candidate, if it beats the default (the first) by more than ``margin``; else the default."""
    default, best = measured[0], max(measured, key=lambda m: m.score)
    return best.settings if best.score > default.score * (1 + margin) else default.settings
