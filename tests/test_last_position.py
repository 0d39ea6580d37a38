"""The LM head on the last position only (exporters/last_position.py): same tokens, and scoring still sees every row."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.exporters.decoder_session import DecoderSession
from edgekit.exporters.last_position import (
    is_last_position,
    keep_last_position,
    keep_last_position_in_folder,
    restore_all_positions,
)
from edgekit.package.manifest import read_manifest, write_manifest
from edgekit.runtimes.model import load

IDS = np.array([[5, 17, 3, 99, 42, 8, 61, 23, 11, 7, 250, 31]], dtype=np.int64)


def graph_of(folder: Path) -> onnx.ModelProto:
    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


def raw_logits(folder: Path, model: onnx.ModelProto) -> np.ndarray:
    """``model`` run as is (no restoring) over ``folder``'s weights, on IDS from an empty cache."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    feed = {}
    for spec in session.get_inputs():
        if spec.name == "input_ids":
            feed[spec.name] = IDS
        elif spec.name == "attention_mask":
            feed[spec.name] = np.ones_like(IDS)
        elif spec.name == "position_ids":
            feed[spec.name] = np.arange(IDS.shape[1], dtype=np.int64)[None]
        else:
            feed[spec.name] = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
    return session.run(["logits"], feed)[0]


def test_cpu_variants_carry_the_rewrite_and_the_reference_does_not(tiny_llama_package: Path) -> None:
    assert is_last_position(graph_of(tiny_llama_package / "int4-rtn"))
    assert not is_last_position(graph_of(tiny_llama_package / "fp32"))


def test_the_last_row_is_the_whole_graphs_last_row_and_fills_every_position(tiny_llama_package: Path) -> None:
    folder = tiny_llama_package / "int4-rtn"
    rewritten = graph_of(folder)
    whole = graph_of(folder)
    assert restore_all_positions(whole)
    last, every = raw_logits(folder, rewritten), raw_logits(folder, whole)
    assert every.shape == (1, IDS.shape[1], every.shape[-1])
    assert last.shape == (1, 1, every.shape[-1]), "one position, as the declared [batch, 1, vocab] says"
    np.testing.assert_allclose(last[0, -1], every[0, -1], rtol=1e-4, atol=1e-4)
    assert not np.allclose(every[0, 0], every[0, -1]), "the whole graph's rows differ"
    declared = next(o for o in rewritten.graph.output if o.name == "logits").type.tensor_type.shape.dim
    assert declared[1].dim_value == 1  # what onnxruntime-genai reads as a graph that keeps the last position
    assert not next(o for o in whole.graph.output if o.name == "logits").type.tensor_type.shape.dim[1].dim_value


def test_scoring_restores_every_position(tiny_llama_package: Path) -> None:
    folder = tiny_llama_package / "int4-rtn"
    whole = graph_of(folder)
    restore_all_positions(whole)
    scored = DecoderSession(folder).logits(IDS)
    np.testing.assert_array_equal(scored, raw_logits(folder, whole))


def test_restore_then_keep_round_trips(tiny_llama_package: Path) -> None:
    model = graph_of(tiny_llama_package / "int4-rtn")
    original = model.SerializeToString()
    assert restore_all_positions(model) and not is_last_position(model)
    assert not restore_all_positions(model)
    assert keep_last_position(model) and not keep_last_position(model), "a second rewrite is refused"
    assert model.SerializeToString() == original


def _linear_head(extra_input: bool) -> onnx.ModelProto:
    """hidden [1, S, 4] -> MatMul -> (Add of another running tensor, when ``extra_input``) -> logits."""
    hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "S", 4])
    other = helper.make_tensor_value_info("other", TensorProto.FLOAT, [1, "S", 6])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "S", 6])
    weight = numpy_helper.from_array(np.arange(24, dtype=np.float32).reshape(4, 6), "W")
    nodes = [helper.make_node("MatMul", ["hidden", "W"], ["mm" if extra_input else "logits"])]
    if extra_input:
        nodes.append(helper.make_node("Add", ["mm", "other"], ["logits"]))
    inputs = [hidden, other] if extra_input else [hidden]
    return helper.make_model(helper.make_graph(nodes, "head", inputs, [logits], [weight]))


def test_a_head_chain_that_mixes_in_another_tensor_is_left_alone() -> None:
    model = _linear_head(extra_input=True)
    before = model.SerializeToString()
    assert not keep_last_position(model)
    assert model.SerializeToString() == before


def test_a_head_whose_inner_tensor_feeds_another_output_is_left_alone() -> None:
    hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "S", 4])
    weight = numpy_helper.from_array(np.ones((4, 6), np.float32), "W")
    nodes = [helper.make_node("MatMul", ["hidden", "W"], ["mm"]), helper.make_node("Tanh", ["mm"], ["logits"])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, "S", 6]) for name in ("logits", "mm")]
    model = helper.make_model(helper.make_graph(nodes, "head", [hidden], outputs, [weight]))
    before = model.SerializeToString()
    assert not keep_last_position(model)
    assert model.SerializeToString() == before


def test_a_plain_head_is_rewritten_and_runs() -> None:
    import onnxruntime as ort

    model = _linear_head(extra_input=False)
    assert keep_last_position(model)
    onnx.checker.check_model(model, full_check=True)
    read = {name for node in model.graph.node for name in node.input}
    assert {init.name for init in model.graph.initializer} <= read, "an initializer no node reads"
    hidden = np.random.default_rng(0).standard_normal((1, 5, 4)).astype(np.float32)
    (logits,) = ort.InferenceSession(model.SerializeToString()).run(None, {"hidden": hidden})
    expected = hidden[:, -1:] @ np.arange(24, dtype=np.float32).reshape(4, 6)
    assert logits.shape == (1, 1, 6)
    np.testing.assert_allclose(logits, expected, rtol=1e-6)


def test_logits_without_a_declared_shape_are_left_alone() -> None:
    model = _linear_head(extra_input=False)
    model.graph.output[0].type.tensor_type.ClearField("shape")
    before = model.SerializeToString()
    assert not keep_last_position(model)  # nothing to mark as one position: onnxruntime-genai would bind S
    assert model.SerializeToString() == before


def _pooled_head() -> onnx.ModelProto:
    """logits = [hidden, Pad(AveragePool(hidden))] @ W: the recipe's asymmetric head, its block means appended
    to its input."""
    hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "S", 8])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "S", 6])
    pads = [0, 0, 0, 0, 0, 2]
    initializers = [
        numpy_helper.from_array(np.random.default_rng(0).standard_normal((12, 6)).astype(np.float32), "W"),
        numpy_helper.from_array(np.array(pads, np.int64), "pads"),
    ]
    nodes = [
        helper.make_node("AveragePool", ["hidden"], ["means"], kernel_shape=[4], strides=[4]),
        helper.make_node("Pad", ["means", "pads"], ["padded"]),
        helper.make_node("Concat", ["hidden", "padded"], ["joined"], axis=-1),
        helper.make_node("MatMul", ["joined", "W"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "pooled", [hidden], [logits], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_a_pooled_asymmetric_head_is_sliced_to_the_last_position() -> None:
    import onnxruntime as ort

    whole, model = _pooled_head(), _pooled_head()
    assert keep_last_position(model)
    hidden = np.random.default_rng(1).standard_normal((1, 7, 8)).astype(np.float32)
    (expected,) = ort.InferenceSession(whole.SerializeToString()).run(None, {"hidden": hidden})
    (logits,) = ort.InferenceSession(model.SerializeToString()).run(None, {"hidden": hidden})
    assert logits.shape == (1, 1, 6)
    np.testing.assert_allclose(logits, expected[:, -1:], rtol=1e-5, atol=1e-6)


@pytest.fixture
def whole_head_package(tiny_llama_package: Path, tmp_path: Path) -> Path:
    """A copy of the tiny package whose int4 graph computes the head over every position (as before the rewrite)."""
    copy = Path(shutil.copytree(tiny_llama_package, tmp_path / "whole"))
    model = graph_of(copy / "int4-rtn")
    assert restore_all_positions(model)
    onnx.save(model, str(copy / "int4-rtn" / "model.onnx"))
    write_manifest(copy, read_manifest(copy))
    return copy


def test_generation_is_token_for_token_the_same(tiny_llama_package: Path, whole_head_package: Path) -> None:
    assert not is_last_position(graph_of(whole_head_package / "int4-rtn"))
    with load(tiny_llama_package, variant="int4-rtn") as last, load(whole_head_package, variant="int4-rtn") as whole:
        for length in (1, 5, 40):
            prompt = [int(t) for t in np.random.default_rng(length).integers(3, 250, size=length)]
            assert last.generate_tokens(prompt, max_new_tokens=12) == whole.generate_tokens(prompt, max_new_tokens=12)


def test_rewriting_a_folder_twice_changes_nothing(whole_head_package: Path) -> None:
    folder = whole_head_package / "int4-rtn"
    assert keep_last_position_in_folder(folder)
    once = (folder / "model.onnx").read_bytes()
    assert not keep_last_position_in_folder(folder)
    assert (folder / "model.onnx").read_bytes() == once
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []


def test_a_package_of_the_earlier_expanded_form_is_restored() -> None:
    """Packages built before the logits were declared [batch, 1, vocab] expand the last row back to every
    position; scoring them must still see every position."""
    import onnxruntime as ort

    prefix = "/edgekit/last_position"
    model = _linear_head(extra_input=False)
    whole = _linear_head(extra_input=False)
    model.graph.node[0].input[0], model.graph.node[0].output[0] = f"{prefix}/hidden", f"{prefix}/logits"
    constants = {f"{prefix}/starts": [-1], f"{prefix}/ends": [np.iinfo(np.int64).max], f"{prefix}/axes": [1]}
    model.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in constants.items())
    model.graph.node.insert(
        0, helper.make_node("Slice", ["hidden", *constants], [f"{prefix}/hidden"], name=f"{prefix}/Slice")
    )
    model.graph.node.extend(
        [
            helper.make_node("Shape", ["hidden"], [f"{prefix}/hidden_shape"], name=f"{prefix}/Shape", end=2),
            helper.make_node("Shape", [f"{prefix}/logits"], [f"{prefix}/vocab"], name=f"{prefix}/ShapeVocab", start=2),
            helper.make_node(
                "Concat", [f"{prefix}/hidden_shape", f"{prefix}/vocab"], [f"{prefix}/shape"], name=f"{prefix}/shape",
                axis=0,
            ),
            helper.make_node("Expand", [f"{prefix}/logits", f"{prefix}/shape"], ["logits"], name=f"{prefix}/Expand"),
        ]
    )  # fmt: skip
    assert is_last_position(model) and restore_all_positions(model)
    hidden = np.random.default_rng(2).standard_normal((1, 5, 4)).astype(np.float32)
    (restored,) = ort.InferenceSession(model.SerializeToString()).run(None, {"hidden": hidden})
    (expected,) = ort.InferenceSession(whole.SerializeToString()).run(None, {"hidden": hidden})
    np.testing.assert_array_equal(restored, expected)
    assert not is_last_position(model)
