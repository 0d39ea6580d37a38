"""GPTQ checkpoints: calibrate a Hugging Face folder with GPTQ and write it in the AutoGPTQ layout.

The written folder (config.json with ``quantization_config``, safetensors with ``qweight``/``qzeros``/
``scales``/``g_idx`` per linear, tokenizer files) is what onnxruntime-genai's builder turns into
MatMulNBits nodes, and what GPTQModel/AutoGPTQ users already have.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from edgekit.errors import CorruptFileError, UsageError
from edgekit.exporters.lazy_weights import CheckpointReader
from edgekit.quant.corpus import Corpus, with_bos
from edgekit.quant.gptq import GPTQConfig, Progress
from edgekit.quant.gptq_format import pack_gptq, quantization_config
from edgekit.quant.gptq_layers import decoder_layers, iter_gptq_layers
from edgekit.quant.lazy_model import open_lazily

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

    ids = np.asarray(Tokenizer.from_file(str(tokenizer_file)).encode(corpus.text, add_special_tokens=False).ids)
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
    nor the unquantized tensors are ever held whole: a 9B model is calibrated in one layer's memory.
    ``timings`` gets the seconds of each GPTQ phase added (see ``iter_gptq_layers``); ``batch_size``
    calibration samples go through a layer at once.
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    model_config = json.loads((hf_folder / "config.json").read_text(encoding="utf-8"))
    lazy = open_lazily(hf_folder)
    before_layer: Callable[[int, Any], None] | None = None
    if lazy is None:  # tensor names transformers renames on load: the whole model, the ordinary way
        loader = getattr(transformers, model_config["architectures"][0])
        model = loader.from_pretrained(
            str(hf_folder), dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=False
        )
    else:
        model = cast(Any, lazy.model)
        calibration = lazy.load_embedding_rows(calibration)

        def before_layer(index: int, layer: Any) -> None:
            if index == 0:  # layer 0's inputs are captured: the embedding is done with
                lazy.release(model.get_input_embeddings())
            lazy.load(layer)

    module_names = {id(module): name for name, module in model.named_modules()}
    layers = decoder_layers(model)
    shards = [f"model-{i:05d}-of-{len(layers) + 1:05d}.safetensors" for i in range(1, len(layers) + 2)]
    weight_map: dict[str, str] = {}
    out.mkdir(parents=True, exist_ok=True)
    # Each layer is packed and written as soon as it is quantized, then released (moved to the meta
    # device), so no float32 layer, no dequantized copy and no packed layer outlives its turn.
    for index, (layer, quantized) in enumerate(
        iter_gptq_layers(
            model,
            calibration,
            config,
            progress=progress,
            timings=timings,
            release=True,
            before_layer=before_layer,
            batch_size=batch_size,
        )
    ):
        prefix = module_names[id(layer)]
        tensors: dict[str, Any] = {}
        for name, q in quantized.items():
            for key, value in pack_gptq(q, config.bits).items():
                tensors[f"{name}.{key}"] = value.contiguous()
        for name, tensor in layer.state_dict().items():
            full = f"{prefix}.{name}"
            if full.rsplit(".", 1)[0] not in quantized:
                tensors[full] = tensor.clone()
        save_file(tensors, str(out / shards[index]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shards[index]))
    released = tuple(f"{module_names[id(layer)]}." for layer in layers)
    tied = bool(model_config.get("tie_word_embeddings"))  # safetensors refuses a head sharing the embedding
    if lazy is None:
        rest = {
            name: tensor.contiguous()
            for name, tensor in model.state_dict().items()
            if not name.startswith(released) and not (tied and name == "lm_head.weight")
        }
        save_file(rest, str(out / shards[-1]), metadata={"format": "pt"})
        names = list(rest)
    else:
        names = [n for n in lazy.weights.names() if not n.startswith(released) and not (tied and n == "lm_head.weight")]
        copy_tensors(lazy.weights, names, out / shards[-1])
    weight_map.update(dict.fromkeys(names, shards[-1]))
    total = sum((out / shard).stat().st_size for shard in shards)
    index_file = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_file, indent=2), encoding="utf-8")
    model_config["quantization_config"] = quantization_config(config)
    for item in sorted(hf_folder.iterdir()):
        if (
            item.is_file()
            and item.name not in ("config.json", "model.safetensors.index.json")
            and item.name.endswith(_COPIED)
        ):
            shutil.copyfile(item, out / item.name)
    (out / "config.json").write_text(json.dumps(model_config, indent=2), encoding="utf-8")
    return model_config


def copy_tensors(reader: CheckpointReader, names: list[str], path: Path) -> None:
    """Write tensors ``names`` of ``reader``'s checkpoint to the safetensors file ``path``, bytes copied as stored.

    The copy goes through a small buffer, so a tensor of any size (a 248k-row embedding) costs no memory.
    """
    header: dict[str, Any] = {}
    offset = 0
    for name in names:
        location = reader.location(name)
        header[name] = {
            "dtype": location.dtype,
            "shape": list(location.shape),
            "data_offsets": [offset, offset + location.nbytes],
        }
        offset += location.nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # safetensors pads the header so the data starts 8-byte aligned
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)))
        handle.write(encoded)
        for name in names:
            location = reader.location(name)
            with location.path.open("rb") as source:
                source.seek(location.offset)
                remaining = location.nbytes
                while remaining:
                    chunk = source.read(min(remaining, _COPY_CHUNK))
                    if not chunk:
                        raise CorruptFileError("ends inside a tensor", path=location.path)
                    handle.write(chunk)
                    remaining -= len(chunk)
