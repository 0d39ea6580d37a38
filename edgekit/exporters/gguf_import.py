"""GGUF files in: dequantize with transformers' GGUF support into an fp32 Hugging Face folder.

transformers dequantizes as it imports, and a parity check of ONNX against PyTorch cannot catch a wrong
import (both sides come from it), so every linear and embedding tensor is checked afterwards against the
file itself, dequantized by the ``gguf`` package's own reference code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ExportError, UnsupportedArchitectureError
from edgekit.exporters.registry import Architecture, lookup_architecture
from edgekit.exporters.weight_files import open_gguf

# GGUF tensor name -> Hugging Face name, for the tensors whose values must survive the import unchanged.
_TENSOR_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# llama.cpp's converter interleaves the rows of Q and K for these architectures; transformers undoes it.
_PERMUTED_QK = {"llama", "mistral"}


@dataclass
class GGUFImport:
    """What importing a GGUF file produced."""

    config: dict[str, Any]
    architecture: Architecture
    tensors_checked: int


def gguf_architecture(path: Path) -> Architecture:
    """Look up a GGUF file's architecture from its metadata, before any tensor is dequantized."""
    reader = open_gguf(path)
    field = reader.fields.get("general.architecture")
    arch = str(field.contents()) if field is not None else "unknown"
    model_type = {"gemma3": "gemma3_text"}.get(arch, arch)
    try:
        return lookup_architecture({"model_type": model_type}, path)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(
            f"GGUF architecture '{arch}' is not supported", path=path, fix=exc.fix
        ) from None


def import_gguf(path: Path, out: Path) -> GGUFImport:
    """Dequantize a GGUF file into an fp32 Hugging Face folder at ``out`` and verify it against the file."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    architecture = gguf_architecture(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain fp32 now
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    checked = verify_against_file(
        path,
        state,
        config.get("model_type", ""),
        int(config["num_attention_heads"]),
        int(config.get("num_key_value_heads") or config["num_attention_heads"]),
    )
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return GGUFImport(config, architecture, checked)


def verify_against_file(path: Path, state: dict[str, Any], model_type: str, n_head: int, n_kv_head: int) -> int:
    """Compare imported tensors with the GGUF file dequantized by ``gguf``; returns how many matched.

    Raises ``ExportError`` naming the first tensor whose values differ.
    """
    from gguf.quants import dequantize

    reader = open_gguf(path)
    blocks = sorted({int(m.group(1)) for t in reader.tensors if (m := _BLOCK_NAME.match(t.name))})
    # The first, middle and last blocks plus the embeddings: a wrong mapping, transposition or
    # permutation shows in every block, and checking all of them would double the import time.
    sampled = {blocks[0], blocks[len(blocks) // 2], blocks[-1]} if blocks else set()
    checked = 0
    for tensor in reader.tensors:
        match = _BLOCK_NAME.match(tensor.name)
        if match and int(match.group(1)) not in sampled:
            continue
        hf_name = _hf_name(tensor.name)
        if hf_name is None or hf_name not in state:
            continue
        expected = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(state[hf_name].shape))
        actual = state[hf_name].float().numpy()
        if model_type in _PERMUTED_QK and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = n_head if hf_name.endswith("q_proj.weight") else n_kv_head
            actual = _llama_cpp_permute(actual, heads)
        if not np.array_equal(expected.astype(np.float32), actual):
            diff = float(np.abs(expected - actual).max())
            raise ExportError(
                f"transformers' GGUF import changed tensor '{tensor.name}' (max difference {diff:.3g})",
                path=path,
                fix="report this file and your transformers version; convert the original checkpoint instead",
            )
        checked += 1
    if checked == 0:
        raise ExportError("no tensor of the GGUF file could be checked after import", path=path)
    return checked


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _TENSOR_NAMES:
        return _TENSOR_NAMES[gguf_name]
    match = _BLOCK_NAME.match(gguf_name)
    if match and match.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{match.group(1)}.{_BLOCK_TENSORS[match.group(2)]}.{match.group(3)}"
    return None


def _llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """The row interleaving llama.cpp's converter applies to Q and K (``LlamaModel.permute``)."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
