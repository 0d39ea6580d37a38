"""Run onnxruntime-genai's model builder in-process, with its console output sent to a log file.

The builder prints freely (options, per-layer progress, tqdm bars, onnxruntime's C++ warnings), so the
process's stdout and stderr file descriptors are pointed at the package's build log for the duration of
the call; edgekit's own progress display writes to a saved copy of the terminal. Libraries that log
through Python's ``logging`` (onnxruntime's quantizer, transformers) hold handlers bound to the stream
they found at import, often the terminal's: those handlers are pointed at the log too while it lasts.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from edgekit.errors import ExportError
from edgekit.exporters import builder_compat


@contextlib.contextmanager
def output_to_log(log_path: Path) -> Iterator[None]:
    """Send everything written to fd 1 and fd 2 (Python and native code alike) to ``log_path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log_path.open("ab") as log, open(log.fileno(), "w", closefd=False, buffering=1) as text:
        try:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            # Where sys.stdout is not fd 1 (an embedding app, click's test runner), redirect it too.
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text), _logging_to(text):
                yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _is_console(stream: Any) -> bool:
    """Whether ``stream`` writes to the terminal or to the process's stdout or stderr file descriptor."""
    if stream is None or getattr(stream, "closed", False):
        return False
    if stream is sys.__stdout__ or stream is sys.__stderr__:
        return True
    try:
        return bool(stream.isatty()) or stream.fileno() in (1, 2)
    except (AttributeError, OSError, ValueError):  # no descriptor: a StringIO, a test runner's capture
        return False


@contextlib.contextmanager
def _logging_to(stream: IO[str]) -> Iterator[None]:
    """Point every ``logging.StreamHandler`` that writes to a console stream at ``stream``; put them back after.

    A handler made at import holds the ``sys.stderr`` of that moment (on a terminal, possibly a progress
    display's proxy), so redirecting the file descriptors alone misses what it writes.
    """
    import logging

    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in list(logging.root.manager.loggerDict))]
    moved: list[tuple[logging.StreamHandler[Any], Any]] = []
    for logger in loggers:
        for handler in list(getattr(logger, "handlers", ())):
            # Only handlers bound to the console: a FileHandler or a test runner's capture is left alone.
            if isinstance(handler, logging.StreamHandler) and _is_console(handler.stream):
                previous = handler.stream
                handler.setStream(stream)
                moved.append((handler, previous))
    try:
        yield
    finally:
        for handler, previous in moved:
            with contextlib.suppress(ValueError):
                handler.setStream(previous)


def run_builder(
    hf_folder: Path,
    out_dir: Path,
    *,
    precision: str,
    provider: str,
    options: dict[str, str],
    cache_dir: Path,
    log_path: Path,
) -> None:
    """Export ``hf_folder`` to an onnxruntime-genai model folder at ``out_dir``.

    ``options`` are the builder's ``extra_options`` (``block_size``, ``accuracy_level``, ...). Any builder
    failure becomes an ``ExportError`` that points at the log; a missing or unsupported onnxruntime-genai is
    refused before anything is written (``builder_compat.check_builder_version``).
    """
    builder_compat.require_builder()
    extra = builder_extra_options(options)
    out_dir.mkdir(parents=True, exist_ok=True)

    def export() -> None:
        builder_compat.export_whole_model(
            hf_folder, out_dir, precision=precision, provider=provider, cache_dir=cache_dir, options=extra
        )

    pairs = [f"{key}={value}" for key, value in extra.items()]
    failure = run_logged(log_path, f"builder {precision}/{provider} {pairs} -> {out_dir.name}", export)
    if failure is not None:
        raise ExportError(
            f"onnxruntime-genai's builder failed on the {precision} {provider} export "
            f"({type(failure).__name__}: {failure})",
            path=log_path,
            fix="see the log for the builder's traceback",
        )


def builder_extra_options(options: dict[str, str]) -> dict[str, str]:
    """The builder ``extra_options`` edgekit passes: the variant's, with the network and remote code off.

    hf_token=false: a local folder never needs the network, and a stored token must not leak into logs.
    hf_remote=false: never trust_remote_code (older builders defaulted it to true); it cannot be overridden.
    """
    return {"hf_token": "false", **options, "hf_remote": "false"}


def run_logged(log_path: Path, title: str, work: Callable[[], None]) -> Exception | None:
    """Run ``work`` with its console output in the build log; return the exception it raised, if any.

    The traceback goes to the log, so the caller can raise a one-line error that points there.
    Interrupts and ``MemoryError`` propagate.
    """
    with output_to_log(log_path):
        print(f"== edgekit: {title}", flush=True)
        try:
            work()
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            import traceback

            traceback.print_exc()
            return exc
    return None
