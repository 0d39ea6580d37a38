"""The tokenizer facts a package records for its consumers: whether raw text starts with BOS, and its id.

Evaluation and calibration windows and the runtime's raw prompts all follow this record
(``sources/tokenizer_rule.py`` reads it off the source at build time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TokenizerRule:
    """The BOS rule of a model's tokenizer."""

    add_bos_token: bool
    bos_token_id: int | None

    def as_dict(self) -> dict[str, Any]:
        """The manifest's form."""
        return {"add_bos_token": self.add_bos_token, "bos_token_id": self.bos_token_id}


def recorded_rule(manifest: dict[str, Any]) -> TokenizerRule:
    """The rule a package's manifest records (packages built before it was recorded: no BOS)."""
    section = manifest.get("tokenizer")
    if not isinstance(section, dict):
        return TokenizerRule(False, None)
    bos = section.get("bos_token_id")
    bos = bos if isinstance(bos, int) and not isinstance(bos, bool) and bos >= 0 else None
    return TokenizerRule(bool(section.get("add_bos_token")) and bos is not None, bos)
