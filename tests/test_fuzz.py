"""The fuzz harnesses in fuzz/ (issue #5, requirement 12): each runs its seeds quickly here, and for a
minute in the slow run (CI). Set EDGEKIT_FUZZ_SECONDS to run longer; see SECURITY.md for a long run."""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).parent.parent / "fuzz"
HARNESSES = ("safetensors", "gguf", "manifest", "archive", "package")
MEMORY_CAP = 4 << 30  # bytes of address space a harness may map; a bigger appetite is a crash


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    done = subprocess.run([sys.executable, str(FUZZ / "make_corpus.py"), str(root)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return root


def start(harness: str, corpus: Path, crashes: Path, *flags: str) -> subprocess.Popen:
    crashes.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(FUZZ / f"fuzz_{harness}.py"), str(corpus / harness), *flags]
    # libFuzzer's -rss_limit_mb reads the peak RSS, which Linux carries over fork and exec from this (large)
    # pytest process; the child's own memory is capped by an address-space limit instead.
    command += [f"-artifact_prefix={crashes}/", "-rss_limit_mb=0"]
    env = {**os.environ, "EDGEKIT_FUZZ_WORK": str(crashes / "work")}  # inside pytest's tmp_path, cleaned up
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=crashes,
        env=env,
        preexec_fn=_cap_memory,
    )


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def finish(process: subprocess.Popen, harness: str, timeout: float) -> str:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"fuzz_{harness} found a crash:\n{output[-4000:]}"
    assert re.search(r"Done \d+ runs", output), output[-2000:]
    return output


@pytest.mark.parametrize("harness", HARNESSES)
def test_a_harness_runs_its_seeds(harness: str, corpus: Path, tmp_path: Path) -> None:
    finish(start(harness, corpus, tmp_path, "-runs=200"), harness, timeout=120)


@pytest.mark.slow
def test_every_harness_fuzzes_for_45_seconds_without_a_crash(corpus: Path, tmp_path: Path) -> None:
    seconds = int(os.environ.get("EDGEKIT_FUZZ_SECONDS", "45"))  # campaigns of hours: SECURITY.md, "Fuzzing"
    # All at once, sharing the CI machine's cores: the wall time of one harness.
    running = {h: start(h, corpus, tmp_path / h, f"-max_total_time={seconds}") for h in HARNESSES}
    for harness, process in running.items():
        output = finish(process, harness, timeout=seconds + 120)
        runs = re.findall(r"Done (\d+) runs", output)[-1]
        rate = (re.findall(r"exec/s: (\d+)", output) or ["?"])[-1]
        print(f"fuzz_{harness}: {runs} runs in {seconds} s, {rate} exec/s")
