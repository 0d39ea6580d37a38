"""GPTQ: the solver beats round-to-nearest, the checkpoint layout round-trips, the driver covers a model."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from edgekit.quant.gptq import (  # noqa: E402
    GPTQConfig,
    HessianAccumulator,
    QuantizedWeight,
    dequantize,
    quantize_weight,
    rtn_quantize_weight,
)
from edgekit.quant.gptq_format import pack_gptq, quantization_config, unpack_gptq  # noqa: E402
from edgekit.quant.gptq_layers import gptq_quantize_model  # noqa: E402
from edgekit.sources.meta_model import decoder_layers  # noqa: E402


def correlated_layer(seed: int = 0, rows: int = 2048, features: int = 128, out: int = 64):
    """Inputs whose features are strongly correlated (X^T X far from diagonal), a weight, and H."""
    generator = torch.Generator().manual_seed(seed)
    # Latent factors of very different strengths, mixed by a random matrix.
    strengths = torch.logspace(0, -2, features)
    latent = torch.randn(rows, features, generator=generator) * strengths
    x = latent @ torch.randn(features, features, generator=generator)
    weight = torch.randn(out, features, generator=generator) * 0.05
    hessian = HessianAccumulator(features)
    hessian.add(x)
    return x, weight, hessian.matrix()


def test_hessian_accumulator_sums_xtx_over_batches():
    x = torch.randn(3, 50, 24, generator=torch.Generator().manual_seed(3))
    hessian = HessianAccumulator(24)
    hessian.add(x[:2])
    hessian.add(x[2])
    flat = x.reshape(-1, 24).double()
    assert hessian.rows == 150
    assert torch.allclose(hessian.matrix().double(), flat.T @ flat, rtol=1e-5, atol=1e-4)
    assert torch.equal(hessian.matrix(), hessian.matrix().T)


def output_error(x, weight, quantized: QuantizedWeight) -> float:
    reference = x @ weight.T
    return float((x @ quantized.dequantized.T - reference).norm() / reference.norm())


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_is_lower_than_rtn(sym, act_order):
    x, weight, hessian = correlated_layer()
    config = GPTQConfig(sym=sym, act_order=act_order)
    gptq = output_error(x, weight, quantize_weight(weight, hessian, config))
    rtn = output_error(x, weight, rtn_quantize_weight(weight, config))
    assert gptq < 0.8 * rtn, (gptq, rtn)


def test_dequantized_is_scales_times_codes_minus_zeros_with_fp16_scales():
    _, weight, hessian = correlated_layer()
    for config in (GPTQConfig(), GPTQConfig(bits=8, group_size=64, sym=False)):
        q = quantize_weight(weight, hessian, config)
        assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= config.maxq
        assert torch.equal(q.scales.half().float(), q.scales)
        assert torch.equal(q.dequantized, dequantize(q.codes, q.scales, q.zeros, config.group_size))


def test_dead_columns_quantize_to_zero():
    x, weight, _ = correlated_layer()
    x[:, 5] = 0.0
    hessian = HessianAccumulator(x.shape[1])
    hessian.add(x)
    q = quantize_weight(weight, hessian.matrix(), GPTQConfig(sym=False))
    assert torch.all(q.dequantized[:, 5] == 0)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_pack_unpack_is_bit_exact(bits, group_size):
    generator = torch.Generator().manual_seed(bits * 1000 + group_size)
    out, features = 48, 256
    groups = features // group_size
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (out, features), generator=generator).to(torch.uint8)
    zeros = torch.randint(0, maxq + 1, (out, groups), generator=generator).to(torch.uint8)
    zeros[0, 0], zeros[1, 0] = 0, maxq  # the wrap-around of the stored zero - 1
    codes[0, :8] = maxq  # a word with its top bit set (negative int32)
    scales = (torch.rand(out, groups, generator=generator) * 0.1).half().float()
    q = QuantizedWeight(codes, scales, zeros, dequantize(codes, scales, zeros, group_size), bits, group_size)

    packed = pack_gptq(q, bits)
    assert packed["qweight"].dtype == torch.int32 and packed["qweight"].shape == (features * bits // 32, out)
    assert packed["qzeros"].dtype == torch.int32 and packed["qzeros"].shape == (groups, out * bits // 32)
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (groups, out)
    codes_back, scales_back, zeros_back = unpack_gptq(packed, bits, group_size)
    assert torch.equal(codes_back, codes)
    assert torch.equal(scales_back, scales)
    assert torch.equal(zeros_back, zeros)


def test_packing_matches_the_builders_unpacking():
    """Low bits first along the input dim, and qzeros stored minus one (what the builder's loader expects)."""
    codes = torch.arange(16, dtype=torch.uint8).repeat(8, 2)  # [8, 32]
    zeros = torch.full((8, 1), 3, dtype=torch.uint8)
    scales = torch.ones(8, 1)
    packed = pack_gptq(QuantizedWeight(codes, scales, zeros, dequantize(codes, scales, zeros, 32), 4, 32), 4)
    word = packed["qweight"][0, 0].item() & 0xFFFFFFFF
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == list(range(8))
    assert (packed["qzeros"][0, 0].item() & 0xF) == 2


def test_act_order_uses_static_groups_and_a_trivial_g_idx():
    _x, weight, hessian = correlated_layer()
    config = GPTQConfig(act_order=True, group_size=32)
    q = quantize_weight(weight, hessian, config)
    # Every column is quantized with its own contiguous group's parameters, fixed before the solve.
    rtn = rtn_quantize_weight(weight, config)
    assert torch.equal(q.scales, rtn.scales) and torch.equal(q.zeros, rtn.zeros)
    g_idx = pack_gptq(q, 4)["g_idx"]
    assert torch.equal(g_idx, torch.arange(weight.shape[1], dtype=torch.int32) // 32)
    assert quantization_config(config)["desc_act"] is False


def test_gptq_is_deterministic():
    _, weight, hessian = correlated_layer()
    first = quantize_weight(weight, hessian, GPTQConfig())
    second = quantize_weight(weight, hessian, GPTQConfig())
    for field in ("codes", "scales", "zeros", "dequantized"):
        assert torch.equal(getattr(first, field), getattr(second, field))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"bits": 3}, "bits"),
        ({"group_size": 16}, "group_size"),
        ({"damp": 0.0}, "damp"),
        ({"damp": 1.5}, "damp"),
        ({"block_size": 0}, "block_size"),
        ({"sym": "yes"}, "sym"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(GPTQConfig(), **changes)


def test_decoder_layers_rejects_unknown_layouts():
    with pytest.raises(ValueError, match="cannot find the decoder layers of Linear"):
        decoder_layers(torch.nn.Linear(2, 2))


def _fake_quantize_rtn(model, config):
    for layer in decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = rtn_quantize_weight(module.weight.data, config).dequantized


def _mean_kl(reference_logits, logits) -> float:
    reference = torch.log_softmax(reference_logits, dim=-1)
    variant = torch.log_softmax(logits, dim=-1)
    return float((reference.exp() * (reference - variant)).sum(-1).mean())


def test_driver_quantizes_every_decoder_linear_and_beats_rtn(tiny_checkpoints):
    from tiny_models import VOCAB, load_tiny_model

    model = load_tiny_model(tiny_checkpoints("llama"))
    generator = torch.Generator().manual_seed(0)
    calibration = torch.randint(4, VOCAB, (16, 64), generator=generator)
    held_out = torch.randint(4, VOCAB, (4, 64), generator=generator)
    config = GPTQConfig(bits=4, group_size=32)
    with torch.no_grad():
        reference = model(held_out).logits
        rtn_model = copy.deepcopy(model)
        _fake_quantize_rtn(rtn_model, config)
        rtn_logits = rtn_model(held_out).logits

    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    results = gptq_quantize_model(model, calibration, config, batch_size=6)  # a short last batch, too

    layers = model.config.num_hidden_layers
    assert len(results) == 7 * layers
    for name, q in results.items():
        module = model.get_submodule(name)
        assert name.startswith("model.layers.")
        assert torch.equal(module.weight.data, q.dequantized)
    untouched = [n for n, p in model.named_parameters() if torch.equal(p, original[n])]
    assert "model.embed_tokens.weight" in untouched and "lm_head.weight" in untouched
    with torch.no_grad():
        gptq_logits = model(held_out).logits
    gptq_kl, rtn_kl = _mean_kl(reference, gptq_logits), _mean_kl(reference, rtn_logits)
    assert gptq_kl < rtn_kl, (gptq_kl, rtn_kl)


def test_driver_is_deterministic(tiny_checkpoints):
    from tiny_models import VOCAB, load_tiny_model

    calibration = torch.randint(4, VOCAB, (8, 32), generator=torch.Generator().manual_seed(1))
    runs = [
        gptq_quantize_model(load_tiny_model(tiny_checkpoints("llama")), calibration, GPTQConfig()) for _ in range(2)
    ]
    assert runs[0].keys() == runs[1].keys()
    for name in runs[0]:
        assert torch.equal(runs[0][name].codes, runs[1][name].codes)
        assert torch.equal(runs[0][name].scales, runs[1][name].scales)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_layers_read_from_disk_give_the_same_checkpoint_as_the_whole_model(
    tiny_checkpoints, tmp_path, monkeypatch, model_type
):
    """GPTQ reading one layer at a time from safetensors writes the very bytes the whole-model load does."""
    from tiny_models import VOCAB, load_checkpoint_tensors

    from edgekit.quant import gptq_checkpoint
    from edgekit.sources.meta_model import open_lazily

    source = tiny_checkpoints(model_type)
    assert open_lazily(source) is not None
    calibration = torch.randint(4, VOCAB, (6, 32), generator=torch.Generator().manual_seed(2))
    gptq_checkpoint.write_gptq_checkpoint(source, tmp_path / "lazy", GPTQConfig(), calibration)
    monkeypatch.setattr(gptq_checkpoint, "open_lazily", lambda folder: None)
    gptq_checkpoint.write_gptq_checkpoint(source, tmp_path / "whole", GPTQConfig(), calibration)
    lazy = load_checkpoint_tensors(tmp_path / "lazy")
    whole = load_checkpoint_tensors(tmp_path / "whole")
    assert lazy.keys() == whole.keys()
    index = json.loads((tmp_path / "lazy" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(lazy)
    assert any(name.endswith(".qweight") for name in lazy)
    for name in lazy:
        assert torch.equal(lazy[name], whole[name]), name


def test_a_checkpoint_with_renamed_tensors_is_loaded_whole(tiny_checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from edgekit.sources.meta_model import open_lazily

    folder = shutil.copytree(tiny_checkpoints("llama"), tmp_path / "renamed")
    tensors = load_file(folder / "model.safetensors")
    tensors["renamed.q_proj"] = tensors.pop("model.layers.0.self_attn.q_proj.weight")
    save_file(tensors, folder / "model.safetensors")
    assert open_lazily(folder) is None
