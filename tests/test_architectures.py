"""Every registered architecture: a tiny model built with `edgekit build`, checked against transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_models import TINY_MODELS, load_tiny_model

from edgekit.cli import main
from edgekit.exporters.validate import onnx_logits
from edgekit.sources.registry import supported_architectures

GREEDY_TOKENS = 16


def test_every_registered_architecture_has_a_tiny_model() -> None:
    missing = sorted(set(supported_architectures()) - set(TINY_MODELS))
    assert not missing, f"registered architectures without a tiny test model: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(TINY_MODELS))
def test_tiny_model_builds_matches_transformers_and_generates_the_same_tokens(
    model_type, tiny_checkpoints, runner, tmp_path
) -> None:
    import torch

    from edgekit.runtimes.model import load

    source = tiny_checkpoints(model_type)
    out = tmp_path / "pkg"
    result = runner.invoke(main, ["build", str(source), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    tolerance = manifest["validation"]["tolerance"]  # the bound measured for this model
    assert manifest["validation"]["max_abs_diff"] <= tolerance
    # The default target: RTN, then the recipe it deploys (searched on the built-in corpus).
    assert set(manifest["variants"]) == {"fp32", "int4-rtn", "int4-recipe"}
    assert manifest["default_variant"] == "int4-recipe"

    # Independent of the build's own check: logits on other tokens, against the user's checkpoint.
    model = load_tiny_model(source)
    ids = np.random.default_rng(1).integers(10, 500, size=(1, 12))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids)).logits.numpy()
    actual = onnx_logits(out / "fp32", ids)
    assert np.abs(expected - actual).max() <= tolerance

    with torch.no_grad():
        hf_tokens = model.generate(
            torch.from_numpy(ids), max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
            do_sample=False, eos_token_id=None, pad_token_id=3,
        )[0, ids.shape[1]:].tolist()  # fmt: skip
    with load(out, variant="fp32") as runtime:
        ours = runtime.generate_tokens(ids[0].tolist(), max_new_tokens=GREEDY_TOKENS)
    assert ours, "the runtime generated nothing"
    assert ours == hf_tokens[: len(ours)]

    for variant in ("int4-rtn", "int4-recipe"):
        with load(out, variant=variant) as runtime:
            assert len(runtime.generate_tokens(ids[0].tolist(), max_new_tokens=4)) >= 1, variant


def test_gemma3_with_linear_rope_is_refused_before_weights() -> None:
    """The builder gives Gemma 3's sliding layers the global layers' linear scaling (larger Gemma 3 text
    configs use factor 8 on their global layers): validation failed after the export, "report it"."""
    from edgekit.errors import UnsupportedArchitectureError
    from edgekit.sources.registry import lookup_architecture

    config = {"model_type": "gemma3_text", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 16,
              "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0},
                                  "sliding_attention": {"rope_type": "default"}}}  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError, match="rope_type 'linear'"):
        lookup_architecture(config).check_config(config, Path("config.json"))
    config["rope_parameters"]["full_attention"] = {"rope_type": "default"}
    lookup_architecture(config).check_config(config, Path("config.json"))
