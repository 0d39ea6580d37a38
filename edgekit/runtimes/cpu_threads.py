"""How many threads onnxruntime should compute with: one per physical core this process may use.

Left unset, onnxruntime-genai's CPU sessions decode markedly slower than with ``intra_op_num_threads`` set
to the core count (``benchmarks/bench_threads.py`` measures it; figures in docs/benchmarks.md).
Hyper-threads share a core's execution units, so they are not counted. Written by hand because psutil
counts the machine's physical cores, not those of the CPUs this process's affinity mask allows.
"""

from __future__ import annotations

import os
from pathlib import Path

_SYS_CPU = Path("/sys/devices/system/cpu")


def usable_cpus() -> set[int]:
    """The logical CPUs this process may run on (its affinity mask, which cgroups and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int] | None = None, sys_cpu: Path = _SYS_CPU) -> int:
    """The number of distinct physical cores among ``cpus`` (default: the usable ones); at least 1.

    Reads Linux's CPU topology (package and core id of each logical CPU); where it is not available,
    every logical CPU counts as a core.
    """
    cpus = usable_cpus() if cpus is None else cpus
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = sys_cpu / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))
