"""GGUF files in: dequantize with transformers' GGUF support into an fp32 Hugging Face folder.

transformers dequantizes as it imports, and a parity check of ONNX against PyTorch cannot catch a wrong
import (both sides come from it), so every linear and embedding tensor is checked afterwards against the
file itself, dequantized by the ``gguf`` package's own reference code.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import CorruptFileError, EdgekitError, ExportError, SourceError, UnsupportedArchitectureError
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
# transformers builds the tokenizer from these; without them it fails with a bare ValueError.
_TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.tokens")
_NO_TOKENIZER_FIX = (
    "convert the checkpoint again with llama.cpp's convert_hf_to_gguf.py (it embeds the tokenizer), "
    "or build from the Hugging Face folder"
)
_DECLARED_SIZE_FIX = (
    "the file lacks tensors or its hyperparameters (block_count, embedding_length, ...) are wrong; "
    "convert the checkpoint again with llama.cpp's convert_hf_to_gguf.py"
)


@dataclass
class GGUFImport:
    """What importing a GGUF file produced."""

    config: dict[str, Any]
    architecture: Architecture
    tensors_checked: int


def gguf_architecture(path: Path) -> Architecture:
    """Look up a GGUF file's architecture from its metadata, before any tensor is dequantized.

    Also refuses a file without tokenizer metadata (``check_gguf_tokenizer``): this is the GGUF check the
    build's precheck runs, and such a file can only fail later, inside transformers.
    """
    reader = open_gguf(path)
    field = reader.fields.get("general.architecture")
    arch = str(field.contents()) if field is not None else "unknown"
    model_type = {"gemma3": "gemma3_text"}.get(arch, arch)
    try:
        architecture = lookup_architecture({"model_type": model_type}, path)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(
            f"GGUF architecture '{arch}' is not supported", path=path, fix=exc.fix
        ) from None
    check_gguf_tokenizer(path)
    return architecture


def check_gguf_tokenizer(path: Path) -> None:
    """Refuse a GGUF file that carries no tokenizer (``tokenizer.ggml.model`` and ``tokenizer.ggml.tokens``).

    A package needs the tokenizer, and a GGUF file is imported from its own metadata only (never from
    files beside it), so a file without one cannot be built.
    """
    fields = open_gguf(path).fields
    missing = [key for key in _TOKENIZER_KEYS if key not in fields]
    if missing:
        raise CorruptFileError(
            f"has no tokenizer metadata (tokenizer.ggml.*): {' and '.join(missing)} missing",
            path=path,
            fix=_NO_TOKENIZER_FIX,
        )


def import_gguf(path: Path, out: Path) -> GGUFImport:
    """Dequantize a GGUF file into an fp32 Hugging Face folder at ``out`` and verify it against the file.

    transformers reads the file through a link in a private folder of its own: given the file's real
    folder, it would also read a ``tokenizer_config.json``/``config.json`` lying beside it, whose ``auto_map``
    makes it offer to run a ``*.py`` from that folder. Any failure of transformers on the file's metadata
    is a ``SourceError`` naming the file.
    """
    from safetensors.torch import save_file

    architecture = gguf_architecture(path)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgekit-gguf-", dir=out.parent) as private:
        tokenizer, model = _load_from_gguf(path, _link_privately(path, Path(private)))
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
    with _as_source_error(path):
        model.generation_config.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    return GGUFImport(config, architecture, checked)


def _link_privately(path: Path, folder: Path) -> Path:
    """A link to ``path`` inside ``folder`` (a fresh private directory), the only file transformers sees.

    A symbolic link first; a hard link where symbolic links are not allowed (Windows without developer
    mode). The link's name is fixed, so nothing about the user's file name reaches transformers.
    """
    link = folder / "model.gguf"
    target = path.resolve()
    try:
        link.symlink_to(target)
    except OSError:
        try:
            os.link(target, link)
        except OSError as exc:
            raise SourceError(
                f"cannot be linked into a private folder for the import ({exc.strerror})",
                path=path,
                fix="copy the GGUF file onto the disk the build writes to (a hard link is the fallback)",
            ) from None
    return link


def _load_from_gguf(path: Path, link: Path) -> tuple[Any, Any]:
    """The tokenizer and the fp32 model transformers builds from ``link``'s metadata and tensors alone.

    ``trust_remote_code=False`` on every call, so transformers never asks whether to run code. The folder
    exists, so it is read as a local folder, never looked up on the hub. ``gguf_file`` is the link's absolute
    path because transformers first tries a bare name against the working directory.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(link.parent), str(link)
    with _as_source_error(path):
        config = AutoConfig.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        _check_declared_size(path, config)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            config=config,
            dtype=torch.float32,
            trust_remote_code=False,
        )
    return tokenizer, model


def _check_declared_size(path: Path, config: Any) -> None:
    """Refuse metadata that declares a bigger model than the file's tensors hold.

    transformers fills absent hyperparameters with its defaults (Llama-2-7B's) and random-initializes every
    weight the file lacks, so a small crafted file would otherwise allocate tens of GB. The model is built
    on the meta device here, which allocates nothing.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    declared = sum(parameter.numel() for parameter in skeleton.parameters())
    stored = sum(int(tensor.n_elements) for tensor in open_gguf(path).tensors)
    if declared > stored:
        raise CorruptFileError(
            f"its metadata describes a model of {declared:,} weights, but the file holds only {stored:,}",
            path=path,
            fix=_DECLARED_SIZE_FIX,
        )


@contextmanager
def _as_source_error(path: Path) -> Iterator[None]:
    """Turn any failure of transformers on the file into a one-line ``SourceError`` naming it.

    transformers raises bare ``ValueError``/``KeyError``/``TypeError`` on metadata it cannot use; edgekit's
    own errors, interrupts and ``MemoryError`` pass through unchanged.
    """
    try:
        yield
    except (KeyboardInterrupt, MemoryError, EdgekitError):
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        detail = f"{type(exc).__name__}: {lines[0][:300].rstrip('.')}" if lines else type(exc).__name__
        raise SourceError(
            f"transformers cannot import this GGUF file ({detail})",
            path=path,
            fix="convert the checkpoint again with a current llama.cpp, or build from the Hugging Face folder",
        ) from None


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
