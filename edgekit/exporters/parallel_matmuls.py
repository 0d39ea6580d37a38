"""Linears that read the same input, joined into one MatMulNBits and a Split: fewer kernel calls per step.

A Llama-style MLP multiplies one activation by its gate and its up projection, two MatMulNBits nodes the
builder keeps apart. On the CPU a decode step is hundreds of small kernel calls, each waking the thread
pool, so one call over both weights is cheaper than two (``benchmarks/bench_levers.py``, lever "gate and
up projections in one MatMulNBits"; docs/benchmarks.md). The joined node's codes, scales and zero points
are written joined, row after row, into the data file, in the type each member stored them (a float16
scale stays float16, cast in the graph as before); the members' own tensors leave it. Joining them in the
graph instead (Concat nodes that onnxruntime folds at load) would keep an extra copy of the joined weights
in memory. A Split gives each original output its old name back, so every reader is unchanged; each output
column depends only on its own weights and scales, so the outputs are those of the separate nodes.

Only nodes that agree on everything but ``N`` are joined: the same input, bits, block size, ``K``,
accuracy level, and the same inputs present (codes, scales, optionally zero points; none with a ``g_idx``
or a bias), each stored as an initializer, or reached from one through the Reshape and Cast nodes the
recipe writes, the same chain for every member. The whole variant is read into memory to be rewritten:
whole-model builds only (a streamed build's variants are left as exported).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_JOINABLE_INPUTS = (3, 4)  # activation, codes, scales[, zero points]
_PREFIX = "edgekit_joined"
_OWN_NAME = re.compile(rf"^{_PREFIX}(\d+)(?:_|$)")  # an earlier join's names: new ones must not clash
_ATTRIBUTES = frozenset({"K", "N", "bits", "block_size", "accuracy_level"})
_REQUIRED = ("K", "N", "bits", "block_size")
_DATA_FILE = "model.onnx.data"


@dataclass(frozen=True)
class _Stored:
    """Where one weight input of a MatMulNBits comes from: an initializer, then Reshape and Cast nodes."""

    tensor: onnx.TensorProto
    nodes: tuple[onnx.NodeProto, ...]
    """The Reshape and Cast nodes between the initializer and the MatMulNBits, in order."""

    @property
    def casts(self) -> tuple[int, ...]:
        """The element types the chain casts to: what a joined tensor must go through as well."""
        return tuple(
            int(helper.get_attribute_value(a))
            for n in self.nodes
            if n.op_type == "Cast"
            for a in n.attribute
            if a.name == "to"
        )


def join_parallel_matmuls(model: onnx.ModelProto) -> int:
    """Join every group of compatible MatMulNBits nodes that read one input (in place, the weights in memory:
    ``onnx.load`` with its external data); return how many groups were joined."""
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    plans = []
    for members in (m for m in _groups(graph).values() if len(m) > 1):
        sources = [[_stored(name, producers, initializers) for name in m.input[1:]] for m in members]
        if _joinable(sources):
            plans.append((members, sources))
    if not plans:
        return 0
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    names_in_use = [n.name for n in graph.node] + [t.name for t in graph.initializer]
    names_in_use += [v.name for v in [*graph.input, *graph.output, *graph.value_info]]
    names_in_use += [output for node in graph.node for output in node.output]
    used = {int(match.group(1)) for name in names_in_use if (match := _OWN_NAME.match(name))}
    fresh_names = (f"{_PREFIX}{number}" for number in itertools.count() if number not in used)
    replaced: dict[str, list[onnx.NodeProto]] = {}  # by a member's output: unique, unlike names or ids
    constants: list[onnx.TensorProto] = []
    left_behind: list[_Stored] = []
    for members, sources in plans:
        made, made_constants = _joined(members, sources, next(fresh_names), version)
        replaced[members[0].output[0]] = made
        replaced.update({member.output[0]: [] for member in members[1:]})
        constants += made_constants
        left_behind += [s for member in sources for s in member if s is not None]
    nodes = [new for node in graph.node for new in replaced.get(node.output[0] if node.output else "", [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unread(graph, left_behind)
    # First, not last: a later rewrite that appends its own (exporters/last_position.py) and is undone and
    # redone leaves the graph byte for byte as it was.
    existing = list(graph.initializer)
    del graph.initializer[:]
    graph.initializer.extend([*constants, *existing])
    return len(plans)


def join_parallel_matmuls_in_folder(folder: Path, filename: str = "model.onnx") -> int:
    """Apply ``join_parallel_matmuls`` to a variant folder's graph and its data file, replaced atomically;
    the folder is left as it was where nothing joins."""
    from onnx.external_data_helper import load_external_data_for_model

    folder = Path(folder)
    path = folder / filename
    model = onnx.load(str(path), load_external_data=False)
    if not any(len(members) > 1 for members in _groups(model.graph).values()):
        return 0  # decided from the graph alone, before any weight is read
    locations = {
        entry.value
        for tensor in model.graph.initializer
        if tensor.data_location == TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }
    load_external_data_for_model(model, str(folder))
    count = join_parallel_matmuls(model)
    if not count:
        return 0
    staging = folder / f".{filename}.{os.getpid()}.joining"
    staging.mkdir()
    try:
        onnx.save_model(
            model,
            str(staging / filename),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=_DATA_FILE,
            size_threshold=1024,
        )
        written = (staging / _DATA_FILE).is_file()
        if written:
            os.replace(staging / _DATA_FILE, folder / _DATA_FILE)
        os.replace(staging / filename, path)
        for location in locations - ({_DATA_FILE} if written else set()):  # every tensor is in the new file
            if "/" not in location and "\\" not in location:  # names the builder wrote: inside the folder
                (folder / location).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return count


def _groups(graph: onnx.GraphProto) -> dict[tuple[object, ...], list[onnx.NodeProto]]:
    groups: dict[tuple[object, ...], list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        key = _join_key(node)
        if key is not None:
            groups[key].append(node)
    return groups


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


def _stored(
    name: str, producers: dict[str, onnx.NodeProto], initializers: dict[str, onnx.TensorProto]
) -> _Stored | None:
    """The initializer behind a weight input and the Reshape/Cast chain from it; None for anything else."""
    chain: list[onnx.NodeProto] = []
    while name not in initializers:
        node = producers.get(name)
        if node is None or node.op_type not in ("Reshape", "Cast") or node.domain not in ("", "ai.onnx"):
            return None
        if node.op_type == "Reshape" and (len(node.input) != 2 or node.input[1] not in initializers):
            return None
        if node.op_type == "Cast" and [a.name for a in node.attribute] != ["to"]:
            return None  # saturate and the like: a joined Cast would not carry them
        chain.append(node)
        name = node.input[0]
    tensor = initializers[name]
    if tensor.data_location == TensorProto.EXTERNAL:
        return None  # its bytes are not in memory (join_parallel_matmuls_in_folder loads them first)
    return _Stored(tensor, tuple(reversed(chain)))


def _joinable(sources: list[list[_Stored | None]]) -> bool:
    """Every member's weights are stored, in one element type and through one chain of casts, per input."""
    for position in range(len(sources[0])):
        column = [member[position] for member in sources]
        if any(s is None for s in column):
            return False
        stored = [s for s in column if s is not None]
        if len({(s.tensor.data_type, s.casts) for s in stored}) != 1:
            return False
    return True


def _joined(
    members: list[onnx.NodeProto], sources: list[list[_Stored | None]], name: str, version: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """One MatMulNBits over the members' joined weights and a Split back into their outputs; the nodes and
    the new initializers (codes as [N, blocks, blob], scales and zero points flat, as the operator reads)."""
    sizes = [int(helper.get_attribute_value(next(a for a in m.attribute if a.name == "N"))) for m in members]
    attributes = {a.name: helper.get_attribute_value(a) for a in members[0].attribute}
    k, block, bits = int(attributes["K"]), int(attributes["block_size"]), int(attributes["bits"])
    made: list[onnx.NodeProto] = []
    constants: list[onnx.TensorProto] = []
    inputs = [members[0].input[0]]
    for position in range(len(members[0].input) - 1):
        stored = [member[position] for member in sources]
        rows = [
            numpy_helper.to_array(s.tensor).reshape(n, -1) for s, n in zip(stored, sizes, strict=True) if s is not None
        ]
        joined = np.concatenate(rows, axis=0)
        joined = joined.reshape(-1, -(-k // block), block * bits // 8) if position == 0 else joined.reshape(-1)
        first = stored[0]
        assert first is not None  # _joinable checked every member
        tensor = numpy_helper.from_array(joined, f"{name}_in{position + 1}_stored")
        if first.tensor.data_type != tensor.data_type:  # bfloat16 and friends: numpy's view, the stored type
            tensor.data_type = first.tensor.data_type
        constants.append(tensor)
        current = tensor.name
        for step, target in enumerate(first.casts):
            cast = f"{name}_in{position + 1}_cast{step}"
            made.append(helper.make_node("Cast", [current], [cast], to=target, name=cast))
            current = cast
        inputs.append(current)
    attributes["N"] = sum(sizes)
    made.append(
        helper.make_node("MatMulNBits", inputs, [f"{name}_out"], name=name, domain="com.microsoft", **attributes)
    )
    outputs = [m.output[0] for m in members]
    if version >= 13:  # the sizes as an input since opset 13, an attribute before
        split_sizes = f"{name}_sizes"
        constants.append(helper.make_tensor(split_sizes, TensorProto.INT64, [len(sizes)], sizes))
        made.append(helper.make_node("Split", [f"{name}_out", split_sizes], outputs, axis=-1, name=f"{name}_split"))
    else:
        made.append(helper.make_node("Split", [f"{name}_out"], outputs, axis=-1, split=sizes, name=f"{name}_split"))
    return made, constants


def _drop_unread(graph: onnx.GraphProto, left_behind: list[_Stored]) -> None:
    """Remove the members' chains and stored weights that nothing reads any more (a tied embedding, say,
    may still read a head's codes; such a tensor stays)."""
    outputs = {value.name for value in graph.output}
    # By output name: the graph's node list was rebuilt, and protobuf copies messages it is given.
    chain_outputs = {output for stored in left_behind for node in stored.nodes for output in node.output}
    candidates = {stored.tensor.name for stored in left_behind}
    candidates |= {node.input[1] for stored in left_behind for node in stored.nodes if node.op_type == "Reshape"}
    while True:
        reads = Counter(name for node in graph.node for name in node.input)
        dead = [
            node
            for node in graph.node
            if set(node.output) <= chain_outputs and not any(reads[o] or o in outputs for o in node.output)
        ]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    reads = Counter(name for node in graph.node for name in node.input)
    unread = {name for name in candidates if not reads[name] and name not in outputs}
    for tensor in [t for t in graph.initializer if t.name in unread]:
        graph.initializer.remove(tensor)
    for value in [v for v in graph.input if v.name in unread]:  # old IRs list initializers as inputs too
        graph.input.remove(value)
