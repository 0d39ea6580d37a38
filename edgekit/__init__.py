"""edgekit: ship small open LLMs to laptops and edge boxes.

``build`` turns a checkpoint into a package (ONNX variants plus a manifest); ``load`` runs a package;
``pack_package`` writes a package as one archive (returning a ``PackedArchive``: path, sha256, size) and
``unpack_package`` extracts one after checking every member against its manifest.
Importing edgekit is light: torch and transformers load only when a build needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgekit.version import __version__

if TYPE_CHECKING:
    from edgekit.package.archive import PackedArchive, pack_package, unpack_package
    from edgekit.pipeline import BuildResult, build
    from edgekit.runtimes.model import Model, load

__all__ = [
    "BuildResult",
    "Model",
    "PackedArchive",
    "__version__",
    "build",
    "load",
    "pack_package",
    "unpack_package",
]

_LAZY = {
    "build": "edgekit.pipeline",
    "BuildResult": "edgekit.pipeline",
    "load": "edgekit.runtimes.model",
    "Model": "edgekit.runtimes.model",
    "PackedArchive": "edgekit.package.archive",
    "pack_package": "edgekit.package.archive",
    "unpack_package": "edgekit.package.archive",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgekit' has no attribute {name!r}")
