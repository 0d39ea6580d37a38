"""GPTQ's one-pass schedule: the true-sequential order, every architecture's layers, and its error paths."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("greenlet")

from edgekit.quant.gptq import GPTQConfig, HessianAccumulator, quantize_weight  # noqa: E402
from edgekit.quant.gptq_layers import gptq_quantize_model  # noqa: E402
from edgekit.sources.meta_model import decoder_layers  # noqa: E402

ONE_PASS = GPTQConfig(one_pass=True)


def _calibration(samples: int = 10, seq_len: int = 32, seed: int = 0):
    from tiny_models import VOCAB

    return torch.randint(4, VOCAB, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def _true_sequential_layer0(model, calibration, config, batch_size):
    """Layer 0 quantized the slow, obvious way: for each group of linears sharing an input, in execution
    order, rerun the layer (earlier groups already quantized) over every batch to collect that group's
    Hessian, then solve the group. Returns module name -> codes."""
    layer = decoder_layers(model)[0]
    captured: list[tuple[torch.Tensor, dict]] = []

    def catch(_module, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise StopIteration

    handle = layer.register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for start in range(0, calibration.shape[0], batch_size):
            with pytest.raises(StopIteration):
                model(input_ids=calibration[start : start + batch_size], use_cache=False)
    handle.remove()
    names = {module: name for name, module in model.named_modules()}
    groups = [
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.0.self_attn.o_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        ["model.layers.0.mlp.down_proj"],
    ]
    codes = {}
    for group in groups:
        leader = model.get_submodule(group[0])
        hessian = HessianAccumulator(leader.in_features)
        handle = leader.register_forward_pre_hook(lambda _m, args, h=hessian: h.add(args[0]))
        with torch.no_grad():
            for hidden, kwargs in captured:
                layer(hidden, **kwargs)
        handle.remove()
        stacked = torch.cat([model.get_submodule(name).weight for name in group])
        quantized = quantize_weight(stacked, hessian.matrix(), config)
        row = 0
        for name in group:
            module = model.get_submodule(name)
            part = quantized.rows(row, row + module.out_features)
            row += module.out_features
            module.weight.data = part.dequantized
            codes[names[module]] = part.codes
    return codes


def test_one_pass_quantizes_each_group_from_the_inputs_the_quantized_groups_before_it_make(tiny_checkpoints):
    from tiny_models import load_tiny_model

    source = tiny_checkpoints("llama")
    calibration = _calibration()
    expected = _true_sequential_layer0(load_tiny_model(source), calibration, ONE_PASS, batch_size=4)
    one_pass = gptq_quantize_model(load_tiny_model(source), calibration, ONE_PASS, batch_size=4)
    two_passes = gptq_quantize_model(load_tiny_model(source), calibration, GPTQConfig(), batch_size=4)
    assert len(expected) == 7
    for name, codes in expected.items():
        assert torch.equal(one_pass[name].codes, codes), name
    # q/k/v see the same inputs in both schedules; o_proj onwards sees the quantized q/k/v only in one pass.
    assert torch.equal(two_passes["model.layers.0.self_attn.q_proj"].codes, expected["model.layers.0.self_attn.q_proj"])
    assert not torch.equal(two_passes["model.layers.0.mlp.down_proj"].codes, expected["model.layers.0.mlp.down_proj"])


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma3_text", "phi3", "qwen3_5"])
def test_one_pass_covers_every_linear_of_every_architecture_and_is_deterministic(tiny_checkpoints, model_type):
    """Hybrid Qwen3.5 (linear and full attention layers), Gemma3's sliding layers and Phi3's fused
    projections run through the unmodified transformers layers; the last layer stops once quantized."""
    from tiny_models import load_tiny_model

    source = tiny_checkpoints(model_type)
    calibration = _calibration(samples=6)
    two_passes = gptq_quantize_model(load_tiny_model(source), calibration, GPTQConfig(), batch_size=4)
    timings: dict[str, float] = {}
    runs = [
        gptq_quantize_model(load_tiny_model(source), calibration, ONE_PASS, batch_size=4, timings=timings)
        for _ in range(2)
    ]
    assert sorted(timings) == ["capture", "forward", "hessian", "solve"]
    assert runs[0].keys() == two_passes.keys()
    for name in runs[0]:
        assert torch.equal(runs[0][name].codes, runs[1][name].codes), name
        assert torch.equal(runs[0][name].scales, runs[1][name].scales), name


def _refused_without_leftover_hooks(model, calibration, error: type[Exception], match: str) -> None:
    """One-pass GPTQ over ``model`` raises ``error``, and every hook it added is gone afterwards."""

    def hook_count() -> int:
        return sum(len(module._forward_pre_hooks) for module in model.modules())

    hooks = hook_count()
    with pytest.raises(error, match=match):
        gptq_quantize_model(model, calibration, ONE_PASS, batch_size=4)
    assert hook_count() == hooks


def test_an_error_inside_the_layer_stops_every_batch_and_removes_the_hooks(tiny_checkpoints):
    from tiny_models import load_tiny_model

    model = load_tiny_model(tiny_checkpoints("llama"))
    down = decoder_layers(model)[0].mlp.down_proj
    calls = []

    def fail_on_the_second_call(_module, _args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom in down_proj")

    down.register_forward_pre_hook(fail_on_the_second_call)
    # The run that learns the grouping calls down_proj once; the second call is the pass's first batch
    # reaching it, while the other batches are suspended at it or before it.
    _refused_without_leftover_hooks(model, _calibration(samples=8), RuntimeError, "boom in down_proj")


def test_batches_that_stop_at_different_linears_are_refused(tiny_checkpoints):
    """A layer whose path depends on the batch (here the MLP skips gate/up for one-sample batches)."""
    from tiny_models import load_tiny_model

    model = load_tiny_model(tiny_checkpoints("llama"))
    mlp = decoder_layers(model)[0].mlp
    original = mlp.forward

    def forward(x):
        if x.shape[0] == 1:
            return mlp.down_proj(torch.zeros(*x.shape[:-1], mlp.down_proj.in_features))
        return original(x)

    mlp.forward = forward
    _refused_without_leftover_hooks(
        model, _calibration(samples=5), RuntimeError, "calibration batches stopped at different linears"
    )


def test_a_linear_the_layer_never_calls_is_refused(tiny_checkpoints):
    from tiny_models import load_tiny_model

    model = load_tiny_model(tiny_checkpoints("llama"))
    decoder_layers(model)[0].mlp.add_module("unused_proj", torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"never calls model\.layers\.0\.mlp\.unused_proj"):
        gptq_quantize_model(model, _calibration(samples=4), ONE_PASS, batch_size=4)
