"""Packages as single files: ``pack_package`` writes a reproducible tar archive of a verified package, and
``unpack_package`` reads one without trusting it.

Unpacking reads every member header before anything is extracted and refuses, naming the member: names
that are absolute, hold ``..``, backslashes, colons or control characters; links, devices and FIFOs;
duplicate names (case-insensitively, for the file systems that fold case); a file that is also a folder;
too many members or too many bytes. It then extracts with ``tarfile``'s ``data`` filter into a hidden
folder next to the destination, verifies the manifest there (hashes, links, the paths configs name), and
renames the folder into place: the destination is either the complete package or left as it was.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

from edgekit.errors import OutputExistsError, PackageError
from edgekit.package import MANIFEST, read_manifest, staged_output, verify_files

MAX_MEMBERS = 10_000
MAX_TOTAL_BYTES = 1 << 40  # 1 TiB of declared file data
MAX_HEADER_READ = 16 << 20  # the longest single read tarfile may make (a pax or long-name header)
_FORBIDDEN_CHARACTERS = frozenset("\\:") | frozenset(chr(c) for c in range(32)) | {"\x7f"}
_COMPRESSED = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
_FIX_ARCHIVE = "ask for the archive again, or make one with `edgekit pack`"


def pack_package(package: str | os.PathLike[str], archive: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write ``package`` (verified against its manifest first) as a tar archive at ``archive``.

    ``.tar.gz``/``.tgz`` names give a gzip archive, ``.tar`` an uncompressed one. The bytes depend only
    on the package's files: members sorted, times, owners and the gzip header fixed. The archive is written
    to a hidden file and renamed into place.
    """
    root, target = Path(package), Path(archive).absolute()
    manifest = read_manifest(root)
    verify_files(root, manifest)
    if target.resolve() == root.resolve() or root.resolve() in target.resolve().parents:
        raise PackageError("is inside the package it would hold", path=target, fix="write the archive elsewhere")
    compress = _compression_for(target)
    if target.exists() and not force:
        raise OutputExistsError("already exists", path=target, fix="choose another name or pass --force to replace it")
    names = [MANIFEST] + [entry["path"] for entry in manifest["files"]]
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb") as raw:
            stream: Any = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if compress else raw
            with tarfile.open(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for name in sorted(names):
                    _add_file(tar, root / name, name)
            if compress:
                stream.close()
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target


def unpack_package(
    archive: str | os.PathLike[str], dest: str | os.PathLike[str], *, force: bool = False
) -> dict[str, Any]:
    """Extract a package archive into ``dest`` after checking every member; returns the package's manifest.

    Raises ``PackageError`` naming the archive and the member for anything unsafe or that does not match
    the manifest; ``dest`` is then left as it was.
    """
    source, out = Path(archive), Path(dest)
    if not source.is_file():
        raise PackageError("is not a file", path=source, fix="pass an archive made by `edgekit pack`")
    if out.absolute() == source.absolute():
        raise OutputExistsError("is the archive itself", path=out, fix="unpack into a folder")
    if out.exists() and not force:
        raise OutputExistsError("already exists", path=out, fix="choose another folder or pass --force to replace it")
    if not hasattr(tarfile, "data_filter"):  # Python 3.10.12+, 3.11.4+
        raise PackageError(
            "this Python's tarfile has no extraction filters", path=source, fix="use Python 3.10.12, 3.11.4 or newer"
        )
    with _open_archive(source) as tar:
        members = _checked_members(source, tar, out)
        with staged_output(out, force=force) as staging:
            try:
                tar.extractall(staging, members=members, filter="data")
            except PackageError:
                raise
            except Exception as exc:  # data cut short, a corrupt compressed stream
                raise _unreadable(source, exc) from None
            try:
                manifest = read_manifest(staging)
                verify_files(staging, manifest)
            except PackageError as exc:
                member = _member_of(exc.path, staging)
                raise PackageError(
                    f"member '{member}': {exc.problem}" if member else exc.problem, path=source, fix=_FIX_ARCHIVE
                ) from None
    return manifest


def _add_file(tar: tarfile.TarFile, path: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    with path.open("rb") as handle:
        tar.addfile(info, handle)


def _compression_for(target: Path) -> bool:
    name = target.name.lower()
    if name.endswith((".tar.gz", ".tgz")):
        return True
    if name.endswith(".tar"):
        return False
    raise PackageError("is not a .tar.gz, .tgz or .tar name", path=target, fix="name the archive PACKAGE.tar.gz")


class _BoundedStream(io.RawIOBase):
    """A decompressed stream that refuses any single read over ``MAX_HEADER_READ`` and any position past
    ``MAX_TOTAL_BYTES`` plus the headers, so a small archive cannot make tarfile allocate without limit."""

    def __init__(self, inner: IO[bytes], path: Path) -> None:
        self.inner, self.path = inner, path

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0 or size > MAX_HEADER_READ:
            raise PackageError(
                f"holds a header or member that needs a {size}-byte read; the limit is {MAX_HEADER_READ}",
                path=self.path,
                fix=_FIX_ARCHIVE,
            )
        data = self.inner.read(size)
        if self.inner.tell() > MAX_TOTAL_BYTES + MAX_MEMBERS * 3 * 512:
            raise PackageError(f"expands to more than {MAX_TOTAL_BYTES} bytes", path=self.path, fix=_FIX_ARCHIVE)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.inner.seek(offset, whence)

    def tell(self) -> int:
        return self.inner.tell()

    def close(self) -> None:
        self.inner.close()
        super().close()


def _open_archive(path: Path) -> tarfile.TarFile:
    with path.open("rb") as handle:
        magic = handle.read(6)
    kind = next((name for prefix, name in _COMPRESSED.items() if magic.startswith(prefix)), None)
    inner = _decompressed(path, kind)
    stream = _BoundedStream(inner, path)
    try:
        return tarfile.open(fileobj=stream, mode="r:")
    except PackageError:
        stream.close()
        raise
    except Exception as exc:
        stream.close()
        raise _unreadable(path, exc) from None


def _decompressed(path: Path, kind: str | None) -> Any:
    """The archive's tar stream; the caller closes it."""
    if kind == "gz":
        return gzip.GzipFile(path, "rb")
    if kind == "bz2":
        import bz2

        return bz2.BZ2File(path, "rb")
    if kind == "xz":
        import lzma

        return lzma.LZMAFile(path, "rb")
    return path.open("rb")


def _iter_members(path: Path, tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's members, read one header at a time, with read errors made ``PackageError``."""
    while True:
        try:
            member = tar.next()
        except PackageError:
            raise
        except Exception as exc:
            raise _unreadable(path, exc) from None
        if member is None:
            return
        yield member


def _checked_members(path: Path, tar: tarfile.TarFile, out: Path) -> list[tarfile.TarInfo]:
    """Every member, after checking names, types, duplicates, counts and sizes; refuses naming the member."""
    members: list[tarfile.TarInfo] = []
    seen: dict[str, str] = {}  # case-folded name -> name
    files: set[str] = set()
    total = 0
    for member in _iter_members(path, tar):
        if len(members) >= MAX_MEMBERS:
            raise PackageError(f"holds more than {MAX_MEMBERS} members", path=path, fix=_FIX_ARCHIVE)
        name = _checked_name(path, member)
        if not (member.isfile() or member.isdir()) or member.issparse():
            raise _refuse(path, member.name, f"is a {_kind(member)}; package archives hold plain files only")
        folded = name.casefold()
        if folded in seen:
            raise _refuse(path, member.name, "appears twice in the archive (names are compared ignoring case)")
        seen[folded] = name
        if member.isfile():
            files.add(folded)
            total += member.size
            if total > MAX_TOTAL_BYTES:
                raise _refuse(path, member.name, f"brings the archive past {MAX_TOTAL_BYTES} bytes")
        members.append(member)
    for folded, name in seen.items():
        parents = [p.as_posix() for p in PurePosixPath(folded).parents][:-1]
        clash = next((p for p in parents if p in files), None)
        if clash is not None:
            raise _refuse(path, name, f"is inside '{seen[clash]}', which is a file")
    if MANIFEST not in files:
        raise PackageError(f"holds no {MANIFEST}", path=path, fix=_FIX_ARCHIVE)
    if total > _free_bytes(out):
        raise PackageError(f"needs {total} bytes but the disk has less free", path=path, fix="free some space")
    return members


def _checked_name(path: Path, member: tarfile.TarInfo) -> str:
    name = member.name
    if not name or any(character in _FORBIDDEN_CHARACTERS for character in name):
        raise _refuse(path, name, "has an empty name, a backslash, a colon or a control character")
    if name.startswith("/"):
        raise _refuse(path, name, "is an absolute path")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise _refuse(path, name, "climbs out of the package with '..'")
    normalized = "/".join(part for part in parts if part != ".")
    if not normalized:
        raise _refuse(path, name, "names the archive's root")
    return normalized


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"symbolic link to '{member.linkname}'"
    if member.islnk():
        return f"hard link to '{member.linkname}'"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    if member.issparse():
        return "sparse file"
    return f"member of tar type {member.type!r}"


def _refuse(path: Path, member: str, problem: str) -> PackageError:
    shown = "".join(c if c not in _FORBIDDEN_CHARACTERS or c in "\\:" else f"\\x{ord(c):02x}" for c in member)
    return PackageError(f"member '{shown}' {problem}", path=path, fix=_FIX_ARCHIVE)


def _unreadable(path: Path, exc: BaseException) -> PackageError:
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return PackageError(f"is not a readable tar archive ({type(exc).__name__}: {detail})", path=path, fix=_FIX_ARCHIVE)


def _member_of(path: str | None, staging: Path) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).relative_to(staging).as_posix()
    except ValueError:
        return path


def _free_bytes(out: Path) -> int:
    try:
        return shutil.disk_usage(out.absolute().parent).free
    except OSError:
        return MAX_TOTAL_BYTES
