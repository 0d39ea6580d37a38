"""Hand-made package parts for tests that craft packages as an attacker would."""

from __future__ import annotations

from typing import Any


def genai_config(filename: str = "model.onnx", **decoder: Any) -> dict[str, Any]:
    """A genai_config.json that passes edgekit's allow-list, as the builder writes it for a tiny model."""
    return {
        "model": {
            "bos_token_id": 1,
            "context_length": 256,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": 16,
                "hidden_size": 64,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask"},
                "outputs": {"logits": "logits"},
                "num_attention_heads": 4,
                "num_hidden_layers": 2,
                "num_key_value_heads": 2,
                **decoder,
            },
            "eos_token_id": 2,
            "pad_token_id": 3,
            "type": "llama",
            "vocab_size": 512,
        },
        "search": {"do_sample": False, "max_length": 256, "past_present_share_buffer": True},
    }
