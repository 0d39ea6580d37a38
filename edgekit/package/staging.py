"""Atomic creation of a package (and of any output folder): a hidden sibling renamed into place.

OUT is either absent, the old complete package, or the new complete one. Folders of builds that were
killed outright carry their process id and are swept by the next build for the same OUT.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgekit.errors import OutputExistsError
from edgekit.interrupts import raise_if_interrupted
from edgekit.package.manifest import MANIFEST

_PARTIAL = ".partial-"


@contextlib.contextmanager
def staged_output(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a private folder next to ``out``; on success it replaces ``out`` in one rename.

    On any exception (Ctrl-C included, even one a library swallowed) the private folder is removed and
    ``out`` is left as it was.
    Leftovers of builds that were killed outright are removed first; a previous package that such a build
    had moved aside (killed between its two renames) is put back.
    """
    out = out.absolute()
    _restore_retired(out)
    if out.exists() and not force:
        raise OutputExistsError("already exists", path=out, fix="choose another folder or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{_PARTIAL}{os.getpid()}-", dir=out.parent))
    # mkdtemp makes a private (0700) folder; a package gets the permissions a plain mkdir would give.
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)
    try:
        yield staging
        raise_if_interrupted()  # a Ctrl-C that a library swallowed still keeps the output from landing
        _plain_modes(staging, umask)
        if out.exists() and not force:  # made by another command while this one ran: not ours to replace
            raise OutputExistsError(
                "appeared while this command ran (another command wrote it); nothing was replaced",
                path=out,
                fix="choose another folder or pass --force to replace it",
            )
        if out.exists():
            retired = out.with_name(f".{out.name}{_PARTIAL}{os.getpid()}-old")
            out.rename(retired)
            staging.rename(out)
            _remove(retired)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _plain_modes(folder: Path, umask: int) -> None:
    """Every file and folder under ``folder`` with the permissions a plain ``open`` or ``mkdir`` gives:
    some writers (onnx's external-data writer) create private (0600) files another user could not read."""
    for root, dirs, files in os.walk(folder):
        for names, mode in ((dirs, 0o777), (files, 0o666)):
            for name in names:
                path = os.path.join(root, name)
                if not os.path.islink(path):  # a package holds no links; never change what one points at
                    os.chmod(path, mode & ~umask)


@contextlib.contextmanager
def scratch_folder(out: Path) -> Iterator[Path]:
    """A private work folder beside ``out`` (not in $TMPDIR), removed on exit.

    Its name carries this process's id, so if the process is killed outright the next build or
    evaluation for ``out`` (``remove_stale_partials``) finds it and deletes it.
    """
    out = out.absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}{_PARTIAL}{os.getpid()}-work-", dir=out.parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _restore_retired(out: Path) -> None:
    """Put back the complete package a killed ``--force`` build had moved aside, if ``out`` is missing."""
    if out.exists() or out.is_symlink():
        return
    prefix = f".{out.name}{_PARTIAL}"
    for candidate in sorted(out.parent.glob(f"{glob.escape(prefix)}*-old")):
        pid_text = candidate.name[len(prefix) : -len("-old")]
        if pid_text.isdigit() and not _process_alive(int(pid_text)) and (candidate / MANIFEST).is_file():
            candidate.rename(out)
            return


def remove_stale_partials(out: Path) -> None:
    """Delete partial build folders for ``out`` whose owning process no longer runs.

    Work folders made beside one of those partial folders (a build's evaluation works beside the staging
    folder it evaluates) go too: ``..OUT.partial-PID-*.partial-PID-work-*``, matched whole, since the prefix
    ``..OUT.partial-`` alone is also that of the output ``.OUT``'s own folders.
    """
    prefix = f".{out.name}{_PARTIAL}"
    for candidate in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid_text = candidate.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            _remove(candidate)
    nested = re.compile(rf"\.{re.escape(prefix)}(\d+)-.+{re.escape(_PARTIAL)}\1-work-.+", re.DOTALL)
    for candidate in out.parent.glob(f".{glob.escape(prefix)}*"):
        if (match := nested.fullmatch(candidate.name)) and not _process_alive(int(match.group(1))):
            _remove(candidate)


def _remove(path: Path) -> None:
    """Delete a folder tree, or a file or link, ignoring what is already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
