"""GPTQ checkpoints: calibrate a Hugging Face folder with GPTQ and write it in the AutoGPTQ layout.

The written folder (config.json with ``quantization_config``, safetensors with ``qweight``/``qzeros``/
``scales``/``g_idx`` per linear, tokenizer files) is what onnxruntime-genai's builder turns into
MatMulNBits nodes, and what GPTQModel/AutoGPTQ users already have.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np

from edgekit.accuracy.texts import Corpus, token_ids, with_bos
from edgekit.errors import CorruptFileError, UsageError
from edgekit.quant.gptq import GPTQConfig, Progress
from edgekit.quant.gptq_format import pack_gptq, quantization_config
from edgekit.quant.gptq_layers import iter_gptq_layers
from edgekit.sources.lazy_weights import CheckpointReader
from edgekit.sources.meta_model import LazyModel, decoder_layers, open_lazily
from edgekit.sources.safetensors_writer import TensorSlot, write_safetensors

_COPIED = (".json", ".jinja", ".model", ".txt", ".tiktoken")
_COPY_CHUNK = 64 * 1024 * 1024


def calibration_tokens(
    tokenizer_file: Path, corpus: Corpus, samples: int, seq_len: int, seed: int, bos_token_id: int | None = None
) -> Any:
    """``samples`` windows of ``seq_len`` tokens drawn from ``corpus`` at seeded random offsets: [samples, seq_len].

    With ``bos_token_id`` (a tokenizer that adds BOS) each window starts with BOS, as evaluation windows do.
    """
    import torch
    from tokenizers import Tokenizer

    ids = token_ids(Tokenizer.from_file(str(tokenizer_file)), corpus.text)
    if len(ids) <= seq_len:
        raise UsageError(
            f"the calibration text has {len(ids)} tokens, not more than one sample of {seq_len}",
            path=corpus.name,
            fix="use a longer --calibration text or a smaller --calib-seq-len",
        )
    starts = np.random.default_rng(seed).integers(0, len(ids) - seq_len, size=samples)
    windows = with_bos(np.stack([ids[s : s + seq_len] for s in starts]).astype(np.int64), bos_token_id)
    return torch.from_numpy(windows)


def write_gptq_checkpoint(
    hf_folder: Path,
    out: Path,
    config: GPTQConfig,
    calibration: Any,
    *,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    batch_size: int = 4,
) -> dict[str, Any]:
    """GPTQ-quantize the model in ``hf_folder`` and write the checkpoint to ``out``; returns its config.

    The checkpoint is sharded the Hugging Face way (``model.safetensors.index.json``): one shard per decoder
    layer, written as soon as the layer is quantized, and one for everything else (embeddings, final norm,
    LM head, a vision tower), copied byte for byte from the source shards. So neither the quantized model
    nor the unquantized tensors are ever held whole: a model of any size is calibrated in one layer's
    memory. ``timings`` gets the seconds of each GPTQ phase added (see ``iter_gptq_layers``); ``batch_size``
    calibration samples go through a layer at once.
    """
    model_config = json.loads((hf_folder / "config.json").read_text(encoding="utf-8"))
    source = _open_source(hf_folder, model_config)
    calibration = source.prepare(calibration)
    layers = decoder_layers(source.model)
    shards = [f"model-{i:05d}-of-{len(layers) + 1:05d}.safetensors" for i in range(1, len(layers) + 2)]
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    # Each layer is packed and written as soon as it is quantized, then released (moved to the meta
    # device), so no float32 layer, no dequantized copy and no packed layer outlives its turn.
    quantized_layers = iter_gptq_layers(
        source.model,
        calibration,
        config,
        progress=progress,
        timings=timings,
        release=True,
        before_layer=source.before_layer,
        batch_size=batch_size,
    )
    for index, (layer, quantized) in enumerate(quantized_layers):
        tensors = _packed_layer(source.names[id(layer)], layer, quantized, config.bits)
        _save_shard(tensors, out / shards[index])
        weight_map.update(dict.fromkeys(tensors, shards[index]))
    released = tuple(f"{source.names[id(layer)]}." for layer in layers)
    tied = bool(model_config.get("tie_word_embeddings"))  # safetensors refuses a head sharing the embedding
    names = source.write_rest(out / shards[-1], released, skip_head=tied)
    weight_map.update(dict.fromkeys(names, shards[-1]))
    _write_index(out, shards, weight_map)
    model_config["quantization_config"] = quantization_config(config)
    _copy_side_files(hf_folder, out)
    (out / "config.json").write_text(json.dumps(model_config, indent=2), encoding="utf-8")
    return model_config


class _Source:
    """The model GPTQ runs, read layer by layer from disk when its tensor names allow, else whole."""

    def __init__(self, model: Any, lazy: LazyModel | None) -> None:
        self.model, self.lazy = model, lazy
        self.names = {id(module): name for name, module in model.named_modules()}
        self.before_layer: Callable[[int, Any], None] | None = self._load_layer if lazy is not None else None

    def prepare(self, calibration: Any) -> Any:
        """The calibration ids the model takes (renumbered into the embedding rows read, when lazy)."""
        return self.lazy.load_embedding_rows(calibration) if self.lazy is not None else calibration

    def _load_layer(self, index: int, layer: Any) -> None:
        lazy = cast(LazyModel, self.lazy)
        if index == 0:  # layer 0's inputs are captured: the embedding is done with
            lazy.release(self.model.get_input_embeddings())
        lazy.load(layer)

    def write_rest(self, path: Path, released: tuple[str, ...], *, skip_head: bool) -> list[str]:
        """Write every tensor outside the decoder layers to ``path``; returns their names."""

        def wanted(name: str) -> bool:
            return not name.startswith(released) and not (skip_head and name == "lm_head.weight")

        if self.lazy is None:
            rest = {name: t.contiguous() for name, t in self.model.state_dict().items() if wanted(name)}
            _save_shard(rest, path)
            return list(rest)
        names = [name for name in self.lazy.weights.names() if wanted(name)]
        copy_tensors(self.lazy.weights, names, path)  # byte for byte, through a small buffer
        return names


def _open_source(hf_folder: Path, model_config: dict[str, Any]) -> _Source:
    import torch
    import transformers

    lazy = open_lazily(hf_folder)
    if lazy is not None:
        return _Source(cast(Any, lazy.model), lazy)
    # Tensor names transformers renames on load: the whole model, the ordinary way.
    loader = getattr(transformers, model_config["architectures"][0])
    model = loader.from_pretrained(
        str(hf_folder), dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False
    )
    return _Source(model, None)


def _packed_layer(prefix: str, layer: Any, quantized: dict[str, Any], bits: int) -> dict[str, Any]:
    """A layer's tensors for the checkpoint: GPTQ's packed linears and the layer's other tensors as they are."""
    tensors: dict[str, Any] = {}
    for name, q in quantized.items():
        for key, value in pack_gptq(q, bits).items():
            tensors[f"{name}.{key}"] = value.contiguous()
    for name, tensor in layer.state_dict().items():
        full = f"{prefix}.{name}"
        if full.rsplit(".", 1)[0] not in quantized:
            tensors[full] = tensor.clone()
    return tensors


def _save_shard(tensors: dict[str, Any], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_index(out: Path, shards: list[str], weight_map: dict[str, str]) -> None:
    total = sum((out / shard).stat().st_size for shard in shards)
    index_file = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2), encoding="utf-8")


def _copy_side_files(hf_folder: Path, out: Path) -> None:
    """Tokenizer files, templates and generation config (everything but the weights and the configs rewritten)."""
    for item in sorted(hf_folder.iterdir()):
        rewritten = item.name in ("config.json", "model.safetensors.index.json")
        if item.is_file() and not rewritten and item.name.endswith(_COPIED):
            shutil.copyfile(item, out / item.name)


def copy_tensors(reader: CheckpointReader, names: list[str], path: Path) -> None:
    """Write tensors ``names`` of ``reader``'s checkpoint to the safetensors file ``path``, bytes copied as stored.

    The copy goes through a small buffer, so a tensor of any size (a 248k-row embedding) costs no memory.
    """
    slots = [TensorSlot(name, reader.location(name).dtype, reader.location(name).shape) for name in names]

    def stored_bytes(slot: TensorSlot) -> Iterator[bytes]:
        location = reader.location(slot.name)
        with location.path.open("rb") as source:
            source.seek(location.offset)
            remaining = location.nbytes
            while remaining:
                chunk = source.read(min(remaining, _COPY_CHUNK))
                if not chunk:
                    raise CorruptFileError("ends inside a tensor", path=location.path)
                yield chunk
                remaining -= len(chunk)

    write_safetensors(path, slots, stored_bytes)
