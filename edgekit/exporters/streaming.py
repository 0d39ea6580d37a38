"""Streamed export: onnxruntime-genai's graph construction fed one decoder layer at a time from disk.

The builder's own path loads the whole PyTorch model, builds a float graph that references every weight,
serializes it to one in-memory ModelProto (fp32 on the CPU) and only then quantizes it: several bytes of
RSS per parameter, tens of GB for a 9B model. Here the same builder classes (so the same fused operators:
GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNormalization, the gated delta net) are subclassed,
not patched (``builder_compat``, the one module that touches the builder's internals), and the hooks of
``StreamedWeights`` hand them what they can consume in bounded memory:

- ``load_weights`` returns the Hugging Face model built on the ``meta`` device: the module tree the
  builder walks, with no data behind it;
- each decoder layer's parameters are read from the safetensors shards (``CheckpointReader``) just
  before the builder makes that layer's nodes, and dropped right after;
- every MatMul the builder would quantize at save time is quantized as it is made, with the same
  ONNX Runtime quantizer (``DefaultWeightOnlyQuantizer``), block of rows by block of rows, so a
  vocabulary-sized LM head never exists in fp32 as a whole;
- after each layer every new initializer is appended to ``model.onnx.data`` and replaced by a reference
  to it, so the graph held in memory carries no weights; the embedding table is converted in row blocks.

The result has the same nodes, names and weights as the builder's own export (tests compare the two on
tiny models, one per architecture with a streamed builder); only the layout of the external data file
differs. Peak memory is about one decoder layer in fp32 plus one block of rows, whatever the model size.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError, ExportError
from edgekit.exporters import builder_compat
from edgekit.exporters.builder_compat import BuilderView, MatMulCall, PackedLinearRepacker
from edgekit.exporters.onnx_builder import builder_extra_options, run_logged
from edgekit.sources.lazy_weights import CheckpointReader
from edgekit.sources.registry import StreamedBuilder, lookup_architecture, streamable_architectures

_ALIGNMENT = 4096  # external-data offsets, so onnxruntime can map large tensors page-aligned
_BLOCK_BYTES = 128 * 1024 * 1024  # fp32 bytes of one block of rows converted at a time


class ExternalDataFile:
    """An append-only ``model.onnx.data`` whose tensors are referenced by ``ir.ExternalTensor``."""

    def __init__(self, folder: Path, filename: str) -> None:
        self.folder = folder
        self.filename = filename
        self._fd = os.open(folder / filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._end = 0

    def reserve(self, length: int) -> int:
        """Reserve ``length`` bytes at the next aligned offset and return that offset."""
        offset = -(-self._end // _ALIGNMENT) * _ALIGNMENT
        self._end = offset + length
        return offset

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset`` (inside a reserved range)."""
        view = memoryview(data).cast("B")
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def append(self, chunks: Iterable[bytes | memoryview], length: int) -> int:
        """Write ``chunks`` (``length`` bytes in all) one after another; return their offset."""
        offset = self.reserve(length)
        position = offset
        for chunk in chunks:
            self.write_at(position, chunk)
            position += memoryview(chunk).nbytes
        if position != offset + length:
            raise ExportError(f"wrote {position - offset} bytes for a {length}-byte tensor", path=self.folder)
        return offset

    def external(self, name: str, dtype: Any, shape: Sequence[int], offset: int, length: int) -> Any:
        """The ``ir.ExternalTensor`` for bytes written at ``offset``."""
        import onnx_ir as ir

        return ir.ExternalTensor(
            self.filename, offset, length, dtype, shape=ir.Shape(shape), name=name, base_dir=str(self.folder)
        )

    def close(self) -> None:
        """Extend the file to its reserved end and close it."""
        if self._fd >= 0:
            os.ftruncate(self._fd, self._end)
            os.close(self._fd)
            self._fd = -1


def _as_bytes(tensor: Any) -> memoryview:
    """The raw bytes of a contiguous torch tensor of any dtype (bfloat16 included)."""
    import torch

    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")


class StreamedWeights:
    """The streamed export's side of the builder's walk (``builder_compat.StreamHooks``): lazy weights,
    quantization as MatMuls are made, weights spilled to disk.

    ``quantization`` is a pre-quantized checkpoint's ``quantization_config`` (GPTQ or AWQ): its packed
    linears are then repacked for MatMulNBits as each layer is read, as the builder's loaders do.
    """

    def __init__(
        self, builder: BuilderView, reader: CheckpointReader, out_dir: Path, quantization: Mapping[str, Any] | None
    ) -> None:
        self._builder = builder
        self._reader = reader
        self._out_dir = out_dir
        self._data: ExternalDataFile | None = None
        self._lazy: dict[int, str] = {}  # id(meta parameter) -> checkpoint key, for tensors read in row blocks
        self._prefix: dict[int, str] = {}  # id(module) -> its qualified name
        self._packed = PackedLinearReader(reader, quantization) if quantization is not None else None

    # -- weights -------------------------------------------------------------------------------------

    def load_weights(self, input_path: str) -> Any:
        """The model's module tree on the meta device; data is read per layer as the builder needs it."""
        import torch
        import transformers

        config = transformers.AutoConfig.from_pretrained(input_path, trust_remote_code=False)
        model_class = getattr(transformers, config.architectures[0])
        with torch.device("meta"):
            model = model_class._from_config(config)
        self._prefix = {id(module): name for name, module in model.named_modules()}
        vocab_size = self._builder.vocab_size
        for name, module in model.named_modules():
            big = (isinstance(module, torch.nn.Embedding) and module.weight.shape[0] == vocab_size) or (
                isinstance(module, torch.nn.Linear) and module.out_features == vocab_size
            )
            # Tied heads share the embedding's Parameter, so the first key (the embedding's) wins.
            if big and id(module.weight) not in self._lazy:
                self._lazy[id(module.weight)] = self._checkpoint_key(f"{name}.weight")
        return model

    def _checkpoint_key(self, name: str) -> str:
        if name in self._reader:
            return name
        raise ExportError(
            f"the checkpoint has no tensor '{name}', which the streamed export needs",
            path=self._reader.folder,
            fix="the safetensors shards do not match config.json; download the checkpoint again",
        )

    @contextlib.contextmanager
    def reading(self, module: Any) -> Iterator[None]:
        """Read ``module``'s parameters (except row-streamed ones) from disk; put meta tensors back after."""
        import torch

        prefix = self._prefix[id(module)]
        restored: list[tuple[Any, str, Any]] = []
        packed: list[Any] = []
        try:
            for name, linear in module.named_modules():
                key = f"{prefix}.{name}" if name else prefix
                if self._packed is not None and isinstance(linear, torch.nn.Linear) and self._packed.holds(key):
                    self._packed.attach(linear, key)
                    packed.append(linear)
            for name, param in list(module.named_parameters()):
                if not param.is_meta or id(param) in self._lazy:
                    continue
                owner_path, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_path) if owner_path else module
                if leaf == "weight" and any(owner is linear for linear in packed):
                    continue  # packed in the checkpoint: the repacked tensors stand in for it
                key = self._checkpoint_key(f"{prefix}.{name}" if prefix else name)
                owner._parameters[leaf] = torch.nn.Parameter(self._reader.tensor(key), requires_grad=False)
                restored.append((owner, leaf, param))
            yield
        finally:
            for owner, leaf, meta in restored:
                owner._parameters[leaf] = meta
            for linear in packed:
                PackedLinearRepacker.remove_from(linear)

    def _rows(self, weight: Any) -> tuple[tuple[int, ...], Iterator[Any]]:
        """Shape of a 2-D weight and its blocks of rows (read from disk when the weight is row-streamed)."""
        key = self._lazy.get(id(weight))
        shape = self._reader.location(key).shape if key is not None else tuple(weight.shape)
        per_block = max(1, _BLOCK_BYTES // (4 * max(1, shape[1])))

        def blocks() -> Iterator[Any]:
            for start in range(0, shape[0], per_block):
                stop = min(shape[0], start + per_block)
                yield self._reader.rows(key, start, stop) if key is not None else weight[start:stop]

        return shape, blocks()

    # -- initializers and MatMuls ----------------------------------------------------------------------

    def make_initializer(self, tensor: Any, name: str, to: Any) -> bool:
        """A row-streamed tensor (the embedding table) is converted block by block straight to disk."""
        key = self._lazy.get(id(tensor))
        if key is None:
            return False
        from onnx_ir.tensor_adapters import to_torch_dtype

        dtype = to if to is not None else self._builder.io_dtype
        torch_dtype = to_torch_dtype(dtype)
        shape, blocks = self._rows(tensor)
        length = shape[0] * shape[1] * torch_dtype.itemsize
        offset = self._file().append((_as_bytes(block.to(torch_dtype)) for block in blocks), length)
        self._register(name, dtype, shape, offset, length)
        return True

    def make_matmul(self, weight: Any, call: MatMulCall) -> bool:
        """Quantize now what ``to_nbits`` would quantize at save time; write row-streamed float heads transposed."""
        if self._quantizes(call.name):
            self._make_matmul_nbits_now(weight, call)
            return True
        if id(weight) not in self._lazy:
            return False
        from onnx_ir.tensor_adapters import to_torch_dtype

        (rows, cols), blocks = self._rows(weight)
        io_dtype = self._builder.io_dtype
        torch_dtype = to_torch_dtype(io_dtype)
        itemsize = torch_dtype.itemsize
        data = self._file()
        offset = data.reserve(rows * cols * itemsize)
        start = 0
        for block in blocks:  # W is [N, K]; the initializer is W.T, [K, N]: each block fills a column range
            columns = block.to(torch_dtype).T.contiguous()
            for k in range(cols):
                data.write_at(offset + (k * rows + start) * itemsize, _as_bytes(columns[k]))
            start += block.shape[0]
        self._register(call.weight_name, io_dtype, (cols, rows), offset, rows * cols * itemsize)
        self._builder.make_matmul_node(call, "MatMul", [call.root_input, call.weight_name], rows)
        return True

    def _quantizes(self, name: str) -> bool:
        builder = self._builder
        if not builder.quantizes_weights or not builder.quantizes_op("MatMul"):
            return False
        if builder.excluded_from_quantization(name):
            return False
        settings = builder.nbits_settings()
        if settings.qdq or settings.algorithm != "default":
            raise ExportError(
                "a streamed export quantizes with the default MatMulNBits quantizer only (no QDQ, RTN or k-quant)",
                fix="build without --streaming, or use the default quantization options",
            )
        if settings.per_node_bits:
            raise ExportError(
                "a streamed export does not support per-node bit widths",
                fix="build without --streaming, or drop the mixed-precision options",
            )
        return True

    def _make_matmul_nbits_now(self, weight: Any, call: MatMulCall) -> None:
        """MatMulNBits exactly as ``to_nbits`` would make it from a float MatMul, from blocks of rows."""
        import numpy as np
        import onnx_ir as ir

        settings = self._builder.nbits_settings()
        bits, block_size = settings.bits, settings.block_size
        (rows, cols), blocks = self._rows(weight)  # weight is [N, K]; the float MatMul's B would be [K, N]
        k_blocks = -(-cols // block_size)
        blob = (block_size + 8 // bits - 1) // (8 // bits)
        packed_length = rows * k_blocks * blob
        packed_offset = self._file().reserve(packed_length)
        scales, zero_points = self._quantize_blocks(blocks, packed_offset)
        quant_name, scales_name = f"{call.weight_name}_Q{bits}", f"{call.weight_name}_scales"
        self._register(quant_name, ir.DataType.UINT8, (rows, k_blocks, blob), packed_offset, packed_length)
        inputs = [call.root_input, quant_name, scales_name]
        self._register_array(scales_name, np.concatenate(scales))
        if not settings.symmetric:
            inputs.append(f"{call.weight_name}_zero_points")
            self._register_array(inputs[-1], np.concatenate(zero_points))
        node_attrs: dict[str, Any] = {"K": cols, "N": rows, "bits": bits, "block_size": block_size}
        if settings.accuracy_level:
            node_attrs["accuracy_level"] = settings.accuracy_level
        self._builder.make_matmul_node(
            call, "MatMulNBits", inputs, rows, node_name=f"{call.name}_Q{bits}", domain="com.microsoft", **node_attrs
        )

    def _quantize_blocks(self, blocks: Iterator[Any], offset: int) -> tuple[list[Any], list[Any]]:
        """Quantize ``blocks`` of rows as ONNX Runtime's quantizer would the whole, packed codes written from
        ``offset`` on; return the blocks' scales and zero points (bf16 scales for a bf16 model, as it makes)."""
        import ml_dtypes
        import numpy as np
        import torch
        from onnx_ir.tensor_adapters import to_torch_dtype
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        settings = self._builder.nbits_settings()
        config = DefaultWeightOnlyQuantConfig(
            block_size=settings.block_size,
            is_symmetric=settings.symmetric,
            accuracy_level=settings.accuracy_level,
            bits=settings.bits,
        )
        quantizer = DefaultWeightOnlyQuantizer(config)
        torch_dtype = to_torch_dtype(self._builder.io_dtype)
        data = self._file()
        scales, zero_points = [], []
        for block in blocks:
            b_matrix = block.T.to(torch_dtype)
            bfloat16 = b_matrix.dtype == torch.bfloat16
            array = np.ascontiguousarray((b_matrix.float() if bfloat16 else b_matrix).numpy())
            packed, block_scales, block_zero_points = quantizer.qbits_block_quant(array)
            data.write_at(offset, np.ascontiguousarray(packed).tobytes())
            offset += packed.nbytes
            scales.append(block_scales.astype(ml_dtypes.bfloat16) if bfloat16 else block_scales)
            zero_points.append(block_zero_points)
            del array, packed
        return scales, zero_points

    # -- external data -----------------------------------------------------------------------------------

    def _file(self) -> ExternalDataFile:
        if self._data is None:
            self._data = ExternalDataFile(self._out_dir, os.path.basename(self._builder.filename) + ".data")
        return self._data

    def _register(self, name: str, dtype: Any, shape: tuple[int, ...], offset: int, length: int) -> None:
        self._builder.add_initializer(name, dtype, shape, self._file().external(name, dtype, shape, offset, length))

    def _register_array(self, name: str, array: Any) -> None:
        import onnx_ir as ir

        data = memoryview(array.tobytes())
        offset = self._file().append([data], data.nbytes)
        self._register(name, ir.DataType.from_numpy(array.dtype), tuple(array.shape), offset, data.nbytes)

    def spill(self) -> None:
        """Write every initializer still held in memory to the data file and keep only a reference."""
        import onnx_ir as ir

        for name, value in list(self._builder.model.graph.initializers.items()):
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor):
                continue
            data = memoryview(tensor.tobytes())
            offset = self._file().append([data], data.nbytes)
            value.const_value = self._file().external(name, tensor.dtype, tensor.shape.numpy(), offset, data.nbytes)

    def save(self, out_dir: str) -> None:
        """Save the graph; its weights are already in ``model.onnx.data``."""
        import onnx
        import onnx_ir as ir

        self.spill()
        self._check_all_quantized()
        model = self._builder.model
        model.graph.sort()
        self._builder.stamp_build_metadata()
        self._file().close()
        onnx.save_model(ir.to_proto(model), os.path.join(out_dir, self._builder.filename))

    def _check_all_quantized(self) -> None:
        """Fail loudly if the builder made a quantizable MatMul some other way than ``make_matmul_float``."""
        if not self._builder.quantizes_weights:
            return
        for node in self._builder.model.graph:
            if (
                node.op_type == "MatMul"
                and not self._builder.excluded_from_quantization(node.name or "")
                and node.inputs[1] is not None
                and node.inputs[1].const_value is not None
            ):
                raise ExportError(f"the streamed export left MatMul '{node.name}' unquantized; report this")


class PackedLinearReader:
    """The packed linears of a GPTQ or AWQ checkpoint, read one at a time and repacked for MatMulNBits.

    The repacking is the builder's own (``builder_compat.PackedLinearRepacker``), applied to one linear
    instead of the whole checkpoint at once; the builder then makes the same MatMulNBits nodes from it.
    """

    def __init__(self, reader: CheckpointReader, quantization: Mapping[str, Any]) -> None:
        method = quantization.get("quant_method")
        if method not in PackedLinearRepacker.METHODS or quantization.get("dynamic"):
            raise ExportError(
                f"a streamed export cannot read '{method}' checkpoints with per-layer overrides"
                if quantization.get("dynamic")
                else f"a streamed export cannot read '{method}' checkpoints",
                path=reader.folder / "config.json",
                fix="build without --streaming",
            )
        self._repacker = PackedLinearRepacker(str(method))
        self._reader = reader
        self._bits = int(quantization.get("bits", quantization.get("w_bit", 4)))
        self._group_size = int(quantization.get("group_size", quantization.get("q_group_size", 128)))
        self._keep_g_idx = method == "gptq" and bool(quantization.get("desc_act", False))

    def holds(self, name: str) -> bool:
        """Whether linear ``name`` is packed in the checkpoint (``NAME.qweight`` is there)."""
        return f"{name}.qweight" in self._reader

    def attach(self, linear: Any, name: str) -> None:
        """Read linear ``name``'s packed tensors, repack them and set them on ``linear``."""
        tensors = {
            part: self._reader.tensor(f"{name}.{part}")
            for part in ("qweight", "scales", "qzeros", "g_idx")
            if f"{name}.{part}" in self._reader
        }
        packed = self._repacker.describe(tensors, self._bits, self._group_size)
        if (packed.in_features, packed.out_features) != (linear.in_features, linear.out_features):
            raise ExportError(
                f"'{name}' is packed as {packed.in_features}x{packed.out_features}, but config.json makes it "
                f"{linear.in_features}x{linear.out_features}",
                path=self._reader.folder,
                fix="the checkpoint's weights do not match its config.json",
            )
        self._repacker.repack_onto(packed, linear, keep_g_idx=self._keep_g_idx)


def _streamed_builder(config_path: Path) -> StreamedBuilder:
    """The registry's streamed builder of the checkpoint's architecture, or the list of those that have one."""
    architecture = lookup_architecture(json.loads(config_path.read_text(encoding="utf-8")), config_path)
    if architecture.streamed_builder is None:
        raise ExportError(
            f"a streamed export does not support architecture '{architecture.model_type}'",
            path=config_path,
            fix="build without --streaming; streamed: " + ", ".join(streamable_architectures()),
        )
    return architecture.streamed_builder


def run_streaming_builder(
    hf_folder: Path,
    out_dir: Path,
    *,
    precision: str,
    provider: str,
    options: dict[str, str],
    cache_dir: Path,
    log_path: Path,
) -> None:
    """Export ``hf_folder`` streamed, to ``out_dir``; the same contract as ``onnx_builder.run_builder``.

    The variant is written into a hidden sibling folder and renamed into place when complete, so an
    interrupted export (Ctrl-C, a crash) leaves no partial folder behind.
    """
    spec = _streamed_builder(hf_folder / "config.json")
    builder_compat.require_builder()
    extra = builder_extra_options(options)
    for key, value in spec.default_options:
        extra.setdefault(key, value)
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)

    def make_hooks(builder: BuilderView, quantization: Mapping[str, Any] | None) -> StreamedWeights:
        return StreamedWeights(builder, CheckpointReader(hf_folder), partial, quantization)

    def export() -> None:
        builder_compat.export_streamed(
            hf_folder, partial, precision=precision, provider=provider, cache_dir=cache_dir, options=extra,
            spec=spec, make_hooks=make_hooks,
        )  # fmt: skip

    try:
        failure = run_logged(log_path, f"streamed builder {precision}/{provider} {extra} -> {out_dir.name}", export)
        if failure is not None:
            if isinstance(failure, EdgekitError):
                raise failure
            raise ExportError(
                f"the streamed {precision} {provider} export failed ({type(failure).__name__}: {failure})",
                path=log_path,
                fix="see the log for the traceback",
            )
        if out_dir.exists():
            out_dir.rmdir()  # run_builder's contract: an empty or absent folder
        partial.rename(out_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
