"""Linears of one input joined into one MatMulNBits (exporters/parallel_matmuls.py): same outputs, fewer calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.exporters.parallel_matmuls import join_parallel_matmuls, join_parallel_matmuls_in_folder

K, BLOCK = 64, 32


def _linear(
    name: str, source: str, n: int, rng: np.random.Generator, *, level: int = 4, zero_points: bool = False
) -> tuple[onnx.NodeProto, list[onnx.TensorProto]]:
    blocks = K // BLOCK
    tensors = [
        numpy_helper.from_array(rng.integers(0, 256, (n, blocks, BLOCK // 2), dtype=np.uint8), f"{name}_B"),
        numpy_helper.from_array((rng.random((n, blocks), dtype=np.float32) * 0.1).astype(np.float32), f"{name}_S"),
    ]
    if zero_points:
        tensors.append(
            numpy_helper.from_array(rng.integers(0, 256, n * ((blocks + 1) // 2), dtype=np.uint8), f"{name}_Z")
        )
    node = helper.make_node(
        "MatMulNBits", [source, *(t.name for t in tensors)], [f"{name}_out"], name=name, domain="com.microsoft",
        K=K, N=n, bits=4, block_size=BLOCK, accuracy_level=level,
    )  # fmt: skip
    return node, tensors


def _model(specs: list[tuple[str, str, int, dict[str, object]]], opset: int = 21) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, initializers = [helper.make_node("Relu", ["x"], ["y"], name="relu")], []
    for name, source, n, options in specs:
        node, tensors = _linear(name, source, n, rng, **options)  # type: ignore[arg-type]
        nodes.append(node)
        initializers += tensors
    outputs = [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["M", n]) for name, _, n, _ in specs]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])], outputs, initializers
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8 if opset < 21 else 10)


def _run(model: onnx.ModelProto, rows: int = 3) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((rows, K)).astype(np.float32)
    return session.run(None, {"x": x})  # type: ignore[return-value]


def _matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "MatMulNBits"]


@pytest.mark.parametrize("opset", [11, 21])
def test_linears_of_one_input_become_one_call_with_the_same_outputs(opset: int) -> None:
    model = _model(
        [
            ("gate", "y", 48, {}),
            ("up", "y", 80, {}),
            ("other_input", "x", 16, {}),  # alone on its input
            ("fp32_compute", "y", 16, {"level": 0}),  # another accuracy level: not joined
            ("zp_a", "y", 24, {"zero_points": True}),  # a second group: zero points of their own
            ("zp_b", "y", 40, {"zero_points": True}),
        ],
        opset,
    )
    before = _run(model)
    joined = onnx.ModelProto()
    joined.CopyFrom(model)
    assert join_parallel_matmuls(joined) == 2
    onnx.checker.check_model(joined)
    assert len(_matmuls(joined)) == 4  # gate+up, zp_a+zp_b, and the two that stayed alone
    assert sorted(n.name for n in _matmuls(joined) if not n.name.startswith("edgekit_joined")) == [
        "fp32_compute",
        "other_input",
    ]
    for expected, got in zip(before, _run(joined), strict=True):
        np.testing.assert_array_equal(expected, got)  # each column depends on its own weights only
    assert join_parallel_matmuls(joined) == 0  # nothing left to join


def test_nodes_that_differ_in_their_inputs_or_attributes_stay_apart() -> None:
    model = _model([("plain", "y", 32, {}), ("with_zero_points", "y", 32, {"zero_points": True})])
    extra = _model([("a", "y", 32, {}), ("b", "y", 32, {})])
    extra.graph.node[2].attribute.append(helper.make_attribute("future_option", 1))  # an attribute not understood
    for graph_model in (model, extra):
        assert join_parallel_matmuls(graph_model) == 0
        assert len(_matmuls(graph_model)) == 2


def test_a_folder_is_rewritten_in_place_only_when_something_joins(tmp_path: Path) -> None:
    lone = tmp_path / "lone"
    lone.mkdir()
    onnx.save(_model([("a", "y", 32, {})]), str(lone / "model.onnx"))
    before = (lone / "model.onnx").read_bytes()
    assert join_parallel_matmuls_in_folder(lone) == 0
    assert (lone / "model.onnx").read_bytes() == before
    pair = tmp_path / "pair"
    pair.mkdir()
    onnx.save(_model([("a", "y", 32, {}), ("b", "y", 32, {})]), str(pair / "model.onnx"))
    assert join_parallel_matmuls_in_folder(pair) == 1
    assert len(_matmuls(onnx.load(str(pair / "model.onnx")))) == 1
    assert [p.name for p in pair.iterdir()] == ["model.onnx"]  # no partial file left behind


def test_scales_stored_in_either_shape_join_alike() -> None:
    model = _model([("a", "y", 32, {}), ("b", "y", 16, {})])
    scales = next(t for t in model.graph.initializer if t.name == "b_S")
    scales.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scales).reshape(-1), "b_S"))  # [N * blocks]
    before = _run(model)
    assert join_parallel_matmuls(model) == 1
    for expected, got in zip(before, _run(model), strict=True):
        np.testing.assert_array_equal(expected, got)


def test_a_second_join_takes_names_the_first_did_not() -> None:
    model = _model([("a", "y", 32, {}), ("b", "y", 16, {}), ("c", "x", 16, {})])
    assert join_parallel_matmuls(model) == 1
    extra, tensors = _linear("d", "x", 24, np.random.default_rng(5))
    model.graph.node.append(extra)
    model.graph.initializer.extend(tensors)
    model.graph.output.append(helper.make_tensor_value_info("d_out", TensorProto.FLOAT, ["M", 24]))
    before = _run(model)
    assert join_parallel_matmuls(model) == 1  # c and d, both on x
    onnx.checker.check_model(model)
    names = [n.name for n in model.graph.node] + [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))
    for expected, got in zip(before, _run(model), strict=True):
        np.testing.assert_array_equal(expected, got)
