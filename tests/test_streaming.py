"""The streamed export against onnxruntime-genai's whole-model export, interruption, and the memory refusal.

Every registry entry with a streamed builder has a case in ``EQUIVALENCE_CASES`` (a test fails without one).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from tiny_models import EXACT_GPTQ_TARGETS

from edgekit.errors import ResourceError, UsageError
from edgekit.exporters import memory_estimate, streaming
from edgekit.exporters.memory_estimate import GIB, BuildEstimate, check_resources
from edgekit.exporters.onnx_builder import run_builder
from edgekit.exporters.streaming import StreamedWeights, run_streaming_builder
from edgekit.exporters.validate import onnx_logits
from edgekit.sources.checkpoint import check_folder, stage_folder
from edgekit.sources.registry import streamable_architectures

INT4 = {"block_size": "32", "accuracy_level": "4"}
IDS = np.array([[5, 17, 33, 100, 7, 9, 200, 301]], dtype=np.int64)


def _tied_qwen3(folder: Path) -> Path:
    import torch
    import transformers
    from tiny_models import TINY_MODELS, tiny_tokenizer

    config, class_name = TINY_MODELS["qwen3"]()
    config.tie_word_embeddings = True
    config.architectures = [class_name]
    torch.manual_seed(1)
    getattr(transformers, class_name)(config).eval().save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def _graph(folder: Path) -> tuple[dict[str, np.ndarray], list[tuple[str, str, tuple[str, ...]]]]:
    import onnx_ir as ir

    model = ir.load(str(folder / "model.onnx"))
    initializers = {name: value.const_value.numpy() for name, value in model.graph.initializers.items()}
    nodes = sorted((n.name, n.op_type, tuple(i.name if i else "" for i in n.inputs)) for n in model.graph)
    return initializers, nodes


def _export_both(checkpoint: Path, tmp: Path, precision: str, options: dict[str, str]) -> tuple[Path, Path]:
    staged = stage_folder(check_folder(checkpoint), tmp / "staged")
    log = tmp / "build.log"
    log.touch()
    common = dict(precision=precision, provider="cpu", options=options, log_path=log)
    run_builder(staged, tmp / "whole", cache_dir=tmp / "cache-whole", **common)  # type: ignore[arg-type]
    run_streaming_builder(staged, tmp / "streamed", cache_dir=tmp / "cache-streamed", **common)  # type: ignore[arg-type]
    return tmp / "whole", tmp / "streamed"


# (model_type, precision): the streamed export of each against the builder's own; "tied-" ties the head.
EQUIVALENCE_CASES = [
    ("llama", "int4"), ("mistral", "int4"), ("qwen2", "int4"), ("qwen3", "int4"), ("qwen3_5", "int4"),
    ("qwen3_5", "fp32"), ("tied-qwen3", "int4"), ("tied-qwen3", "fp32"),
]  # fmt: skip


def test_every_streamed_architecture_has_an_equivalence_test() -> None:
    """Like optimum's test_all_models_tested: a registry entry with a streamed builder needs a case above."""
    tested = {model_type.removeprefix("tied-") for model_type, _ in EQUIVALENCE_CASES}
    missing = sorted(set(streamable_architectures()) - tested)
    assert not missing, f"streamed architectures without a case in EQUIVALENCE_CASES: {missing}"
    assert {"llama", "mistral", "qwen2", "qwen3", "qwen3_5"} <= set(streamable_architectures())


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "precision"), EQUIVALENCE_CASES)
def test_streamed_export_equals_whole_model_export(
    model_type: str, precision: str, tiny_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Blocks of a few rows, so the embedding and LM head go through many blocks as a 9B model's do.
    monkeypatch.setattr(streaming, "_BLOCK_BYTES", 4096)
    checkpoint = _tied_qwen3(tmp_path / "tied") if model_type == "tied-qwen3" else tiny_checkpoints(model_type)
    whole, streamed = _export_both(checkpoint, tmp_path, precision, INT4 if precision == "int4" else {})
    whole_init, whole_nodes = _graph(whole)
    streamed_init, streamed_nodes = _graph(streamed)
    assert streamed_nodes == whole_nodes
    assert sorted(streamed_init) == sorted(whole_init)
    different = [name for name in whole_init if not np.array_equal(whole_init[name], streamed_init[name])]
    assert different == []
    assert np.array_equal(onnx_logits(whole, IDS), onnx_logits(streamed, IDS))
    assert (streamed / "genai_config.json").read_text() == (whole / "genai_config.json").read_text()


@pytest.mark.slow
@pytest.mark.parametrize(("model_type", "method"), [("qwen3", "gptq"), ("llama", "gptq"), ("qwen3", "awq")])
def test_streamed_export_of_a_prequantized_checkpoint_equals_whole_model_export(
    model_type: str, method: str, tiny_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tiny_models import quantized_checkpoint

    monkeypatch.setattr(streaming, "_BLOCK_BYTES", 4096)
    checkpoint = quantized_checkpoint(tiny_checkpoints(model_type), tmp_path / method, method)
    whole, streamed = _export_both(checkpoint, tmp_path, "int4", INT4)
    whole_init, whole_nodes = _graph(whole)
    streamed_init, streamed_nodes = _graph(streamed)
    assert streamed_nodes == whole_nodes
    assert any(name.endswith(".qweight") for name in streamed_init)  # the checkpoint's codes, not re-quantized
    assert sorted(streamed_init) == sorted(whole_init)
    different = [name for name in whole_init if not np.array_equal(whole_init[name], streamed_init[name])]
    assert different == []
    assert np.array_equal(onnx_logits(whole, IDS), onnx_logits(streamed, IDS))


@pytest.mark.slow
def test_interrupted_streaming_leaves_no_partial_folder(
    tiny_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = stage_folder(check_folder(tiny_checkpoints("qwen3")), tmp_path / "staged")
    original = StreamedWeights.reading

    def interrupt_at_layer_one(self, module):  # type: ignore[no-untyped-def]
        if self._prefix[id(module)].endswith(".layers.1"):
            raise KeyboardInterrupt
        return original(self, module)

    monkeypatch.setattr(StreamedWeights, "reading", interrupt_at_layer_one)
    out = tmp_path / "pkg" / "int4"
    log = tmp_path / "build.log"
    log.touch()
    with pytest.raises(KeyboardInterrupt):
        run_streaming_builder(
            staged, out, precision="int4", provider="cpu", options=INT4, cache_dir=tmp_path / "c", log_path=log
        )
    assert not (tmp_path / "pkg").exists() or list((tmp_path / "pkg").iterdir()) == []

    # Through the pipeline: neither the package nor a hidden partial folder is left.
    from edgekit.pipeline import build

    with pytest.raises(KeyboardInterrupt):
        build(tiny_checkpoints("qwen3"), tmp_path / "out" / "pkg", progress=False, evaluation=None, streaming=True)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_streamed_build_runs(tiny_checkpoints, tmp_path: Path) -> None:
    import edgekit
    from edgekit.pipeline import build

    result = build(tiny_checkpoints("qwen3_5"), tmp_path / "pkg", "laptop-cpu-rtn", progress=False, streaming=True)
    assert list(result.manifest["variants"]) == ["int4-rtn"]
    assert "skipped" in result.manifest["validation"]
    # laptop-cpu-rtn asks for an int8 LM head; the streamed export makes every MatMul int4 and says so.
    assert "streamed export: int4-rtn's int8 LM head (the target's) is built int4" in result.warnings
    graph = onnx.load(str(tmp_path / "pkg" / "int4-rtn" / "model.onnx"), load_external_data=False).graph
    head = next(node for node in graph.node if node.name.startswith("/lm_head/"))
    assert {a.name: a.i for a in head.attribute}["bits"] == 4
    with edgekit.load(tmp_path / "pkg") as model:
        assert len(model.generate_tokens([5, 17, 33], max_new_tokens=4)) == 4


@pytest.mark.slow
def test_streamed_gptq_build_equals_the_whole_model_build(tiny_checkpoints, tmp_path: Path) -> None:
    """GPTQ from disk, then the streamed export of its checkpoint: the logits of the whole-model build."""
    import edgekit
    from edgekit.pipeline import CalibrationSettings, build

    targets = tmp_path / "targets.yaml"
    targets.write_text(EXACT_GPTQ_TARGETS)
    calibration = CalibrationSettings(samples=4, seq_len=48)
    common = dict(targets_file=targets, progress=False, evaluation=None, calibration=calibration)
    streamed = build(tiny_checkpoints("qwen3"), tmp_path / "streamed", "cpu-gptq", streaming=True, **common)  # type: ignore[arg-type]
    whole = build(tiny_checkpoints("qwen3"), tmp_path / "whole", "cpu-gptq", **common)  # type: ignore[arg-type]
    assert list(streamed.manifest["variants"]) == ["int4-rtn", "int4-gptq"]
    assert streamed.manifest["default_variant"] == "int4-gptq"
    for variant in ("int4-rtn", "int4-gptq"):
        expected = onnx_logits(tmp_path / "whole" / variant, IDS)
        assert np.array_equal(onnx_logits(tmp_path / "streamed" / variant, IDS), expected), variant
    rtn = onnx_logits(tmp_path / "whole" / "int4-rtn", IDS)
    assert not np.array_equal(onnx_logits(tmp_path / "streamed" / "int4-gptq", IDS), rtn)  # GPTQ is not RTN
    assert whole.manifest["default_variant"] == "int4-gptq"
    with edgekit.load(tmp_path / "streamed") as model:
        assert len(model.generate_tokens([5, 17, 33], max_new_tokens=4)) == 4


@pytest.mark.slow
@pytest.mark.parametrize("streaming", [True, False])
def test_gptq_of_qwen3_5_matches_the_fake_quantized_model(
    streaming: bool, tiny_checkpoints, tmp_path: Path, kept_gptq_checkpoint: dict[str, Path]
) -> None:
    """Qwen3.5's gated delta net reads GPTQ-packed projections right; its dense gates stay float.

    Without ``--streaming`` too: the builder's loader cannot read a Qwen3.5 GPTQ checkpoint, so that
    variant alone goes through the streamed export.
    """
    import torch
    from tiny_models import fake_quantized_model, load_checkpoint_tensors

    from edgekit.pipeline import CalibrationSettings, build

    targets = tmp_path / "targets.yaml"
    targets.write_text(EXACT_GPTQ_TARGETS)
    source = tiny_checkpoints("qwen3_5")
    calibration = CalibrationSettings(samples=4, seq_len=48)
    common = dict(targets_file=targets, progress=False, evaluation=None, calibration=calibration)
    build(source, tmp_path / "pkg", "cpu-gptq", streaming=streaming, **common)  # type: ignore[arg-type]
    tensors = load_checkpoint_tensors(kept_gptq_checkpoint["folder"])
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.qweight" in tensors
    assert "model.language_model.layers.0.linear_attn.in_proj_a.weight" in tensors  # a dense gate
    model = fake_quantized_model(source, tensors)
    with torch.no_grad():
        expected = model(torch.from_numpy(IDS)).logits.numpy()
    # The registry's fp32 parity tolerance for qwen3_5 (its scan sums in another order than PyTorch's);
    # RTN's logits are about 0.1 away from these.
    gptq = onnx_logits(tmp_path / "pkg" / "int4-gptq", IDS)
    assert np.abs(gptq - expected).max() < 5e-3
    assert np.abs(onnx_logits(tmp_path / "pkg" / "int4-rtn", IDS) - expected).max() > 5e-2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"quantization_config": {"dynamic": {"+:.*q_proj": {"bits": 8}}}}, "per-layer overrides"),
        ({"intermediate_size": 256}, r"mlp.gate_proj' is packed as 64x128, but config.json makes it 64x256"),
    ],
)
@pytest.mark.slow
def test_streamed_export_refuses_packed_checkpoints_it_cannot_read(
    change: dict, message: str, tiny_checkpoints, tmp_path: Path
) -> None:
    import json

    from tiny_models import quantized_checkpoint

    from edgekit.errors import ExportError

    source = quantized_checkpoint(tiny_checkpoints("qwen3"), tmp_path / "gptq", "gptq")
    config = json.loads((source / "config.json").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (source / "config.json").write_text(json.dumps(config))
    log = tmp_path / "build.log"
    log.touch()
    with pytest.raises(ExportError, match=message):
        run_streaming_builder(
            source, tmp_path / "out", precision="int4", provider="cpu", options=INT4, cache_dir=tmp_path / "c",
            log_path=log,
        )  # fmt: skip
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_streamed_build_of_a_prequantized_checkpoint(method: str, tiny_checkpoints, tmp_path: Path) -> None:
    from tiny_models import quantized_checkpoint

    from edgekit.pipeline import build

    source = quantized_checkpoint(tiny_checkpoints("qwen3"), tmp_path / method, method)
    targets = tmp_path / "targets.yaml"
    targets.write_text(EXACT_GPTQ_TARGETS)
    common = dict(targets_file=targets, progress=False, evaluation=None)
    streamed = build(source, tmp_path / "streamed", "cpu-gptq", streaming=True, **common)  # type: ignore[arg-type]
    build(source, tmp_path / "whole", "cpu-gptq", **common)  # type: ignore[arg-type]
    variant = f"int4-{method}"
    assert list(streamed.manifest["variants"]) == [variant]
    assert np.array_equal(
        onnx_logits(tmp_path / "streamed" / variant, IDS), onnx_logits(tmp_path / "whole" / variant, IDS)
    )


def test_streaming_refuses_an_architecture_without_a_streamed_export(tiny_checkpoints, tmp_path: Path) -> None:
    from edgekit.pipeline import build

    with pytest.raises(
        UsageError, match="--streaming cannot build this: architecture 'phi3' has no streamed export"
    ) as error:
        build(tiny_checkpoints("phi3"), tmp_path / "pkg", progress=False, streaming=True)
    assert not (tmp_path / "pkg").exists()
    # The list comes from the registry's streamed builders.
    assert f"(streamed: {', '.join(streamable_architectures())})" in str(error.value)
    assert "streamed: llama, mistral, qwen2, qwen3, qwen3_5" in str(error.value)


def test_the_streamed_export_refuses_an_architecture_without_a_streamed_builder(tiny_checkpoints, tmp_path) -> None:
    from edgekit.errors import ExportError

    log = tmp_path / "build.log"
    log.touch()
    with pytest.raises(ExportError, match=r"does not support architecture 'phi3'.*streamed: llama, mistral, qwen2"):
        run_streaming_builder(
            tiny_checkpoints("phi3"), tmp_path / "out", precision="int4", provider="cpu", options=INT4,
            cache_dir=tmp_path / "c", log_path=log,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == [log]


def test_build_refuses_when_memory_is_short(
    tiny_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runner
) -> None:
    from edgekit.cli import main

    monkeypatch.setattr(memory_estimate, "available_memory", lambda: 200 * 1024**2)
    result = runner.invoke(main, ["build", str(tiny_checkpoints("qwen3")), "-o", str(tmp_path / "pkg"), "-q"])
    assert result.exit_code == 1
    assert "needs about 1.0 GiB of memory" in result.output
    assert "0.2 GiB is available" in result.output
    assert not (tmp_path / "pkg").exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_recipe_search_that_does_not_fit_is_left_out_and_rtn_deployed(
    tiny_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The export fits in memory and the recipe search would not: a whole-model build without the recipe."""
    from edgekit.pipeline import build
    from edgekit.quant import recipe_build
    from edgekit.targets import get_target
    from edgekit.variants import target_variants

    assert memory_estimate.RECIPE_ROUNDS == recipe_build._ROUNDS  # the disk estimate counts every round

    monkeypatch.setattr(memory_estimate, "available_memory", lambda: 2 * GIB)
    monkeypatch.setattr(memory_estimate, "RECIPE_BYTES_PER_PARAM", 1e6)  # the tiny model's search: terabytes
    result = build(tiny_checkpoints("llama"), tmp_path / "pkg", "laptop-cpu", progress=False, evaluation=None)
    assert set(result.manifest["variants"]) == {"fp32", "int4-rtn"}  # whole: the fp32 reference is there
    assert result.manifest["targets"]["laptop-cpu"]["variant"] == "int4-rtn"
    (note,) = [w for w in result.warnings if "recipe search needs about" in w]
    assert "no int4-recipe" in note and "laptop-cpu-rtn" in note
    assert "--streaming, whose search fits" in note  # 4 B/param + 24 KiB per vocabulary entry do
    # A size bound only a recipe keeps, with no search that fits: refused before the source is staged, not
    # an RTN package over it.
    monkeypatch.setattr(memory_estimate, "STREAMED_RECIPE_BYTES_PER_PARAM", 1e6)
    out = tmp_path / "bounded"
    with pytest.raises(ResourceError, match="only a recipe can be held to max_model_bytes"):
        build(tiny_checkpoints("llama"), out, "laptop-cpu", progress=False, evaluation=None, max_model_bytes=10**9)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bounded")]
    monkeypatch.undo()
    shapes = {"model.layers.0.mlp.w": (1000, 1000)}
    plain = memory_estimate.estimate_from_shapes(shapes, [], streaming=False, tied=False)
    variants = target_variants(get_target("laptop-cpu"))
    recipe = memory_estimate.estimate_from_shapes(shapes, variants, streaming=False, tied=False)
    per_param = memory_estimate.RECIPE_BYTES_PER_PARAM - memory_estimate.WHOLE_BYTES_PER_PARAM
    assert recipe.peak_memory - plain.peak_memory == per_param * 10**6 > 0
    # GPTQ candidates keep XᵀX of every input: 4 bytes per entry, K^2 per matrix.
    gptq = memory_estimate.estimate_from_shapes(shapes, variants, streaming=False, tied=False, recipe_hessians=True)
    assert gptq.peak_memory - recipe.peak_memory == 4 * 1000**2


def test_a_streamed_recipe_counts_its_fp32_export_and_rounds_and_a_pre_quantized_build_plans_none(
    tmp_path: Path,
) -> None:
    """A streamed recipe: the fp32 export it searches on and its rounds on disk, its search's memory per
    parameter; a short memory drops it. A pre-quantized source makes no recipe: a short memory drops none."""
    from edgekit.sources.registry import lookup_architecture
    from edgekit.targets import get_target, with_max_model_bytes
    from edgekit.variants import reference_variant, target_variants

    layers = {f"model.layers.{i}.mlp.w": (8000, 8000) for i in range(4)}  # the search's peak above the export's
    shapes = {"model.embed_tokens.weight": (50_000, 8), **layers}
    params = 4 * 8000**2 + 50_000 * 8
    default, rtn = (target_variants(get_target(name)) for name in ("laptop-cpu", "laptop-cpu-rtn"))
    streamed = memory_estimate.estimate_from_shapes(shapes, default, streaming=True, tied=False)
    streamed_rtn = memory_estimate.estimate_from_shapes(shapes, rtn, streaming=True, tied=False)
    recipe_bytes = memory_estimate._variant_bytes(shapes, default[-1], False)
    fp32_bytes = memory_estimate._variant_bytes(shapes, reference_variant(), False)
    assert streamed.disk - streamed_rtn.disk == memory_estimate.RECIPE_ROUNDS * recipe_bytes + fp32_bytes
    assert fp32_bytes == 4 * params
    search = (
        memory_estimate.BASE_BYTES
        + memory_estimate.STREAMED_RECIPE_BYTES_PER_PARAM * params
        + memory_estimate.STREAMED_RECIPE_BYTES_PER_TOKEN * 50_000  # the calibration logits: per vocabulary entry
    )
    assert streamed.peak_memory == int(search) > streamed_rtn.peak_memory
    whole = memory_estimate.estimate_from_shapes(shapes, default, streaming=False, tied=False)
    assert whole.disk > memory_estimate.estimate_from_shapes(shapes, rtn, streaming=False, tied=False).disk
    architecture = lookup_architecture({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})

    def plan(memory: int, streaming: bool, recipe: bool = True) -> memory_estimate.ResourcePlan:
        return memory_estimate.plan_resources(
            shapes, architecture, get_target("laptop-cpu"), tmp_path / "out", tmp_path, streaming=streaming,
            tied=False, memory=memory, recipe=recipe,
        )  # fmt: skip

    memory = GIB + int(memory_estimate.WHOLE_BYTES_PER_PARAM * params) + 1  # the build without the search fits
    assert plan(memory, False, recipe=False).recipe_dropped is None
    dropped = plan(memory, False).recipe_dropped
    assert dropped is not None and not dropped.streaming
    assert plan(int(search), True).recipe_dropped is None  # the streamed search fits
    dropped = plan(int(search) - 1, True).recipe_dropped
    assert dropped is not None and dropped.streaming and dropped.peak_memory == int(search)
    # Too short for the whole build, long enough streamed: switched to streaming, with the recipe.
    switched = plan(int(search), False)
    assert switched.streaming and switched.switched and switched.recipe_dropped is None
    # Short only for the whole build's search: that build runs without it, its warning naming --streaming;
    # under a size bound, which only a recipe keeps, the build streams with its recipe instead.
    kept_whole = plan(memory, False)
    assert not kept_whole.streaming and kept_whole.recipe_dropped is not None and kept_whole.recipe_streams
    bounded = memory_estimate.plan_resources(
        shapes, architecture, with_max_model_bytes(get_target("laptop-cpu"), 10**9), tmp_path / "out", tmp_path,
        streaming=False, tied=False, memory=memory,
    )  # fmt: skip
    assert bounded.streaming and bounded.switched and bounded.recipe_dropped is None


def test_memory_refusal_names_streaming_when_it_fits() -> None:
    whole = BuildEstimate(9_000_000_000, 220_000_000, 70 * GIB, 9 * 10**9, streaming=False)
    streamed = BuildEstimate(9_000_000_000, 220_000_000, 5 * GIB, 9 * 10**9, streaming=True)
    with pytest.raises(ResourceError, match=r"needs about 70.0 GiB .* 20.0 GiB is available.*pass --streaming"):
        check_resources(whole, Path("out"), source=Path("ckpt"), streamed=streamed, memory=20 * GIB, disk=10**12)
    check_resources(streamed, Path("out"), source=Path("ckpt"), streamed=streamed, memory=20 * GIB, disk=10**12)
    with pytest.raises(ResourceError, match=r"needs about 9.0 GB of disk but 1.0 GB is free"):
        check_resources(streamed, Path("out"), source=Path("ckpt"), memory=20 * GIB, disk=10**9)


def test_the_estimate_counts_gptq_calibration(tmp_path: Path) -> None:
    """GPTQ's peak (one fp32 layer, the calibration activations, the Hessians) joins the export's."""
    import torch
    from safetensors.torch import save_file

    from edgekit.exporters.memory_estimate import BASE_BYTES, estimate_build
    from edgekit.targets import get_target
    from edgekit.variants import target_variants

    hidden, inner = 1024, 4096
    layer = {
        "q_proj": (hidden, hidden),
        "o_proj": (hidden, hidden),
        "up_proj": (inner, hidden),
        "down_proj": (hidden, inner),
    }
    tensors = {
        f"model.layers.0.{name}.weight": torch.empty(shape, dtype=torch.bfloat16) for name, shape in layer.items()
    }
    tensors["model.embed_tokens.weight"] = torch.empty(1000, hidden, dtype=torch.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    files, variants = [tmp_path / "model.safetensors"], target_variants(get_target("laptop-cpu"))
    plain = estimate_build(files, variants, streaming=True, tied=True)
    tokens = 128 * 512
    gptq = estimate_build(files, variants, streaming=True, tied=True, calibration_tokens=tokens)
    largest = 2 * hidden * hidden + 2 * inner * hidden
    expected = BASE_BYTES + 12 * largest + 4 * tokens * hidden + 8 * (hidden * hidden + inner * inner) + 8 * inner**2
    assert plain.peak_memory < gptq.peak_memory == expected
    # One pass holds every token's activations at the widest stop (before down_proj) and one Hessian.
    one_pass = estimate_build(files, variants, streaming=True, tied=True, calibration_tokens=tokens, gptq_one_pass=True)
    assert one_pass.peak_memory == BASE_BYTES + 12 * largest + 6 * tokens * (3 * hidden + inner) + 16 * inner**2


def test_checkpoint_reader_reads_rows_and_tensors(tiny_checkpoints) -> None:
    from safetensors import safe_open

    from edgekit.sources.lazy_weights import CheckpointReader

    folder = tiny_checkpoints("llama")
    reader = CheckpointReader(folder)
    with safe_open(str(next(folder.glob("*.safetensors"))), "pt") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open handles are not mappings
            expected = handle.get_tensor(name)
            assert np.array_equal(reader.tensor(name).numpy(), expected.numpy())
        embed = handle.get_tensor("model.embed_tokens.weight")
    assert np.array_equal(reader.rows("model.embed_tokens.weight", 10, 20).numpy(), embed[10:20].numpy())
    assert [name for name, _ in reader.iter_tensors("model.layers.1.")] == sorted(
        n for n in reader.names() if n.startswith("model.layers.1.")
    )


@pytest.mark.slow
def test_cli_streaming_build_and_info(
    tiny_checkpoints, tmp_path: Path, runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgekit import build_steps
    from edgekit.cli import main

    checked_tokenizer = build_steps.check_tokenizer_parity
    scratch: list[list[Path]] = []

    def check_then_look(*args, **kwargs):  # type: ignore[no-untyped-def]
        # The step after the recipe: its scratch fp32 export is already gone, the scratch folder not yet.
        assert any("-work-" in p.name for p in tmp_path.iterdir())  # the scratch folder is still there
        scratch.append([p for p in tmp_path.rglob("*") if p.name.endswith(".onnx.data") and "-work-" in str(p)])
        return checked_tokenizer(*args, **kwargs)

    monkeypatch.setattr(build_steps, "check_tokenizer_parity", check_then_look)
    out = tmp_path / "pkg"
    result = runner.invoke(main, ["build", str(tiny_checkpoints("llama")), "-o", str(out), "-q", "--streaming"])
    assert result.exit_code == 0, result.output
    assert "validation: skipped (streamed build: no fp32 reference)" in result.output
    # Evaluated all the same, against the checkpoint run in PyTorch one layer at a time.
    assert "reference: streamed PyTorch from the checkpoint (float32 weights" in result.output
    # The default target's recipe, searched on an fp32 export streamed to scratch space that is gone after.
    assert sorted(p.name for p in out.iterdir()) == ["build.log", "eval", "int4-recipe", "int4-rtn", "manifest.json"]
    assert scratch == [[]] and [p for p in tmp_path.iterdir() if p.name != "pkg"] == []
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["targets"]["laptop-cpu"]["variant"] == "int4-recipe"
    recipe = manifest["variants"]["int4-recipe"]["recipe"]
    assert recipe["model_bytes"] <= sum(p.stat().st_size for p in (out / "int4-rtn").glob("model.onnx*"))
    assert "int4-recipe" in manifest["evaluation"]["variants"]
    assert (out / "eval" / "sensitivity.json").is_file()
    info = runner.invoke(main, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert "validation: skipped" in info.output


def test_the_streamed_builder_is_told_not_to_trust_remote_code(tiny_checkpoints, tmp_path: Path, monkeypatch) -> None:
    from edgekit.exporters import builder_compat, streaming

    seen: dict[str, str] = {}
    monkeypatch.setattr(builder_compat, "export_streamed", lambda *args, **kwargs: seen.update(kwargs["options"]))
    streaming.run_streaming_builder(
        tiny_checkpoints("qwen3"),
        tmp_path / "out",
        precision="int4",
        provider="cpu",
        options={"hf_remote": "true"},  # even asked to, it does not
        cache_dir=tmp_path / "cache",
        log_path=tmp_path / "build.log",
    )
    assert seen["hf_remote"] == "false" and seen["hf_token"] == "false"


def test_a_short_memory_never_suggests_streaming_an_architecture_that_cannot(tmp_path: Path) -> None:
    """phi3 and gemma3_text have no streamed export: the refusal named --streaming, which then refused too."""
    from edgekit.sources.registry import lookup_architecture
    from edgekit.targets import get_target

    shapes = {f"model.layers.{i}.mlp.w": (4000, 4000) for i in range(8)}  # whole 3.6 GiB, streamed 1.3
    whole_memory = 4 * GIB
    for model_type, streams in (("llama", True), ("phi3", False)):
        architecture = lookup_architecture({"model_type": model_type, "architectures": ["XForCausalLM"]})
        assert (architecture.streamed_builder is not None) is streams
        args = (shapes, architecture, get_target("laptop-cpu-rtn"), tmp_path / "out", tmp_path)
        if streams:
            plan = memory_estimate.plan_resources(*args, streaming=False, tied=False, memory=2 * GIB)
            assert plan.switched
            continue
        with pytest.raises(ResourceError) as refused:
            memory_estimate.plan_resources(*args, streaming=False, tied=False, memory=2 * GIB)
        assert "--streaming" not in str(refused.value) and "free memory" in str(refused.value)
        assert memory_estimate.plan_resources(*args, streaming=False, tied=False, memory=whole_memory)


def test_gptq_refuses_linears_its_groups_do_not_divide_before_any_weight_is_read(tmp_path: Path) -> None:
    """An 80-wide model reached GPTQ's solver and ended in a traceback (a build of odd tiny configs)."""
    from edgekit.errors import UsageError
    from edgekit.sources.registry import lookup_architecture
    from edgekit.targets import get_target

    architecture = lookup_architecture({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    shapes = {"model.layers.0.mlp.down_proj.weight": (80, 136), "model.layers.0.mlp.up_proj.weight": (136, 80)}
    args = (shapes, architecture, get_target("laptop-cpu-gptq"), tmp_path / "out", tmp_path)
    with pytest.raises(UsageError, match=r"down_proj.weight has 136 inputs, not a multiple of the GPTQ group size"):
        memory_estimate.plan_resources(*args, streaming=False, tied=False, calibration_tokens=4096, memory=64 * GIB)
    rtn = (shapes, architecture, get_target("laptop-cpu-rtn"), tmp_path / "out", tmp_path)
    assert memory_estimate.plan_resources(*rtn, streaming=False, tied=False, memory=64 * GIB)


# Measured in a fresh interpreter: in the test process the allocator reuses memory earlier tests freed, so
# a copied weight need not raise RssAnon there.
_ANONYMOUS_GROWTH = """
import json, sys
import numpy as np, onnxruntime as ort
def anonymous():
    with open("/proc/self/status", encoding="utf-8") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))
grown = {}
for path in sys.argv[1:]:
    before = anonymous()
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the "initializer appears in graph inputs" warning is the point here
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    session.run(None, {"x": np.ones((1, 4096), np.float32)})
    grown[path] = anonymous() - before
    del session
print(json.dumps(grown))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc")
def test_onnxruntime_maps_a_page_aligned_weight_the_graph_may_override(tmp_path: Path) -> None:
    """What the streamed recipe search's memory estimate rests on: a weight in a data file written by the
    streamed export's ExternalDataFile and declared a graph input too, as the search's probe graph declares
    every linear's, stays in the file's pages; a constant weight is copied into the process (prepacked)."""
    import subprocess
    import sys

    from onnx import TensorProto, helper

    k = n = 4096  # 64 MiB of float32
    data = streaming.ExternalDataFile(tmp_path, "w.data")
    data.append([b"\0" * 100], 100)
    offset = data.append([np.ones((k, n), np.float32).tobytes()], 4 * k * n)
    data.close()
    assert offset == 4096  # the export aligns every tensor (onnxruntime maps unaligned ones too)
    weight = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[k, n], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "w.data"), ("offset", str(offset)), ("length", str(4 * k * n))):
        weight.external_data.add(key=key, value=value)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
    paths = {}
    for overridable in (True, False):
        inputs = [x, helper.make_tensor_value_info("W", TensorProto.FLOAT, [k, n])] if overridable else [x]
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", inputs, [y], [weight])
        paths[overridable] = str(tmp_path / f"m{int(overridable)}.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), paths[overridable])
    child = subprocess.run(
        [sys.executable, "-c", _ANONYMOUS_GROWTH, paths[True], paths[False]], capture_output=True, text=True, check=True
    )
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    grown = {overridable: measured[path] for overridable, path in paths.items()}
    assert grown[True] < 16 << 20 and grown[False] > 48 << 20, grown
