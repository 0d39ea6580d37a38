"""The package on disk: its manifest, file hashes, verification, and atomic creation.

Layout::

    OUT/manifest.json          what was built, from what, with which tools; every file's size and sha256
    OUT/build.log              the builder's console output
    OUT/<variant>/             one onnxruntime-genai model folder per variant (genai_config.json, ...)

A package is built in a hidden sibling folder and renamed into place, so OUT is either absent, the old
complete package, or the new complete package.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    StringConstraints,
    ValidationError,
)

from edgekit.errors import EdgekitError, PackageError
from edgekit.safe_io import PLAIN_NAME, open_regular, strict_json_loads, write_text_atomic

MANIFEST = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KB
_PARTIAL = ".partial-"


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


def variant_fingerprint(manifest: dict[str, Any], variant: str) -> str:
    """sha256 of one variant's manifest entry and its files' sizes and hashes: what identifies the model that
    runs, unchanged by what evaluation or another variant writes into the manifest."""
    entry = manifest["variants"][variant]
    prefix = entry["path"].rstrip("/") + "/"
    files = sorted((f["path"], f["size"], f["sha256"]) for f in manifest["files"] if f["path"].startswith(prefix))
    return hashlib.sha256(json.dumps([entry, files], sort_keys=True).encode("utf-8")).hexdigest()


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` (with the file list computed now) into ``root``, atomically."""
    body = {key: value for key, value in manifest.items() if key not in ("schema_version", "files")}
    manifest = {"schema_version": MANIFEST_SCHEMA_VERSION, **body, "files": file_entries(root)}
    path = root / MANIFEST
    write_text_atomic(path, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
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
        manifest = strict_json_loads(data)
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


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


Number = StrictInt | StrictFloat
Name = Annotated[StrictStr, StringConstraints(pattern=PLAIN_NAME)]  # variant and target names


class _Source(_Open):
    kind: StrictStr
    location: StrictStr


class _Variant(_Open):
    path: StrictStr
    precision: StrictStr | None = None
    method: StrictStr | None = None
    provider: StrictStr | None = None
    block_size: StrictInt | None = None
    accuracy_level: StrictInt | None = None
    lm_head: StrictStr | None = None
    bytes: StrictInt | None = None


class _Validation(_Open):
    variant: StrictStr | None = None
    skipped: StrictStr | None = None
    max_abs_diff: Number | None = None
    max_rel_diff: Number | None = None
    noise: Number | None = None
    tolerance: Number | None = None
    top1_agreement: Number | None = None
    tokens: StrictInt | None = None
    prompts: list[dict[str, Any]] | None = None


class _File(_Open):
    path: Annotated[StrictStr, StringConstraints(max_length=1024)]  # real ones are a folder and a file name
    size: Annotated[StrictInt, Field(ge=0)]
    sha256: Annotated[StrictStr, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class _TargetEntry(_Open):
    variant: Name
    providers: list[Any] = []


class _Step(_Open):
    name: StrictStr
    seconds: Number
    peak_rss_mb: Number


class _Tokenizer(_Open):
    add_bos_token: StrictBool | None = None
    bos_token_id: StrictInt | None = None
    chat_template: StrictBool | None = None


class _Shape(_Open):
    """The types of the manifest fields edgekit reads and prints (a hostile manifest gets no further)."""

    files: list[_File] = []
    default_variant: Name | None = None
    targets: dict[Name, _TargetEntry] = {}
    edgekit_version: StrictStr | None = None
    source: _Source = _Source(kind="", location="")
    architecture: StrictStr | None = None
    parameter_count: StrictInt | None = None
    target: Name | None = None
    variants: dict[Name, _Variant] = {}
    tokenizer: _Tokenizer = _Tokenizer()
    validation: _Validation = _Validation()
    tools: dict[str, StrictStr | None] = {}
    build_steps: list[_Step] = []
    evaluation: dict[str, Any] = {}


def _check_structure(manifest: dict[str, Any], path: str | Path) -> None:
    """Refuse a manifest whose files, variants, targets or other fields edgekit reads have the wrong shape
    (``_Shape``), so later code can trust it."""
    try:
        _Shape.model_validate(manifest)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PackageError(
            f"has a malformed '{where}' ({first['msg']})", path=path, fix="rebuild the package"
        ) from None
