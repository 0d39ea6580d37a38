"""Per-tensor recipes (issue #15): formats, the weighted fit, the search, targets, and a whole recipe build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import snapshot

from edgekit.errors import RecipeBudgetError, TargetError, UsageError
from edgekit.quant.block_quant import quantize_matrix, weighted_error
from edgekit.quant.formats import TensorFormat, parse_format
from edgekit.quant.graph_rewrite import Linear, find_linears
from edgekit.quant.recipe_build import recipe_formats
from edgekit.quant.search import Objective, Option, choose
from edgekit.quant.sensitivity import SENSITIVITY_VERSION, read_table
from edgekit.targets import HeadPrecision, get_target, parse_targets, with_max_model_bytes

# --- formats ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "bits_per_weight"),
    [
        ("int4-b32-sym-rtn", 4.5),
        ("int4-b32-asym-weighted", 4.75),
        ("int4-b32-zp-weighted", 4.625),
        ("int4-b128-zp-rtn", 4.15625),
        ("int4-b128-sym-search", 4.125),
        ("int8-b32-sym-rtn", 8.5),
    ],
)
def test_a_format_reads_back_as_it_is_spelled_and_counts_its_scales(spelling: str, bits_per_weight: float) -> None:
    fmt = parse_format(spelling)
    assert fmt.spelling == spelling
    assert fmt.bits_per_weight == pytest.approx(bits_per_weight)


@pytest.mark.parametrize("spelling", ["int3-b32-sym-rtn", "int4-b48-sym-rtn", "int4-b32-sym-awq", "int4_b32"])
def test_a_format_edgekit_cannot_build_is_refused_by_name(spelling: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_format(spelling)
    assert f"'{spelling}'" in str(info.value)


# --- the fit ------------------------------------------------------------------------------------------------


def test_the_weighted_search_cuts_the_error_the_activations_see_below_round_to_nearest() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 256)).astype(np.float32)
    # A few input channels carry most of the activation energy, as in real layers.
    importance = np.exp(rng.standard_normal(256) * 2.0).astype(np.float32)
    rtn = quantize_matrix(weight, parse_format("int4-b32-sym-rtn"))
    weighted = quantize_matrix(weight, parse_format("int4-b32-sym-weighted"), importance)
    ratio = weighted_error(weight, weighted, importance) / weighted_error(weight, rtn, importance)
    assert ratio < 0.85, ratio


def test_an_asymmetric_block_represents_an_off_centre_grid_exactly() -> None:
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(8, 64)).astype(np.float32)
    weight = 0.01 * codes + 0.5  # every block sits off centre: a Q4_1-style grid
    fitted = quantize_matrix(weight, parse_format("int4-b32-asym-search"))
    assert np.abs(fitted.dequantize() - weight).max() < 1e-3
    symmetric = quantize_matrix(weight, parse_format("int4-b32-sym-search"))
    assert np.abs(symmetric.dequantize() - weight).max() > 1e-2


# --- the search ---------------------------------------------------------------------------------------------

SMALL, LARGE = parse_format("int4-b128-sym-rtn"), parse_format("int8-b32-sym-rtn")


def _options(losses: dict[str, tuple[float, float]]) -> dict[str, list[Option]]:
    """Two options per tensor: small (loss_small) and large (loss_large)."""
    return {
        name: [Option(SMALL, 100, small, 100.0), Option(LARGE, 200, large, 200.0)]
        for name, (small, large) in losses.items()
    }


def test_the_search_spends_the_bytes_where_they_save_the_most_loss() -> None:
    options = _options({"a": (1.0, 0.1), "b": (0.2, 0.15), "c": (0.5, 0.05)})
    recipe = choose(options, Objective(max_bytes=450))
    assert recipe.bytes <= 450
    assert recipe.formats() == {"a": LARGE, "b": SMALL, "c": SMALL} or recipe.formats()["a"] == LARGE
    assert recipe.loss == pytest.approx(0.1 + 0.2 + 0.5)


def test_the_search_finds_the_fewest_bytes_within_a_loss_budget() -> None:
    options = _options({"a": (1.0, 0.1), "b": (0.2, 0.15), "c": (0.5, 0.05)})
    recipe = choose(options, Objective(max_loss=0.4))
    assert recipe.loss <= 0.4
    assert recipe.bytes == 500  # a and c upgraded, b left small


def test_a_budget_no_recipe_meets_names_the_smallest_size_reached() -> None:
    options = _options({"a": (1.0, 0.1), "b": (0.2, 0.15)})
    with pytest.raises(RecipeBudgetError) as info:
        choose(options, Objective(max_bytes=150, fixed_bytes=10))
    assert "210" in str(info.value)
    assert info.value.exit_code == 2


def test_the_decode_cost_bound_keeps_the_slow_format_out() -> None:
    options = _options({"a": (1.0, 0.1), "b": (0.2, 0.15)})
    recipe = choose(options, Objective(max_bytes=400, max_cost=300.0))
    assert recipe.cost <= 300.0
    assert sum(option.fmt == LARGE for option in recipe.choices.values()) == 1


def test_a_manifest_recipe_entry_reads_back_as_formats() -> None:
    entry = {"tensors": {"lm_head": "int8-b32-sym-rtn", "model/layers.0/mlp/down_proj": "int4-b64-asym-weighted"}}
    parsed = recipe_formats(entry)
    assert parsed["lm_head"] == TensorFormat(8, 32, False, parse_format("int8-b32-sym-rtn").method)
    with pytest.raises(ValueError):
        recipe_formats({"tensors": {"lm_head": "int4-b32-sym-magic"}})


# --- targets ------------------------------------------------------------------------------------------------


def _profile(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "description": "t",
        "providers": ["cpu"],
        "precision": "int4",
        "int4_methods": ["rtn", "recipe"],
        "budget": {"max_kl_mean": 0.1},
    }
    return {"schema_version": 1, "targets": {"t": {**base, **changes}}}


@pytest.mark.parametrize(
    ("changes", "phrase"),
    [
        ({"providers": ["cuda", "cpu"]}, "put cpu first"),
        ({"providers": ["dml", "cpu"]}, "put cpu first"),
        ({"int4_methods": ["recipe"]}, "needs rtn before it"),
        ({"int4_methods": ["recipe", "rtn"]}, "needs rtn before it"),
        ({"budget": {}}, "budget.max_kl_mean"),
        ({"recipe": {"max_model_bytes": 10, "optimize": "size"}}, "not both"),
        ({"recipe": {"max_model_bytes": 10, "optimize": "loss"}}, "not both"),
        ({"recipe": {"optimize": "speed"}}, "'size' or 'loss'"),
        ({"recipe": {"candidates": ["int4-b32-sym-rtn", "int5-b32-sym-rtn"]}}, "int4-b32-asym-weighted"),
        ({"recipe": {"max_bytes": 10}}, "'max_bytes'"),
        ({"precision": "fp16"}, "precision int4"),
    ],
)
def test_a_recipe_a_target_cannot_build_is_refused_naming_the_rule(changes: dict[str, object], phrase: str) -> None:
    with pytest.raises(TargetError) as info:
        parse_targets(_profile(**changes))
    assert "targets.yaml" in str(info.value) and phrase in str(info.value)


def test_max_model_bytes_turns_a_cpu_target_into_a_recipe_target() -> None:
    target = with_max_model_bytes(get_target("laptop-cpu-rtn"), 5_000_000)
    assert [m.value for m in target.int4_methods] == ["rtn", "recipe"]
    assert target.recipe.max_model_bytes == 5_000_000 and target.recipe.optimize is None
    assert target.name == "laptop-cpu-rtn"


@pytest.mark.parametrize("target", ["edge-cuda", "laptop-dml"])
def test_max_model_bytes_on_a_gpu_target_is_a_one_line_error_before_anything_is_written(
    target: str, tiny_checkpoints, tmp_path: Path
) -> None:
    from edgekit.pipeline import build

    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="--max-model-bytes") as info:
        build(tiny_checkpoints("llama"), tmp_path / "out", target, progress=False, max_model_bytes=10**6)
    assert "\n" not in str(info.value) and "put cpu first" in str(info.value)
    assert snapshot(tmp_path) == before


# --- a whole build ------------------------------------------------------------------------------------------


@pytest.fixture
def private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    return cache


def _model_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


@pytest.mark.slow
def test_a_size_budget_build_deploys_a_recipe_that_fits_is_evaluated_and_generates(
    tiny_checkpoints, tmp_path: Path, private_cache: Path
) -> None:
    from edgekit.pipeline import build
    from edgekit.runtimes.model import load

    out = tmp_path / "pkg"
    # The default target first: its recipe (optimize: loss) fits in its own RTN variant's model bytes.
    default = build(tiny_checkpoints("llama"), out, "laptop-cpu", progress=False).manifest
    rtn_size = _model_bytes(out / "int4-rtn")
    assert default["targets"]["laptop-cpu"]["variant"] == "int4-recipe"
    assert _model_bytes(out / "int4-recipe") == default["variants"]["int4-recipe"]["recipe"]["model_bytes"] <= rtn_size
    assert default["variants"]["int4-recipe"]["recipe"]["sensitivity_reused"] is False
    # Then a byte budget under RTN's size: the same model and text, so the table comes from the user's cache.
    budget = int(rtn_size * 0.9)
    result = build(tiny_checkpoints("llama"), out, "laptop-cpu", progress=False, force=True, max_model_bytes=budget)
    manifest = result.manifest
    assert manifest["default_variant"] == "int4-recipe"
    assert manifest["targets"]["laptop-cpu"]["variant"] == "int4-recipe"
    entry = manifest["variants"]["int4-recipe"]
    recipe = entry["recipe"]
    assert _model_bytes(out / "int4-recipe") == recipe["model_bytes"] <= budget
    formats = recipe_formats(recipe)
    graph = onnx.load(str(out / "fp32" / "model.onnx"), load_external_data=False)
    expected = {linear.name for linear in find_linears(graph) if linear.tied_to is None}
    assert set(formats) == expected and "lm_head" in formats and len(formats) > 10  # every linear, head, embedding
    assert recipe["decode_ratio"] is not None and recipe["sensitivity_reused"] is True
    assert 1 <= recipe["kept_round"] <= recipe["search_rounds"]
    report = json.loads((out / "eval" / "report.json").read_text())
    assert "int4-recipe" in report["variants"]
    assert (out / "eval" / "sensitivity.json").is_file()
    assert load(out).generate("Hello", max_new_tokens=4) is not None
    assert any(private_cache.rglob("*.json"))


@pytest.mark.parametrize("streaming", [False, True], ids=["whole", "streamed"])
def test_a_size_budget_no_recipe_fits_is_a_one_line_error_and_nothing_is_written(
    tiny_checkpoints, tmp_path: Path, private_cache: Path, streaming: bool
) -> None:
    from edgekit.pipeline import build

    with pytest.raises(RecipeBudgetError) as info:
        build(
            tiny_checkpoints("llama"), tmp_path / "out", "laptop-cpu", progress=False, max_model_bytes=1000,
            streaming=streaming,
        )  # fmt: skip
    message = str(info.value)
    assert "\n" not in message and "bytes" in message
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "cache"]


def test_the_cli_refuses_max_model_bytes_on_a_gpu_target_in_one_line(tiny_checkpoints, tmp_path: Path, runner) -> None:
    from edgekit.cli import main

    result = runner.invoke(
        main,
        ["build", str(tiny_checkpoints("llama")), "-o", str(tmp_path / "out"), "-t", "edge-cuda",
         "--max-model-bytes", "1000000"],
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--max-model-bytes" in lines[0] and "edge-cuda" in lines[0], result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "phrase"),
    [
        (["-t", "laptop-cpu-rtn"], "builds no per-tensor recipe"),
        (["--max-model-bytes", "1000000", "--min-decode-ratio", "0"], "greater than 0"),
        (["--max-model-bytes", "1000000", "--min-decode-ratio", "5"], "less than or equal to 4"),
    ],
)
def test_the_cli_refuses_a_speed_bound_it_cannot_apply_in_one_line(
    tiny_checkpoints, tmp_path: Path, runner, extra: list[str], phrase: str
) -> None:
    from edgekit.cli import main

    args = ["build", str(tiny_checkpoints("llama")), "-o", str(tmp_path / "out"), "--min-decode-ratio", "1.0"]
    result = runner.invoke(main, args + extra)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--min-decode-ratio" in lines[0] and phrase in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_the_loss_objective_bounds_the_bytes_by_the_rtn_variants() -> None:
    from edgekit.recipe_step import recipe_request

    target = get_target("laptop-cpu")
    assert target.recipe.optimize == "loss" and target.recipe.max_model_bytes is None
    request = recipe_request(target, rtn_model_bytes=123_456)
    assert (request.max_model_bytes, request.max_kl, request.min_top1) == (123_456, None, None)
    with pytest.raises(ValueError, match="RTN variant's model bytes"):
        recipe_request(target)
    # The speed baseline is the RTN variant as built: the target's int8 head, or int4 where the export streamed.
    assert target.lm_head.value == "int8"
    for built, bits in ((None, 8), (HeadPrecision.INT4, 4)):
        head = recipe_request(target, rtn_model_bytes=1, rtn_head=built).head_baseline
        assert head is not None and head.bits == bits
    # --max-model-bytes replaces the objective; the RTN size no longer matters.
    assert recipe_request(with_max_model_bytes(target, 10**6), rtn_model_bytes=5).max_model_bytes == 10**6
    # A loss objective needs no accuracy budget: the bytes bound it.
    (parsed,) = parse_targets(_profile(budget={}, recipe={"optimize": "loss"})).values()
    assert parsed.recipe.optimize == "loss"


def test_a_speed_bound_from_the_command_line_reaches_the_recipe_request() -> None:
    from edgekit.recipe_step import recipe_request
    from edgekit.targets import with_min_decode_ratio

    target = with_min_decode_ratio(with_max_model_bytes(get_target("laptop-cpu"), 10**8), 1.05)
    request = recipe_request(target)
    assert request.min_decode_ratio == 1.05 and request.max_model_bytes == 10**8
    assert target.name == "laptop-cpu"


# --- untrusted caches and manifests -------------------------------------------------------------------------


def _table_json(tensors: list[dict[str, object]]) -> str:
    return json.dumps(
        {"version": SENSITIVITY_VERSION, "key": {"k": "v"}, "group_losses": {"g": 0.1}, "tensors": tensors}
    )


def _linear(name: str = "model/layers.0/mlp/down_proj") -> Linear:
    return Linear(name, "w", 64, 128, "x")


GOOD_ENTRY = {
    "name": "model/layers.0/mlp/down_proj",
    "rows": 64,
    "cols": 128,
    "group": "g",
    "probe_loss": 0.01,
    "proxy": {"int4-b32-sym-rtn": 1.0, "int8-b32-sym-rtn": 0.1},
}


@pytest.mark.parametrize(
    "entry",
    [
        {**GOOD_ENTRY, "probe_loss": "Infinity"},
        {**GOOD_ENTRY, "proxy": {"int4-b32-sym-rtn": 1e999, "int8-b32-sym-rtn": 0.1}},
        {**GOOD_ENTRY, "proxy": {"int8-b32-sym-rtn": 0.1}},  # no probe format
        {**GOOD_ENTRY, "proxy": {"int4-b32-sym-rtn": 1.0}},  # a candidate missing
        {**GOOD_ENTRY, "rows": 65},  # another shape
        {**GOOD_ENTRY, "name": "model/layers.9/mlp/down_proj"},  # another tensor
    ],
)
def test_a_cached_table_that_does_not_fit_the_model_is_remeasured_not_trusted(
    entry: dict[str, object], tmp_path: Path
) -> None:
    path = tmp_path / "sensitivity.json"
    path.write_text(_table_json([entry]).replace('"Infinity"', "Infinity"))
    candidates = (parse_format("int8-b32-sym-rtn"),)
    table = read_table(path, {"k": "v"})
    assert table is None or not table.fits([_linear()], candidates)
    path.write_text(_table_json([GOOD_ENTRY]))
    good = read_table(path, {"k": "v"})
    assert good is not None and good.fits([_linear()], candidates)


def test_info_prints_a_tampered_recipe_entry_without_a_traceback() -> None:
    from edgekit.summary import _recipe_figures

    text = _recipe_figures(
        {"tensors": {"a": "int4-b32-sym-rtn", "b": 7}, "calibration_kl": 10**400, "decode_ratio": "x"}
    )
    assert text.startswith("1 int4-b32-sym-rtn") and "KL" not in text


@pytest.mark.slow
@pytest.mark.parametrize(
    "allowed", [["int4-b64-sym-weighted", "int8-b32-sym-rtn"], ["int4-b64-sym-gptq", "int4-b32-zp-gptq"]]
)
def test_a_size_objective_keeps_to_the_targets_candidates(
    tiny_checkpoints, tmp_path: Path, private_cache: Path, allowed: list[str]
) -> None:
    import yaml

    from edgekit.pipeline import build

    targets = {
        "schema_version": 1,
        "targets": {
            "small": {
                "description": "recipe within a KL budget, two formats",
                "providers": ["cpu"],
                "int4_methods": ["rtn", "recipe"],
                "lm_head": "int8",
                "accuracy_level": 4,
                "recipe": {"optimize": "size", "candidates": allowed, "min_decode_ratio": 0.5},
                "budget": {"max_kl_mean": 0.5},
            }
        },
    }
    targets_file = tmp_path / "targets.yaml"
    targets_file.write_text(yaml.safe_dump(targets))
    result = build(tiny_checkpoints("llama"), tmp_path / "pkg", "small", targets_file=targets_file, progress=False)
    recipe = result.manifest["variants"]["int4-recipe"]["recipe"]
    # An untied embedding has no XᵀX: a GPTQ candidate is the weighted search of the same grid there alone.
    for name, spelling in recipe["tensors"].items():
        fitting = allowed if "embed_tokens" not in name else [a.replace("-gptq", "-weighted") for a in allowed]
        assert spelling in fitting, (name, spelling)
    assert result.manifest["default_variant"] == "int4-recipe"


# --- the rewritten graph computes with the dequantized weights -------------------------------------------------


def _tied_graph(weight: np.ndarray, opset: int = 17) -> onnx.ModelProto:
    """ids -> embedding (the head's weight, transposed) -> + x -> head MatMul: one tied linear, both uses."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    nodes = [
        helper.make_node("Transpose", ["W"], ["W_T"], name="/model/embed_tokens/Transpose", perm=[1, 0]),
        helper.make_node("Gather", ["W_T", "input_ids"], ["embedded"], name="/model/embed_tokens/Gather"),
        helper.make_node("Add", ["embedded", "x"], ["hidden"], name="/model/Add"),
        helper.make_node("MatMul", ["hidden", "W"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 3]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k]),
        ],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3, n]),
            helper.make_tensor_value_info("embedded", TensorProto.FLOAT, [1, 3, k]),
        ],
        [numpy_helper.from_array(weight, "W")],
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize(
    "spelling",
    [
        "int4-b32-sym-weighted",
        "int4-b64-zp-weighted",
        "int4-b32-zp-rtn",
        "int4-b64-asym-search",
        "int4-b32-asym-weighted",
        "int8-b32-asym-rtn",
        "int8-b32-sym-rtn",
        "int8-b32-zp-search",
    ],
)
def test_the_rewritten_head_and_tied_embedding_compute_with_the_dequantized_weight(spelling: str) -> None:
    import onnxruntime as ort

    from edgekit.quant.graph_rewrite import rewrite_model

    rng = np.random.default_rng(3)
    k, n = 192, 96  # block 64: three blocks, so the last byte of each row's zero points holds one
    weight = (rng.standard_normal((k, n)) * 0.05 + rng.standard_normal((1, n)) * 0.03).astype(np.float32)
    model = _tied_graph(weight)
    fmt = parse_format(spelling)
    quantized = quantize_matrix(weight.T, fmt)
    rewritten = rewrite_model(model, {"lm_head": fmt}, 0, lambda linear, f: quantized)
    ops = {node.op_type for node in rewritten.graph.node}
    assert {"MatMulNBits", "GatherBlockQuantized"} <= ops
    nbits = next(node for node in rewritten.graph.node if node.op_type == "MatMulNBits")
    assert (len(nbits.input) == 4) == fmt.zero_point
    # An asymmetric head's offsets are extra columns of the one MatMulNBits: no other product, no other add.
    inner_k = next(a.i for a in nbits.attribute if a.name == "K")
    assert (inner_k > k) == fmt.offsets and inner_k == quantized.columns - (quantized.codes.shape[1] - k)
    assert not ops & {"MatMul", "ReduceSum"}
    session = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, n - 1]], dtype=np.int64)
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    logits, embedded = session.run(["logits", "embedded"], {"input_ids": ids, "x": x})
    dequantized = quantize_matrix(weight.T, fmt).dequantize()  # [n, k]
    np.testing.assert_allclose(embedded[0], dequantized[ids[0]], rtol=1e-5, atol=1e-6)
    expected = (dequantized[ids[0]] + x[0]) @ dequantized.T
    np.testing.assert_allclose(logits[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opset", [17, 21])  # ReduceMean's axes: an attribute, then an input from opset 18
@pytest.mark.parametrize("ids_name", ["input_ids", "tokens"])
def test_block_means_are_padded_by_zeros_made_once_or_by_a_pad_without_input_ids(ids_name: str, opset: int) -> None:
    """Zeros from input_ids' shape, ahead of the graph, pad the means (a Pad per activation cost decode time);
    a graph without input_ids pads where the means are made. Both compute the same product."""
    import onnxruntime as ort

    from edgekit.quant.graph_rewrite import rewrite_model

    rng = np.random.default_rng(5)
    k, n = 192, 96  # block 32: six blocks of means, padded to 32 columns per digit
    weight = (rng.standard_normal((k, n)) * 0.05 + rng.standard_normal((1, n)) * 0.03).astype(np.float32)
    model = _tied_graph(weight, opset)
    for value in [*model.graph.input, *model.graph.node]:
        names = value.input if isinstance(value, onnx.NodeProto) else None
        if names is None and value.name == "input_ids":
            value.name = ids_name
        elif names is not None:
            names[:] = [ids_name if name == "input_ids" else name for name in names]
    fmt = parse_format("int4-b32-asym-rtn")
    quantized = quantize_matrix(weight.T, fmt)
    rewritten = rewrite_model(model, {"lm_head": fmt}, 0, lambda linear, f: quantized)
    ops = [node.op_type for node in rewritten.graph.node]
    assert ops.count("ReduceMean") == 1 and ops.count("Pad") == (ids_name != "input_ids")
    assert ops.count("ConstantOfShape") == (ids_name == "input_ids")
    session = ort.InferenceSession(rewritten.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 5, n - 1]], dtype=np.int64)
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    logits, embedded = session.run(["logits", "embedded"], {ids_name: ids, "x": x})
    # (Without input_ids the embedding is not recognised as tied: the head's product is what is compared.)
    expected = (embedded[0] + x[0]) @ quantized.dequantize().T
    np.testing.assert_allclose(logits[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_offsets_round_to_a_grid_of_the_rows_largest_offset(bits: int) -> None:
    from edgekit.quant import offset_digits

    rng = np.random.default_rng(6)
    codes = rng.integers(0, 2**bits, size=(16, 256)).astype(np.float32)
    codes[:, 0::32], codes[:, 1::32] = 0, 2**bits - 1  # each block spans the whole grid: the fit finds it
    centres = np.repeat(rng.uniform(-0.08, 0.08, size=(16, 8)), 32, axis=1)  # every block off centre its own way
    grid = 0.16 / 2**bits  # blocks span +-0.08 around their centres
    weight = (grid * (codes - 2 ** (bits - 1)) + centres).astype(np.float32)
    fitted = quantize_matrix(weight, parse_format(f"int{bits}-b32-asym-search"))
    offsets = fitted.offsets()
    assert offsets is not None and fitted.offset_levels is not None and fitted.offset_steps is not None
    step = fitted.offset_steps.astype(np.float32)
    # Rounding moves an offset by at most half a step (the row's largest offset over 119, or 127); the rest
    # is the scale's float16 rounding, at most 2^-11 of it per code from the middle.
    scale_rounding = 2 ** (bits - 1) * grid * 2.0**-11
    assert np.abs(fitted.dequantize() - weight).max() <= 0.5 * step.max() + scale_rounding
    # The offset columns the kernel multiplies by block means decode to block_size times each offset.
    codes_out = offset_digits.digit_codes(fitted.offset_levels, bits, 32).astype(np.float32)
    scales_out = np.repeat(offset_digits.digit_scales(fitted.offset_steps, bits, 32, 8), 32, axis=1)
    decoded = (scales_out * (codes_out - 2 ** (bits - 1))).reshape(16, -1, 32).sum(axis=1)  # digits summed
    np.testing.assert_allclose(decoded[:, :8], 32 * offsets, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(decoded[:, 8:], 0)  # the padding columns add nothing


@pytest.mark.parametrize("bits", [4, 8])
def test_a_constant_block_keeps_its_value_and_its_rows_grid(bits: int) -> None:
    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((4, 128)) * 0.02).astype(np.float32)
    weight[0] = 0.0  # a zero row (a padding token's embedding)
    weight[1, 32:64] = 0.0  # a pruned block
    weight[2, :32] = 0.05  # a constant block off zero
    fitted = quantize_matrix(weight, parse_format(f"int{bits}-b32-asym-rtn"))
    error = np.abs(fitted.dequantize() - weight)
    assert error[0].max() == 0.0
    # The other blocks of those rows keep the grid a row without a constant block gets.
    assert error[1:3].max() < 2 * error[3].max(), error.max(axis=1)
    assert np.abs(fitted.dequantize()[2, :32] - 0.05).max() < 1e-3


def test_a_rewritten_asymmetric_head_keeps_its_last_row_when_sliced() -> None:
    import onnxruntime as ort

    from edgekit.exporters.last_position import keep_last_position
    from edgekit.quant.graph_rewrite import rewrite_model

    rng = np.random.default_rng(8)
    weight = (rng.standard_normal((192, 96)) * 0.05).astype(np.float32)
    fmt = parse_format("int4-b32-asym-search")
    quantized = quantize_matrix(weight.T, fmt)
    whole = rewrite_model(_tied_graph(weight), {"lm_head": fmt}, 4, lambda linear, f: quantized)
    sliced = rewrite_model(_tied_graph(weight), {"lm_head": fmt}, 4, lambda linear, f: quantized)
    assert keep_last_position(sliced)
    feed = {
        "input_ids": np.array([[0, 5, 7]], dtype=np.int64),
        "x": rng.standard_normal((1, 3, 192)).astype(np.float32),
    }
    (expected,) = ort.InferenceSession(whole.SerializeToString()).run(["logits"], feed)
    (logits,) = ort.InferenceSession(sliced.SerializeToString()).run(["logits"], feed)
    np.testing.assert_allclose(logits, np.broadcast_to(expected[:, -1:], logits.shape), rtol=1e-5, atol=1e-5)


def test_a_zero_point_block_fits_an_off_centre_block_better_than_a_symmetric_one() -> None:
    rng = np.random.default_rng(4)
    weight = (rng.standard_normal((64, 256)) * 0.02 + 0.03).astype(np.float32)  # blocks sit off centre
    importance = np.exp(rng.standard_normal(256)).astype(np.float32)
    formats = {kind: parse_format(f"int4-b32-{kind}-weighted") for kind in ("sym", "zp")}
    fitted = {kind: quantize_matrix(weight, fmt, importance) for kind, fmt in formats.items()}
    errors = {kind: weighted_error(weight, q, importance) for kind, q in fitted.items()}
    assert errors["zp"] < 0.7 * errors["sym"], errors
    zero_points = fitted["zp"].zero_points
    assert zero_points is not None and zero_points.max() <= 15 and fitted["zp"].offsets() is None


@pytest.mark.parametrize(("measured", "moves"), [(0.85, True), (0.91, False), (0.95, False), (0.98, True)])
def test_the_speed_bound_moves_only_on_a_miss_or_a_clear_margin(measured: float, moves: bool) -> None:
    from edgekit.quant.recipe_build import _SPEED_MARGIN, RecipeOutcome, RecipeRequest, _Rounds

    request = RecipeRequest(
        max_model_bytes=400, max_kl=None, min_top1=None, min_decode_ratio=0.9, accuracy_level=4, head_baseline=None
    )
    rounds = _Rounds(_options({"a": (1.0, 0.1), "b": (0.2, 0.15)}), request, 0, 400.0)
    recipe = rounds.next_recipe()
    assert recipe.cost == 400.0  # the bound binds: both large
    outcome = RecipeOutcome({}, recipe.loss, 0.1, 0.9, 400, measured, 1, False)
    assert rounds.learn(recipe, outcome) == moves
    expected = recipe.cost * measured / (0.9 + _SPEED_MARGIN) if moves else 400.0
    assert rounds.max_cost == pytest.approx(expected)


def test_a_decode_ratio_is_the_median_of_back_to_back_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgekit.quant import decode_timing

    # The candidate takes half the baseline's time per step. The machine slows down by half for the
    # last third of the run (both chunks of those pairs), one baseline chunk is hit by a spike, and three
    # baseline chunks ran while a neighbour paused (faster than the machine's usual): a ratio of each
    # folder's lower quartile would take those three for the baseline's speed (1.55x, not 2x).
    candidate = [1.0] * 8 + [1.5] * 4
    baseline = [2.0 * c for c in candidate]
    baseline[9] = 30.0
    baseline[1] = baseline[3] = baseline[5] = 1.4
    monkeypatch.setattr(decode_timing, "chunk_seconds", lambda folders, rounds: [baseline, candidate])
    assert decode_timing.decode_ratio(Path("rtn"), Path("recipe")) == pytest.approx(2.0)


@pytest.mark.parametrize("method", ["rtn", "search", "weighted"])
def test_a_zero_point_block_of_one_sign_keeps_its_values_inside_its_grid(method: str) -> None:
    rng = np.random.default_rng(5)
    positive = (rng.standard_normal((16, 64)) * 0.01 + 0.05).astype(np.float32)  # no value near zero
    weight = np.concatenate([positive, -positive, np.full((2, 64), 0.2, np.float32)])
    zp = quantize_matrix(weight, parse_format(f"int4-b32-zp-{method}"))
    sym = quantize_matrix(weight, parse_format(f"int4-b32-sym-{method}"))
    assert weighted_error(weight, zp) < 0.5 * weighted_error(weight, sym)
    decoded = zp.dequantize()
    assert np.abs(decoded[-2:] - 0.2).max() < 1e-3  # a constant block is on its grid, not clipped to 0
    assert np.abs(decoded - weight).max() < 0.01  # nothing clipped at the zero point


def test_a_target_with_a_gptq_candidate_is_known_to_keep_xtx() -> None:
    (gptq,) = parse_targets(_profile(recipe={"candidates": ["int4-b32-sym-gptq", "int8-b32-sym-rtn"]})).values()
    (plain,) = parse_targets(_profile(recipe={"candidates": ["int4-b32-sym-weighted"]})).values()
    assert gptq.recipe.gptq_candidates and not plain.recipe.gptq_candidates


@pytest.mark.slow
def test_a_model_no_candidate_fits_deploys_rtn_or_is_refused_under_a_size_bound(tmp_path: Path) -> None:
    """80 inputs are no whole number of blocks of any candidate: the default target refused a model its
    RTN variant builds (a build of odd tiny configs). It now deploys RTN with a note; a size bound refuses."""
    import torch
    import transformers
    from tiny_models import _COMMON, tiny_tokenizer

    from edgekit.pipeline import build

    config = transformers.LlamaConfig(
        **{**_COMMON, "hidden_size": 80, "num_attention_heads": 5, "num_key_value_heads": 1, "head_dim": 16}
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).float().save_pretrained(str(tmp_path / "src"))
    tiny_tokenizer().save_pretrained(str(tmp_path / "src"))
    result = build(tmp_path / "src", tmp_path / "pkg", progress=False, evaluation=None)
    assert result.manifest["default_variant"] == "int4-rtn" and "int4-recipe" not in result.manifest["variants"]
    assert any("no int4-recipe: no recipe candidate fits" in warning for warning in result.warnings)
    with pytest.raises(UsageError, match="only a recipe can be held to max_model_bytes"):
        build(tmp_path / "src", tmp_path / "bound", progress=False, evaluation=None, max_model_bytes=10**7)
    assert not (tmp_path / "bound").exists()
