"""GPTQ checkpoints: calibrate a Hugging Face folder with GPTQ and write it in the AutoGPTQ layout.

The written folder (config.json with ``quantization_config``, safetensors with ``qweight``/``qzeros``/
``scales``/``g_idx`` per linear, tokenizer files) is what onnxruntime-genai's builder turns into
MatMulNBits nodes, and what GPTQModel/AutoGPTQ users already have.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from edgekit.errors import UsageError
from edgekit.quant.corpus import Corpus
from edgekit.quant.gptq import GPTQConfig, Progress, decoder_layers, iter_gptq_layers
from edgekit.quant.gptq_format import pack_gptq, quantization_config
from edgekit.quant.lazy_model import open_lazily

_COPIED = (".json", ".jinja", ".model", ".txt", ".tiktoken")


def calibration_tokens(tokenizer_file: Path, corpus: Corpus, samples: int, seq_len: int, seed: int) -> Any:
    """``samples`` windows of ``seq_len`` tokens drawn from ``corpus`` at seeded random offsets: [samples, seq_len]."""
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
    return torch.from_numpy(np.stack([ids[s : s + seq_len] for s in starts]).astype(np.int64))


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
        model = loader.from_pretrained(str(hf_folder), dtype=torch.float32, attn_implementation="sdpa")
    else:
        model = cast(Any, lazy.model)

        def before_layer(index: int, layer: Any) -> None:
            if index == 0:  # layer 0's inputs are captured: the embedding is done with
                lazy.release(model.get_input_embeddings())
            lazy.load(layer)

    module_names = {id(module): name for name, module in model.named_modules()}
    tensors: dict[str, Any] = {}
    # Each layer is packed as soon as it is quantized and then released (moved to the meta device), so
    # no float32 layer and no dequantized copy outlives its turn.
    for layer, quantized in iter_gptq_layers(
        model,
        calibration,
        config,
        progress=progress,
        timings=timings,
        release=True,
        before_layer=before_layer,
        batch_size=batch_size,
    ):
        prefix = module_names[id(layer)]
        for name, q in quantized.items():
            for key, value in pack_gptq(q, config.bits).items():
                tensors[f"{name}.{key}"] = value.contiguous()
        for name, tensor in layer.state_dict().items():
            full = f"{prefix}.{name}"
            if full.rsplit(".", 1)[0] not in quantized:
                tensors[full] = tensor.clone()
    released = tuple(f"{module_names[id(layer)]}." for layer in decoder_layers(model))
    if lazy is None:
        rest = {name: t for name, t in model.state_dict().items() if not name.startswith(released)}
    else:
        rest = {name: lazy.weights.tensor(name) for name in lazy.weights.names() if not name.startswith(released)}
    for name, tensor in rest.items():
        tensors[name] = (tensor.to(torch.float32) if tensor.is_floating_point() else tensor).contiguous()
    if model_config.get("tie_word_embeddings") and "lm_head.weight" in tensors:
        del tensors["lm_head.weight"]  # tied to the embedding; safetensors refuses shared storage
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    model_config["quantization_config"] = quantization_config(config)
    for item in sorted(hf_folder.iterdir()):
        if item.is_file() and item.name != "config.json" and item.name.endswith(_COPIED):
            shutil.copyfile(item, out / item.name)
    (out / "config.json").write_text(json.dumps(model_config, indent=2), encoding="utf-8")
    return model_config
