"""The package on disk: its manifest, file hashes, verification, and atomic creation.

Layout::

    OUT/manifest.json          what was built, from what, with which tools; every file's size and sha256
    OUT/build.log              the builder's console output
    OUT/<variant>/             one onnxruntime-genai model folder per variant (genai_config.json, ...)

A package is built in a hidden sibling folder and renamed into place, so OUT is either absent, the old
complete package, or the new complete package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekit.errors import OutputExistsError, PackageError

MANIFEST = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
_PARTIAL = ".partial-"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(root: Path) -> list[dict[str, Any]]:
    """Every file under ``root`` except the manifest, sorted, with relative path, size and sha256."""
    entries = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() or p.is_symlink()):
        relative = path.relative_to(root).as_posix()
        if relative == MANIFEST:
            continue
        if path.is_symlink():
            raise PackageError("is a symbolic link; packages hold plain files only", path=path)
        entries.append({"path": relative, "size": path.stat().st_size, "sha256": sha256_file(path)})
    return entries


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (with the file list computed now) into ``root``, atomically."""
    body = {key: value for key, value in manifest.items() if key not in ("schema_version", "files")}
    manifest = {"schema_version": MANIFEST_SCHEMA_VERSION, **body, "files": file_entries(root)}
    path = root / MANIFEST
    partial = root / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path


def read_manifest(root: str | Path) -> dict[str, Any]:
    """Read a package's manifest, with errors that name the file and the fix."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        raise PackageError("is not a package folder", path=root, fix="pass the OUT folder of `edgekit build`")
    if not path.is_file():
        raise PackageError("has no manifest.json", path=root, fix="rebuild it with `edgekit build`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackageError(f"is not valid JSON ({exc})", path=path, fix="rebuild the package") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise PackageError(
            f"has schema_version {manifest.get('schema_version') if isinstance(manifest, dict) else None!r}, "
            f"this edgekit reads {MANIFEST_SCHEMA_VERSION}",
            path=path,
            fix="rebuild the package with this edgekit",
        )
    return manifest


def verify_files(root: Path, manifest: dict[str, Any], subfolder: str | None = None) -> None:
    """Check the package's files against the manifest: nothing missing, extra, linked, resized or altered.

    With ``subfolder`` (a variant's folder) only the files under it are checked.
    """
    listed = {}
    for entry in manifest.get("files", []):
        relative = entry["path"]
        if relative.startswith("/") or ".." in Path(relative).parts:
            raise PackageError("the manifest lists a path outside the package", path=relative)
        if subfolder is None or relative.startswith(f"{subfolder}/"):
            listed[relative] = entry
    present = set()
    for path in (root if subfolder is None else root / subfolder).rglob("*"):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise PackageError("is a symbolic link; packages hold plain files only", path=path)
        if path.is_file() and path.stat().st_nlink > 1:
            raise PackageError("is a hard link; packages hold plain files only", path=path)
        if path.is_file() and relative != MANIFEST:
            present.add(relative)
    extra = sorted(present - set(listed))
    if extra:
        raise PackageError("is not listed in the manifest", path=root / extra[0], fix="rebuild the package")
    for relative, entry in sorted(listed.items()):
        path = root / relative
        if relative not in present:
            raise PackageError("is listed in the manifest but missing", path=path, fix="rebuild the package")
        size = path.stat().st_size
        if size != entry["size"]:
            raise PackageError(f"is {size} bytes, the manifest says {entry['size']}", path=path)
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise PackageError(f"has sha256 {digest}, the manifest says {entry['sha256']}", path=path)


def variant_dir(root: str | Path, manifest: dict[str, Any], variant: str | None) -> tuple[str, Path]:
    """Resolve a variant name (``None``: the one the package's target deploys) to its folder."""
    variants = manifest.get("variants", {})
    name = variant or manifest.get("default_variant") or next(iter(variants), "")
    if not isinstance(name, str) or name not in variants:
        known = ", ".join(variants) or "none"
        raise PackageError(f"has no variant '{name}'", path=root, fix=f"use one of: {known}")
    return name, Path(root) / variants[name]["path"]


@contextlib.contextmanager
def staged_output(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a private folder next to ``out``; on success it replaces ``out`` in one rename.

    On any exception (Ctrl-C included) the private folder is removed and ``out`` is left as it was.
    Leftovers of builds that were killed outright are removed first.
    """
    out = out.absolute()
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


def remove_stale_partials(out: Path) -> None:
    """Delete partial build folders for ``out`` whose owning process no longer runs."""
    prefix = f".{out.name}{_PARTIAL}"
    for candidate in out.parent.glob(f"{prefix}*"):
        pid_text = candidate.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
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
