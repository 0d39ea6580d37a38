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

from edgekit.errors import EdgekitError, OutputExistsError, PackageError
from edgekit.package_contents import check_contents
from edgekit.safe_io import open_regular

MANIFEST = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KB
_PARTIAL = ".partial-"
_HEX = frozenset("0123456789abcdef")


def sha256_file(path: Path, error: type[EdgekitError] = PackageError) -> str:
    """Hex sha256 of a regular file (a FIFO or device is ``error``, never read)."""
    with open_regular(path, error) as handle:
        if hasattr(hashlib, "file_digest"):  # Python 3.11+
            return hashlib.file_digest(handle, "sha256").hexdigest()
        digest = hashlib.sha256()
        while block := handle.read(1 << 20):
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
    if not path.is_file() or path.is_symlink():
        raise PackageError("has no manifest.json", path=root, fix="rebuild it with `edgekit build`")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise PackageError(f"is larger than {MAX_MANIFEST_BYTES} bytes", path=path, fix="rebuild the package")
    return parse_manifest(path.read_bytes(), path)


def parse_manifest(data: bytes, path: str | Path) -> dict[str, Any]:
    """Parse and structurally check a manifest's bytes; ``path`` names it in errors."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise PackageError(f"is larger than {MAX_MANIFEST_BYTES} bytes", path=path, fix="rebuild the package")
    try:
        manifest = json.loads(data)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4,300 digits
        raise PackageError(f"is not valid JSON ({exc})", path=path, fix="rebuild the package") from None
    except RecursionError:
        raise PackageError("is nested too deeply to be a manifest", path=path, fix="rebuild the package") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise PackageError(
            f"has schema_version {manifest.get('schema_version') if isinstance(manifest, dict) else None!r}, "
            f"this edgekit reads {MANIFEST_SCHEMA_VERSION}",
            path=path,
            fix="rebuild the package with this edgekit",
        )
    _check_structure(manifest, path)
    return manifest


def _check_structure(manifest: dict[str, Any], path: str | Path) -> None:
    """Refuse a manifest whose file list or variant table has the wrong shape, so later code can trust it."""
    files, variants = manifest.get("files", []), manifest.get("variants", {})
    if not isinstance(files, list) or not isinstance(variants, dict):
        raise PackageError("has a 'files' that is not a list or 'variants' that is not a mapping", path=path)
    for entry in files:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("path"), str)
            or type(entry.get("size")) is not int
            or entry["size"] < 0
            or not isinstance(entry.get("sha256"), str)
            or len(entry["sha256"]) != 64
            or not set(entry["sha256"]) <= _HEX
        ):
            raise PackageError(f"has a malformed file entry {str(entry)[:200]}", path=path, fix="rebuild the package")
    for name, variant in variants.items():
        if not isinstance(variant, dict) or not isinstance(variant.get("path"), str):
            raise PackageError(f"has a malformed entry for variant '{name}'", path=path, fix="rebuild the package")
    for key in ("default_variant",):
        if manifest.get(key) is not None and not isinstance(manifest[key], str):
            raise PackageError(f"has a '{key}' that is not a string", path=path, fix="rebuild the package")
    targets = manifest.get("targets", {})
    if not isinstance(targets, dict) or not all(
        isinstance(t, dict) and isinstance(t.get("variant"), str) and isinstance(t.get("providers", []), list)
        for t in targets.values()
    ):
        raise PackageError("has a malformed 'targets' table", path=path, fix="rebuild the package")


def verify_files(root: Path, manifest: dict[str, Any], subfolder: str | None = None, *, hashes: bool = True) -> None:
    """Check the package's files against the manifest: nothing missing, extra, linked, resized or altered,
    and no path that a config or ONNX file names leading out of the package (``references``).

    With ``subfolder`` (a variant's folder) only the files under it are checked. Every size is compared
    before any file is hashed; ``hashes=False`` skips the hashing (``edgekit.load(verify=False)``).
    """
    all_listed: dict[str, dict[str, Any]] = {}
    for entry in manifest.get("files", []):
        relative = entry["path"]
        if not _is_inside(relative):
            raise PackageError("the manifest lists a path outside the package", path=relative)
        if relative in all_listed:
            raise PackageError("is listed twice in the manifest", path=root / relative, fix="rebuild the package")
        all_listed[relative] = entry
    check_contents(list(all_listed), str(root))
    if subfolder is not None and (not _is_inside(subfolder) or "/" in subfolder.strip("/")):
        raise PackageError(f"names the variant folder '{subfolder}', which is not a folder of the package", path=root)
    listed = {r: e for r, e in all_listed.items() if subfolder is None or r.startswith(f"{subfolder}/")}
    folder = root if subfolder is None else root / subfolder
    if folder.is_symlink():
        raise PackageError("is a symbolic link; packages hold plain files only", path=folder)
    present = set()
    for path in folder.rglob("*"):
        relative = path.relative_to(root).as_posix()
        if path.is_symlink():
            raise PackageError("is a symbolic link; packages hold plain files only", path=path)
        if path.is_file() and path.stat().st_nlink > 1:
            raise PackageError("is a hard link; packages hold plain files only", path=path)
        if not path.is_file() and not path.is_dir():
            raise PackageError("is a FIFO, socket or device; packages hold plain files only", path=path)
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
    for relative, entry in sorted(listed.items()) if hashes else ():
        path = root / relative
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise PackageError(f"has sha256 {digest}, the manifest says {entry['sha256']}", path=path)
    from edgekit.references import check_references

    check_references(root, {r: e["size"] for r, e in all_listed.items()}, subfolder)


def _is_inside(relative: str) -> bool:
    """Whether a manifest path is relative, portable and free of ``..``."""
    return (
        bool(relative)
        and not (relative.startswith("/") or "\\" in relative or "\0" in relative or ":" in relative)
        and ".." not in Path(relative).parts
    )


def variant_dir(root: str | Path, manifest: dict[str, Any], variant: str | None) -> tuple[str, Path]:
    """Resolve a variant name (``None``: the one the package's target deploys) to its folder."""
    variants = manifest.get("variants", {})
    name = variant or manifest.get("default_variant") or next(iter(variants), "")
    if not isinstance(name, str) or name not in variants:
        known = ", ".join(variants) or "none"
        raise PackageError(f"has no variant '{name}'", path=root, fix=f"use one of: {known}")
    folder = variants[name]["path"]
    if not _is_inside(folder) or "/" in folder.strip("/") or folder in (".", ""):
        raise PackageError(
            f"the manifest puts variant '{name}' in '{folder}', which is not a folder of the package",
            path=Path(root) / MANIFEST,
            fix="rebuild the package",
        )
    return name, Path(root) / folder


@contextlib.contextmanager
def staged_output(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a private folder next to ``out``; on success it replaces ``out`` in one rename.

    On any exception (Ctrl-C included) the private folder is removed and ``out`` is left as it was.
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
    for candidate in sorted(out.parent.glob(f"{prefix}*-old")):
        pid_text = candidate.name[len(prefix) : -len("-old")]
        if pid_text.isdigit() and not _process_alive(int(pid_text)) and (candidate / MANIFEST).is_file():
            candidate.rename(out)
            return


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
