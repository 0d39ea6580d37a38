"""The LM head on the last position only: a prefill computes one row of logits, not one per prompt token.

onnxruntime-genai reads only the last position's logits after a prompt, but the builder's graphs compute
the head over every position; on a small model the head is a large part of a prefill (a vocabulary of tens
of thousands of rows against a hidden size of hundreds). The rewrite slices the final norm's output to the
last position before the head, and the ``logits`` output is declared ``[batch, 1, vocab]``:
onnxruntime-genai (0.18 on) reads a static 1 there as a graph that outputs the last position only, so it
neither binds nor copies a [batch, sequence, vocab] buffer for a prompt. (Earlier packages expanded the one
row back to every position; ``restore_all_positions`` undoes either form.) Every node between the final
norm and ``logits`` must work row by row (the head's MatMul or MatMulNBits, casts, scalings), so the last
row is what the whole graph computed for it; a head with any other node is left alone. An asymmetric head
multiplies the final norm's output with its block means appended: that joined input is the one sliced.

Scoring needs every position's logits: ``restore_all_positions`` undoes the rewrite in memory, so the
evaluation runs the package's own head (same weights, same accuracy level) over every position.

A package is for unpadded single-sequence generation, as edgekit runs it: onnxruntime-genai reads the row
of the last token that is not the pad id, so a padded batch (or a prompt ending in the pad id, where the
rewrite gives the real last token's row) would read a different row than before.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper

LOGITS = "logits"
_PREFIX = "/edgekit/last_position"
# Ops that act on each position (row) alone. An asymmetric head's block means are appended to its input
# before its MatMulNBits: the head's input is that concatenation, sliced like any other.
_ROW_WISE = {"MatMul", "MatMulNBits", "Cast", "Mul", "Div", "Add", "Sub", "Tanh", "Softcap"}
_HEAD_OPS = {"MatMul", "MatMulNBits"}
_MAX_HEAD_NODES = 32


def _producers(model: ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output if output}


class _Graph:
    """What the head search asks of a graph: who makes a tensor, and whether it depends on the inputs."""

    def __init__(self, model: ModelProto) -> None:
        self.producers = _producers(model)
        self.initializers = {init.name: init for init in model.graph.initializer}
        self._constant: dict[str, bool] = {}

    def constant(self, name: str) -> bool:
        """Whether ``name`` is computed from initializers alone (a weight, not an activation)."""
        if name in self.initializers:
            return True
        if name not in self._constant:
            node = self.producers.get(name)
            self._constant[name] = False  # a cycle guard; graph inputs are activations
            self._constant[name] = node is not None and all(self.constant(i) for i in node.input if i)
        return self._constant[name]

    def keeps_rows(self, node: onnx.NodeProto) -> bool:
        """Whether ``node`` computes each position's output from that position's inputs alone."""
        if node.op_type in _HEAD_OPS:
            return self.constant(node.input[1])  # activations times a weight
        return node.op_type in _ROW_WISE


def _head(model: ModelProto) -> tuple[str, list[onnx.NodeProto]] | None:
    """The final norm's output and the nodes between it and ``logits`` (graph order); None unless all row-wise."""
    graph = _Graph(model)
    node = graph.producers.get(LOGITS)
    for _ in range(_MAX_HEAD_NODES):  # down the activation path to the head's MatMul
        if node is None or node.op_type in _HEAD_OPS:
            break
        running = [name for name in node.input if name and not graph.constant(name)]
        node = graph.producers.get(running[0]) if running else None
    if node is None or node.op_type not in _HEAD_OPS:
        return None
    hidden = node.input[0]
    region: dict[int, onnx.NodeProto] = {}
    pending = [graph.producers[LOGITS]]
    while pending:
        node = pending.pop()
        if id(node) in region:
            continue
        if not graph.keeps_rows(node) or len(region) >= _MAX_HEAD_NODES:
            return None
        region[id(node)] = node
        for name in node.input:
            if name and name != hidden and not graph.constant(name):
                if name not in graph.producers:
                    return None  # a graph input reaches the logits another way
                pending.append(graph.producers[name])
    # The head's inner tensors must feed nothing else: a reader outside it would see sliced rows.
    inner = {name for node in region.values() for name in node.output if name and name != LOGITS}
    outside = (node for node in model.graph.node if id(node) not in region)
    if inner & {output.name for output in model.graph.output} or any(inner & set(n.input) for n in outside):
        return None
    order = {id(n): index for index, n in enumerate(model.graph.node)}
    return hidden, sorted(region.values(), key=lambda n: order[id(n)])


def is_last_position(model: ModelProto) -> bool:
    """Whether ``model`` carries the rewrite."""
    return any(node.name.startswith(_PREFIX) for node in model.graph.node)


def keep_last_position(model: ModelProto) -> bool:
    """Rewrite ``model`` (in place) to compute the head on the last position only; False where it cannot."""
    if is_last_position(model) or LOGITS not in {output.name for output in model.graph.output}:
        return False
    head = _head(model)
    if head is None:
        return False
    sequence = _sequence_dim(model)
    if sequence is None:
        return False  # no declared [batch, sequence, vocab] shape to mark as one position
    hidden, nodes = head
    last_hidden = f"{_PREFIX}/hidden"
    for node in nodes:
        node.input[:] = [last_hidden if name == hidden else name for name in node.input]
    constants = {
        f"{_PREFIX}/starts": [-1],
        f"{_PREFIX}/ends": [np.iinfo(np.int64).max],
        f"{_PREFIX}/axes": [1],
    }
    model.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in constants.items())
    # Graph order: the slice before the head's first node.
    position = list(model.graph.node).index(nodes[0])
    model.graph.node.insert(
        position, helper.make_node("Slice", [hidden, *constants], [last_hidden], name=f"{_PREFIX}/Slice")
    )
    sequence.Clear()
    sequence.dim_value = 1  # a static 1: onnxruntime-genai then reads the logits as the last position's
    return True


def _sequence_dim(model: ModelProto) -> onnx.TensorShapeProto.Dimension | None:
    """The sequence dimension of the declared ``logits`` output [batch, sequence, vocab]; None without one."""
    output = next(o for o in model.graph.output if o.name == LOGITS)
    if not output.type.tensor_type.HasField("shape") or len(output.type.tensor_type.shape.dim) != 3:
        return None
    return output.type.tensor_type.shape.dim[1]


def restore_all_positions(model: ModelProto) -> bool:
    """Undo ``keep_last_position`` (in place): the head over every position again; False where there was none."""
    if not is_last_position(model):
        return False
    slice_node = next(node for node in model.graph.node if node.name == f"{_PREFIX}/Slice")
    hidden = slice_node.input[0]
    for node in model.graph.node:
        node.input[:] = [hidden if name == f"{_PREFIX}/hidden" else name for name in node.input]
        node.output[:] = [LOGITS if name == f"{_PREFIX}/logits" else name for name in node.output]
    kept = [node for node in model.graph.node if not node.name.startswith(_PREFIX)]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    initializers = [init for init in model.graph.initializer if not init.name.startswith(_PREFIX)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(initializers)
    sequence = _sequence_dim(model)
    ids = next((i for i in model.graph.input if i.name == "input_ids"), None)
    if sequence is not None and sequence.HasField("dim_value") and sequence.dim_value == 1 and ids is not None:
        sequence.CopyFrom(ids.type.tensor_type.shape.dim[1])  # every position again, as the inputs have
    return True


def keep_last_position_in_folder(folder: Path, filename: str = "model.onnx") -> bool:
    """Apply ``keep_last_position`` to a variant folder's graph file (its weights are untouched); True if done."""
    path = Path(folder) / filename
    model = onnx.load(str(path), load_external_data=False)
    if not keep_last_position(model):
        return False
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        onnx.save(model, str(partial))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return True
