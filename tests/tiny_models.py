"""Tiny random-weight checkpoints, one per registered architecture, made from configs in code.

Each is a few hundred KB, built with transformers from a config (no download), saved as safetensors
with a small byte-level BPE tokenizer and a chat template, the way a real Hugging Face folder looks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

VOCAB = 512
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
    tie_word_embeddings=False,
)


def _llama() -> Any:
    import transformers

    return transformers.LlamaConfig(**_COMMON, head_dim=16), "LlamaForCausalLM"


def _mistral() -> Any:
    import transformers

    return transformers.MistralConfig(**_COMMON, head_dim=16, sliding_window=None), "MistralForCausalLM"


def _qwen2() -> Any:
    import transformers

    return transformers.Qwen2Config(**_COMMON), "Qwen2ForCausalLM"


def _qwen3() -> Any:
    import transformers

    return transformers.Qwen3Config(**_COMMON, head_dim=16), "Qwen3ForCausalLM"


def _phi3() -> Any:
    import transformers

    return transformers.Phi3Config(**_COMMON, original_max_position_embeddings=256), "Phi3ForCausalLM"


def _gemma3_text() -> Any:
    import transformers

    config = transformers.Gemma3TextConfig(
        **_COMMON,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
    )
    return config, "Gemma3ForCausalLM"


def _qwen3_5() -> Any:
    import transformers

    # Real Qwen3.5 checkpoints carry mrope_section in rope_parameters; sum(mrope_section) must be
    # head_dim * partial_rotary_factor / 2.
    text = dict(
        _COMMON,
        head_dim=32,
        layer_types=["linear_attention", "full_attention"],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        },
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
    )
    # The default vision tower is full size (~1.7 GB); the text export ignores it, so keep it tiny.
    vision = dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
        num_position_embeddings=64, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
    )  # fmt: skip
    config = transformers.Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return config, "Qwen3_5ForConditionalGeneration"


TINY_MODELS: dict[str, Callable[[], Any]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "phi3": _phi3,
    "gemma3_text": _gemma3_text,
    "qwen3_5": _qwen3_5,
}


@functools.cache
def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer of exactly ``VOCAB`` entries, trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = [
        "the quick brown fox jumps over the lazy dog. " * 3,
        "hello world, this is a tiny tokenizer for testing onnx export of language models.",
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789",
        "once upon a time there was a small model that generated text token by token.",
    ] * 10
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    missing = VOCAB - tokenizer.get_vocab_size()
    if missing > 0:
        tokenizer.add_special_tokens([f"<extra_{i}>" for i in range(missing)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_checkpoint(model_type: str, folder: Path, seed: int = 0, *, tied: bool = False) -> Path:
    """Write a tiny random ``model_type`` checkpoint (config, safetensors, tokenizer) into ``folder``.

    ``tied``: the LM head shares the input embedding's weight, as in SmolLM2.
    """
    import torch
    import transformers

    config, class_name = TINY_MODELS[model_type]()
    config.architectures = [class_name]
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).float().eval()
    model.save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def load_tiny_model(folder: Path) -> Any:
    """Load a tiny checkpoint back with the class its config names."""
    import json

    import torch
    import transformers

    class_name = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, class_name).from_pretrained(str(folder), dtype=torch.float32).eval()
