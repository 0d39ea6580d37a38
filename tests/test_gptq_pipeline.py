"""GPTQ variants through `edgekit build`: the ONNX export matches the fake-quantized model, builds repeat."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import EXACT_GPTQ_TARGETS, fake_quantized_model, load_checkpoint_tensors

from edgekit.cli import main
from edgekit.exporters.validate import onnx_logits

BUILD_FLAGS = ["--eval-windows", "2", "--eval-ctx", "64", "--calib-samples", "8", "--calib-seq-len", "64", "-q"]


@pytest.fixture(scope="module")
def targets_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("targets") / "targets.yaml"
    path.write_text(EXACT_GPTQ_TARGETS)
    return path


def _build(runner, source: Path, out: Path, targets_file: Path) -> None:
    args = ["build", str(source), "-o", str(out), "-t", "cpu-gptq", "--targets-file", str(targets_file)]
    result = runner.invoke(main, args + BUILD_FLAGS)
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_gptq_variant_matches_the_fake_quantized_model_and_is_deployed(
    runner, tiny_checkpoints, targets_file: Path, tmp_path: Path, kept_gptq_checkpoint: dict[str, Path]
) -> None:
    source = tiny_checkpoints("llama")
    kept = kept_gptq_checkpoint
    out = tmp_path / "pkg"
    _build(runner, source, out, targets_file)
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["variants"]) == ["fp32", "int4-rtn", "int4-gptq"]
    assert manifest["targets"]["cpu-gptq"]["variant"] == "int4-gptq"
    config = json.loads((kept["folder"] / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq"
    assert config["quantization_config"]["desc_act"] is False

    model = fake_quantized_model(source, load_checkpoint_tensors(kept["folder"]))
    ids = np.random.default_rng(3).integers(10, 500, size=(1, 16))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    actual = onnx_logits(out / "int4-gptq", ids)
    assert np.abs(expected - actual).max() < 1e-4

    import onnx

    graph = onnx.load(str(out / "int4-gptq" / "model.onnx"), load_external_data=False).graph
    nbits = [node for node in graph.node if node.op_type == "MatMulNBits"]
    assert len(nbits) == 2 * 4  # qkv, o, gate and up joined (exporters/parallel_matmuls.py), down; 2 layers
    assert sum(node.name.startswith("edgekit_joined") for node in nbits) == 2
    # No g_idx (it would disable prepacking) and no zero points: symmetric GPTQ's are all the default,
    # and the input would slow decoding (edgekit/exporters/zero_points.py).
    assert all(len(node.input) == 3 for node in nbits), [list(node.input) for node in nbits]


@pytest.mark.slow
def test_two_gptq_builds_give_identical_weight_bytes(runner, tiny_checkpoints, targets_file: Path, tmp_path) -> None:
    source = tiny_checkpoints("qwen3")
    first, second = tmp_path / "a", tmp_path / "b"
    _build(runner, source, first, targets_file)
    _build(runner, source, second, targets_file)
    for name in ("model.onnx", "model.onnx.data"):
        assert (first / "int4-gptq" / name).read_bytes() == (second / "int4-gptq" / name).read_bytes()


@pytest.mark.slow
def test_a_targets_gptq_settings_reach_the_solver(runner, tiny_checkpoints, tmp_path: Path, monkeypatch) -> None:
    """`gptq: {one_pass, sym, ...}` in targets.yaml is the GPTQConfig the build calibrates with."""
    import edgekit.quant.gptq_checkpoint as checkpoint_module

    configs = []
    original = checkpoint_module.write_gptq_checkpoint

    def record(hf_folder, out, config, *args, **kwargs):  # type: ignore[no-untyped-def]
        configs.append(config)
        return original(hf_folder, out, config, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "write_gptq_checkpoint", record)
    targets = tmp_path / "targets.yaml"
    targets.write_text(EXACT_GPTQ_TARGETS + "    gptq: {one_pass: true, sym: false, damp: 0.02}\n")
    _build(runner, tiny_checkpoints("llama"), tmp_path / "pkg", targets)
    [config] = configs
    assert (config.one_pass, config.sym, config.damp, config.act_order, config.group_size) == (
        True,
        False,
        0.02,
        True,
        32,
    )
