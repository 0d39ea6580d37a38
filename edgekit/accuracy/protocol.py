"""What an evaluation scored (the protocol), what a reference must offer the scoring loop, and its cache file.

Shared by the fp32 ONNX reference (``evaluate.py``) and the streamed PyTorch reference
(``streamed_reference.py``), so neither imports the other.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

EVAL_DIR = "eval"
Progress = Callable[[str], None]
_CACHE_VERSION = 1


@dataclass(frozen=True)
class EvalProtocol:
    """What was scored: the text, its token count, the windows and the scored positions."""

    text_name: str
    text_sha256: str
    text_tokens: int
    ctx: int
    windows: int
    bos: bool = False
    """Each window starts with BOS (the model's tokenizer adds one), in place of its first token."""

    @property
    def scored_per_window(self) -> int:
        """Positions scored in each window (the second half, less the last position)."""
        return self.ctx - 1 - self.ctx // 2

    def as_dict(self) -> dict[str, Any]:
        """The protocol as report data."""
        return {
            "text": self.text_name,
            "text_sha256": self.text_sha256,
            "text_tokens": self.text_tokens,
            "ctx": self.ctx,
            "windows": self.windows,
            "bos": self.bos,
            "scored_positions": f"{self.ctx // 2}..{self.ctx - 2} of each window",
            "tokens_scored": self.windows * self.scored_per_window,
        }


class ReferenceSource(Protocol):
    """What the scoring loop needs of a reference: log-probabilities per window, computed once, cached."""

    cache_hit: bool
    cacheable: bool

    def compute(self, progress: Progress) -> None:
        """Run the reference over every window (nothing to do on a cache hit)."""

    def logprobs(self, index: int) -> np.ndarray:
        """Log-probabilities [scored, vocab] of window ``index``."""

    def save(self, eval_dir: Path) -> None:
        """Write the cache file."""

    def describe(self) -> dict[str, Any]:
        """What the reference is, for the report."""


def reference_cache_path(root: Path, key_material: dict[str, Any]) -> Path:
    """The reference cache file of ``root`` for this key (protocol and reference identity)."""
    key = hashlib.sha256(json.dumps({"cache": _CACHE_VERSION, **key_material}, sort_keys=True).encode()).hexdigest()
    return root / EVAL_DIR / f"reference-{key[:16]}.npz"


_MAX_HIDDEN = 1 << 16  # widest hidden state a cache may declare


def read_cached_hidden(path: Path, windows: int, scored: int) -> np.ndarray | None:
    """The cached hidden states [windows, scored, hidden], or None when there is no usable cache file.

    The file is in the package, so it is read like any file from a stranger: its one array's header is
    checked (float32, ``windows`` x ``scored`` x at most ``_MAX_HIDDEN``, the stored size matching) before a
    byte of data is inflated; anything else is no cache, and the reference is run again.
    """
    import zipfile

    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.namelist() != ["hidden.npy"]:
                return None
            member = archive.getinfo("hidden.npy")
            with archive.open(member) as stream:
                version = np.lib.format.read_magic(stream)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(stream)
            width = shape[2] if len(shape) == 3 else 0
            expected = windows * scored * width * 4
            if dtype != np.float32 or shape[:2] != (windows, scored) or not 0 < width <= _MAX_HIDDEN:
                return None
            if not expected <= member.file_size <= expected + 4096:  # the data and the .npy header
                return None
            with archive.open(member) as stream:
                return np.asarray(np.lib.format.read_array(stream, allow_pickle=False), dtype=np.float32)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError):
        return None  # a compression method or encryption flag zipfile cannot read, too


def write_cached_hidden(path: Path, hidden: np.ndarray) -> None:
    """Write the cache file, replacing caches of other texts, protocols or references."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob("reference-*.npz"):
        stale.unlink()
    np.savez(path, hidden=hidden)
