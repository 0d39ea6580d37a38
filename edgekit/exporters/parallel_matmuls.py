"""Linears that read the same input, joined into one MatMulNBits and a Split: fewer kernel calls per step.

A Llama-style MLP multiplies one activation by its gate and its up projection, two MatMulNBits nodes the
builder keeps apart. On the CPU a decode step is hundreds of small kernel calls, each waking the thread
pool, so one call over both weights is cheaper than two (``benchmarks/bench_levers.py``, lever "gate and
up projections in one MatMulNBits"; docs/benchmarks.md). The joined node reads its codes, scales and zero
points through Concat nodes over the originals' (constants, which onnxruntime folds when the session
starts), so the data file is untouched, and a Split gives each original output its old name back, so every
reader is unchanged. Each output column depends only on its own weights: the outputs are bit-identical.

Only nodes that agree on everything but ``N`` are joined: the same input, bits, block size, ``K``,
accuracy level, and the same inputs present (codes, scales, optionally zero points; none with a ``g_idx``
or a bias, whose layouts this does not handle).
"""

from __future__ import annotations

import itertools
import os
import re
from collections import defaultdict
from pathlib import Path

import onnx
from onnx import TensorProto, helper

_JOINABLE_INPUTS = (3, 4)  # activation, codes, scales[, zero points]
_PREFIX = "edgekit_joined"
_OWN_NAME = re.compile(rf"^{_PREFIX}(\d+)(?:_|$)")  # an earlier join's names: new ones must not clash
_ATTRIBUTES = frozenset({"K", "N", "bits", "block_size", "accuracy_level"})
_REQUIRED = ("K", "N", "bits", "block_size")


def join_parallel_matmuls(model: onnx.ModelProto) -> int:
    """Join every group of compatible MatMulNBits nodes that read one input (in place); return how many groups."""
    graph = model.graph
    groups: dict[tuple[object, ...], list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        key = _join_key(node)
        if key is not None:
            groups[key].append(node)
    joined = {id(node): members for members in groups.values() if len(members) > 1 for node in members}
    if not joined:
        return 0
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    nodes: list[onnx.NodeProto] = []
    constants: list[onnx.TensorProto] = []
    names_in_use = [n.name for n in graph.node] + [t.name for t in graph.initializer]
    used = {int(match.group(1)) for name in names_in_use if (match := _OWN_NAME.match(name))}
    fresh_names = (f"{_PREFIX}{number}" for number in itertools.count() if number not in used)
    count = 0
    for node in graph.node:
        members = joined.get(id(node))
        if members is None:
            nodes.append(node)
        elif node is members[0]:  # the group's nodes go where its first one stood: its input exists there
            made, made_constants = _joined_nodes(members, next(fresh_names), version)
            nodes += made
            constants += made_constants
            count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    # First, not last: a later rewrite that appends its own (exporters/last_position.py) and is undone and
    # redone leaves the graph byte for byte as it was.
    existing = list(graph.initializer)
    del graph.initializer[:]
    graph.initializer.extend([*constants, *existing])
    return count


def join_parallel_matmuls_in_folder(folder: Path, filename: str = "model.onnx") -> int:
    """Apply ``join_parallel_matmuls`` to a variant folder's graph file (its weights are untouched)."""
    path = Path(folder) / filename
    model = onnx.load(str(path), load_external_data=False)
    count = join_parallel_matmuls(model)
    if count:
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            onnx.save(model, str(partial))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return count


def _join_key(node: onnx.NodeProto) -> tuple[object, ...] | None:
    """What a node must share with another to be joined with it; None for a node that is never joined."""
    if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
        return None
    if len(node.input) not in _JOINABLE_INPUTS or not all(node.input) or len(node.output) != 1:
        return None
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.keys() - _ATTRIBUTES or not all(isinstance(attributes.get(name), int) for name in _REQUIRED):
        return None
    shared = tuple(sorted((name, value) for name, value in attributes.items() if name != "N"))
    return (node.input[0], len(node.input), shared)


def _joined_nodes(
    members: list[onnx.NodeProto], name: str, version: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """One MatMulNBits over the members' weights (codes by rows; scales and zero points flattened, as the
    operator also reads them) and a Split back into the members' outputs; and the constants they use."""
    sizes = [int(helper.get_attribute_value(next(a for a in m.attribute if a.name == "N"))) for m in members]
    attributes = {a.name: helper.get_attribute_value(a) for a in members[0].attribute}
    k, block, bits = int(attributes["K"]), int(attributes["block_size"]), int(attributes["bits"])
    flat, codes_shape, split_sizes = f"{name}_flat", f"{name}_codes_shape", f"{name}_sizes"
    constants = [
        helper.make_tensor(flat, TensorProto.INT64, [1], [-1]),
        helper.make_tensor(codes_shape, TensorProto.INT64, [3], [-1, -(-k // block), block * bits // 8]),
        helper.make_tensor(split_sizes, TensorProto.INT64, [len(sizes)], sizes),
    ]
    made: list[onnx.NodeProto] = []
    inputs = [members[0].input[0]]
    for position in range(1, len(members[0].input)):
        parts = [m.input[position] for m in members]
        # Codes as [N, blocks, blob] (the layout MatMulNBits reads), scales and zero points as flat vectors,
        # whatever shape each member's were stored in, so the Concat along rows cannot meet a mismatch.
        reshaped = [f"{name}_in{position}_{index}" for index in range(len(parts))]
        shape = codes_shape if position == 1 else flat
        made += [
            helper.make_node("Reshape", [part, shape], [out], name=out)
            for part, out in zip(parts, reshaped, strict=True)
        ]
        parts = reshaped
        inputs.append(f"{name}_in{position}")
        made.append(helper.make_node("Concat", parts, [inputs[-1]], axis=0, name=inputs[-1]))
    attributes["N"] = sum(sizes)
    made.append(
        helper.make_node("MatMulNBits", inputs, [f"{name}_out"], name=name, domain="com.microsoft", **attributes)
    )
    outputs = [m.output[0] for m in members]
    if version >= 13:  # the sizes as an input since opset 13, an attribute before
        made.append(helper.make_node("Split", [f"{name}_out", split_sizes], outputs, axis=-1, name=f"{name}_split"))
    else:
        made.append(helper.make_node("Split", [f"{name}_out"], outputs, axis=-1, split=sizes, name=f"{name}_split"))
    return made, constants
