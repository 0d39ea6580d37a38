"""Text to token ids and back, with the Hugging Face ``tokenizers`` library on the package's tokenizer.json.

The runtime encodes and decodes with the same library and file transformers' fast tokenizers use, so
the ids match the source model's tokenizer by construction (onnxruntime-genai's own tokenizer is a
separate implementation); onnxruntime-genai gets token ids only. Raw prompts get a BOS token exactly
where the source tokenizer adds one (the package's recorded ``add_bos_token`` rule); a rendered chat
template is encoded as is, since templates write their own BOS.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgekit.errors import PackageError, UsageError
from edgekit.safe_io import not_unicode, read_regular_file

TOKENIZER_FILE = "tokenizer.json"
MAX_TOKENIZER_BYTES = 512 << 20


def check_text(text: object) -> None:
    """A ``UsageError`` unless ``text`` is a string that UTF-8 can encode (no lone surrogate: what Python
    makes of bytes that were not UTF-8 in a command line or a terminal's input)."""
    if not isinstance(text, str):
        raise UsageError(f"the prompt must be text (a str), not {type(text).__name__}", fix="pass a str")
    odd = not_unicode(text)
    if odd is not None:
        raise UsageError(f"the text is not valid Unicode: it holds {odd!r} (bytes that were not UTF-8)",
                         fix="give UTF-8 text")  # fmt: skip


class TextTokenizer:
    """Encode prompts and decode generated ids for one variant folder."""

    def __init__(self, folder: Path, *, add_bos: bool, bos_token_id: int | None) -> None:
        from tokenizers import Tokenizer

        path = folder / TOKENIZER_FILE
        data = read_regular_file(path, MAX_TOKENIZER_BYTES, PackageError)
        try:
            self._tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise PackageError(f"is not a tokenizer ({str(exc)[:200]})", path=path, fix="rebuild the package") from None
        self.add_bos = add_bos and bos_token_id is not None
        self.bos_token_id = bos_token_id

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Ids of ``text`` with no special tokens added, then BOS in front where the model's rule says so."""
        check_text(text)
        try:
            ids: list[int] = self._tokenizer.encode(text, add_special_tokens=False).ids
        except (KeyboardInterrupt, SystemExit, MemoryError):
            raise
        except BaseException as exc:  # a pattern of the file that panics the Rust library (a BaseException)
            raise PackageError(f"the package's tokenizer failed on this text ({type(exc).__name__}: "
                               f"{str(exc)[:200]})", fix="rebuild the package") from None  # fmt: skip
        wanted = self.add_bos if add_bos is None else add_bos
        if wanted and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``, special tokens skipped."""
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def decode_stream(self, ids: Iterator[int]) -> Iterator[str]:
        """Text pieces of whole characters as ``ids`` arrive, special tokens skipped.

        The pieces join to ``decode`` of all the ids: bytes of a character the generation never finished are
        given at the end as ``decode`` gives them (U+FFFD), not dropped.
        """
        from tokenizers.decoders import DecodeStream

        stream = DecodeStream(skip_special_tokens=True)
        seen: list[int] = []
        given: list[str] = []
        for token in ids:
            seen.append(token)
            piece = stream.step(self._tokenizer, token)
            if piece:
                given.append(piece)
                yield piece
        whole, so_far = self.decode(seen), "".join(given)
        if len(whole) > len(so_far) and whole.startswith(so_far):
            yield whole[len(so_far) :]

    @property
    def raw(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tokenizer
