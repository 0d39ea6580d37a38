"""Drop MatMulNBits zero points that only repeat the default, so a symmetric checkpoint decodes at RTN's speed.

onnxruntime-genai's builder gives every MatMulNBits of a GPTQ or AWQ checkpoint its ``qzeros`` as the
optional ``zero_points`` input, even when they all equal the operator's default (``2^(bits-1)``: 8 for
4 bits), which is what a symmetric GPTQ checkpoint stores. With the input present, onnxruntime's CPU
kernel takes its slower zero-point path (``benchmarks/bench_decode_parity.py`` measures the difference;
figures in docs/benchmarks.md). The default is the same number, so dropping the input leaves the outputs
the same (up to the order the kernel sums in), and the package shrinks by the zero points.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

MODEL_FILE = "model.onnx"
_COPY_CHUNK = 64 << 20


def drop_default_zero_points(model_dir: Path) -> int:
    """Remove the ``zero_points`` input of every MatMulNBits in ``model_dir/model.onnx`` that holds only
    the default value; returns how many were removed.

    The external data file is compacted in place without the dropped tensors (through a small buffer, so
    a large model costs neither memory nor a second copy on disk), then the graph is replaced atomically.
    """
    import onnx

    path = model_dir / MODEL_FILE
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    removed = 0
    for node in graph.node:
        if node.op_type != "MatMulNBits" or len(node.input) < 4 or not node.input[3]:
            continue
        tensor = initializers.get(node.input[3])
        if tensor is None or not _holds_only_the_default(node, tensor, model_dir):
            continue
        uses[node.input[3]] -= 1
        if len(node.input) == 4:
            del node.input[3]
        else:  # a g_idx follows: an empty name leaves the optional input out and keeps the position
            node.input[3] = ""
        removed += 1
    if not removed:
        return 0
    unused = [tensor for tensor in graph.initializer if uses.get(tensor.name, 0) == 0 and tensor.name in uses]
    for tensor in unused:
        graph.initializer.remove(tensor)
    dropped = {tensor.name for tensor in unused}
    for value in [value for value in graph.input if value.name in dropped]:  # old IRs list initializers too
        graph.input.remove(value)
    _rewrite_external_data(model, model_dir)
    temporary = path.with_name(path.name + ".tmp")
    onnx.save(model, str(temporary))
    os.replace(temporary, path)
    return removed


def _holds_only_the_default(node: Any, tensor: Any, model_dir: Path) -> bool:
    """Whether a uint8 ``zero_points`` tensor's every real entry is ``2^(bits-1)`` (padding ignored)."""
    import onnx
    from onnx import numpy_helper

    if tensor.data_type != onnx.TensorProto.UINT8:
        return False  # float zero points (a different layout): leave them
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    bits, rows, columns, block = attributes["bits"], attributes["N"], attributes["K"], attributes["block_size"]
    if 8 % bits:
        return False
    groups = math.ceil(columns / block)
    per_byte = 8 // bits
    packed = numpy_helper.to_array(tensor, base_dir=str(model_dir)).reshape(-1)
    row_bytes = math.ceil(groups / per_byte)
    if packed.size != rows * row_bytes:
        return False
    fields = np.stack([(packed >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)], axis=-1)
    values = fields.reshape(rows, row_bytes * per_byte)[:, :groups]  # the low bits hold the first group
    return bool(np.all(values == 1 << (bits - 1)))


def _rewrite_external_data(model: Any, model_dir: Path) -> None:
    """Close the gaps the dropped tensors left in each external data file, in place, offsets updated.

    Tensors move only towards the start (each keeps its alignment, which its old offset already had), so
    a forward chunked copy never overwrites bytes not yet read, and no second copy of a large model's
    data is ever on disk. The build's staging folder is discarded if this is interrupted.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    by_file: dict[str, list[tuple[Any, ExternalDataInfo]]] = {}
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = ExternalDataInfo(tensor)  # onnx's own parser: offsets and lengths checked non-negative
            by_file.setdefault(info.location, []).append((tensor, info))
    for location, entries in by_file.items():
        path = model_dir / location
        size = path.stat().st_size
        end = 0
        with path.open("r+b") as handle:
            for tensor, info in sorted(entries, key=lambda entry: entry[1].offset or 0):
                offset = info.offset or 0
                length = size - offset if info.length is None else info.length  # absent: to the end of the file
                # Keep the alignment the writer gave the tensor, up to 64 bytes (the builder's).
                alignment = min(64, offset & -offset) if offset else 1
                target = end + (-end % alignment)
                if target != offset:
                    for done in range(0, length, _COPY_CHUNK):
                        handle.seek(offset + done)
                        chunk = handle.read(min(_COPY_CHUNK, length - done))
                        if len(chunk) < min(_COPY_CHUNK, length - done):
                            raise OSError(f"{path} ends inside tensor {tensor.name}")
                        handle.seek(target + done)
                        handle.write(chunk)
                    _set_offset(tensor, target)
                end = target + length
            handle.truncate(end)


def _set_offset(tensor: Any, offset: int) -> None:
    # onnx's set_external_data needs the tensor's raw_data in memory, which a tensor stored outside has not.
    for entry in tensor.external_data:
        if entry.key == "offset":
            entry.value = str(offset)
            return
    tensor.external_data.add(key="offset", value=str(offset))
