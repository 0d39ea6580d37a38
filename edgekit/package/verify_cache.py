"""Remember which package files were verified, so a second load skips hashing unchanged files.

The verdict is keyed by the manifest's sha256 and each file's size and modification time, and kept in
the user's cache folder (``$XDG_CACHE_HOME/edgekit/verified.json``), never inside the package. A changed,
added or removed file, or another manifest, means the files are hashed again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from edgekit.package.manifest import MANIFEST
from edgekit.package.verify import verify_files
from edgekit.safe_io import user_cache_path, write_text_atomic

# Raised whenever verification learns a new rule, so verdicts cached under older rules are not trusted.
POLICY_VERSION = 2


def verdict_store_path() -> Path:
    """Where verdicts are stored: the user's cache folder (``$XDG_CACHE_HOME/edgekit`` on Linux)."""
    return user_cache_path("verified.json")


def _fingerprint(root: Path, subfolder: str) -> dict[str, Any]:
    files = {}
    for path in sorted((root / subfolder).rglob("*")):
        if path.is_file() or path.is_symlink():
            stat = path.lstat()
            files[path.relative_to(root).as_posix()] = [stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_nlink]
    manifest_hash = hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()
    return {"policy": POLICY_VERSION, "manifest": manifest_hash, "files": files}


def verify_variant(root: Path, manifest: dict[str, Any], subfolder: str) -> bool:
    """Verify a variant's files against the manifest unless an identical verdict is cached.

    Returns True when the cached verdict was used. Raises ``PackageError`` like ``verify_files``.
    """
    key = f"{root.resolve()}::{subfolder}"
    store = verdict_store_path()
    fingerprint = _fingerprint(root, subfolder)
    try:
        cached = json.loads(store.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    if isinstance(cached, dict) and cached.get(key) == fingerprint:
        return True
    verify_files(root, manifest, subfolder)
    cached = cached if isinstance(cached, dict) else {}
    cached[key] = fingerprint
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(store, json.dumps(cached))
    except OSError:
        pass  # a read-only home only costs the next load a re-hash
    return False
