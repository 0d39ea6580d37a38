"""The architectures edgekit can export, keyed by the Hugging Face ``model_type``.

Each entry is a short declaration, in the manner of optimum's per-architecture ONNX configs and
llama.cpp's ``ModelBase.register``: which class onnxruntime-genai's builder dispatches on, the tolerance
the fp32 export must meet against PyTorch, and the config adaptations the builder needs. Adding an
architecture means adding one ``register(...)`` call and one tiny test model in ``tests/tiny_models.py``.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import UnsupportedArchitectureError

ConfigFix = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face architecture goes through the export."""

    model_type: str
    builder_class: str
    """``config.architectures[0]`` as onnxruntime-genai's builder expects it."""
    tolerance: float = 1e-3
    """Largest absolute difference allowed between fp32 ONNX and PyTorch logits."""
    config_fixes: tuple[ConfigFix, ...] = ()
    """Rewrites of config.json the builder needs; applied to a copy, never to the user's file."""
    aliases: tuple[str, ...] = ()
    """Other ``model_type`` values (text-only variants) that map to this entry."""
    genai_tokenizer_class: str | None = None
    """Rewrite the exported tokenizer_config.json's class to this one onnxruntime-genai accepts."""
    prequantized_streamed: bool = False
    """The builder's own loader cannot read this architecture's GPTQ/AWQ checkpoints: export them streamed."""
    notes: str = ""

    def builder_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The config.json to hand the builder: the user's, with ``architectures`` set and fixes applied."""
        adapted = copy.deepcopy(dict(config))
        adapted["architectures"] = [self.builder_class]
        adapted.pop("auto_map", None)  # custom code is never run; the builder must not even see a pointer to it
        for fix in self.config_fixes:
            adapted = fix(adapted)
        return adapted

    def adapt_export(self, variant_folder: Path) -> None:
        """Fix what the builder wrote that onnxruntime-genai cannot load (the tokenizer class)."""
        if self.genai_tokenizer_class is None:
            return
        path = variant_folder / "tokenizer_config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config["tokenizer_class"] = self.genai_tokenizer_class
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add an architecture to the registry (keyed by its model_type and aliases)."""
    for key in (arch.model_type, *arch.aliases):
        if key in _REGISTRY:
            raise ValueError(f"architecture '{key}' is registered twice")
        _REGISTRY[key] = arch
    return arch


def supported_architectures() -> list[str]:
    """The registered model_type names, sorted (aliases excluded)."""
    return sorted({arch.model_type for arch in _REGISTRY.values()})


def lookup_architecture(config: Mapping[str, Any], config_path: str | Path = "config.json") -> Architecture:
    """The registry entry for a parsed config.json, or an error listing what is supported."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in _REGISTRY:
        return _REGISTRY[model_type]
    known = ", ".join(supported_architectures())
    raise UnsupportedArchitectureError(
        f"architecture '{model_type}' is not supported",
        path=config_path,
        fix=f"edgekit exports: {known}",
    )


def _flatten_per_layer_rope(config: dict[str, Any]) -> dict[str, Any]:
    """Gemma3: transformers 5 nests ``rope_parameters`` per layer type; the builder reads flat keys.

    Without this the builder fails with ``KeyError: 'rope_type'``. The per-layer-type entries stay (the
    PyTorch side reads them); the builder gets ``rope_type``/``rope_theta`` of the global layers and
    ``rope_local_base_freq`` for the sliding-window ones, beside them.
    """
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "full_attention" in rope and "rope_type" not in rope:
        local = rope.get("sliding_attention", {})
        config["rope_parameters"] = {**rope, **rope["full_attention"]}
        if "rope_theta" in local:
            config["rope_parameters"]["rope_local_base_freq"] = local["rope_theta"]
    return config


def _name_the_longrope_type(config: dict[str, Any]) -> dict[str, Any]:
    """Phi-3: the builder reads long rope's ``type`` key, which hub configs have and transformers 5 drops on save.

    Without this a Phi-3.5 folder saved by transformers 5 fails with ``KeyError: 'type'``.
    """
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("rope_type") == "longrope":
        rope.setdefault("type", "longrope")
    return config


register(Architecture("llama", "LlamaForCausalLM", notes="Llama 2/3, SmolLM2, TinyLlama"))
register(Architecture("mistral", "MistralForCausalLM"))
register(Architecture("qwen2", "Qwen2ForCausalLM", notes="Qwen2 and Qwen2.5"))
register(Architecture("qwen3", "Qwen3ForCausalLM"))
register(
    Architecture(
        "qwen3_5",
        "Qwen3_5ForConditionalGeneration",
        tolerance=5e-3,  # the gated-delta-net scan accumulates in a different order than PyTorch's
        # transformers re-saves the tokenizer as Qwen3_5Tokenizer, a class onnxruntime-genai rejects;
        # tokenizer.json itself is standard.
        genai_tokenizer_class="TokenizersBackend",
        # The builder's loader rejects the gated delta net's tensors (A_log, conv1d) in a GPTQ checkpoint.
        prequantized_streamed=True,
        notes="Qwen3.5 family, text path (hybrid linear/full attention)",
    )
)
register(
    Architecture(
        "gemma3_text",
        "Gemma3ForCausalLM",
        config_fixes=(_flatten_per_layer_rope,),
        notes="Gemma 3 text models (1B and the text path of larger ones)",
    )
)
register(
    Architecture(
        "phi3",
        "Phi3ForCausalLM",
        config_fixes=(_name_the_longrope_type,),
        notes="Phi-3 and Phi-3.5 mini, Phi-4 mini",
    )
)
