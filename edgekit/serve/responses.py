"""OpenAI's response shapes: whole completions, stream chunks, usage, and the model list."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict[str, int]:
        """OpenAI's ``usage`` object."""
        total = self.prompt_tokens + self.completion_tokens
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens, "total_tokens": total}


@dataclass(frozen=True)
class Reply:
    """What every object of one response shares: its id, creation time, model and fingerprint."""

    id: str
    created: int
    model: str
    fingerprint: str

    @classmethod
    def new(cls, prefix: str, model: str, fingerprint: str) -> Reply:
        """A fresh id (``chatcmpl-...``, ``cmpl-...``) stamped now."""
        return cls(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), model, fingerprint)

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}  # fmt: skip

    def chat(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        """A whole ``chat.completion``."""
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("chat.completion"), "choices": [choice], "usage": usage.as_dict()}

    def chat_chunk(self, delta: dict[str, Any], finish_reason: str | None, with_usage: bool) -> dict[str, Any]:
        """One ``chat.completion.chunk`` with one choice (``usage`` null when the stream reports usage)."""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._head("chat.completion.chunk"), "choices": [choice]}
        return {**chunk, "usage": None} if with_usage else chunk

    def chat_usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The stream's last chunk when ``stream_options.include_usage``: no choices, the counts."""
        return {**self._head("chat.completion.chunk"), "choices": [], "usage": usage.as_dict()}

    def completion(self, text: str, finish_reason: str | None, usage: Usage | None) -> dict[str, Any]:
        """A ``text_completion``: the whole answer, or one stream chunk (``usage`` None)."""
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        body = {**self._head("text_completion"), "choices": [choice]}
        return {**body, "usage": usage.as_dict()} if usage is not None else body

    def completion_usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """A completion stream's last chunk when ``stream_options.include_usage``."""
        return {**self._head("text_completion"), "choices": [], "usage": usage.as_dict()}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event carrying ``data`` (a JSON object, or the literal ``[DONE]``)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()
