"""Opening files that strangers named: regular files only, never a FIFO, device or socket.

``open()`` on a FIFO blocks until a writer appears (forever, for a crafted checkpoint), and reading
``/dev/zero`` never ends. Every reader of an input file opens it through here: the file is opened
non-blocking, checked with ``fstat`` on the open descriptor (so a swap between check and open cannot
slip a FIFO in), and only then switched back to blocking reads. Written by hand because neither
``pathlib`` nor ``io`` has a "regular files only" open.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO

from edgekit.errors import EdgekitError, UsageError
from edgekit.interrupts import raise_if_interrupted

_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


PLAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
"""The form of a name that becomes a folder, a rich table cell, a JUnit attribute and a terminal line (variant
and target names): letters, digits, ".", "_" and "-", no markup, no escapes."""


def file_kind(mode: int) -> str:
    """What a non-regular ``st_mode`` is, in words."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(
    path: str | Path, error: type[EdgekitError] = UsageError, fix: str | None = None, buffering: int = -1
) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file; ``error`` (naming it) if not or if unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC)
    except FileNotFoundError:
        raise error("does not exist", path=path, fix=fix) from None
    except OSError as exc:
        raise error(f"cannot be read ({exc.strerror})", path=path, fix=fix) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"is {file_kind(mode)}, not a regular file", path=path, fix=fix)
        if _NONBLOCK:
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(
    path: str | Path, limit: int, error: type[EdgekitError] = UsageError, fix: str | None = None
) -> bytes:
    """The bytes of regular file ``path``, refusing files over ``limit`` bytes."""
    with open_regular(path, error, fix) as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise error(f"is larger than {limit} bytes", path=path, fix=fix)
    return data


def require_regular(path: str | Path, error: type[EdgekitError] = UsageError, fix: str | None = None) -> int:
    """Raise ``error`` unless ``path`` is a regular file (links followed); returns its size."""
    with open_regular(path, error, fix) as handle:
        return os.fstat(handle.fileno()).st_size


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a sibling temporary file renamed over it: a reader sees the old file
    or the new one, never half of one. The temporary name carries the process id, so two processes writing
    the same shared file (the user's caches) cannot interleave in one temporary file."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        raise_if_interrupted()  # a Ctrl-C a library swallowed must not let the file land
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def not_unicode(text: str) -> str | None:
    """The first character of ``text`` that UTF-8 cannot encode (a lone surrogate: JSON's ``"\\ud800"``, or
    what Python makes of a byte that was not UTF-8 in argv or on stdin), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return text[exc.start]
    return None


def write_output_text(path: Path, text: str) -> None:
    """Write a file the user named (a report, a JUnit file): a regular file atomically, a device or FIFO in
    place; an ``OSError`` (a read-only file, a full disk, a path under /proc) is a one-line ``UsageError``."""
    try:
        if path.exists() and not path.is_file():  # /dev/stdout, a FIFO a CI step reads: written where it is
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
        else:  # through a link to the file it names, not over the link
            write_text_atomic(path.resolve() if path.is_symlink() else path, text)
    except OSError as exc:
        raise UsageError(f"cannot be written ({exc.strerror or exc})", path=path, fix="choose another path") from None


def user_cache_path(*parts: str) -> Path:
    """A path in edgekit's folder of the user's cache (``$XDG_CACHE_HOME/edgekit`` on Linux)."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("edgekit", appauthor=False), *parts)


class DuplicateKeyError(ValueError):
    """A JSON object names one key twice."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKeyError(f"the key '{key[:64]}' appears twice in one object")
        seen[key] = value
    return seen


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:  # 2^64 has 20 digits; nothing a file of edgekit's holds is larger
        raise ValueError(f"the integer {text[:24]}... has more than 20 digits")
    return int(text)


def strict_json_loads(data: str | bytes) -> Any:
    """``json.loads`` that refuses an object naming a key twice (``DuplicateKeyError``, a ``ValueError``) and
    an integer of more than 20 digits (a ``ValueError``: no float or C integer holds it).

    Python keeps a repeated key's last value; onnxruntime-genai's and other native parsers may act on every
    copy, so a file checked here must mean one thing to all of them.
    """
    return json.loads(data, object_pairs_hook=_unique_pairs, parse_int=_bounded_int)
