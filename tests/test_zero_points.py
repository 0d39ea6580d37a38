"""Dropping MatMulNBits zero points that repeat the default: same outputs, smaller file, others kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edgekit.exporters.zero_points import drop_default_zero_points

K, BLOCK = 96, 32  # three groups per row: an odd count, so each row's last zero-point byte has padding


def _zero_points(rows: int, values: np.ndarray, padding: int) -> np.ndarray:
    """Pack [rows, 3] 4-bit zero points two to a byte, low nibble first, with ``padding`` in the spare nibble."""
    padded = np.concatenate([values, np.full((rows, 1), padding)], axis=1).astype(np.uint8)
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).reshape(-1)


def _model(folder: Path) -> Path:
    """Three MatMulNBits over one input: default zero points (spare nibbles 0), default zero points
    followed by a g_idx, and zero points that differ from the default; weights in external data."""
    rng = np.random.default_rng(0)
    rows = 64  # enough zero-point bytes that dropping two shrinks the file past any alignment padding
    groups = K // BLOCK
    nodes, initializers, outputs = [], [], []
    default = np.full((rows, groups), 8)
    varied = rng.integers(0, 16, (rows, groups))
    varied[0, 0] = 3  # certainly not all default
    for index, (zeros, g_idx) in enumerate([(default, False), (default, True), (varied, False)]):
        weight = rng.integers(0, 256, (rows, groups, BLOCK // 2)).astype(np.uint8)
        scales = rng.random(rows * groups).astype(np.float32) * 0.1
        names = [f"w{index}", f"s{index}", f"z{index}"]
        initializers += [
            numpy_helper.from_array(weight, names[0]),
            numpy_helper.from_array(scales, names[1]),
            numpy_helper.from_array(_zero_points(rows, zeros, padding=0), names[2]),
        ]
        if g_idx:
            names.append(f"g{index}")
            initializers.append(numpy_helper.from_array((np.arange(K) // BLOCK).astype(np.int32), names[3]))
        nodes.append(
            helper.make_node(
                "MatMulNBits", ["x", *names], [f"y{index}"], domain="com.microsoft",
                K=K, N=rows, bits=4, block_size=BLOCK, accuracy_level=4,
            )
        )  # fmt: skip
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, [1, rows]))
    graph = helper.make_graph(
        nodes, "zero_points", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, K])], outputs, initializers
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    path = folder / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def _run(path: Path) -> list[np.ndarray]:
    x = np.random.default_rng(1).standard_normal((1, K)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_default_zero_points_are_dropped_with_their_bytes_and_outputs_stay_the_same(tmp_path: Path) -> None:
    path = _model(tmp_path)
    before, size = _run(path), (tmp_path / "model.onnx.data").stat().st_size

    assert drop_default_zero_points(tmp_path) == 2

    graph = onnx.load(str(path), load_external_data=False).graph
    inputs = {node.output[0]: list(node.input) for node in graph.node}
    assert inputs["y0"] == ["x", "w0", "s0"]
    assert inputs["y1"] == ["x", "w1", "s1", "", "g1"]  # the g_idx keeps its position
    assert inputs["y2"] == ["x", "w2", "s2", "z2"]  # not the default: kept
    assert {t.name for t in graph.initializer} == {"w0", "s0", "w1", "s1", "g1", "w2", "s2", "z2"}
    assert (tmp_path / "model.onnx.data").stat().st_size < size
    for old, new in zip(before, _run(path), strict=True):
        # the same numbers; the kernel without zero points only sums in another order
        np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5)
    assert drop_default_zero_points(tmp_path) == 0  # nothing left to drop


def test_a_model_without_zero_points_is_left_untouched(tmp_path: Path) -> None:
    path = _model(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        del node.input[3:]
    onnx.save(model, str(path))
    data = (tmp_path / "model.onnx.data").read_bytes()
    proto = path.read_bytes()
    assert drop_default_zero_points(tmp_path) == 0
    assert path.read_bytes() == proto
    assert (tmp_path / "model.onnx.data").read_bytes() == data
