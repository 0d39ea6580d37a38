"""Whether the source's tokenizer starts every text with a BOS token, read from the source and kept in the package.

Models such as Gemma and Llama 3 are trained (and used) with BOS at the start of every input; SmolLM2 is
not. llama.cpp's perplexity tool, transformers' tokenizer and the runtime all follow that rule, so the
package records it once (``manifest.json``'s ``tokenizer`` section) and evaluation windows, calibration
windows and raw prompts are built from the record. For a GGUF source the file's own
``tokenizer.ggml.add_bos_token`` decides; for a Hugging Face folder, what its tokenizer does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError, SourceError, first_line
from edgekit.tokenizer_record import TokenizerRule

GGUF_ADD_BOS = "tokenizer.ggml.add_bos_token"


def tokenizer_rule(hf_folder: Path, gguf_metadata: dict[str, Any] | None = None) -> TokenizerRule:
    """The rule of the tokenizer in ``hf_folder``; ``gguf_metadata`` (a GGUF source's) overrides what it does."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder), trust_remote_code=False)
    bos = tokenizer.bos_token_id
    bos = bos if isinstance(bos, int) else None
    sample = "The capital of France"
    with_special = list(tokenizer(sample, add_special_tokens=True)["input_ids"])
    plain = list(tokenizer(sample, add_special_tokens=False)["input_ids"])
    adds = bos is not None and with_special[:1] == [bos] and plain[:1] != [bos]
    recorded = (gguf_metadata or {}).get(GGUF_ADD_BOS)
    if isinstance(recorded, bool):
        adds = recorded and bos is not None
    return TokenizerRule(adds, bos)


def source_tokenizer_rule(hf_folder: Path, *, gguf: Path | None, origin: str | Path) -> TokenizerRule:
    """The BOS rule of a build's source: ``gguf`` file's own metadata, else what ``hf_folder``'s tokenizer
    does. A config or tokenizer file transformers cannot take is a ``SourceError`` naming ``origin``."""
    gguf_metadata = None
    if gguf is not None:
        from edgekit.sources.weight_files import checked_gguf_header

        gguf_metadata = checked_gguf_header(gguf).metadata
    try:
        return tokenizer_rule(hf_folder, gguf_metadata)
    except (EdgekitError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # transformers raises any type at a config or tokenizer file it cannot take
        raise SourceError(
            f"transformers cannot load its config or tokenizer ({type(exc).__name__}: {first_line(exc, 200)})",
            path=origin,
            fix="check config.json and the tokenizer files (tokenizer.json, tokenizer_config.json, "
            "special_tokens_map.json) against the model's originals",
        ) from None
