"""The LM head on the last position only: a prefill computes one row of logits, not one per prompt token.

onnxruntime-genai reads only the last position's logits after a prompt, but the builder's graphs compute
the head over every position; on a small model the head is a large part of a prefill (a vocabulary of tens
of thousands of rows against a hidden size of hundreds). The rewrite slices the final norm's output to the
last position before the head and expands the one row of logits back to ``[batch, sequence, vocab]``, the
shape onnxruntime-genai binds for the output. Every node between the final norm and ``logits`` must work
row by row (the head's MatMul or MatMulNBits, casts, scalings), so the last row is what the whole graph
computed for it; a chain with any other node is left alone.

Scoring needs every position's logits: ``restore_all_positions`` undoes the rewrite in memory, so the
evaluation runs the package's own head (same weights, same accuracy level) over every position.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import ModelProto, helper, numpy_helper

LOGITS = "logits"
_PREFIX = "/edgekit/last_position"
# Ops that act on each position (row) alone, so the head chain may hold them.
_ROW_WISE = {"MatMul", "MatMulNBits", "Cast", "Mul", "Div", "Tanh", "Add", "Softcap"}
_HEAD_OPS = {"MatMul", "MatMulNBits"}


def _producers(model: ModelProto) -> dict[str, onnx.NodeProto]:
    return {output: node for node in model.graph.node for output in node.output if output}


def _head_chain(model: ModelProto) -> list[onnx.NodeProto] | None:
    """The nodes from the head's MatMul to ``logits``, in graph order; None where the chain is not row-wise."""
    producers = _producers(model)
    initializers = {init.name for init in model.graph.initializer}
    node = producers.get(LOGITS)
    chain: list[onnx.NodeProto] = []
    while node is not None and node.op_type in _ROW_WISE and len(chain) < 8:
        chain.append(node)
        if node.op_type in _HEAD_OPS:
            return chain[::-1]
        # Elementwise steps take the running tensor and constants only.
        running = [name for name in node.input if name and name not in initializers and name in producers]
        constants = [name for name in node.input if name and name not in running]
        if len(running) != 1 or any(name not in initializers for name in constants):
            return None
        node = producers[running[0]]
    return None


def is_last_position(model: ModelProto) -> bool:
    """Whether ``model`` carries the rewrite."""
    return any(node.name.startswith(_PREFIX) for node in model.graph.node)


def keep_last_position(model: ModelProto) -> bool:
    """Rewrite ``model`` (in place) to compute the head on the last position only; False where it cannot."""
    if is_last_position(model) or LOGITS not in {output.name for output in model.graph.output}:
        return False
    chain = _head_chain(model)
    if chain is None:
        return False
    hidden = chain[0].input[0]
    last_hidden, last_logits, shape = f"{_PREFIX}/hidden", f"{_PREFIX}/logits", f"{_PREFIX}/shape"
    chain[0].input[0] = last_hidden
    chain[-1].output[0] = last_logits
    constants = {
        f"{_PREFIX}/starts": [-1],
        f"{_PREFIX}/ends": [np.iinfo(np.int64).max],
        f"{_PREFIX}/axes": [1],
        f"{_PREFIX}/ones": [1, 1],
    }
    model.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in constants.items())
    nodes = [
        helper.make_node("Slice", [hidden, *list(constants)[:3]], [last_hidden], name=f"{_PREFIX}/Slice"),
        helper.make_node("Shape", [hidden], [f"{_PREFIX}/hidden_shape"], name=f"{_PREFIX}/Shape", end=2),
        helper.make_node("Shape", [last_logits], [f"{_PREFIX}/vocab"], name=f"{_PREFIX}/ShapeVocab", start=2),
        helper.make_node("Concat", [f"{_PREFIX}/hidden_shape", f"{_PREFIX}/vocab"], [shape], name=shape, axis=0),
        helper.make_node("Expand", [last_logits, shape], [LOGITS], name=f"{_PREFIX}/Expand"),
    ]
    # Graph order: the slice before the chain, the expand after it.
    position = list(model.graph.node).index(chain[0])
    model.graph.node.insert(position, nodes[0])
    model.graph.node.extend(nodes[1:])
    return True


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
