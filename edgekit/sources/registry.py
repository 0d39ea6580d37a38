"""The architectures edgekit can export, keyed by the Hugging Face ``model_type``.

Each entry is a short declaration, in the manner of optimum's per-architecture ONNX configs and
llama.cpp's ``ModelBase.register``: which class onnxruntime-genai's builder dispatches on, the tolerance
the fp32 export must meet against PyTorch, the config adaptations the builder needs, and every other
per-architecture quirk (the streamed export's builder class, the linears GPTQ leaves float). Nothing outside
this module branches on an architecture's name. Adding an architecture means adding one ``register(...)``
call and one tiny test model in ``tests/tiny_models.py``; one with a ``streamed_builder`` also needs a case
in the streamed export's equivalence test (``tests/test_streaming.py``; a test fails without one).
"""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import UnsupportedArchitectureError

ConfigFix = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class StreamedBuilder:
    """The onnxruntime-genai builder class the streamed export (``exporters/streaming.py``) feeds layer by layer."""

    module: str
    """The builder's module in ``onnxruntime_genai.models.builders`` (``qwen`` for ``builders/qwen.py``)."""
    class_name: str
    """The class the builder's ``create_model`` makes for this architecture."""
    decoder_class: str | None = None
    """A composite builder's decoder class (same module): that graph is the one streamed."""
    default_options: tuple[tuple[str, str], ...] = ()
    """Builder ``extra_options`` the streamed export sets unless the variant sets them."""
    text_model_type: str | None = None
    """genai_config's ``model_type`` when the embeddings are in the graph, as ``create_model`` sets it."""
    nbits_output_aliases: tuple[str, ...] = ()
    """Name fragments of MatMuls whose output the builder reads as ``{name}/output_0`` even when pre-quantized."""


@dataclass(frozen=True)
class ParityTolerance:
    """How far the fp32 export's logits may be from PyTorch's, relative to the model rather than absolute.

    The bound is ``noise_multiple x noise + scale_floor x largest |logit| + known difference``. ``noise`` is
    the largest gap between PyTorch's fp32 and float64 logits on the validation prompts: this model's float
    error in fp32, measured at build time. One absolute tolerance cannot serve both a tiny random model and
    real weights whose logits (and float error) are orders of magnitude larger.
    """

    noise_multiple: float = 10.0
    """Times PyTorch's own fp32 noise the export may differ by: another runtime rounds in other places."""
    scale_floor: float = 1e-5
    """Share of the largest |logit| always allowed: covers a model whose fp32 and fp64 runs barely differ."""
    builder_approximation: Callable[[], AbstractContextManager[None]] | None = None
    """Inside it, transformers computes what the builder's graph computes where the two knowingly differ.

    The gap this makes to PyTorch's fp32 logits, measured on the same prompts, is the known difference: it
    is added to the bound and recorded, so only as much as the builder's approximation is worth on this
    model is forgiven (next to nothing on real weights; a bug is not).
    """


@contextlib.contextmanager
def _qwen3_5_l2norm_without_epsilon() -> Iterator[None]:
    """Qwen3.5: the builder normalizes the gated delta net's queries and keys with ``LpNormalization``.

    That op has no epsilon; transformers' ``l2norm`` adds 1e-6 under the root. On trained weights the
    queries' and keys' norms dwarf it; on a tiny random model they do not, and the logits show it.
    """
    from transformers.models.qwen3_5 import modeling_qwen3_5 as modeling

    original = modeling.l2norm

    def l2norm(x: Any, dim: int = -1, eps: float = 1e-6) -> Any:
        return original(x, dim=dim, eps=0.0)

    modeling.l2norm = l2norm
    try:
        yield
    finally:
        modeling.l2norm = original


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face architecture goes through the export."""

    model_type: str
    builder_class: str
    """``config.architectures[0]`` as onnxruntime-genai's builder expects it."""
    tolerance: ParityTolerance = ParityTolerance()
    """How far the fp32 export's logits may be from PyTorch's (``exporters/validate.py``)."""
    config_fixes: tuple[ConfigFix, ...] = ()
    """Rewrites of config.json the builder needs; applied to a copy, never to the user's file."""
    aliases: tuple[str, ...] = ()
    """Other ``model_type`` values (text-only variants) that map to this entry."""
    genai_tokenizer_class: str | None = None
    """Rewrite the exported tokenizer_config.json's class to this one onnxruntime-genai accepts."""
    prequantized_streamed: bool = False
    """The builder's own loader cannot read this architecture's GPTQ/AWQ checkpoints: export them streamed."""
    streamed_builder: StreamedBuilder | None = None
    """The builder class ``--streaming`` subclasses; ``None``: no streamed export."""
    gptq_kept_dense: tuple[str, ...] = ()
    """Name suffixes of the linears GPTQ leaves float (the builder keeps them float and refuses packed ones)."""
    rope_types: tuple[str, ...] = ("default", "linear")
    """The ``rope_type`` values the builder exports as transformers computes them (yarn: other frequencies)."""
    composite: bool = False
    """config.json nests the text model's settings under ``text_config`` (a multimodal config)."""
    notes: str = ""

    def text_section(self, config: Mapping[str, Any]) -> Mapping[str, Any]:
        """The part of config.json the text model is built from: ``text_config`` for a composite config, the
        config itself otherwise (transformers ignores a ``text_config`` there, so the checks must too)."""
        nested = config.get("text_config")
        return nested if self.composite and isinstance(nested, Mapping) else config

    def check_config(self, config: Mapping[str, Any], path: Path) -> None:
        """Refuse, before any weight is read, a config the builder would export wrong or not run: a rope type
        it does not implement for this family, a head size onnxruntime's attention kernel does not take."""
        if self.composite and not isinstance(config.get("text_config"), Mapping):
            raise UnsupportedArchitectureError(
                f"has no 'text_config' object, where a {self.model_type} config holds the text model's settings",
                path=path,
                fix="restore config.json from the model's source",
            )
        section = self.text_section(config)
        _check_rope_entries(section, path)
        for rope_type in _rope_types(section):
            if rope_type not in self.rope_types:
                raise UnsupportedArchitectureError(
                    f"uses rope_type '{rope_type}', which onnxruntime-genai's builder does not export as "
                    f"transformers computes it for {self.model_type} (it does: {', '.join(self.rope_types)})",
                    path=path,
                    fix="build a checkpoint of this family without that rope scaling",
                )
        heads, hidden = section.get("num_attention_heads"), section.get("hidden_size")
        head_dim = section.get("head_dim")
        if not isinstance(head_dim, int) and isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
            head_dim = hidden // heads
        if isinstance(head_dim, int) and not isinstance(head_dim, bool) and head_dim % 16:
            raise UnsupportedArchitectureError(
                f"has a head size of {head_dim}; onnxruntime's attention kernel takes multiples of 16",
                path=path,
                fix="build a model whose head_dim (hidden_size / num_attention_heads) is a multiple of 16",
            )

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


def _check_rope_entries(section: Mapping[str, Any], path: Path) -> None:
    """Rope settings per attention kind (Gemma 3's ``full_attention`` / ``sliding_attention``) must be objects."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = section.get(key)
        if rope is not None and not isinstance(rope, Mapping):
            raise UnsupportedArchitectureError(f"'{key}' is not an object", path=path,
                                               fix="restore config.json from the model's source")  # fmt: skip
        for kind in ("full_attention", "sliding_attention"):
            if isinstance(rope, Mapping) and kind in rope and not isinstance(rope[kind], Mapping):
                raise UnsupportedArchitectureError(f"'{key}.{kind}' is not an object", path=path,
                                                   fix="restore config.json from the model's source")  # fmt: skip


def _rope_types(section: Mapping[str, Any]) -> list[str]:
    """The rope types a config names: flat (``rope_parameters`` or the older ``rope_scaling``, ``rope_type``
    or ``type``) or per layer type (Gemma 3: one entry per attention kind)."""
    found = []
    for key in ("rope_parameters", "rope_scaling"):
        rope = section.get(key)
        if not isinstance(rope, Mapping):
            continue
        entries = [rope, *(value for value in rope.values() if isinstance(value, Mapping))]
        for entry in entries:
            kind = entry.get("rope_type", entry.get("type"))
            if isinstance(kind, str):
                found.append(kind)
    return found


_REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    """Add an architecture to the registry (keyed by its model_type and aliases)."""
    for key in (arch.model_type, *arch.aliases):
        if key in _REGISTRY:
            raise ValueError(f"architecture '{key}' is registered twice")
        _REGISTRY[key] = arch
    return arch


def registered_architectures() -> list[Architecture]:
    """Every registered architecture once (aliases excluded), sorted by model_type."""
    unique = {arch.model_type: arch for arch in _REGISTRY.values()}
    return [unique[name] for name in sorted(unique)]


def supported_architectures() -> list[str]:
    """The registered model_type names, sorted (aliases excluded)."""
    return [arch.model_type for arch in registered_architectures()]


def streamable_architectures() -> list[str]:
    """The model_type names ``--streaming`` can build (those with a ``streamed_builder``), sorted."""
    return [arch.model_type for arch in registered_architectures() if arch.streamed_builder is not None]


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


def _mrope_section_default(config: dict[str, Any]) -> dict[str, Any]:
    """transformers reads a missing ``mrope_section`` as [11, 11, 10]; give the builder the same.

    Given none, the builder declares 3-D positions and reads them with a plain rotary embedding: the graph
    cannot run, in onnxruntime-genai either.
    """
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    rope = text.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("mrope_section") is None:
        rope["mrope_section"] = [11, 11, 10]
    return config


def _tie_text_config(config: dict[str, Any]) -> dict[str, Any]:
    """transformers ties the LM head by the top-level ``tie_word_embeddings``; give the text config the same.

    The builder reads the text config's (False unless set): a tied checkpoint, which saves no ``lm_head``,
    gets a randomly initialized head.
    """
    text = config.get("text_config")
    if isinstance(text, dict) and "tie_word_embeddings" in config:
        text["tie_word_embeddings"] = config["tie_word_embeddings"]
    return config


def _count(config: dict[str, Any], key: str) -> int | None:
    """``config[key]`` when it is a positive integer (not a bool), else None."""
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _window_on_every_layer(config: dict[str, Any]) -> dict[str, Any]:
    """Mistral, Phi-3: transformers applies ``sliding_window`` to every layer; the builder only to the layers
    ``layer_types`` marks sliding, and these configs have none, so it exported full attention everywhere
    (right within the window, wrong past it: Mistral-7B-v0.1's 4,096, Phi-3-mini-4k's 2,047).

    A window at least as long as the context changes nothing and is left alone (Phi-3.5's 262,144).
    """
    window, layers, context = (_count(config, key) for key in ("sliding_window", "num_hidden_layers",
                                                                "max_position_embeddings"))  # fmt: skip
    if window and layers and config.get("layer_types") is None and not (context and window >= context):
        config["layer_types"] = ["sliding_attention"] * layers
    return config


def _window_within_context(config: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3: a ``sliding_window`` longer than the context (a small config keeping the default 4,096) is a
    window onnxruntime's attention refuses at run time (its cache holds the context); within the context
    it is the same attention, so the builder gets the context's length."""
    window, context = _count(config, "sliding_window"), _count(config, "max_position_embeddings")
    if window and context and window > context:
        config["sliding_window"] = context
    return config


def _name_the_longrope_type(config: dict[str, Any]) -> dict[str, Any]:
    """Phi-3: the builder reads long rope's ``type`` key, which hub configs have and transformers 5 drops on save.

    Without this a Phi-3.5 folder saved by transformers 5 fails with ``KeyError: 'type'``.
    """
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and rope.get("rope_type") == "longrope":
        rope.setdefault("type", "longrope")
    return config


register(
    Architecture(
        "llama",
        "LlamaForCausalLM",
        streamed_builder=StreamedBuilder("llama", "LlamaModel"),
        rope_types=("default", "llama3"),  # the builder's Llama drops every other scaling (linear) silently
        notes="Llama 2/3, SmolLM2, TinyLlama",
    )
)
register(
    Architecture(
        "mistral",
        "MistralForCausalLM",
        config_fixes=(_window_on_every_layer,),
        streamed_builder=StreamedBuilder("mistral", "MistralModel"),
    )
)
register(
    Architecture(
        "qwen2",
        "Qwen2ForCausalLM",
        streamed_builder=StreamedBuilder("qwen", "QwenModel"),
        notes="Qwen2 and Qwen2.5",
    )
)
register(Architecture("qwen3", "Qwen3ForCausalLM", streamed_builder=StreamedBuilder("qwen", "Qwen3Model")))
register(
    Architecture(
        "qwen3_5",
        "Qwen3_5ForConditionalGeneration",
        composite=True,
        config_fixes=(_mrope_section_default, _tie_text_config),
        tolerance=ParityTolerance(builder_approximation=_qwen3_5_l2norm_without_epsilon),
        # transformers re-saves the tokenizer as Qwen3_5Tokenizer, a class onnxruntime-genai rejects;
        # tokenizer.json itself is standard.
        genai_tokenizer_class="TokenizersBackend",
        # The builder's loader rejects the gated delta net's tensors (A_log, conv1d) in a GPTQ checkpoint.
        prequantized_streamed=True,
        streamed_builder=StreamedBuilder(
            "qwen",
            "Qwen35Model",
            decoder_class="Qwen35TextModel",  # the composite also holds the optional MTP head
            default_options=(("exclude_mtp", "true"),),  # transformers does not load the MTP head's weights either
            text_model_type="qwen3_5_text",
            # The gated delta net reads its projections' outputs by the float MatMul's name; its own loader
            # never hands it pre-quantized ones.
            nbits_output_aliases=("/linear_attn/",),
        ),
        # The linear-attention gates drive the gated delta net's recurrence and hold ~0.1% of the weights;
        # the builder keeps them float and refuses pre-quantized ones.
        gptq_kept_dense=("linear_attn.in_proj_a", "linear_attn.in_proj_b"),
        notes="Qwen3.5 family, text path (hybrid linear/full attention)",
    )
)
register(
    Architecture(
        "gemma3_text",
        "Gemma3ForCausalLM",
        config_fixes=(_flatten_per_layer_rope, _window_within_context),
        # The builder gives the sliding layers' rope the global layers' linear scaling; transformers does not.
        rope_types=("default",),
        notes="Gemma 3 text models (1B and the text path of larger ones)",
    )
)
register(
    Architecture(
        "phi3",
        "Phi3ForCausalLM",
        config_fixes=(_name_the_longrope_type, _window_on_every_layer),
        rope_types=("default", "longrope", "su"),
        notes="Phi-3 and Phi-3.5 mini, Phi-4 mini",
    )
)
