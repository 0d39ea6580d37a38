"""The streamed evaluation reference: the checkpoint run in PyTorch one decoder layer at a time."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekit.accuracy import streamed_reference
from edgekit.accuracy.evaluate import EVAL_DIR, evaluate_package
from edgekit.accuracy.streamed_reference import StreamedModel
from edgekit.cli import main
from edgekit.package.manifest import read_manifest, write_manifest

WINDOWS = 4
CTX = 64


def _bf16_qwen3(source: Path, folder: Path) -> Path:
    """The tiny Qwen3 checkpoint stored in bfloat16, as published checkpoints are."""
    import torch
    from tiny_models import load_tiny_model, tiny_tokenizer

    load_tiny_model(source).to(torch.bfloat16).save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def _checkpoint(name: str, tiny_checkpoints, tmp_path: Path) -> Path:
    from tiny_models import make_tiny_checkpoint

    if name == "tied-qwen3":
        return make_tiny_checkpoint("qwen3", tmp_path / "tied", seed=1, tied=True)
    if name == "bf16-qwen3":
        return _bf16_qwen3(tiny_checkpoints("qwen3"), tmp_path / "bf16")
    return Path(tiny_checkpoints(name))


@pytest.mark.parametrize("name", ["qwen3", "tied-qwen3", "bf16-qwen3", "llama", "qwen3_5"])
def test_streamed_hidden_states_equal_the_whole_model(
    name: str, tiny_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch
    from tiny_models import load_tiny_model

    # Head blocks of a few rows, so the LM head goes through many blocks as a 248k-row one does.
    monkeypatch.setattr(streamed_reference, "_HEAD_BLOCK_BYTES", 4096)
    folder = _checkpoint(name, tiny_checkpoints, tmp_path)
    windows = np.random.default_rng(0).integers(0, 512, size=(5, 32)).astype(np.int64)
    model = StreamedModel(folder)
    # Batches of 2 windows: the last batch has one, so kwargs are captured for two batch sizes.
    hidden = model.final_hidden_states(windows, 16, 31, batch_windows=2)
    logits = model.head_logits(hidden.reshape(-1, hidden.shape[-1]))

    whole = load_tiny_model(folder)
    with torch.no_grad():
        out = whole(input_ids=torch.from_numpy(windows), output_hidden_states=True)
    expected_hidden = out.hidden_states[-1][:, 16:31].numpy()
    expected_logits = out.logits[:, 16:31].reshape(-1, logits.shape[-1]).numpy()
    assert hidden.shape == expected_hidden.shape
    np.testing.assert_allclose(hidden, expected_hidden, rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=1e-5)
    assert model.weight_dtype == ("bfloat16" if name == "bf16-qwen3" else "float32")
    assert model.head_name == ("model.embed_tokens.weight" if name == "tied-qwen3" else "lm_head.weight")


def _without_fp32(package: Path, destination: Path) -> Path:
    """A copy of ``package`` whose fp32 variant is gone, as in a streamed build."""
    root = Path(shutil.copytree(package, destination))
    shutil.rmtree(root / "fp32")
    manifest = read_manifest(root)
    del manifest["variants"]["fp32"]
    write_manifest(root, manifest)
    return root


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_5"])
def test_streamed_reference_scores_like_the_fp32_onnx_reference(model_type: str, tiny_checkpoints, tmp_path) -> None:
    from edgekit.pipeline import build

    checkpoint = tiny_checkpoints(model_type)
    package = build(checkpoint, tmp_path / "pkg", progress=False, evaluation=None).out
    onnx = evaluate_package(package, windows=WINDOWS, ctx=CTX, write=False)
    streamed = evaluate_package(
        _without_fp32(package, tmp_path / "no-fp32"),
        windows=WINDOWS,
        ctx=CTX,
        write=False,
        reference_checkpoint=checkpoint,
    )
    assert onnx["reference"]["kind"] == "onnx"
    assert streamed["reference"]["kind"] == "pytorch-streamed"
    assert streamed["reference"]["checkpoint"] == "sha256 of its weight files matches the manifest's source"
    assert streamed["protocol"] == onnx["protocol"]
    ours, theirs = streamed["variants"]["int4-rtn"], onnx["variants"]["int4-rtn"]
    assert theirs["kl_mean"] > 1e-5  # a real difference to measure, not 0 against 0
    # The fp32 ONNX export matches PyTorch to 1e-3 (5e-3 for Qwen3.5) in logits: the metrics agree closely.
    assert ours["kl_mean"] == pytest.approx(theirs["kl_mean"], rel=1e-3)
    assert ours["kl_p99"] == pytest.approx(theirs["kl_p99"], rel=1e-2)
    assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-6)
    assert ours["ppl_ratio"] == pytest.approx(theirs["ppl_ratio"], rel=1e-4)
    assert ours["top1_agreement"] == theirs["top1_agreement"]
    assert streamed["variants"]["fp32"]["perplexity"] == pytest.approx(onnx["variants"]["fp32"]["perplexity"], rel=1e-4)
    assert streamed["variants"]["fp32"]["bytes"] is None


def test_streamed_build_is_evaluated_and_eval_needs_the_checkpoint(runner, tiny_checkpoints, tmp_path: Path) -> None:
    from tiny_models import make_tiny_checkpoint

    from edgekit.pipeline import EvalSettings, build

    checkpoint = tiny_checkpoints("qwen3")
    out = tmp_path / "streamed"
    settings = EvalSettings(windows=2, ctx=32)
    result = build(checkpoint, out, "laptop-cpu-rtn", progress=False, streaming=True, evaluation=settings)
    manifest = result.manifest
    assert "fp32" not in manifest["variants"]
    assert "skipped" in manifest["validation"]  # no fp32 ONNX, so no parity check against PyTorch
    evaluation = manifest["evaluation"]
    assert evaluation["reference"]["kind"] == "pytorch-streamed"
    assert evaluation["reference"]["description"].startswith("streamed PyTorch from the checkpoint")
    assert 0 < evaluation["variants"]["int4-rtn"]["kl_mean"] < 0.01
    assert "Reference: streamed PyTorch from the checkpoint" in (out / EVAL_DIR / "report.md").read_text()
    assert len(list((out / EVAL_DIR).glob("reference-*.npz"))) == 1

    # No checkpoint: a one-line usage error that names the option, and nothing written.
    before = (out / "manifest.json").read_text()
    failed = runner.invoke(main, ["eval", str(out), "--windows", "2", "--ctx", "32"])
    assert failed.exit_code == 2
    assert "--reference-checkpoint DIR" in failed.output
    assert "has no fp32 reference variant" in failed.output
    assert (out / "manifest.json").read_text() == before

    # The source folder: its weights are verified, and the build's cache serves the same protocol.
    protocol = ["eval", str(out), "--windows", "2", "--ctx", "32"]
    ok = runner.invoke(main, [*protocol, "--reference-checkpoint", str(checkpoint)])
    assert ok.exit_code == 0, ok.output
    report = json.loads((out / EVAL_DIR / "report.json").read_text())
    assert report["reference_cache"] == "hit"
    assert report["reference"]["checkpoint"] == "sha256 of its weight files matches the manifest's source"
    assert report["variants"]["int4-rtn"]["kl_mean"] == pytest.approx(evaluation["variants"]["int4-rtn"]["kl_mean"])

    # Another checkpoint of the same shape is refused before anything runs.
    other = make_tiny_checkpoint("qwen3", tmp_path / "other", seed=7)
    wrong = runner.invoke(main, [*protocol, "--reference-checkpoint", str(other)])
    assert wrong.exit_code == 2
    assert "not the ones the package was built from" in wrong.output
