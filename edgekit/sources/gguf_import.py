"""GGUF files in: an fp32 Hugging Face folder written one tensor at a time, never the whole model in memory.

transformers supplies what it knows of the format: the config and the tokenizer from the file's metadata,
the GGUF -> Hugging Face tensor names, and each architecture's tensor processor (llama.cpp permutes the
rows of Q and K; Gemma stores norm weights plus one). Each tensor is then dequantized by the ``gguf``
package, processed, and written straight into ``model.safetensors`` (embedding-sized tensors in blocks of
rows), so the import holds one tensor at a time, not the fp32 model transformers' own loader builds.
A parity check of ONNX against PyTorch cannot catch a wrong import (both sides are built from it), so the
embedding and every tensor of the first, middle and last blocks are also checked against the file
dequantized and permuted by edgekit's own code.
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
from edgekit.sources.checkpoint import check_config_values
from edgekit.sources.gguf_header import GGUFHeader
from edgekit.sources.registry import Architecture, lookup_architecture
from edgekit.sources.weight_files import checked_gguf_header, open_gguf, release_gguf_pages

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
    open_gguf(path)  # the header checks first
    arch = _architecture_name(path)
    model_type = {"gemma3": "gemma3_text", "qwen35": "qwen3_5"}.get(arch, arch)
    try:
        architecture = lookup_architecture({"model_type": model_type}, path)
    except UnsupportedArchitectureError as exc:
        raise UnsupportedArchitectureError(
            f"GGUF architecture '{arch}' is not supported", path=path, fix=exc.fix
        ) from None
    check_gguf_tokenizer(path)
    return architecture


def _architecture_name(path: Path) -> str:
    """``general.architecture`` as the checked header read it: a string of at most 4 KiB, else "unknown"."""
    value = checked_gguf_header(path).metadata.get("general.architecture")
    return value if isinstance(value, str) else "unknown"


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
    for key, value in checked_gguf_header(path).metadata.items():
        # A negative id (an int32 in the file) would count from the vocabulary's end in Python.
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id") and isinstance(value, int) and value < 0:
            raise CorruptFileError(f"{key} is {value}; a token id is never negative", path=path,
                                   fix="convert the checkpoint again with a current llama.cpp")  # fmt: skip


def import_gguf(path: Path, out: Path) -> GGUFImport:
    """Write the GGUF file's model into ``out`` as an fp32 Hugging Face folder, one tensor at a time.

    transformers reads the file's metadata through a link in a private folder of its own: given the file's
    real folder, it would also read a ``tokenizer_config.json``/``config.json`` lying beside it, whose
    ``auto_map`` makes it offer to run a ``*.py`` from that folder. Any failure of transformers on the
    file's metadata is a ``SourceError`` naming the file.
    """
    architecture = gguf_architecture(path)
    _require_transformers_reader(path)
    out = out.absolute()  # transformers reads a relative folder that does not exist as a hub id
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgekit-gguf-", dir=out.parent) as private:
        link = _link_privately(path, Path(private))
        config, tokenizer, parsed = _metadata_from_gguf(path, link)
        plan = _tensor_plan(path, config, parsed)
        with _as_source_error(path):
            tokenizer.save_pretrained(str(out))
    checked = _write_weights(path, out / "model.safetensors", plan, config)
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)  # the weights are plain fp32 now
    config_dict.pop("_name_or_path", None)
    config_dict["architectures"] = [plan.model_class]
    config_dict["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config_dict, indent=2), encoding="utf-8")
    with _as_source_error(path):
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(str(out))
    return GGUFImport(config_dict, architecture, checked)


@dataclass(frozen=True)
class _TensorPlan:
    """Which GGUF tensor becomes which Hugging Face tensor, and how each is processed."""

    model_class: str
    names: dict[str, str]
    """GGUF name -> Hugging Face name, in the file's order."""
    shapes: dict[str, tuple[int, ...]]
    """Hugging Face name -> shape."""
    processor: Any


def _metadata_from_gguf(path: Path, link: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The config and the tokenizer transformers builds from ``link``'s metadata alone, and its parsed metadata.

    ``trust_remote_code=False`` on every call, so transformers never asks whether to run code. The folder
    exists, so it is read as a local folder, never looked up on the hub. ``gguf_file`` is the link's absolute
    path because transformers first tries a bare name against the working directory.
    """
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(link.parent), str(link)
    with _as_source_error(path):
        config = AutoConfig.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        parsed = load_gguf_checkpoint(name, return_tensors=False)
    return config, tokenizer, parsed


def _tensor_plan(path: Path, config: Any, parsed: dict[str, Any]) -> _TensorPlan:
    """Map the file's tensors to the model's parameters (transformers' map), refusing a file that lacks some."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    header = checked_gguf_header(path)
    _check_layers(path, config, header)
    with _as_source_error(path), torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    _check_declared_size(path, skeleton)
    processor = TENSOR_PROCESSORS.get(_architecture_name(path), TensorProcessor)(config=parsed.get("config", {}))
    with _as_source_error(path):
        mapping = get_gguf_hf_weights_map(skeleton, processor)
    shapes = {name: tuple(parameter.shape) for name, parameter in skeleton.state_dict().items()}
    names = {t.name: mapping[t.name] for t in header.tensors if mapping.get(t.name) in shapes}
    _check_mapped(path, header, names, shapes)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    wanted = {name for name in shapes if not (tied and name == "lm_head.weight")}
    missing = sorted(wanted - set(names.values()))
    if missing:
        raise CorruptFileError(
            f"has no tensor for the model's '{missing[0]}'"
            + (f" (and {len(missing) - 1} more)" if missing[1:] else ""),
            path=path,
            fix=_DECLARED_SIZE_FIX,
        )
    return _TensorPlan(type(skeleton).__name__, names, {n: shapes[n] for n in names.values()}, processor)


def _check_layers(path: Path, config: Any, header: GGUFHeader) -> None:
    """The config transformers made from the metadata: sizes in range, and as many layers as the file holds
    ``blk.N`` tensors for (checked before the model's skeleton is built, which takes time per layer)."""
    try:
        check_config_values(config.to_dict(), path)
    except SourceError as exc:
        raise CorruptFileError(f"its metadata gives {exc.problem}", path=path, fix=_DECLARED_SIZE_FIX) from None
    held = {int(m.group(1)) for t in header.tensors if (m := _BLOCK_NAME.match(t.name))}
    declared = config.num_hidden_layers
    if held != set(range(declared)):
        raise CorruptFileError(
            f"its metadata declares {declared} layers but the file holds tensors of "
            + (f"layers {min(held)}..{max(held)} ({len(held)} of them)" if held else "none"),
            path=path,
            fix=_DECLARED_SIZE_FIX,
        )


# Rope scaling llama.cpp's converter stores as tensors (Llama 3.1's llama3 frequencies, Phi-3.5's longrope
# factors): transformers' GGUF reader keeps neither the tensors nor the scaling in its config.
_ROPE_SCALING_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _check_mapped(path: Path, header: GGUFHeader, names: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every tensor of the file has a place in the model, of its shape: a tensor left out (a bias, an extra
    layer) or one reshaped to fit (a transposed matrix of the same size) would build a different model."""
    for tensor in header.tensors:
        if tensor.name in _ROPE_SCALING_TENSORS:
            raise SourceError(
                f"holds '{tensor.name}', rope scaling that transformers' GGUF reader drops: the imported model "
                "would compute every position's rotation differently from the file's",
                path=path,
                fix="build from the model's Hugging Face folder (safetensors), whose config keeps the rope scaling",
            )
        if tensor.name not in names:
            raise CorruptFileError(
                f"holds tensor '{tensor.name}', which the model its metadata describes has no place for",
                path=path,
                fix=_DECLARED_SIZE_FIX,
            )
        expected = shapes[names[tensor.name]]
        if tuple(reversed(tensor.shape)) != expected:  # GGUF lists the fastest-varying dimension first
            raise CorruptFileError(
                f"tensor '{tensor.name}' has shape {list(reversed(tensor.shape))} where the model its metadata "
                f"describes has {list(expected)}",
                path=path,
                fix=_DECLARED_SIZE_FIX,
            )


def _require_transformers_reader(path: Path) -> None:
    """Refuse a GGUF architecture transformers cannot read (its config keys, tokenizer and tensor names).

    edgekit relies on transformers' GGUF support for those; Qwen3.5 (``qwen35``) files, for one, have no
    reader in transformers yet, though the build's estimate can be made from their header.
    """
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = _architecture_name(path)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise SourceError(
            f"is a '{arch}' GGUF file, which transformers (whose GGUF reader edgekit uses for the config, "
            "tokenizer and tensor names) cannot read yet",
            path=path,
            fix="build from the model's Hugging Face folder (safetensors) instead",
        )


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


def _check_declared_size(path: Path, skeleton: Any) -> None:
    """Refuse metadata that declares a bigger model than the file's tensors hold.

    transformers fills absent hyperparameters with its defaults (Llama-2-7B's), so a small crafted file
    would otherwise make the import write tens of GB. ``skeleton`` is the model on the meta device, which
    allocates nothing.
    """
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


def _write_weights(path: Path, target: Path, plan: _TensorPlan, config: Any) -> int:
    """Dequantize, process and write every mapped tensor into ``target``; returns how many were cross-checked."""
    from edgekit.sources.safetensors_writer import TensorSlot, write_safetensors

    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    blocks = sorted({int(m.group(1)) for name in plan.names if (m := _BLOCK_NAME.match(name))})
    # The first, middle and last blocks plus the embeddings: a wrong mapping, transposition or permutation
    # shows in every block, and checking all of them would double the import time.
    sampled = {blocks[0], blocks[len(blocks) // 2], blocks[-1]} if blocks else set()
    heads = (
        int(config.num_attention_heads),
        int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads),
    )
    slots = [TensorSlot(hf, "F32", plan.shapes[hf]) for hf in plan.names.values()]
    by_hf = {hf: gguf for gguf, hf in plan.names.items()}
    checked = 0

    def produce(slot: TensorSlot) -> Iterator[memoryview]:
        nonlocal checked
        tensor = tensors[by_hf[slot.name]]
        match = _BLOCK_NAME.match(tensor.name)
        verify = (match is None or int(match.group(1)) in sampled) and _hf_name(tensor.name) == slot.name
        for index, block in enumerate(_processed_blocks(tensor, plan.processor, slot.shape, path)):
            if verify and index == 0:  # a tensor written in row blocks is checked on its first block
                _check_block(path, tensor, block, slot.name, config.model_type, heads)
            yield memoryview(np.ascontiguousarray(block, dtype=np.float32).data).cast("B")
            release_gguf_pages(reader)
        checked += verify

    write_safetensors(target, slots, produce)
    if checked == 0:
        raise ExportError("no tensor of the GGUF file could be checked after import", path=path)
    return checked


_ROW_BLOCK_BYTES = 256 << 20  # float32 bytes of one block of an embedding-sized tensor's rows


def _processed_blocks(tensor: Any, processor: Any, shape: tuple[int, ...], path: Path) -> Iterator[np.ndarray]:
    """The tensor dequantized and processed, as its Hugging Face shape; large 2-D tensors in blocks of rows.

    Only tensors the architecture's processor leaves as they are (embeddings and heads, in every registered
    family) are split: a processor that changes a tensor sees it whole.
    """
    from gguf.quants import dequantize

    rows = shape[0] if len(shape) == 2 else 1
    per_block = max(1, _ROW_BLOCK_BYTES // (4 * max(1, int(np.prod(shape[1:])) if len(shape) == 2 else 1)))
    if len(shape) != 2 or rows <= per_block or not _leaves_alone(processor, tensor.name):
        with _as_source_error(path):  # a tensor whose element count is not its shape's fails the reshape
            weights = processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name).weights
            whole = np.asarray(weights, dtype=np.float32).reshape(shape)
        yield whole
        return
    for start in range(0, rows, per_block):
        with _as_source_error(path):
            block = dequantize(tensor.data[start : start + per_block], tensor.tensor_type)
            rows_block = np.asarray(block, dtype=np.float32).reshape(-1, shape[1])
        yield rows_block


def _leaves_alone(processor: Any, name: str) -> bool:
    """Whether ``processor`` returns a tensor of this name unchanged (tried on a small array)."""
    probe = np.arange(8, dtype=np.float32).reshape(2, 4)
    result = processor.process(weights=probe, name=name)
    return result.name == name and result.weights is probe


def _check_block(
    path: Path, tensor: Any, block: np.ndarray, hf_name: str, model_type: str, heads: tuple[int, int]
) -> None:
    """Compare a processed tensor (or its first block) with the file dequantized by ``gguf`` and edgekit's permute."""
    from gguf.quants import dequantize

    rows = block.shape[0] if block.ndim == 2 else None
    raw = tensor.data[:rows] if rows is not None and rows < int(tensor.shape[-1]) else tensor.data
    expected = np.asarray(dequantize(raw, tensor.tensor_type), dtype=np.float32).reshape(block.shape)
    actual = block
    if model_type in _PERMUTED_QK and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        actual = _llama_cpp_permute(actual, heads[0] if hf_name.endswith("q_proj.weight") else heads[1])
    if not np.array_equal(expected, actual):
        diff = float(np.abs(expected - actual).max())
        raise ExportError(
            f"the import changed tensor '{tensor.name}' (max difference {diff:.3g} from the file)",
            path=path,
            fix="report this file and your transformers version; convert the original checkpoint instead",
        )


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
