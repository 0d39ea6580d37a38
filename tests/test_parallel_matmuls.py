"""Linears of one input joined into one MatMulNBits (exporters/parallel_matmuls.py): same outputs, fewer calls."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.exporters.parallel_matmuls import join_parallel_matmuls, join_parallel_matmuls_in_folder


def _linear(
    name: str,
    source: str,
    n: int,
    rng: np.random.Generator,
    *,
    k: int = 64,
    block: int = 32,
    bits: int = 4,
    level: int = 4,
    zero_points: str | None = None,
    stored_half: bool = False,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """A MatMulNBits [M, k] x [k, n]; ``stored_half``: codes stored flat and scales float16, reshaped and cast
    in the graph as the recipe writes them; ``zero_points``: None, "uint8" (packed) or "float"."""
    blocks = math.ceil(k / block)
    codes = rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8)
    scales = (rng.random((n, blocks), dtype=np.float32) * 0.1).astype(np.float32)
    nodes: list[onnx.NodeProto] = []
    tensors = [numpy_helper.from_array(codes.reshape(-1) if stored_half else codes, f"{name}_B")]
    inputs = [source, f"{name}_B"]
    if stored_half:
        tensors.append(numpy_helper.from_array(np.array(codes.shape, dtype=np.int64), f"{name}_B_shape"))
        nodes.append(helper.make_node("Reshape", [f"{name}_B", f"{name}_B_shape"], [f"{name}_B3"], name=f"{name}_r"))
        tensors.append(numpy_helper.from_array(scales.astype(np.float16), f"{name}_S16"))
        nodes.append(helper.make_node("Cast", [f"{name}_S16"], [f"{name}_S"], to=TensorProto.FLOAT, name=f"{name}_c"))
        inputs = [source, f"{name}_B3"]
    else:
        tensors.append(numpy_helper.from_array(scales, f"{name}_S"))
    inputs.append(f"{name}_S")
    if zero_points == "uint8":
        zp_bytes = math.ceil(blocks * bits / 8)
        tensors.append(numpy_helper.from_array(rng.integers(0, 256, n * zp_bytes, dtype=np.uint8), f"{name}_Z"))
        inputs.append(f"{name}_Z")
    elif zero_points == "float":
        tensors.append(numpy_helper.from_array(rng.random((n, blocks), dtype=np.float32) * 8, f"{name}_Z"))
        inputs.append(f"{name}_Z")
    nodes.append(
        helper.make_node(
            "MatMulNBits",
            inputs,
            [f"{name}_out"],
            name=name,
            domain="com.microsoft",
            K=k,
            N=n,
            bits=bits,
            block_size=block,
            accuracy_level=level,
        )
    )
    return nodes, tensors


def _model(specs: list[tuple[str, str, int, dict[str, object]]], opset: int = 21, k: int = 64) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, initializers = [helper.make_node("Relu", ["x"], ["y"], name="relu")], []
    for name, source, n, options in specs:
        made, tensors = _linear(name, source, n, rng, k=k, **options)  # type: ignore[arg-type]
        nodes += made
        initializers += tensors
    outputs = [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["M", n]) for name, _, n, _ in specs]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])], outputs, initializers
    )
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8 if opset < 21 else 10)


def _run(model: onnx.ModelProto | Path, rows: int = 3, optimized: bool = True) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    k = session.get_inputs()[0].shape[1]
    x = np.random.default_rng(1).standard_normal((rows, k)).astype(np.float32)
    return session.run(None, {"x": x})  # type: ignore[return-value]


def _matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "MatMulNBits"]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _assert_same(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    for expected, got in zip(before, after, strict=True):
        np.testing.assert_array_equal(expected, got)  # each column depends on its own weights only


@pytest.mark.parametrize("opset", [11, 21])
def test_linears_of_one_input_become_one_call_with_the_same_outputs(opset: int) -> None:
    model = _model(
        [
            ("gate", "y", 48, {}),
            ("up", "y", 80, {}),
            ("other_input", "x", 16, {}),  # alone on its input
            ("fp32_compute", "y", 16, {"level": 0}),  # another accuracy level: not joined
            ("zp_a", "y", 24, {"zero_points": "uint8"}),  # a second group: zero points of their own
            ("zp_b", "y", 40, {"zero_points": "uint8"}),
        ],
        opset,
    )
    joined = _copy(model)
    assert join_parallel_matmuls(joined) == 2
    onnx.checker.check_model(joined)
    assert len(_matmuls(joined)) == 4  # gate+up, zp_a+zp_b, and the two that stayed alone
    assert sorted(n.name for n in _matmuls(joined) if not n.name.startswith("edgekit_joined")) == [
        "fp32_compute",
        "other_input",
    ]
    names = {t.name for t in joined.graph.initializer}
    assert not names & {"gate_B", "gate_S", "up_B", "up_S", "zp_a_Z", "zp_b_Z"}, "the members' weights are gone"
    _assert_same(_run(model), _run(joined))
    _assert_same(_run(model, optimized=False), _run(joined, optimized=False))  # no folding needed
    assert join_parallel_matmuls(joined) == 0  # nothing left to join


@pytest.mark.parametrize(
    ("k", "options"),
    [
        (80, {"zero_points": "uint8"}),  # 3 blocks: each row's packed zero points padded to 2 bytes
        (80, {"bits": 8}),  # K not a multiple of the block
        (96, {"bits": 8, "block": 16, "zero_points": "uint8"}),
        (96, {"bits": 2, "block": 64}),
        (96, {"level": 0, "block": 64}),
    ],
)
def test_every_layout_joins_exactly(k: int, options: dict[str, object]) -> None:
    model = _model([("a", "y", 24, options), ("b", "y", 40, options)], k=k)
    joined = _copy(model)
    assert join_parallel_matmuls(joined) == 1
    _assert_same(_run(model), _run(joined))


def test_weights_the_recipe_reshapes_and_casts_are_joined_stored_the_same_way() -> None:
    model = _model([("a", "y", 32, {"stored_half": True}), ("b", "y", 16, {"stored_half": True})])
    joined = _copy(model)
    assert join_parallel_matmuls(joined) == 1
    types = {t.name: t.data_type for t in joined.graph.initializer}
    assert TensorProto.FLOAT16 in types.values() and TensorProto.FLOAT not in types.values(), "scales stay half"
    assert [n.op_type for n in joined.graph.node].count("Cast") == 1
    assert not {"a_r", "a_c", "b_r", "b_c"} & {n.name for n in joined.graph.node}, "the members' chains are gone"
    _assert_same(_run(model), _run(joined))


def test_nodes_that_differ_in_their_inputs_or_attributes_stay_apart() -> None:
    cases = [
        _model([("plain", "y", 32, {}), ("with_zero_points", "y", 32, {"zero_points": "uint8"})]),
        _model([("packed", "y", 32, {"zero_points": "uint8"}), ("float", "y", 32, {"zero_points": "float"})]),
        _model([("stored", "y", 32, {}), ("reshaped", "y", 32, {"stored_half": True})]),  # fp32 and fp16 scales
    ]
    saturating = _model([("a", "y", 32, {"stored_half": True}), ("b", "y", 32, {"stored_half": True})])
    for node in saturating.graph.node:
        if node.op_type == "Cast":  # an attribute besides `to`: the joined Cast would drop it
            node.attribute.append(helper.make_attribute("saturate", 1))
    cases.append(saturating)
    unknown = _model([("a", "y", 32, {}), ("b", "y", 32, {})])
    unknown.graph.node[-1].attribute.append(helper.make_attribute("future_option", 1))  # not understood
    for model in [*cases, unknown]:
        before = model.SerializeToString()
        assert join_parallel_matmuls(model) == 0
        assert model.SerializeToString() == before


def test_a_second_join_takes_names_the_first_did_not() -> None:
    model = _model([("a", "y", 32, {}), ("b", "y", 16, {}), ("c", "x", 16, {})])
    assert join_parallel_matmuls(model) == 1
    extra, tensors = _linear("d", "x", 24, np.random.default_rng(5))
    model.graph.node.extend(extra)
    model.graph.initializer.extend(tensors)
    model.graph.output.append(helper.make_tensor_value_info("d_out", TensorProto.FLOAT, ["M", 24]))
    before = _run(model)
    assert join_parallel_matmuls(model) == 1  # c and d, both on x
    onnx.checker.check_model(model)
    names = [n.name for n in model.graph.node] + [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))
    _assert_same(before, _run(model))


def _save(model: onnx.ModelProto, folder: Path) -> None:
    folder.mkdir()
    onnx.save_model(
        model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )


def test_a_folder_is_rewritten_with_its_data_file_only_when_something_joins(tmp_path: Path) -> None:
    _save(_model([("a", "y", 32, {})]), tmp_path / "lone")
    files = {p.name: p.read_bytes() for p in (tmp_path / "lone").iterdir()}
    assert join_parallel_matmuls_in_folder(tmp_path / "lone") == 0
    assert {p.name: p.read_bytes() for p in (tmp_path / "lone").iterdir()} == files

    model = _model([("a", "y", 32, {}), ("b", "y", 48, {"zero_points": None})])
    _save(model, tmp_path / "pair")
    before = _run(tmp_path / "pair" / "model.onnx")
    data_bytes = (tmp_path / "pair" / "model.onnx.data").stat().st_size
    assert join_parallel_matmuls_in_folder(tmp_path / "pair") == 1
    assert sorted(p.name for p in (tmp_path / "pair").iterdir()) == ["model.onnx", "model.onnx.data"]
    # The members' tensors left the data file: it holds the joined ones, not both.
    assert (tmp_path / "pair" / "model.onnx.data").stat().st_size <= data_bytes + 1024
    assert len(_matmuls(onnx.load(str(tmp_path / "pair" / "model.onnx"), load_external_data=False))) == 1
    _assert_same(before, _run(tmp_path / "pair" / "model.onnx"))
