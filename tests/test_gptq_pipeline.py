"""GPTQ variants through `edgekit build`: the ONNX export matches the fake-quantized model, builds repeat."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import fake_quantized_model, load_checkpoint_tensors

from edgekit.cli import main
from edgekit.exporters.validate import onnx_logits

TARGETS = """
schema_version: 1
targets:
  cpu-gptq:
    description: GPTQ beside RTN, head left in float so the parity check sees GPTQ alone
    providers: [cpu]
    precision: int4
    block_size: 32
    accuracy_level: 1
    int4_methods: [rtn, gptq]
    lm_head: float
    budget: {max_kl_mean: 1.0}
"""
BUILD_FLAGS = ["--eval-windows", "2", "--eval-ctx", "64", "--calib-samples", "8", "--calib-seq-len", "64", "-q"]


@pytest.fixture(scope="module")
def targets_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("targets") / "targets.yaml"
    path.write_text(TARGETS)
    return path


def _build(runner, source: Path, out: Path, targets_file: Path) -> None:
    args = ["build", str(source), "-o", str(out), "-t", "cpu-gptq", "--targets-file", str(targets_file)]
    result = runner.invoke(main, args + BUILD_FLAGS)
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_gptq_variant_matches_the_fake_quantized_model_and_is_deployed(
    runner, tiny_checkpoints, targets_file: Path, tmp_path: Path, monkeypatch
) -> None:
    import edgekit.quant.gptq_checkpoint as checkpoint_module

    source = tiny_checkpoints("llama")
    kept: dict[str, Path] = {}
    original = checkpoint_module.write_gptq_checkpoint

    def keep_copy(hf_folder, out, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = original(hf_folder, out, *args, **kwargs)
        kept["folder"] = shutil.copytree(out, tmp_path / "gptq-checkpoint")
        return result

    monkeypatch.setattr(checkpoint_module, "write_gptq_checkpoint", keep_copy)
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
    assert len(nbits) == 2 * 5  # qkv, o, gate, up, down in each of the 2 layers
    assert all(len(node.input) <= 4 for node in nbits), "a g_idx input would disable prepacking"


@pytest.mark.slow
def test_two_gptq_builds_give_identical_weight_bytes(runner, tiny_checkpoints, targets_file: Path, tmp_path) -> None:
    source = tiny_checkpoints("qwen3")
    first, second = tmp_path / "a", tmp_path / "b"
    _build(runner, source, first, targets_file)
    _build(runner, source, second, targets_file)
    for name in ("model.onnx", "model.onnx.data"):
        assert (first / "int4-gptq" / name).read_bytes() == (second / "int4-gptq" / name).read_bytes()
