"""Evaluation and calibration text: user files, or the built-in corpus, cut into token windows.

The built-in corpus is the Python reference manual every interpreter carries (``pydoc_data.topics``),
so edgekit ships no copied text. Its topics are split by a hash of their names into a calibration part
and an evaluation part that never overlap: GPTQ calibrates on the first, ``edgekit eval`` measures on
the second.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import UsageError
from edgekit.safe_io import open_regular

BUILTIN = "builtin"


@dataclass(frozen=True)
class Corpus:
    """A text and where it came from."""

    name: str
    text: str

    @property
    def sha256(self) -> str:
        """sha256 of the text as UTF-8."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def builtin_corpus(part: str) -> Corpus:
    """The ``calibration`` or ``evaluation`` part of the Python reference manual."""
    from pydoc_data.topics import topics

    if part not in ("calibration", "evaluation"):
        raise ValueError(f"part must be 'calibration' or 'evaluation', not {part!r}")
    calibration: list[str] = []
    evaluation: list[str] = []
    for name in sorted(topics):
        side = calibration if hashlib.sha256(name.encode()).digest()[0] % 2 == 0 else evaluation
        side.extend(p.strip() for p in topics[name].split("\n\n") if p.strip())
    # Many topics quote others whole (specialnames holds attribute-access, compound holds while/if/else),
    # so each paragraph is kept once, on the calibration side when both have it: nothing measured was
    # seen in calibration.
    seen: set[str] = set()
    parts: dict[str, list[str]] = {"calibration": [], "evaluation": []}
    for side_name, paragraphs in (("calibration", calibration), ("evaluation", evaluation)):
        for paragraph in paragraphs:
            if paragraph not in seen:
                seen.add(paragraph)
                parts[side_name].append(paragraph)
    return Corpus(f"{BUILTIN}:{part}", "\n\n".join(parts[part]))


MAX_TEXT_BYTES = 64 << 20
"""The largest text file read: the whole file is tokenized, and 64 MiB is millions of tokens."""


def load_text(path: str | Path) -> Corpus:
    """Read a ``.txt`` file, or a ``.jsonl`` file whose lines carry a ``text`` field."""
    path = Path(path)
    fix = "pass a UTF-8 .txt or .jsonl file"
    with open_regular(path, UsageError, fix) as handle:
        data = handle.read(MAX_TEXT_BYTES + 1)
    if len(data) > MAX_TEXT_BYTES:
        raise UsageError(
            f"is larger than {MAX_TEXT_BYTES >> 20} MiB, more text than an evaluation or calibration reads",
            path=path,
            fix="pass a shorter excerpt (a few MB hold thousands of windows)",
        )
    try:
        raw = data.decode("utf-8-sig")  # a byte-order mark is not text
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read the text ({exc})", path=path, fix=fix) from None
    if path.suffix.lower() != ".jsonl":
        text = raw
    else:
        parts = []
        # JSON Lines are split on "\n" alone: str.splitlines would also split inside a string holding U+2028
        # or U+0085, which JSON writes unescaped (json.dumps with ensure_ascii=False).
        for number, line in enumerate(raw.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):  # also a number of over 4,300 digits, a line nested too deep
                raise UsageError(f"line {number} is not JSON", path=path, fix="one JSON object per line") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UsageError(f"line {number} has no 'text' string", path=path, fix='write {"text": "..."}')
            parts.append(record["text"])
        text = "\n\n".join(parts)
    if not text.strip():
        raise UsageError("holds no text", path=path, fix="pass a file with text in it")
    return Corpus(str(path), text)


WHOLE_TEXT_CHARS = 4 << 20
"""Texts up to this many characters are encoded in one call; longer ones in paragraphs of about a quarter of
it: the tokenizers library holds offsets and masks of every token of one call, some hundreds of bytes per
character of text, where the ids alone are a few bytes per token."""


def token_ids(tokenizer: Any, text: str) -> np.ndarray:
    """``text``'s token ids (no special tokens added) as int64, encoded in bounded pieces.

    A text longer than ``WHOLE_TEXT_CHARS`` is cut at paragraph breaks (blank lines) where it has them, so
    the ids differ from one whole-text call only where a tokenizer marks the start of a sequence.
    """
    if len(text) <= WHOLE_TEXT_CHARS:
        return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    pieces: list[np.ndarray] = []
    start, step = 0, WHOLE_TEXT_CHARS // 4
    while start < len(text):
        end = len(text) if len(text) - start <= step else text.find("\n\n", start + step)
        end = start + step if end < 0 or end - start > 2 * step else end
        pieces.append(np.asarray(tokenizer.encode(text[start:end], add_special_tokens=False).ids, dtype=np.int64))
        start = end
    return np.concatenate(pieces)


def with_bos(windows: np.ndarray, bos_token_id: int | None) -> np.ndarray:
    """``windows`` with their first position replaced by BOS (llama.cpp's rule: windows stay ``ctx`` long).

    ``None`` (the tokenizer adds no BOS) leaves them as they are.
    """
    if bos_token_id is None:
        return windows
    marked = np.array(windows, copy=True)
    marked[:, 0] = bos_token_id
    return marked


def token_windows(
    ids: np.ndarray, ctx: int, count: int | None, bos_token_id: int | None = None, source: str | None = None
) -> np.ndarray:
    """Non-overlapping windows of ``ctx`` tokens from the start of ``ids``: [windows, ctx].

    With ``bos_token_id`` each window starts with BOS in place of its first token. ``source`` names the
    text in the error a text shorter than one window gets.
    """
    available = len(ids) // ctx
    if available == 0:
        raise UsageError(
            f"the text has {len(ids)} tokens, fewer than one window of {ctx}",
            path=source,
            fix="use a longer text or a smaller --ctx",
        )
    n = available if count is None else min(count, available)
    return with_bos(np.asarray(ids[: n * ctx], dtype=np.int64).reshape(n, ctx), bos_token_id)
