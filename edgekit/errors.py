"""The errors edgekit raises, and the exit code each one maps to.

Library code raises these and never prints or exits; the CLI turns them into one line on stderr and the
exit code in ``exit_code`` (2: the user's input is wrong, 1: the work itself failed). Every message names
the file it is about and says what to do about it.
"""

from __future__ import annotations

from pathlib import Path


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of a library's error message, at most ``limit`` characters (its type's name when it has
    none): onnxruntime, jinja and transformers messages run to many lines of context."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


class EdgekitError(Exception):
    """Base class of every error edgekit raises on purpose."""

    exit_code = 1

    def __init__(self, problem: str, *, path: str | Path | None = None, fix: str | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The message as one line: ``PATH: PROBLEM. FIX``, each part printable and of bounded length."""
        text = _shown(self.problem).rstrip(".")
        if self.path:
            text = f"{_shown(self.path)}: {text}"
        if self.fix:
            text = f"{text}. {_shown(self.fix).rstrip('.')}"
        return text + "."


_MAX_PART = 1000
"""Characters kept of each part of a message: they quote values from strangers' files, which can be huge."""


def _shown(text: str) -> str:
    """``text`` on one line, unprintable characters escaped, cut to ``_MAX_PART`` characters."""
    text = printable(" ".join(text.split()))
    return text if len(text) <= _MAX_PART else text[: _MAX_PART - 1] + "…"


def printable(text: str) -> str:
    """``text`` with every unprintable character (controls, line breaks, lone surrogates) written as its
    Python escape: a terminal escape sequence in a stranger's file must not reach the user's terminal."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


class UsageError(EdgekitError):
    """The user's input (a path, an option, a file they handed in) is wrong; exit code 2."""

    exit_code = 2


class SourceError(UsageError):
    """A checkpoint (folder, GGUF file, hub id) cannot be used as a build source."""


class UnsupportedArchitectureError(SourceError):
    """The checkpoint's architecture is not in edgekit's registry."""


class CorruptFileError(SourceError):
    """A weight file is truncated or malformed (safetensors header, GGUF layout)."""


class TargetError(UsageError):
    """targets.yaml is malformed, or names an unknown target, key or provider."""


class OutputExistsError(UsageError):
    """The output folder already exists and ``--force`` was not given."""


class PackageError(UsageError):
    """A package folder is missing, incomplete, or does not match its manifest."""


class ExportError(EdgekitError):
    """The ONNX export itself failed; the build log has the details."""


class ValidationError(EdgekitError):
    """The exported fp32 reference does not match PyTorch within the architecture's tolerance."""


class ProviderUnavailableError(EdgekitError):
    """An execution provider asked for cannot start on this machine (raised with ``strict=True``)."""


class MissingDependencyError(UsageError):
    """An optional dependency (the ``export`` extra) is not installed."""


class ResourceError(EdgekitError):
    """This machine lacks the memory or disk a build needs (estimated before any weight is read)."""


class RecipeBudgetError(UsageError):
    """No per-tensor recipe meets the size (``max_model_bytes``) or accuracy budget a build asked for."""
