"""The SIGINT record: kept within the CLI's block only, and it stops every rename into place."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import pytest

from edgekit.interrupts import interrupts_recorded, raise_if_interrupted, was_interrupted
from edgekit.safe_io import write_text_atomic


def swallowed_ctrl_c() -> None:
    """A library that catches the KeyboardInterrupt of a Ctrl-C and goes on."""
    with contextlib.suppress(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(autouse=True)
def default_sigint():
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_swallowed_ctrl_c_stops_an_atomic_write(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    with interrupts_recorded():
        swallowed_ctrl_c()
        assert was_interrupted()
        with pytest.raises(KeyboardInterrupt):
            write_text_atomic(target, "{}")
    assert sorted(tmp_path.iterdir()) == []


def test_the_record_ends_with_the_block(tmp_path: Path) -> None:
    with interrupts_recorded():
        swallowed_ctrl_c()
    assert not was_interrupted()
    raise_if_interrupted()
    write_text_atomic(tmp_path / "after.json", "{}")
    assert (tmp_path / "after.json").read_text() == "{}"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_ignored_sigint_stays_ignored() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with interrupts_recorded():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGINT)
    assert not was_interrupted()
