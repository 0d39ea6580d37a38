"""Packages as single files: ``pack_package`` writes a reproducible tar archive of a verified package, and
``unpack_package`` reads one without trusting it.

The format: ``manifest.json`` is the first member, then every file the manifest lists, once each, sorted.
Putting the manifest first lets the reader know every legitimate member's name and size before it has
decompressed anything else, so each later header is held to the manifest as soon as it is read.

Unpacking reads the manifest (at most 16 MiB) and then every other member header before anything is
extracted, and refuses, naming the member: a first member other than ``manifest.json``; names that are
absolute, hold ``..``, backslashes, colons or control characters; links, devices and FIFOs; duplicate
names (case-insensitively, for the file systems that fold case); a file that is also a folder; a file the
manifest does not list or whose size differs from the manifest's; a folder that holds no listed file; a
listed file the archive lacks; too many members, or more bytes than the limit or the disk's free space.
It then extracts with ``tarfile``'s ``data`` filter into a hidden folder next to the destination,
verifies the manifest there (hashes, links, the paths configs name), and renames the folder into place:
the destination is either the complete package or left as it was.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from edgekit.errors import OutputExistsError, PackageError
from edgekit.interrupts import raise_if_interrupted
from edgekit.package.archive_headers import FIX_ARCHIVE, HeaderChecks, checked_name, refuse_member
from edgekit.package.manifest import MANIFEST, MAX_MANIFEST_BYTES, parse_manifest, read_manifest
from edgekit.package.staging import staged_output
from edgekit.package.verify import verify_files

MAX_MEMBERS = 10_000
MAX_TOTAL_BYTES = 1 << 40  # 1 TiB of declared file data
MAX_HEADER_READ = 16 << 20  # the longest single read tarfile may make (a pax or long-name header)
# gzip's fastest level: quantized weights compress by the same few percent at every level, and level 9 is
# several times slower on the float weights that do compress.
DEFAULT_COMPRESS_LEVEL = 1
_COPY_CHUNK = 1 << 20  # tarfile's copy buffer when packing: 1 MiB reads, one progress call each
_COMPRESSED = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
_FIX_ORDER = "repack it with `edgekit pack`, which writes manifest.json first"

Progress = Callable[[int, int], None]
"""A pack progress callback: (bytes hashed and written so far, bytes in all)."""


@dataclasses.dataclass(frozen=True)
class PackedArchive:
    """What ``pack_package`` wrote: the archive's path, and the sha256 and size of its bytes.

    It is a path-like (``os.fspath`` gives ``path``), so it can be passed wherever a path is expected.
    """

    path: Path
    sha256: str
    size: int

    def __fspath__(self) -> str:
        return os.fspath(self.path)


def pack_package(
    package: str | os.PathLike[str],
    archive: str | os.PathLike[str],
    *,
    force: bool = False,
    progress: Progress | None = None,
    compress_level: int = DEFAULT_COMPRESS_LEVEL,
) -> PackedArchive:
    """Write ``package``, verified against its manifest, as a tar archive at ``archive``.

    ``.tar.gz``/``.tgz`` names give a gzip archive (``compress_level`` 1-9, gzip's trade of time for
    size), ``.tar`` an uncompressed one. ``manifest.json`` comes
    first, then the listed files, sorted; the bytes depend only on the package's files (times, owners and
    the gzip header fixed). Each file's sha256 is checked against the manifest as it is copied in, so what
    the archive holds is what was verified. ``progress(done, total)`` is called as bytes are hashed and
    written. The archive goes to a hidden file renamed into place; the result gives its sha256 and size.
    """
    root, target = Path(package), Path(archive).absolute()
    if not 1 <= compress_level <= 9:
        raise ValueError(f"compress_level must be 1 to 9, not {compress_level}")
    _check_target(root, target, force=force)
    manifest_bytes = _manifest_bytes(root)
    manifest = parse_manifest(manifest_bytes, root / MANIFEST)
    # Sizes, links and the paths configs name; the hashes are checked below, on the bytes being written.
    verify_files(root, manifest, hashes=False)
    entries = sorted(manifest.get("files", []), key=lambda entry: entry["path"])
    tally = _Tally(len(manifest_bytes) + sum(entry["size"] for entry in entries), progress)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        with partial.open("wb") as raw:
            sink = _HashingWriter(raw)
            level = compress_level if _compression_for(target) else None
            _write_archive(sink, root, manifest_bytes, entries, tally, level=level)
        raise_if_interrupted()  # a Ctrl-C a library swallowed must not let the archive land
        os.replace(partial, target)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _pack_error(exc, target, partial) from None
        raise
    return PackedArchive(target, sink.digest.hexdigest(), sink.size)


def _check_target(root: Path, target: Path, *, force: bool) -> None:
    """Refuse an archive path inside the package, with an unknown suffix, in no folder, or already there."""
    if target.resolve() == root.resolve() or root.resolve() in target.resolve().parents:
        raise PackageError("is inside the package it would hold", path=target, fix="write the archive elsewhere")
    _compression_for(target)
    folder = target.parent
    if not folder.is_dir():
        problem = "is not a folder" if folder.exists() else "does not exist"
        raise PackageError(
            f"{problem}, so {target.name} cannot be written there",
            path=folder,
            fix="create the folder first, or choose another path for the archive",
        )
    if target.exists() and not force:
        raise OutputExistsError("already exists", path=target, fix="choose another name or pass --force to replace it")


def _manifest_bytes(root: Path) -> bytes:
    """The manifest's bytes, read after ``read_manifest``'s checks; the caller parses exactly these and packs them."""
    read_manifest(root)
    with (root / MANIFEST).open("rb") as handle:
        return handle.read(MAX_MANIFEST_BYTES + 1)


def _write_archive(
    sink: _HashingWriter,
    root: Path,
    manifest: bytes,
    entries: list[dict[str, Any]],
    tally: _Tally,
    *,
    level: int | None,
) -> None:
    """The tar stream into ``sink``, gzip-compressed at ``level`` (``None``: a plain tar)."""
    stream: Any = (
        sink if level is None else gzip.GzipFile(filename="", mode="wb", fileobj=sink, mtime=0, compresslevel=level)
    )
    with tarfile.TarFile(fileobj=stream, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_COPY_CHUNK) as tar:
        tar.addfile(_info(MANIFEST, len(manifest)), io.BytesIO(manifest))
        tally.add(len(manifest))
        for entry in entries:
            _add_file(tar, root, entry, tally)
    if level is not None:
        stream.close()


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = 0, 0o644, 0, 0, "", ""
    return info


def _add_file(tar: tarfile.TarFile, root: Path, entry: dict[str, Any], tally: _Tally) -> None:
    """Copy one listed file into the archive, hashing it on the way; refuse it if the hash is not the manifest's."""
    path = root / entry["path"]
    with path.open("rb") as handle:
        reader = _CheckedReader(handle, path, tally)
        tar.addfile(_info(entry["path"], entry["size"]), reader)
    digest = reader.digest.hexdigest()
    if digest != entry["sha256"]:
        raise PackageError(f"has sha256 {digest}, the manifest says {entry['sha256']}", path=path)


class _Tally:
    """Bytes done out of a total, reported to an optional progress callback."""

    def __init__(self, total: int, callback: Progress | None) -> None:
        self.done, self.total, self.callback = 0, total, callback
        self.add(0)

    def add(self, count: int) -> None:
        self.done += count
        if self.callback is not None:
            self.callback(self.done, self.total)


class _CheckedReader:
    """A package file as tarfile copies it: hashed as it is read, counted, and refused if it got shorter."""

    def __init__(self, handle: IO[bytes], path: Path, tally: _Tally) -> None:
        self.handle, self.path, self.tally = handle, path, tally
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        if size >= 0 and len(data) < size:  # tarfile only asks for bytes the manifest says are there
            raise PackageError("got shorter while it was being packed", path=self.path, fix="pack it again")
        self.digest.update(data)
        self.tally.add(len(data))
        return data


class _HashingWriter:
    """The archive file as the tar (or gzip) stream writes it: sha256 and size taken from the bytes written."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.digest, self.size = raw, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()


def _pack_error(exc: OSError, target: Path, partial: Path) -> PackageError:
    """An OS error while packing as a one-line error naming the package file or the archive it concerns."""
    detail = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None and str(exc.filename) != str(partial):
        return PackageError(f"could not be read ({detail})", path=exc.filename, fix="check the package's files")
    return PackageError(f"could not be written ({detail})", path=target, fix="choose another path or free some space")


def unpack_package(
    archive: str | os.PathLike[str], dest: str | os.PathLike[str], *, force: bool = False
) -> dict[str, Any]:
    """Extract a package archive into ``dest`` after checking every member; returns the package's manifest.

    Raises ``PackageError`` naming the archive and the member for anything unsafe or that does not match
    the manifest; ``dest`` is then left as it was. Every header is checked against the manifest (the
    first member) before any file data is written.
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
            return _verified(source, staging)


def _verified(source: Path, staging: Path) -> dict[str, Any]:
    """The extracted package's manifest, after verifying its files (hashes included) in the staged folder."""
    try:
        manifest = read_manifest(staging)
        verify_files(staging, manifest)
    except PackageError as exc:
        member = _member_of(exc.path, staging)
        raise PackageError(
            f"member '{member}': {exc.problem}" if member else exc.problem, path=source, fix=FIX_ARCHIVE
        ) from None
    return manifest


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
                fix=FIX_ARCHIVE,
            )
        data = self.inner.read(size)
        if self.inner.tell() > MAX_TOTAL_BYTES + MAX_MEMBERS * 3 * 512:
            raise PackageError(f"expands to more than {MAX_TOTAL_BYTES} bytes", path=self.path, fix=FIX_ARCHIVE)
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
    """Every member, each header checked against the manifest (the first member) as it is read.

    The manifest's sizes bound the whole archive before the second header is read: a member that is not
    listed, or whose header declares another size, is refused before its data is decompressed.
    """
    headers = _iter_members(path, tar)
    first, manifest = _manifest_member(path, tar, next(headers, None))
    checks = HeaderChecks(path, manifest)
    if checks.limit > MAX_TOTAL_BYTES:
        raise refuse_member(
            path, MANIFEST, f"lists {checks.limit} bytes of files, past the {MAX_TOTAL_BYTES}-byte limit"
        )
    if checks.limit > _free_bytes(out):
        raise PackageError(f"needs {checks.limit} bytes but the disk has less free", path=path, fix="free some space")
    members = [first]
    for member in headers:
        if len(members) >= MAX_MEMBERS:
            raise PackageError(f"holds more than {MAX_MEMBERS} members", path=path, fix=FIX_ARCHIVE)
        checks.check(member)
        members.append(member)
    checks.finish()
    return members


def _manifest_member(path: Path, tar: tarfile.TarFile, first: tarfile.TarInfo | None) -> tuple[tarfile.TarInfo, Any]:
    """The first member, which must be ``manifest.json`` (a plain file within the cap), and its parsed content."""
    if first is None:
        raise PackageError(f"holds no {MANIFEST}", path=path, fix=FIX_ARCHIVE)
    if checked_name(path, first) != MANIFEST or not first.isfile() or first.issparse():
        raise refuse_member(
            path, first.name, f"comes first, but {MANIFEST} must be the archive's first member", _FIX_ORDER
        )
    if first.size > MAX_MANIFEST_BYTES:
        raise refuse_member(path, first.name, f"is {first.size} bytes; a manifest is at most {MAX_MANIFEST_BYTES}")
    try:
        handle = tar.extractfile(first)
        data = handle.read(first.size) if handle is not None else b""
    except PackageError:
        raise
    except Exception as exc:  # data cut short, a corrupt compressed stream
        raise _unreadable(path, exc) from None
    if len(data) != first.size:
        raise refuse_member(path, first.name, f"is cut short ({len(data)} of {first.size} bytes)")
    try:
        return first, parse_manifest(data, MANIFEST)
    except PackageError as exc:
        raise refuse_member(path, MANIFEST, exc.problem) from None


def _unreadable(path: Path, exc: BaseException) -> PackageError:
    detail = str(exc).splitlines()[0] if str(exc) else ""
    return PackageError(f"is not a readable tar archive ({type(exc).__name__}: {detail})", path=path, fix=FIX_ARCHIVE)


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
