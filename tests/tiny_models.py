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


# Tiny models with the real family's window, rope and vocabulary settings (from the config.json of the named
# checkpoint), so that runtime sizing that works only for toy values shows: Gemma 3's 512-token window and
# 262,144-token vocabulary, Llama 3's rope scaling, Phi-3.5's long rope, Mistral's 4,096-token window.
def _realistic(config_class: str, class_name: str, **settings: Any) -> Callable[[], Any]:
    def make() -> Any:
        import transformers

        common = {**_COMMON, "head_dim": 16, **settings}
        if config_class == "Qwen3_5Config":
            text = {**common, "tie_word_embeddings": False}
            config = transformers.Qwen3_5Config(
                text_config=text, vision_config=_QWEN3_5_VISION, tie_word_embeddings=False
            )
            return config, class_name
        return getattr(transformers, config_class)(**common), class_name

    return make


_QWEN3_5_VISION = dict(
    depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
    num_position_embeddings=64, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
)  # fmt: skip

REALISTIC_MODELS: dict[str, Callable[[], Any]] = {
    # Llama-3.2-1B
    "llama": _realistic(
        "LlamaConfig", "LlamaForCausalLM", max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    # Mistral-7B-v0.1
    "mistral": _realistic(
        "MistralConfig", "MistralForCausalLM", max_position_embeddings=32768, sliding_window=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    # Qwen2.5-0.5B
    "qwen2": _realistic(
        "Qwen2Config", "Qwen2ForCausalLM", max_position_embeddings=32768, use_sliding_window=False,
        sliding_window=32768, max_window_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # Qwen3-0.6B
    "qwen3": _realistic(
        "Qwen3Config", "Qwen3ForCausalLM", max_position_embeddings=40960,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # Phi-3.5-mini-instruct: long rope (one factor per rotary pair), a window as long as the context
    "phi3": _realistic(
        "Phi3Config", "Phi3ForCausalLM", max_position_embeddings=131072, original_max_position_embeddings=4096,
        sliding_window=262144,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                         "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.4, 1.8, 2.5],
                         "long_factor": [1.1, 1.3, 1.8, 2.8, 4.5, 8.0, 14.0, 24.0]},
    ),
    # gemma-3-270m: five sliding-window layers (512) to one global, 262,144-token vocabulary
    "gemma3_text": _realistic(
        "Gemma3TextConfig", "Gemma3ForCausalLM", vocab_size=262144, max_position_embeddings=32768,
        sliding_window=512, query_pre_attn_scalar=256, num_hidden_layers=6,
        layer_types=["sliding_attention"] * 5 + ["full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
    ),
    # Qwen3.5: three linear-attention layers to one full one, interleaved multimodal rope on a quarter of each head
    "qwen3_5": _realistic(
        "Qwen3_5Config", "Qwen3_5ForConditionalGeneration", head_dim=32, max_position_embeddings=262144,
        num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                         "mrope_section": [2, 1, 1], "mrope_interleaved": True},
        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
        linear_num_value_heads=4,
    ),
}  # fmt: skip


@functools.cache
def tiny_tokenizer(add_bos: bool = False) -> Any:
    """A byte-level BPE tokenizer of exactly ``VOCAB`` entries, trained on a few sentences.

    ``add_bos``: it starts every text with ``<s>`` (id 1), as Gemma's and Llama 3's tokenizers do.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    if add_bos:
        bos = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
        tokenizer.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), bos])
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


def make_tiny_checkpoint(
    model_type: str, folder: Path, seed: int = 0, *, tied: bool = False, add_bos: bool = False, realistic: bool = False
) -> Path:
    """Write a tiny random ``model_type`` checkpoint (config, safetensors, tokenizer) into ``folder``.

    ``tied``: the LM head shares the input embedding's weight, as in SmolLM2. ``add_bos``: its tokenizer
    starts every text with BOS. ``realistic``: the family's real window, rope and vocabulary settings
    (``REALISTIC_MODELS``).
    """
    import torch
    import transformers

    config, class_name = (REALISTIC_MODELS if realistic else TINY_MODELS)[model_type]()
    config.architectures = [class_name]
    config.tie_word_embeddings = tied
    torch.manual_seed(seed)
    model = getattr(transformers, class_name)(config).float().eval()
    model.save_pretrained(str(folder))
    tiny_tokenizer(add_bos).save_pretrained(str(folder))
    return folder


def load_tiny_model(folder: Path) -> Any:
    """Load a tiny checkpoint back with the class its config names."""
    import json

    import torch
    import transformers

    class_name = json.loads((folder / "config.json").read_text())["architectures"][0]
    return getattr(transformers, class_name).from_pretrained(str(folder), dtype=torch.float32).eval()


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_awq(values: Any) -> Any:
    """[rows, out] 4-bit values -> [rows, out/8] int32, nibbles in AWQ's interleaved order (as AutoAWQ packs)."""
    import torch

    rows, out = values.shape
    grouped = values.to(torch.int64).reshape(rows, out // 8, 8)[:, :, list(AWQ_ORDER)]
    words = torch.zeros(rows, out // 8, dtype=torch.int64)
    for slot in range(8):
        words |= grouped[:, :, slot] << (4 * slot)
    return words.to(torch.uint32).view(torch.int32) if hasattr(torch, "uint32") else words.to(torch.int32)


def quantized_checkpoint(source: Path, out: Path, method: str) -> Path:
    """Copy a tiny checkpoint with every decoder linear RTN-quantized into the GPTQ or AWQ layout."""
    import json
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from edgekit.quant.gptq import GPTQConfig, rtn_quantize_weight
    from edgekit.quant.gptq_format import pack_gptq, quantization_config

    shutil.copytree(source, out)
    state = load_file(str(out / "model.safetensors"))
    config = GPTQConfig(group_size=32, sym=False)
    packed: dict[str, Any] = {}
    for name, tensor in state.items():
        if ".layers." in name and name.endswith("proj.weight"):
            module = name[: -len(".weight")]
            q = rtn_quantize_weight(tensor, config)
            if method == "gptq":
                packed.update({f"{module}.{k}": v for k, v in pack_gptq(q, 4).items()})
            else:
                packed[f"{module}.qweight"] = pack_awq(q.codes.t().contiguous())
                packed[f"{module}.qzeros"] = pack_awq(q.zeros.t().contiguous())
                packed[f"{module}.scales"] = q.scales.t().contiguous().to(torch.float16)
        else:
            packed[name] = tensor
    (out / "model.safetensors").unlink()
    save_file(packed, str(out / "model.safetensors"))
    model_config = json.loads((out / "config.json").read_text())
    if method == "gptq":
        model_config["quantization_config"] = quantization_config(config)
    else:
        model_config["quantization_config"] = {
            "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
        }  # fmt: skip
    (out / "config.json").write_text(json.dumps(model_config))
    return out


def load_checkpoint_tensors(folder: Path) -> dict[str, Any]:
    """Every tensor of the ``*.safetensors`` shards in ``folder`` (one dict, names unique across shards)."""
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        part = load_file(str(shard))
        assert not part.keys() & tensors.keys(), f"{shard.name} repeats tensors of another shard"
        tensors.update(part)
    return tensors


def fake_quantized_model(source: Path, checkpoint: dict[str, Any]) -> Any:
    """The tiny model in ``source`` with every linear that ``checkpoint`` (GPTQ tensors) packs dequantized into it."""
    import torch

    from edgekit.quant.gptq import dequantize
    from edgekit.quant.gptq_format import unpack_gptq

    model = load_tiny_model(source)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and f"{name}.qweight" in checkpoint:
            parts = {key: checkpoint[f"{name}.{key}"] for key in ("qweight", "qzeros", "scales", "g_idx")}
            codes, scales, zeros = unpack_gptq(parts, 4, 32)
            module.weight.data = dequantize(codes, scales, zeros, 32)
    return model


# A target whose INT4 variants' logits equal the fake-quantized PyTorch model's (to float32 rounding).
EXACT_GPTQ_TARGETS = """
schema_version: 1
targets:
  cpu-gptq:
    description: GPTQ beside RTN, fp32 compute and a float head, so the ONNX logits are the quantized weights' alone
    providers: [cpu]
    precision: int4
    block_size: 32
    accuracy_level: 1
    int4_methods: [rtn, gptq]
    lm_head: float
    budget: {max_kl_mean: 1.0}
"""
