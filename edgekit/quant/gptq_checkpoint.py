"""GPTQ checkpoints: calibrate a Hugging Face folder with GPTQ and write it in the AutoGPTQ layout.

The written folder (config.json with ``quantization_config``, safetensors with ``qweight``/``qzeros``/
``scales``/``g_idx`` per linear, tokenizer files) is what onnxruntime-genai's builder turns into
MatMulNBits nodes, and what GPTQModel/AutoGPTQ users already have.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import UsageError
from edgekit.quant.corpus import Corpus
from edgekit.quant.gptq import GPTQConfig, Progress, gptq_quantize_model
from edgekit.quant.gptq_format import pack_gptq, quantization_config

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
) -> dict[str, Any]:
    """GPTQ-quantize the model in ``hf_folder`` and write the checkpoint to ``out``; returns its config."""
    import torch
    import transformers
    from safetensors.torch import save_file

    model_config = json.loads((hf_folder / "config.json").read_text(encoding="utf-8"))
    loader = getattr(transformers, model_config["architectures"][0])
    model = loader.from_pretrained(str(hf_folder), dtype=torch.float32, attn_implementation="sdpa")
    quantized = gptq_quantize_model(model, calibration, config, progress=progress)
    tensors: dict[str, Any] = {}
    for name, tensor in model.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if module in quantized and name.endswith(".weight"):
            for key, value in pack_gptq(quantized[module], config.bits).items():
                tensors[f"{module}.{key}"] = value.contiguous()
        else:
            tensors[name] = tensor.contiguous()
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
