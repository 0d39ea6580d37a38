"""Third-party GPTQ (AutoGPTQ layout) and AWQ (GEMM layout) checkpoints as `edgekit build` sources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import pack_awq, quantized_checkpoint

from edgekit.cli import main
from edgekit.exporters.validate import onnx_logits
from edgekit.quant.gptq import GPTQConfig, rtn_quantize_weight
from edgekit.quant.gptq_format import pack_gptq
from edgekit.sources.prequantized import dequantize_awq, dequantize_gptq

TARGETS = """
schema_version: 1
targets:
  exact-cpu:
    description: fp32 compute and a float head, so the INT4 graph holds exactly the checkpoint's weights
    providers: [cpu]
    precision: int4
    accuracy_level: 1
    lm_head: float
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_quantized_checkpoint_builds_with_a_dequantized_reference(
    method, runner, tiny_checkpoints, tmp_path: Path
) -> None:
    source = quantized_checkpoint(tiny_checkpoints("llama"), tmp_path / f"tiny-{method}", method)
    targets = tmp_path / "targets.yaml"
    targets.write_text(TARGETS)
    out = tmp_path / "pkg"
    flags = ["-t", "exact-cpu", "--targets-file", str(targets), "--eval-windows", "2", "--eval-ctx", "64", "-q"]
    result = runner.invoke(main, ["build", str(source), "-o", str(out), *flags])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["variants"]) == ["fp32", f"int4-{method}"]
    assert manifest["targets"]["exact-cpu"]["variant"] == f"int4-{method}"
    assert manifest["validation"]["max_abs_diff"] <= 1e-3
    assert 100_000 < manifest["parameter_count"] < 400_000  # real parameters, not packed int32 words

    # The builder's reading of the packed weights and edgekit's dequantization agree: with fp32 compute
    # and a float head, the INT4 graph computes what the dequantized fp32 reference computes.
    ids = np.random.default_rng(5).integers(10, 500, size=(1, 16))
    reference = onnx_logits(out / "fp32", ids)
    quantized = onnx_logits(out / f"int4-{method}", ids)
    assert np.abs(reference - quantized).max() < 1e-4
    assert manifest["evaluation"]["variants"][f"int4-{method}"]["kl_mean"] < 1e-6


@pytest.mark.parametrize("streaming", [[], ["--streaming"]], ids=["whole", "streamed"])
def test_a_size_bound_on_a_quantized_checkpoint_is_refused_before_a_weight_is_read(
    streaming: list[str], runner, tiny_checkpoints, tmp_path: Path
) -> None:
    """The checkpoint's own INT4 variant is deployed as it is: no recipe, so nothing is held to the bound."""
    source = quantized_checkpoint(tiny_checkpoints("llama"), tmp_path / "tiny-gptq", "gptq")
    out = tmp_path / "pkg"
    args = ["build", str(source), "-o", str(out), "--max-model-bytes", "1000000", *streaming]
    result = runner.invoke(main, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "gptq checkpoint is deployed as it is" in lines[0], result.output
    assert "max_model_bytes (1,000,000)" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-gptq"]


def test_dequantizers_invert_the_packers() -> None:
    torch.manual_seed(0)
    weight = torch.randn(64, 96) * 0.05
    q = rtn_quantize_weight(weight, GPTQConfig(group_size=32, sym=False))
    gptq = dequantize_gptq(pack_gptq(q, 4), 4)
    awq = dequantize_awq(
        {
            "qweight": pack_awq(q.codes.t().contiguous()),
            "qzeros": pack_awq(q.zeros.t().contiguous()),
            "scales": q.scales.t().contiguous().to(torch.float16),
        }
    )
    assert torch.equal(gptq, q.dequantized)
    assert torch.equal(awq, q.dequantized)


def test_unsupported_quantization_is_refused_before_reading_weights(runner, tiny_checkpoints, tmp_path) -> None:
    source = tmp_path / "src"
    shutil.copytree(tiny_checkpoints("llama"), source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (source / "config.json").write_text(json.dumps(config))
    (source / "model.safetensors").write_bytes(b"not read")
    result = runner.invoke(main, ["build", str(source), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "bitsandbytes" in result.output and "config.json" in result.output
    assert not (tmp_path / "out").exists()
