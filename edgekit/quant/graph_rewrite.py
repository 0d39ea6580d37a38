"""Apply a per-tensor recipe to an fp32 decoder export: every linear becomes a MatMulNBits in its own format.

The fp32 graph onnxruntime-genai's builder exported is rewritten node by node, so attention, norms and the
cache layout stay the builder's. For each quantized linear:

- codes go into a MatMulNBits (4 or 8 bits, the tensor's block size, the target's accuracy level);
- float16 scales (an asymmetric matrix's offset columns' included) are stored once and cast to fp32 in the
  graph: onnxruntime folds the casts when the session starts, so the kernel sees fp32 scales while the
  file holds half of them;
- a zero-point tensor gives MatMulNBits its packed ``zero_points`` input (GatherBlockQuantized too);
- an asymmetric tensor's float offsets are extra columns of its MatMulNBits (``offset_digits``): its input
  is the activation with its block means appended (a ReduceMean and a Concat with zeros to whole blocks,
  shared by the linears that read that activation), so the product, offsets included, is one kernel call;
  an asymmetric embedding adds its gathered offset columns back to its blocks.

A tied embedding shares its codes with the LM head: the head's MatMulNBits and the embedding's
GatherBlockQuantized read one packed initializer (reshaped in the graph, folded at load), so the file stores
the matrix once.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgekit.quant import offset_digits
from edgekit.quant.block_quant import QuantizedMatrix, quantize_matrix
from edgekit.quant.formats import TensorFormat

HEAD = "lm_head"
EMBEDDING = "model/embed_tokens"
_MS = "com.microsoft"
_DROPPED_OUTPUTS = ("hidden_states",)  # the fp32 reference's extra output; a deployed variant does not carry it


@dataclass(frozen=True)
class Linear:
    """One quantizable weight of the fp32 graph: a MatMul by an initializer, or the embedding's Gather."""

    name: str
    """Recipe name: the node's name less its op and outer slashes (``model/layers.0/attn/qkv_proj``)."""
    weight: str
    """The initializer's name."""
    rows: int
    """N: outputs of the linear (vocabulary rows for an embedding)."""
    cols: int
    """K: inputs of the linear (the hidden size for an embedding)."""
    activation: str | None
    """The tensor the linear multiplies (None for an embedding)."""
    tied_to: str | None = None
    """For an embedding that reads the head's weight: the head's name."""


def find_linears(model: onnx.ModelProto) -> list[Linear]:
    """Every MatMul by a 2-D float initializer, then the token embedding, each once."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    found: list[Linear] = []
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is not None and len(weight.dims) == 2 and weight.data_type == TensorProto.FLOAT:
            k, n = weight.dims
            found.append(Linear(_recipe_name(node.name), weight.name, n, k, node.input[0]))
    heads = {linear.weight: linear.name for linear in found}
    for node in graph.node:
        if node.op_type != "Gather" or len(node.input) != 2 or node.input[1] != "input_ids":
            continue
        source = node.input[0]
        table = initializers.get(source)
        if table is not None and len(table.dims) == 2 and table.data_type == TensorProto.FLOAT:
            found.append(Linear(_recipe_name(node.name), source, table.dims[0], table.dims[1], None))
        elif source in producers and producers[source].op_type == "Transpose":
            weight_name = producers[source].input[0]
            if weight_name in heads:  # the embedding is the head's weight, transposed: they share one format
                k, n = initializers[weight_name].dims
                found.append(Linear(_recipe_name(node.name), weight_name, n, k, None, tied_to=heads[weight_name]))
    return found


def weight_matrix(model: onnx.ModelProto, linear: Linear, base_dir: Path | None = None) -> np.ndarray:
    """The linear's fp32 weight as [N, K] (MatMul initializers are stored [K, N]).

    ``base_dir``: where the model's external data lies, read for this tensor alone (the model may have been
    loaded without its data).
    """
    tensor = next(t for t in model.graph.initializer if t.name == linear.weight)
    array = numpy_helper.to_array(tensor, "" if base_dir is None else str(base_dir))
    if linear.activation is None and linear.tied_to is None:
        return np.ascontiguousarray(array)  # an untied embedding is already [vocab, hidden]
    return np.ascontiguousarray(array.T)


def stored_layout(linear: Linear, matrix: np.ndarray) -> np.ndarray:
    """``matrix`` [N, K] laid out as the graph stores the linear's weight (``weight_matrix``'s inverse)."""
    if linear.activation is None and linear.tied_to is None:
        return np.ascontiguousarray(matrix)
    return np.ascontiguousarray(matrix.T)


def model_file_bytes(folder: Path) -> int:
    """Bytes of a variant's model files (``model.onnx`` and its external data), what ``max_model_bytes`` counts."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith("model.onnx"))


def rewrite_model(
    model: onnx.ModelProto,
    formats: dict[str, TensorFormat],
    accuracy_level: int,
    quantize: Callable[[Linear, TensorFormat], QuantizedMatrix] | None = None,
) -> onnx.ModelProto:
    """``model`` (fp32, modified in place and returned) with each linear named in ``formats`` quantized.

    A tied embedding takes its head's format. ``quantize`` fits one linear's weight (by default the weight
    in ``model``, without calibration statistics; a caller with statistics, or with the model loaded without
    its data, passes its own).
    """
    fit = quantize or (lambda linear, fmt: quantize_matrix(weight_matrix(model, linear), fmt))
    rewriter = _Rewriter(model, accuracy_level)
    for linear in find_linears(model):
        fmt = formats.get(linear.tied_to or linear.name)
        if fmt is None:
            continue
        quantized = rewriter.quantized.get(linear.weight)
        if quantized is None:
            quantized = fit(linear, fmt)
            rewriter.quantized[linear.weight] = quantized
        if linear.activation is None:
            rewriter.replace_gather(linear, quantized)
        else:
            rewriter.replace_matmul(linear, quantized)
    rewriter.finish()
    return model


def write_variant(model: onnx.ModelProto, reference_folder: Path, out: Path) -> None:
    """Write ``model`` with its weights in ``model.onnx.data``, beside the reference's config and tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    for item in reference_folder.iterdir():
        if item.is_file() and not item.name.startswith("model.onnx"):
            shutil.copyfile(item, out / item.name)
    onnx.save_model(
        model,
        str(out / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=1024,
    )
    config_path = out / "genai_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config.get("model", {}).get("decoder", {}).get("outputs", {}).pop("hidden_states", None)
        config_path.write_text(json.dumps(config, indent=4), encoding="utf-8")


def _recipe_name(node_name: str) -> str:
    parts = node_name.strip("/").split("/")
    return "/".join(parts[:-1]) if len(parts) > 1 else parts[0].replace(".MatMul.weight", "")


class _Rewriter:
    """Node surgery on one graph: new nodes go where the replaced node stood, initializers are added once."""

    def __init__(self, model: onnx.ModelProto, accuracy_level: int) -> None:
        self.model = model
        self.graph = model.graph
        self.level = accuracy_level
        self.quantized: dict[str, QuantizedMatrix] = {}
        self.stored: dict[str, dict[str, str]] = {}  # weight -> its stored initializers' names
        self.block_means: dict[tuple[str, int, int], str] = {}
        # Casts and reshapes of constants (folded at load) and the block means' zero padding: ahead of the graph.
        self.prefix: list[onnx.NodeProto] = []
        self.replaced_weights: set[str] = set()
        self.replacements: dict[str, list[onnx.NodeProto]] = {}  # node name -> the nodes that stand in for it

    def replace_matmul(self, linear: Linear, q: QuantizedMatrix) -> None:
        node = self._node(lambda n: n.op_type == "MatMul" and n.input[1] == linear.weight)
        fmt = q.fmt
        names = self._store(linear, q)
        new: list[onnx.NodeProto] = []
        source, cols = node.input[0], linear.cols
        if q.offset_levels is not None:
            assert linear.activation is not None
            if linear.cols % fmt.block_size:  # the offset columns must start right after the K inputs
                raise ValueError(f"{linear.name}: {linear.cols} columns are not whole blocks of {fmt.block_size}")
            source = self._with_block_means(linear.activation, fmt, linear.cols // fmt.block_size, new)
            cols = q.columns
        blocks = q.columns // fmt.block_size
        packed = self._constant_reshape(names["codes"], [linear.rows, blocks, fmt.block_size * fmt.bits // 8])
        scales = self._constant_reshape(names["scales"], [-1])
        attrs: dict[str, Any] = {"K": cols, "N": linear.rows, "bits": fmt.bits, "block_size": fmt.block_size}
        if self.level:
            attrs["accuracy_level"] = self.level
        inputs = [source, packed, scales]
        if "zero_points" in names:
            inputs.append(names["zero_points"])
        new.append(
            helper.make_node("MatMulNBits", inputs, list(node.output), name=f"{node.name}_NBits", domain=_MS, **attrs)
        )
        self._swap(node, new)
        self.replaced_weights.add(linear.weight)

    def replace_gather(self, linear: Linear, q: QuantizedMatrix) -> None:
        node = self._node(lambda n: n.op_type == "Gather" and _recipe_name(n.name) == linear.name)
        fmt = q.fmt
        names = self._store(linear, q)
        out = node.output[0]
        gathered = out if q.offset_levels is None else f"{out}_with_offsets"
        data = self._constant_reshape(names["codes"], [linear.rows, q.columns * fmt.bits // 8])
        attrs: dict[str, Any] = {"gather_axis": 0, "quantize_axis": 1, "block_size": fmt.block_size, "bits": fmt.bits}
        inputs = [data, node.input[1], names["scales"]]
        if "zero_points" in names:
            inputs.append(names["zero_points"])
        new = [
            helper.make_node(
                "GatherBlockQuantized", inputs, [gathered], name=f"{node.name}_Quantized", domain=_MS, **attrs
            )
        ]
        if q.offset_levels is not None:
            if linear.cols % fmt.block_size:  # padded columns: the offsets' segments would not start at K
                raise ValueError(f"{linear.name}: {linear.cols} columns are not whole blocks of {fmt.block_size}")
            new += self._add_gathered_offsets(gathered, out, linear.cols, fmt, node.name)
        self._swap(node, new)
        self.replaced_weights.add(linear.weight)

    def _add_gathered_offsets(
        self, gathered: str, out: str, cols: int, fmt: TensorFormat, name: str
    ) -> list[onnx.NodeProto]:
        """A gathered row [..., K + offset columns] back to K weights: each offset is its digits' sum (their
        columns decode as level * step * block_size), added to its block's weights."""
        blocks = cols // fmt.block_size
        width = offset_digits.segment(blocks, fmt.block_size)
        slices = [(0, cols)] + [
            (cols + i * width, cols + i * width + blocks) for i in range(offset_digits.digits(fmt.bits))
        ]
        axes = self._int64(f"{out}_axes", [-1])
        parts = [f"{out}_part{i}" for i in range(len(slices))]
        nodes = [
            helper.make_node(
                "Slice",
                [gathered, self._int64(f"{part}_start", [start]), self._int64(f"{part}_end", [end]), axes],
                [part],
                name=f"{name}_{part.rsplit('_', 1)[1]}",
            )
            for part, (start, end) in zip(parts, slices, strict=True)
        ]
        inverse = self._initializer(f"{out}_per_block", np.array(1.0 / fmt.block_size, dtype=np.float32))
        by_block, offsets, back = (f"{out}_{s}" for s in ("by_block", "offsets", "sum"))
        nodes += [
            helper.make_node("Sum", parts[1:], [f"{out}_levels"], name=f"{name}_Levels"),
            helper.make_node("Mul", [f"{out}_levels", inverse], [offsets], name=f"{name}_OffsetValues"),
            helper.make_node(
                "Reshape",
                [parts[0], self._int64(f"{out}_shape_blocks", [0, 0, blocks, fmt.block_size])],
                [by_block],
                name=f"{name}_Blocks",
            ),
            helper.make_node(
                "Unsqueeze", [offsets, self._int64(f"{out}_last", [-1])], [f"{offsets}_1"], name=f"{name}_OffBlocks"
            ),
            helper.make_node("Add", [by_block, f"{offsets}_1"], [back], name=f"{name}_AddOffsets"),
            helper.make_node(
                "Reshape", [back, self._int64(f"{out}_shape_back", [0, 0, cols])], [out], name=f"{name}_Back"
            ),
        ]
        return nodes

    def finish(self) -> None:
        """Splice in the new nodes (constants first), drop replaced weights and the reference-only outputs."""
        nodes = list(self.prefix)
        for node in self.graph.node:
            nodes.extend(self.replacements.get(node.name, [node]))
        # A Transpose that fed the float embedding feeds nothing once the embedding reads the codes.
        read = {name for node in nodes for name in node.input}
        nodes = [n for n in nodes if n.op_type != "Transpose" or any(o in read for o in n.output)]
        _replace_all(self.graph.node, [_copy(n) for n in nodes])
        used = {name for node in self.graph.node for name in node.input}
        keep = [t for t in self.graph.initializer if t.name not in self.replaced_weights or t.name in used]
        _replace_all(self.graph.initializer, [_copy(t) for t in keep])
        outputs = [o for o in self.graph.output if o.name not in _DROPPED_OUTPUTS]
        _replace_all(self.graph.output, [_copy(o) for o in outputs])

    # --- helpers -----------------------------------------------------------------------------------------------

    def _store(self, linear: Linear, q: QuantizedMatrix) -> dict[str, str]:
        """Codes and fp16 scales (the offset columns' included) of one weight, stored once (a tied head and
        embedding share them)."""
        if linear.weight in self.stored:
            return self.stored[linear.weight]
        base = linear.weight.replace("/", "_")
        packed = q.packed_codes()
        names = {"codes": self._initializer(f"{base}_Q{q.fmt.bits}", packed.reshape(packed.shape[0], -1))}
        names["scales"] = self._half_constant(f"{base}_scales", q.packed_scales())
        if q.zero_points is not None:
            names["zero_points"] = self._initializer(f"{base}_zero_points", q.packed_zero_points())
        self.stored[linear.weight] = names
        return names

    def _with_block_means(self, activation: str, fmt: TensorFormat, blocks: int, new: list[onnx.NodeProto]) -> str:
        """``activation`` [..., K] with its block means appended, padded to whole blocks, once per offset digit:
        the input an asymmetric linear's MatMulNBits multiplies (``offset_digits``). One Reshape, ReduceMean and
        Concat per activation and format, shared by the linears that read it."""
        count = offset_digits.digits(fmt.bits)
        key = (activation, fmt.block_size, count)
        if key not in self.block_means:
            base = f"{activation}_means{fmt.block_size}x{count}"
            size = fmt.block_size
            new += self._block_mean_nodes(activation, base, size)
            width = offset_digits.segment(blocks, size)
            segment = self._padded(base, width - blocks, new) if width > blocks else [base]
            joined = f"{base}_joined"
            new.append(helper.make_node("Concat", [activation, *segment * count], [joined], axis=-1, name=joined))
            self.block_means[key] = joined
        return self.block_means[key]

    def _block_mean_nodes(self, activation: str, means: str, size: int) -> list[onnx.NodeProto]:
        """``means`` [batch, sequence, K / size]: the mean of each block of ``size`` inputs of ``activation``.

        A Reshape to [batch, sequence, blocks, size] and a ReduceMean over the last axis: onnxruntime's
        AveragePool, the one-node spelling, made a prefill measurably slower (``benchmarks/bench_levers.py``)."""
        shape = self._int64(f"block_means_shape{size}", [0, 0, -1, size])
        blocks = f"{means}_blocks"
        nodes = [helper.make_node("Reshape", [activation, shape], [blocks], name=blocks)]
        opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset >= 18:  # axes became an input in opset 18
            axes = self._int64("block_means_last_axis", [-1])
            nodes.append(helper.make_node("ReduceMean", [blocks, axes], [means], keepdims=0, name=means))
        else:
            nodes.append(helper.make_node("ReduceMean", [blocks], [means], axes=[-1], keepdims=0, name=means))
        return nodes

    def _padded(self, means: str, width: int, new: list[onnx.NodeProto]) -> list[str]:
        """``means`` [batch, sequence, blocks] and ``width`` zero columns after them, as Concat inputs.

        The zeros are made once per width from ``input_ids``' shape, ahead of the graph: a Pad per activation
        cost a measurable share of a decode step. A graph without ``input_ids`` pads ``means`` where it stands.
        """
        name = f"block_means_zeros{width}"
        if any(name in node.output for node in self.prefix):
            return [means, name]
        if not any(i.name == "input_ids" for i in self.graph.input):
            padded = f"{means}_padded"
            pads = self._int64(f"{padded}_pads", [0, 0, 0, 0, 0, width])
            new.append(helper.make_node("Pad", [means, pads], [padded], name=padded))
            return [padded]
        rows = self._constant(f"{name}_rows", "Shape", ["input_ids"])
        shape = self._constant(f"{name}_shape", "Concat", [rows, self._int64(f"{name}_width", [width])], axis=0)
        zero = helper.make_tensor(f"{name}_value", TensorProto.FLOAT, [1], [0.0])
        return [means, self._constant(name, "ConstantOfShape", [shape], value=zero)]

    def _initializer(self, name: str, array: np.ndarray) -> str:
        self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def _int64(self, name: str, values: list[int]) -> str:
        if not any(t.name == name for t in self.graph.initializer):
            self._initializer(name, np.array(values, dtype=np.int64))
        return name

    def _half_constant(self, name: str, array: np.ndarray) -> str:
        stored = self._initializer(f"{name}_fp16", np.asarray(array, dtype=np.float16))
        return self._constant(name, "Cast", [stored], to=TensorProto.FLOAT)

    def _constant(self, name: str, op: str, inputs: list[str], **attrs: Any) -> str:
        self.prefix.append(helper.make_node(op, inputs, [name], name=f"{name}_{op}", **attrs))
        return name

    def _constant_reshape(self, name: str, shape: list[int]) -> str:
        target = f"{name}_as_{'x'.join(str(abs(d)) for d in shape)}"
        if any(target in node.output for node in self.prefix):
            return target
        return self._constant(target, "Reshape", [name, self._int64(f"{target}_shape", shape)])

    def _node(self, match: Callable[[onnx.NodeProto], bool]) -> onnx.NodeProto:
        return next(node for node in self.graph.node if match(node))

    def _swap(self, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        if not node.name or node.name in self.replacements:
            raise ValueError(f"cannot rewrite node '{node.name}': the graph's node names must be unique")
        self.replacements[node.name] = new


def _copy(message: Any) -> Any:
    copied = type(message)()
    copied.CopyFrom(message)
    return copied


def _replace_all(field: Any, items: list[Any]) -> None:
    del field[:]
    field.extend(items)


def iter_recipe_names(model: onnx.ModelProto) -> Iterator[str]:
    """Names a recipe can give a format to (a tied embedding is its head's)."""
    for linear in find_linears(model):
        if linear.tied_to is None:
            yield linear.name
