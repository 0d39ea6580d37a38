"""Validation of the fp32 export against PyTorch: a bound from the model's own float noise, and broken exports.

Each broken export is a correct one with one deliberate bug written into its graph: the rotary pairing
flipped (interleaved against half-split), every RMSNorm epsilon ten times too large, a square attention
output projection transposed. Each must fail on every tiny family (with its real quirks) and on the real
SmolLM2-135M weights, while the correct export passes with room to spare.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tiny_models import REALISTIC_MODELS, make_tiny_checkpoint, tiny_tokenizer

from edgekit.errors import PackageError, ValidationError
from edgekit.exporters import validate
from edgekit.exporters.decoder_session import DecoderSession, context_length
from edgekit.exporters.validate import (
    LONG_PROMPT_TOKENS,
    SHORT_PROMPTS,
    TorchReference,
    check_export,
    compare_logits,
    onnx_logits,
    parity_bound,
    torch_reference,
    validation_inputs,
)
from edgekit.sources import registry
from edgekit.sources.registry import ParityTolerance, lookup_architecture

FP32_ONLY = """
schema_version: 1
targets:
  fp32-only:
    description: the fp32 reference alone (what validation checks)
    providers: [cpu]
    precision: fp32
"""
BUGS = ("rotary", "epsilon", "transpose")
BUG_FACTOR = 100
"""Every broken export misses the bound's float-noise allowance by at least this factor (most by thousands)."""


# --- graph surgery: a correct fp32 export made wrong in one place --------------------------------------------


def _flip_rotary_pairing(model: onnx.ModelProto) -> int:
    """Interleaved rotary pairs against half-split ones: the rotation applied to the wrong pairs of dimensions."""
    flipped = 0
    for node in model.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "GroupQueryAttention" and attrs.get("do_rotary") and attrs["do_rotary"].i == 1:
            attrs["rotary_interleaved"].i ^= 1
            flipped += 1
        elif node.op_type in ("RotaryEmbedding", "MRotaryEmbedding") and "interleaved" in attrs:
            attrs["interleaved"].i ^= 1
            flipped += 1
    return flipped


def _wrong_norm_epsilon(model: onnx.ModelProto) -> int:
    """Every RMSNorm's epsilon ten times too large (1e-5 for 1e-6, a common slip between families)."""
    changed = 0
    for node in model.graph.node:
        if node.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
            for attr in node.attribute:
                if attr.name == "epsilon":
                    attr.f *= 10
                    changed += 1
    return changed


def _transpose_square_projection(model: onnx.ModelProto) -> int:
    """The first square attention output projection, transposed (a weight read in the wrong layout)."""
    for init in model.graph.initializer:
        square = len(init.dims) == 2 and init.dims[0] == init.dims[1]
        if square and any(part in init.name for part in ("o_proj", "out_proj", "q_proj")):
            weight = numpy_helper.to_array(init)
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight.T), init.name))
            return 1
    return 0


SURGERY: dict[str, Callable[[onnx.ModelProto], int]] = {
    "rotary": _flip_rotary_pairing,
    "epsilon": _wrong_norm_epsilon,
    "transpose": _transpose_square_projection,
}


def broken_copy(variant: Path, out: Path, bug: str) -> Path:
    """A copy of an fp32 variant folder with ``bug`` written into its graph."""
    shutil.copytree(variant, out, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data"))
    model = onnx.load(str(variant / "model.onnx"))
    assert SURGERY[bug](model) > 0, f"{bug}: nothing to change in {variant}"
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return out


# --- helpers ---------------------------------------------------------------------------------------------------


def build_fp32(source: Path, out: Path) -> dict[str, Any]:
    """Build only the fp32 reference of ``source`` (validated inside the build); returns its manifest."""
    from edgekit.pipeline import build

    targets = out.parent / f"{out.name}-targets.yaml"
    targets.write_text(FP32_ONLY)
    return build(source, out, "fp32-only", targets_file=targets, progress=False, evaluation=None).manifest


def reference_for(hf_folder: Path, variant: Path, rule: ParityTolerance, model_class: str) -> TorchReference:
    """PyTorch's logits on the validation prompts, as the build computes them."""
    max_tokens = min(context_length(variant), validate._torch_context_length(hf_folder))
    inputs = validation_inputs(hf_folder, max_tokens)
    return torch_reference(hf_folder, inputs, model_class, approximation=rule.builder_approximation)


def assert_broken_export_fails(variant: Path, reference: TorchReference, rule: ParityTolerance) -> float:
    """``variant`` fails validation in one line naming it, far beyond the bound's float-noise allowance; its max diff.

    Beyond a known builder approximation (Qwen3.5's), what counts is how far the bug goes past it: the bound
    holds the approximation exactly and float noise on top, and the bug must miss that margin by ``BUG_FACTOR``.
    """
    with pytest.raises(ValidationError) as caught:
        check_export(variant, reference, rule)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{variant}: the {variant.name} export's logits differ from PyTorch's")
    known = max(reference.known_difference or [0.0])
    bound = parity_bound(max(reference.noise), reference.scale, rule, known)
    diff = float(np.abs(onnx_logits(variant, reference.inputs[-1]) - reference.logits[-1]).max())
    assert diff - known > BUG_FACTOR * (bound - known), f"{variant.name}: {diff:.3g} is too close to {bound:.3g}"
    return diff


def assert_recorded(validation: dict[str, Any]) -> None:
    """The manifest's validation section: every figure, the bound met, each prompt recorded, one of them long."""
    assert validation["variant"] == "fp32"
    assert validation["max_abs_diff"] <= validation["tolerance"]
    assert validation["top1_agreement"] == 1.0
    assert 0 < validation["noise"] < validation["tolerance"]
    assert validation["max_rel_diff"] < 1e-2
    assert validation["logit_scale"] > 0
    assert set(validation["rule"]) == {"noise_multiple", "scale_floor", "builder_approximation"}
    prompts = validation["prompts"]
    assert len(prompts) == len(SHORT_PROMPTS) + 1
    assert sum(p["tokens"] for p in prompts) == validation["tokens"]
    assert prompts[-1]["tokens"] >= min(256, LONG_PROMPT_TOKENS)  # the tiny models' context is 256
    assert all(p["max_abs_diff"] <= validation["tolerance"] for p in prompts)


# --- the rule itself (no builder) -----------------------------------------------------------------------------


def test_the_bound_is_a_multiple_of_the_noise_plus_a_floor_relative_to_the_logits() -> None:
    rule = ParityTolerance(noise_multiple=10.0, scale_floor=1e-5)
    assert parity_bound(2e-4, 40.0, rule) == pytest.approx(10 * 2e-4 + 1e-5 * 40.0)
    assert parity_bound(0.0, 40.0, rule) == pytest.approx(4e-4)  # fp32 and fp64 agree: the floor alone
    assert parity_bound(2e-4, 40.0, rule, known_difference=1e-3) == pytest.approx(2e-3 + 4e-4 + 1e-3)


def test_a_near_tie_flipped_by_rounding_is_not_a_disagreement() -> None:
    expected = np.zeros((1, 3, 5), dtype=np.float32)
    expected[0, :, 1] = 5.0
    expected[0, 0, 2] = 5.0 - 1e-4  # position 0: PyTorch's top two within the bound of each other
    expected[0, 1, 2] = 5.0 - 1.0  # position 1: a clear winner
    actual = expected.copy()
    actual[0, 0, 2] += 2e-4  # ONNX picks the runner-up at both
    actual[0, 1, 2] += 2.0
    tied = compare_logits(expected, actual, bound=1e-3)
    assert tied.near_ties == 1
    assert tied.top1_agreement == pytest.approx(2 / 3)  # the near tie agrees, the clear winner does not
    assert tied.max_abs_diff == pytest.approx(2.0)
    assert tied.max_rel_diff == pytest.approx(2.0 / 5.0)


def test_shapes_that_differ_are_a_validation_error() -> None:
    with pytest.raises(ValidationError, match="shape"):
        compare_logits(np.zeros((1, 2, 4), np.float32), np.zeros((1, 3, 4), np.float32), 1e-3)


def test_the_float64_run_has_no_float32_islands() -> None:
    import torch

    weight, buffer = torch.ones(2, 2), torch.zeros(2)  # made outside, in float32, as a model's are
    with validate._float64_everywhere():
        x = torch.ones(3, dtype=torch.float64)
        assert x.float().dtype == torch.float64
        assert x.to(torch.float32).dtype == torch.float64
        assert torch.softmax(x, -1, dtype=torch.float32).dtype == torch.float64
        assert torch.zeros(2, dtype=torch.float32).dtype == torch.float64
        assert torch.nn.functional.linear(torch.ones(1, 2), weight).dtype == torch.float64  # weights promoted
        assert torch.arange(3).to(torch.int64).dtype == torch.int64  # other casts are left alone
        buffer.add_(1.0)  # an in-place write lands in the tensor itself, not in a promoted copy
        buffer[0] = 5.0
    assert weight.dtype == torch.float32 and buffer.tolist() == [5.0, 1.0]
    assert torch.ones(2).float().dtype == torch.float32  # and nothing outlives the block


def test_prompts_are_short_and_long_and_fit_the_context(tmp_path: Path) -> None:
    tiny_tokenizer().save_pretrained(str(tmp_path))
    lengths = [ids.shape[1] for ids in validation_inputs(tmp_path, 10_000)]
    assert len(lengths) == len(SHORT_PROMPTS) + 1
    assert lengths[-1] == LONG_PROMPT_TOKENS
    assert max(lengths[:-1]) < LONG_PROMPT_TOKENS
    assert [ids.shape[1] for ids in validation_inputs(tmp_path, 40)][-1] == 40
    assert all(ids.shape[1] <= 40 for ids in validation_inputs(tmp_path, 40))


# --- the rotary layout, from the graph (hand-built graphs, no builder) ----------------------------------------


def _positions_graph(folder: Path, position_shape: list[Any], rotary: str | None) -> Path:
    """A decoder whose ``logits`` are its ``position_ids`` as floats, read by a rotary op of kind ``rotary``."""
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, position_shape),
    ]
    nodes = [helper.make_node("Cast", ["position_ids"], ["logits"], to=TensorProto.FLOAT)]
    initializers = []
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)]
    if rotary is not None:  # rotating x, [batch, seq, 8] made from input_ids
        cache = np.ones((16, 4), dtype=np.float32)
        initializers = [
            numpy_helper.from_array(cache, "cos_cache"),
            numpy_helper.from_array(cache, "sin_cache"),
            numpy_helper.from_array(np.array([2], np.int64), "axis"),
            numpy_helper.from_array(np.array([1, 1, 8], np.int64), "repeats"),
        ]
        nodes += [
            helper.make_node("Cast", ["input_ids"], ["ids_float"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["ids_float", "axis"], ["ids_3d"]),
            helper.make_node("Tile", ["ids_3d", "repeats"], ["x"]),
        ]
        extra = {"mrope_section": [2, 1, 1], "mrope_layout": 1} if rotary == "MRotaryEmbedding" else {}
        nodes.append(
            helper.make_node(rotary, ["x", "position_ids", "cos_cache", "sin_cache"], ["rotated"],
                             domain="com.microsoft", num_heads=1, rotary_embedding_dim=8, **extra)
        )  # fmt: skip
        outputs.append(helper.make_tensor_value_info("rotated", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "positions", inputs, outputs, initializers)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    folder.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(folder / "model.onnx"))
    genai = {"model": {"context_length": 16, "decoder": {"filename": "model.onnx", "head_size": 8}}}
    (folder / "genai_config.json").write_text(json.dumps(genai))
    return folder


def test_a_2d_position_input_gets_one_row(tmp_path: Path) -> None:
    session = DecoderSession(_positions_graph(tmp_path / "m", ["batch_size", "sequence_length"], None))
    assert session.position_rows == 0
    np.testing.assert_array_equal(session.logits(np.zeros((1, 4), np.int64)), [[0, 1, 2, 3]])


def test_a_multimodal_rope_graph_gets_the_same_positions_on_every_section(tmp_path: Path) -> None:
    folder = _positions_graph(tmp_path / "m", [3, "batch_size", "sequence_length"], "MRotaryEmbedding")
    session = DecoderSession(folder)
    assert session.position_rows == 3
    np.testing.assert_array_equal(session.logits(np.zeros((1, 4), np.int64)), np.tile(np.arange(4), (3, 1, 1)))


def test_3d_positions_read_by_a_plain_rotary_embedding_are_refused_in_one_line(tmp_path: Path) -> None:
    # What the builder makes of a Qwen3.5 config without mrope_section: no feed can run it.
    folder = _positions_graph(tmp_path / "m", [3, "batch_size", "sequence_length"], "RotaryEmbedding")
    with pytest.raises(PackageError) as caught:
        DecoderSession(folder)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(folder))
    assert "mrope_section" in message and "RotaryEmbedding" in message


# --- every tiny family, with its real quirks (builder) ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(REALISTIC_MODELS))
def test_family_validates_and_every_broken_export_fails(model_type: str, tmp_path: Path) -> None:
    source = make_tiny_checkpoint(model_type, tmp_path / "source", realistic=True)
    manifest = build_fp32(source, tmp_path / "pkg")
    assert_recorded(manifest["validation"])
    architecture = lookup_architecture({"model_type": model_type})
    rule = architecture.tolerance
    variant = tmp_path / "pkg" / "fp32"
    reference = reference_for(source, variant, rule, architecture.builder_class)
    clean = check_export(variant, reference, rule)
    known = clean.known_difference or 0.0  # Qwen3.5's l2norm: the bound holds it exactly, plus the noise terms
    assert clean.max_abs_diff - known < (clean.tolerance - known) / 2  # the correct export is well inside
    for bug in BUGS:
        assert_broken_export_fails(broken_copy(variant, tmp_path / f"broken-{bug}", bug), reference, rule)


@pytest.mark.slow
def test_build_summary_and_info_print_every_validation_figure(tmp_path: Path) -> None:
    from rich.console import Console

    from edgekit.pipeline import build
    from edgekit.summary import print_build_summary, print_manifest

    source = make_tiny_checkpoint("llama", tmp_path / "source")
    targets = tmp_path / "targets.yaml"
    targets.write_text(FP32_ONLY)
    result = build(source, tmp_path / "pkg", "fp32-only", targets_file=targets, progress=False, evaluation=None)
    validation = result.manifest["validation"]
    for show in (lambda console: print_build_summary(result, console),
                 lambda console: print_manifest(result.out, result.manifest, console)):  # fmt: skip
        console = Console(width=400, record=True)
        show(console)
        (line,) = [line for line in console.export_text().splitlines() if line.startswith("validation:")]
        assert f"max |Δlogit| {validation['max_abs_diff']:.2e} ({validation['max_rel_diff']:.1e} relative)" in line
        assert f"tolerance {validation['tolerance']:g} (PyTorch fp32 vs fp64: {validation['noise']:.1e})" in line
        assert f"top-1 agreement 100.0% on 4 prompts, {validation['tokens']} tokens" in line


# --- Qwen3.5: with and without mrope_section, tied and untied, with a vision tower (builder) --------------------

_TINY_VISION = dict(
    depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
    num_position_embeddings=64, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
)  # fmt: skip
_TINY_TEXT = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=256,
    layer_types=["linear_attention", "full_attention"], linear_conv_kernel_dim=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
)  # fmt: skip


def _qwen3_5_checkpoint(folder: Path, *, mrope: bool, tied: bool) -> Path:
    """A tiny Qwen3_5ForConditionalGeneration folder with a (tiny) vision tower.

    ``mrope``: rope_parameters as real checkpoints carry them (interleaved mrope_section). Without it, the
    text config keeps transformers' own default: no mrope_section, head_dim 256, a quarter of it rotated
    (2 heads, so that q_proj's shape is not the embedding's, which the builder's loader confuses).
    """
    import torch
    import transformers

    if mrope:
        rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                "mrope_section": [2, 1, 1], "mrope_interleaved": True}  # fmt: skip
        text = dict(_TINY_TEXT, num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_parameters=rope)
    else:
        text = dict(_TINY_TEXT, num_attention_heads=2, num_key_value_heads=1)
    config = transformers.Qwen3_5Config(
        text_config=text, vision_config=_TINY_VISION, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
        pad_token_id=3,
    )  # fmt: skip
    config.architectures = ["Qwen3_5ForConditionalGeneration"]
    assert ("mrope_section" in config.text_config.rope_parameters) is mrope
    torch.manual_seed(0)
    transformers.Qwen3_5ForConditionalGeneration(config).float().eval().save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


# The two config fixes below are proposed for the registry's qwen3_5 entry (``config_fixes``); until it has them,
# the tests that build Qwen3.5 apply them here. Each changes nothing where the config already says it.


def _qwen3_5_config_fixes(monkeypatch, fixes: tuple[Callable[[dict[str, Any]], dict[str, Any]], ...]) -> None:
    """The registry's qwen3_5 entry, for this test, with exactly ``fixes`` as its config fixes."""
    arch = registry.lookup_architecture({"model_type": "qwen3_5"})
    monkeypatch.setitem(registry._REGISTRY, "qwen3_5", dataclasses.replace(arch, config_fixes=fixes))


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("mrope", [True, False], ids=["mrope_section", "transformers-default"])
def test_qwen3_5_builds_and_validates(mrope: bool, tied: bool, tmp_path: Path, monkeypatch) -> None:
    fixes = registry.lookup_architecture({"model_type": "qwen3_5"}).config_fixes
    assert {fix.__name__ for fix in fixes} >= {"_mrope_section_default", "_tie_text_config"}
    source = _qwen3_5_checkpoint(tmp_path / "source", mrope=mrope, tied=tied)
    validation = build_fp32(source, tmp_path / "pkg")["validation"]
    assert_recorded(validation)
    # The builder's l2norm has no epsilon: that, and float noise, is all the difference there is.
    assert "LpNormalization" in validation["rule"]["builder_approximation"]
    assert 0 < validation["known_difference"] <= validation["max_abs_diff"] + 10 * validation["noise"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mrope", "tied", "expected"),
    [
        (False, False, "the fp32 export cannot run: the graph declares position_ids"),
        (True, True, "the fp32 export's logits differ from PyTorch's"),  # its LM head is random
    ],
    ids=["no-mrope_section", "tied"],
)
def test_qwen3_5_export_the_builder_gets_wrong_fails_in_one_line(
    mrope: bool, tied: bool, expected: str, tmp_path: Path, monkeypatch
) -> None:
    from click.testing import CliRunner

    from edgekit.cli import main

    _qwen3_5_config_fixes(monkeypatch, ())  # the builder gets the config as saved
    source = _qwen3_5_checkpoint(tmp_path / "source", mrope=mrope, tied=tied)
    targets = tmp_path / "targets.yaml"
    targets.write_text(FP32_ONLY)
    args = ["build", str(source), "-o", str(tmp_path / "pkg"), "-t", "fp32-only", "--targets-file", str(targets)]
    result = CliRunner().invoke(main, [*args, "--no-eval", "-q"])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.strip()]
    assert expected in line


# --- the real SmolLM2-135M weights (builder) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """SmolLM2's GGUF file as a Hugging Face folder, its fp32 export (validated in the build), PyTorch's logits."""
    from edgekit.demo import demo_gguf_path
    from edgekit.sources.gguf_import import import_gguf

    root = tmp_path_factory.mktemp("smollm2-validation")
    hf_folder = root / "hf"
    import_gguf(demo_gguf_path(), hf_folder)
    manifest = build_fp32(hf_folder, root / "pkg")
    architecture = lookup_architecture({"model_type": "llama"})
    variant = root / "pkg" / "fp32"
    reference = reference_for(hf_folder, variant, architecture.tolerance, architecture.builder_class)
    return {
        "root": root,
        "variant": variant,
        "manifest": manifest,
        "reference": reference,
        "rule": architecture.tolerance,
    }


@pytest.mark.slow
def test_smollm2_export_validates_with_room_to_spare(smollm2: dict[str, Any]) -> None:
    validation = smollm2["manifest"]["validation"]
    assert validation["variant"] == "fp32"
    assert validation["prompts"][-1]["tokens"] == LONG_PROMPT_TOKENS
    assert validation["max_abs_diff"] * 3 < validation["tolerance"]
    assert validation["top1_agreement"] == 1.0
    # Real weights: logits in the tens, so PyTorch's own fp32 noise is far above a tiny model's.
    assert validation["logit_scale"] > 10 and validation["noise"] > 1e-5
    clean = check_export(smollm2["variant"], smollm2["reference"], smollm2["rule"])
    assert clean.max_abs_diff * 3 < clean.tolerance


@pytest.mark.slow
@pytest.mark.parametrize("bug", BUGS)
def test_smollm2_broken_export_fails(bug: str, smollm2: dict[str, Any]) -> None:
    broken = broken_copy(smollm2["variant"], smollm2["root"] / f"broken-{bug}", bug)
    try:
        assert_broken_export_fails(broken, smollm2["reference"], smollm2["rule"])
    finally:
        shutil.rmtree(broken)  # half a gigabyte each


def test_a_tokenizer_that_makes_no_tokens_is_refused_not_looped_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The long prompt grew its text until it had enough tokens: a tokenizer giving none hung the build."""
    import transformers

    from edgekit.errors import SourceError

    def no_tokens(text: str, return_tensors: str) -> dict[str, np.ndarray]:
        return {"input_ids": np.zeros((1, 0), dtype=np.int64)}

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: no_tokens)
    with pytest.raises(SourceError, match="into no tokens"):
        validation_inputs(tmp_path, 256)
