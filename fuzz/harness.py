"""What every harness shares: run a ``TestOneInput`` under atheris, or under a plain mutation loop without it.

A harness's target calls one of edgekit's front doors on the input. An ``EdgekitError`` is the expected
answer to a bad input; any other exception escapes and is a crash (atheris stops and writes the input to
``crash-<sha1>``; the fallback loop does the same in the current folder).

Usage of every harness (libFuzzer's flags under atheris; the fallback loop understands the two shown)::

    python fuzz/fuzz_gguf.py fuzz/corpus/gguf -max_total_time=60 -rss_limit_mb=2048
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the machine
    atheris = None

from edgekit.errors import EdgekitError

# libFuzzer ends the process without running Python's exit handlers, so a temporary folder made here
# would outlive every run; a caller that cares (the test suite) names one it cleans up itself.
WORK = Path(os.environ.get("EDGEKIT_FUZZ_WORK") or tempfile.mkdtemp(prefix="edgekit-fuzz-"))
WORK.mkdir(parents=True, exist_ok=True)


def expected(call: Callable[[], object]) -> None:
    """Run ``call``; an EdgekitError is a correct refusal, anything else escapes as a crash."""
    with contextlib.suppress(EdgekitError):
        call()


def main(target: Callable[[bytes], None], instrumented: Callable[[], None]) -> None:
    """Fuzz ``target`` with atheris when it is installed, else with a mutation loop over the corpus."""
    if atheris is not None and not os.environ.get("EDGEKIT_FUZZ_NO_ATHERIS"):
        with atheris.instrument_imports():
            instrumented()
        atheris.Setup(sys.argv, target)
        atheris.Fuzz()
    else:
        instrumented()
        _mutation_loop(target, sys.argv[1:])


def _mutation_loop(target: Callable[[bytes], None], args: list[str]) -> None:
    """A small stand-in for libFuzzer: random byte mutations and splices of the corpus files."""
    seconds = next((float(a.split("=", 1)[1]) for a in args if a.startswith("-max_total_time=")), 60.0)
    runs = next((int(a.split("=", 1)[1]) for a in args if a.startswith("-runs=")), -1)
    folders = [Path(a) for a in args if not a.startswith("-")]
    corpus = [p.read_bytes() for f in folders for p in sorted(f.iterdir()) if p.is_file()] or [b""]
    rng = random.Random(int(os.environ.get("EDGEKIT_FUZZ_SEED", "0")))
    deadline, done = time.monotonic() + seconds, 0
    while time.monotonic() < deadline and done != runs:
        data = _mutate(rng, rng.choice(corpus), corpus)
        try:
            target(data)
        except Exception:
            name = f"crash-{hashlib.sha1(data).hexdigest()}"
            Path(name).write_bytes(data)
            print(f"crash: input written to {name}", file=sys.stderr)
            raise
        done += 1
    print(f"Done {done} runs in {seconds:.0f} second(s) (fallback mutation loop)", file=sys.stderr)


_INTERESTING = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 31, (1 << 63) - 1, (1 << 64) - 1]


def _mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        position = rng.randrange(len(buf) + 1)
        if choice == 0 and buf:  # flip a bit
            index = rng.randrange(len(buf))
            buf[index] ^= 1 << rng.randrange(8)
        elif choice == 1:  # insert random bytes
            buf[position:position] = rng.randbytes(rng.randint(1, 8))
        elif choice == 2 and buf:  # delete a run
            del buf[position : position + rng.randint(1, 16)]
        elif choice == 3:  # an interesting little-endian integer
            width = rng.choice((1, 2, 4, 8))
            value = rng.choice(_INTERESTING) & ((1 << (8 * width)) - 1)
            buf[position : position + width] = value.to_bytes(width, "little")
        elif choice == 4:  # splice another corpus entry
            other = rng.choice(corpus)
            start = rng.randrange(len(other) + 1)
            buf[position:] = other[start:]
        elif choice == 5:  # truncate
            del buf[position:]
    return bytes(buf)
