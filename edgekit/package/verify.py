"""Checking a package's files against its manifest, and resolving a variant to its folder.

Nothing is missing, extra, linked, resized or altered, every file is one edgekit writes, and no path a
config or ONNX file names leads out of the package (``references.py``). Every size is compared before
any file is hashed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.errors import PackageError
from edgekit.package.contents import check_contents
from edgekit.package.manifest import MANIFEST, sha256_file

_CHANGED_FIX = "the file changed after the package was made: build it again, or unpack it again from its archive"


def verify_files(root: Path, manifest: dict[str, Any], subfolder: str | None = None, *, hashes: bool = True) -> None:
    """Check the package's files against the manifest: nothing missing, extra, linked, resized or altered,
    and no path that a config or ONNX file names leading out of the package (``references``).

    With ``subfolder`` (a variant's folder) only the files under it are checked. Every size is compared
    before any file is hashed; ``hashes=False`` skips the hashing (``edgekit.load(verify=False)``).
    """
    all_listed: dict[str, dict[str, Any]] = {}
    for entry in manifest.get("files", []):
        relative = entry["path"]
        if not is_inside(relative):
            raise PackageError("the manifest lists a path outside the package", path=relative)
        if relative in all_listed:
            raise PackageError("is listed twice in the manifest", path=root / relative, fix="rebuild the package")
        all_listed[relative] = entry
    check_contents(list(all_listed), str(root))
    if subfolder is not None and (not is_inside(subfolder) or "/" in subfolder.strip("/")):
        raise PackageError(f"names the variant folder '{subfolder}', which is not a folder of the package", path=root)
    listed = {r: e for r, e in all_listed.items() if subfolder is None or r.startswith(f"{subfolder}/")}
    folder = root if subfolder is None else root / subfolder
    if folder.is_symlink():
        raise PackageError("is a symbolic link; packages hold plain files only", path=folder)
    try:
        present = _present_files(root, folder)
    except OSError as exc:  # a name too long for this system, a folder that cannot be listed
        raise PackageError(f"cannot be read ({exc.strerror or exc})", path=folder, fix="rebuild the package") from None
    extra = sorted(present - set(listed))
    if extra:
        raise PackageError("is not listed in the manifest", path=root / extra[0], fix="rebuild the package")
    for relative, entry in sorted(listed.items()):
        path = root / relative
        if relative not in present:
            raise PackageError("is listed in the manifest but missing", path=path, fix="rebuild the package")
        size = path.stat().st_size
        if size != entry["size"]:
            raise PackageError(f"is {size} bytes, the manifest says {entry['size']}", path=path, fix=_CHANGED_FIX)
    for relative, entry in sorted(listed.items()) if hashes else ():
        path = root / relative
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise PackageError(f"has sha256 {digest}, the manifest says {entry['sha256']}", path=path, fix=_CHANGED_FIX)
    from edgekit.package.references import check_references

    check_references(root, {r: e["size"] for r, e in all_listed.items()}, subfolder)


def _present_files(root: Path, folder: Path) -> set[str]:
    """The plain files under ``folder`` (relative to ``root``); a link, hard link or special file is refused."""
    present: set[str] = set()
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
    return present


def is_inside(relative: str) -> bool:
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
    if not is_inside(folder) or "/" in folder.strip("/") or folder in (".", ""):
        raise PackageError(
            f"the manifest puts variant '{name}' in '{folder}', which is not a folder of the package",
            path=Path(root) / MANIFEST,
            fix="rebuild the package",
        )
    return name, Path(root) / folder
