"""The checks every member header of a package archive must pass before anything is extracted.

Each header after ``manifest.json`` is held to the manifest as soon as it is read: a safe name, a plain
file or a folder of a listed file, listed, with the manifest's size, once; see ``archive.py``.
"""

from __future__ import annotations

import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

from edgekit.errors import PackageError
from edgekit.package.manifest import MANIFEST

MAX_PAX_CHARACTERS = 1 << 16
FIX_ARCHIVE = "ask for the archive again, or make one with `edgekit pack`"
_FORBIDDEN_CHARACTERS = frozenset("\\:") | frozenset(chr(c) for c in range(32)) | {"\x7f"}


class HeaderChecks:
    """The checks every header after the manifest must pass, one header at a time, before anything is written."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        files = manifest.get("files", [])  # parse_manifest checked its shape, not that it is there
        self.sizes: dict[str, int] = {entry["path"]: entry["size"] for entry in files}
        # Folders a listed file is in: the only folder members an archive of this package may hold.
        self.folders = {p.as_posix() for name in self.sizes for p in PurePosixPath(name).parents} - {"."}
        self.limit = sum(entry["size"] for entry in files)
        self.seen: dict[str, str] = {MANIFEST.casefold(): MANIFEST}  # case-folded name -> name
        self.files = {MANIFEST.casefold()}  # case-folded names of file members
        self.inside: set[str] = set()  # case-folded folders that earlier members are in
        self.present: set[str] = set()
        self.total = 0

    def check(self, member: tarfile.TarInfo) -> None:
        """Refuse ``member`` (naming it) if its name, type or place is unsafe, or the manifest disagrees."""
        name = checked_name(self.path, member)
        # tarfile keeps every member's pax header: what `pack` writes (a long name, a size) is a few hundred
        # bytes, and a 16 MiB header per member would hold gigabytes for a few-megabyte archive.
        if sum(len(key) + len(value) for key, value in member.pax_headers.items()) > MAX_PAX_CHARACTERS:
            raise refuse_member(self.path, member.name, f"has a pax header of over {MAX_PAX_CHARACTERS} characters")
        if not (member.isfile() or member.isdir()) or member.issparse():
            raise refuse_member(
                self.path, member.name, f"is a {member_kind(member)}; package archives hold plain files only"
            )
        folded = name.casefold()
        if folded in self.seen:
            raise refuse_member(
                self.path, member.name, "appears twice in the archive (names are compared ignoring case)"
            )
        parents = [p.as_posix() for p in PurePosixPath(folded).parents][:-1]
        clash = next((p for p in parents if p in self.files), None)
        if clash is not None:
            raise refuse_member(self.path, member.name, f"is inside '{self.seen[clash]}', which is a file")
        if member.isfile() and folded in self.inside:
            raise refuse_member(self.path, member.name, "is a file, but earlier members are inside it")
        self.seen[folded] = name
        self.inside.update(parents)
        if member.isdir():
            if name not in self.folders:
                raise refuse_member(self.path, member.name, f"is a folder that holds no file {MANIFEST} lists")
            return
        self.files.add(folded)
        self._check_listed(member, name)

    def _check_listed(self, member: tarfile.TarInfo, name: str) -> None:
        expected = self.sizes.get(name)
        if expected is None:
            raise refuse_member(self.path, member.name, f"is not listed in the archive's {MANIFEST}")
        if member.size != expected:
            raise refuse_member(self.path, member.name, f"is {member.size} bytes, the manifest says {expected}")
        self.present.add(name)
        self.total += member.size
        # Exact sizes, each listed file once: this cannot trip today, and keeps the bound if that changes.
        if self.total > self.limit:
            raise refuse_member(
                self.path, member.name, f"brings the archive past the {self.limit} bytes the manifest lists"
            )

    def finish(self) -> None:
        """Refuse an archive that lacks a file its manifest lists (once every header has been read)."""
        missing = sorted(set(self.sizes) - self.present)
        if missing:
            raise PackageError(
                f"lacks '{missing[0]}', which its {MANIFEST} lists"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                path=self.path,
                fix=FIX_ARCHIVE,
            )


def checked_name(path: Path, member: tarfile.TarInfo) -> str:
    """The member's name, normalized; refused (naming it) when absolute, climbing out, or holding odd characters."""
    name = member.name
    if not name or any(character in _FORBIDDEN_CHARACTERS for character in name):
        raise refuse_member(path, name, "has an empty name, a backslash, a colon or a control character")
    if name.startswith("/"):
        raise refuse_member(path, name, "is an absolute path")
    parts = PurePosixPath(name).parts
    if ".." in parts:
        raise refuse_member(path, name, "climbs out of the package with '..'")
    normalized = "/".join(part for part in parts if part != ".")
    if not normalized:
        raise refuse_member(path, name, "names the archive's root")
    return normalized


def member_kind(member: tarfile.TarInfo) -> str:
    """What a member that is not a plain file or folder is, in words."""
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


def refuse_member(path: Path, member: str, problem: str, fix: str = FIX_ARCHIVE) -> PackageError:
    """The error that refuses ``member`` of the archive ``path``, control characters shown escaped."""
    shown = "".join(c if c not in _FORBIDDEN_CHARACTERS or c in "\\:" else f"\\x{ord(c):02x}" for c in member)
    return PackageError(f"member '{shown}' {problem}", path=path, fix=fix)
