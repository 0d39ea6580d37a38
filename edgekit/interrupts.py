"""Ctrl-C that no library can lose: every SIGINT is recorded as well as raised (and SIGTERM, which ``timeout``
and a CI's cancel send, is handled the same way, so its cleanup runs too).

Python turns SIGINT into ``KeyboardInterrupt`` wherever the main thread happens to be, and some libraries
catch it there: pydantic-core reports it as a ``SchemaError`` when it lands while a model class is being
built (a lazy import), and a bare ``except:`` swallows it. The record lets the CLI tell an interrupted
command from a failed one, and lets a build refuse to put its output in place after an interrupt that
something swallowed.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

_interrupted = threading.Event()
_received = [int(signal.SIGINT)]  # the signal that interrupted, for the exit code (128 + its number)


def _record_and_raise(signum: int, frame: FrameType | None) -> None:
    """The SIGINT (and SIGTERM) handler: what Python's default SIGINT handler does, plus the record."""
    _received[0] = signum
    _interrupted.set()
    raise KeyboardInterrupt


def interrupt_exit_code() -> int:
    """The exit code a shell gives a process the recorded signal ended: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + _received[0]


@contextlib.contextmanager
def interrupts_recorded() -> Iterator[None]:
    """Record every SIGINT while the block runs (main thread only; a SIGINT that was ignored stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is not signal.default_int_handler:
        try:
            yield  # ignored, or someone else's handler: theirs to keep
        finally:
            _interrupted.clear()  # nothing of this block's may outlive it
        return
    _interrupted.clear()
    _received[0] = int(signal.SIGINT)
    signal.signal(signal.SIGINT, _record_and_raise)
    terminate = signal.getsignal(signal.SIGTERM)
    if terminate is signal.SIG_DFL:  # an embedding app's own SIGTERM handler stays its own
        signal.signal(signal.SIGTERM, _record_and_raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if terminate is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, terminate)
        _interrupted.clear()  # the record belongs to this block: later library calls in the process start clean


def was_interrupted() -> bool:
    """Whether a SIGINT arrived inside ``interrupts_recorded`` (False where none was recorded)."""
    return _interrupted.is_set()


def raise_if_interrupted() -> None:
    """Raise ``KeyboardInterrupt`` again where an earlier one was swallowed; a no-op outside the CLI."""
    if _interrupted.is_set():
        raise KeyboardInterrupt
