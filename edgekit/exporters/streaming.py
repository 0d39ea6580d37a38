"""Streamed export: onnxruntime-genai's graph construction fed one decoder layer at a time from disk.

The builder's own path loads the whole PyTorch model, builds a float graph that references every weight,
serializes it to one in-memory ModelProto (fp32 on the CPU) and only then quantizes it: about 8 bytes of
RSS per parameter, 75 GB for a 9B model. Here the same builder classes (so the same fused operators:
GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNormalization, the gated delta net) are subclassed,
not patched, and handed what they can consume in bounded memory:

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
tiny models); only the layout of the external data file differs. Peak memory is about one decoder layer
in fp32 plus one block of rows, whatever the model size.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from edgekit.errors import ExportError
from edgekit.exporters.lazy_weights import CheckpointReader
from edgekit.exporters.onnx_builder import builder_extra_options, run_logged

# builder_class (config.architectures[0]) -> (module in onnxruntime_genai.models.builders, class name)
STREAMING_BUILDERS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("llama", "LlamaModel"),
    "MistralForCausalLM": ("mistral", "MistralModel"),
    "Qwen2ForCausalLM": ("qwen", "QwenModel"),
    "Qwen3ForCausalLM": ("qwen", "Qwen3Model"),
    "Qwen3_5ForConditionalGeneration": ("qwen", "Qwen35Model"),  # a composite whose decoder is Qwen35TextModel
}
_ALIGNMENT = 4096  # external-data offsets, so onnxruntime can map large tensors page-aligned
_BLOCK_BYTES = 128 * 1024 * 1024  # fp32 bytes of one block of rows converted at a time


def supports_streaming(builder_class: str) -> bool:
    """Whether ``builder_class`` (a registry entry's builder class) can be exported streamed."""
    return builder_class in STREAMING_BUILDERS


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

    def external(self, name: str, dtype: Any, shape: tuple[int, ...], offset: int, length: int) -> Any:
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


class StreamingMixin:
    """Mixed in before a builder class: lazy weights, quantization as MatMuls are made, weights spilled to disk.

    Attributes set by ``streaming_setup`` before ``make_model``; everything else is the builder's.
    """

    # Provided by the builder class this is mixed into.
    model: Any
    vocab_size: int
    io_dtype: Any
    onnx_dtype: Any
    quant_attrs: dict[str, Any]
    filename: str

    def streaming_setup(self, reader: CheckpointReader, out_dir: Path, quantization: dict[str, Any] | None) -> None:
        """Read weights with ``reader``; write ``model.onnx.data`` into ``out_dir``.

        ``quantization`` is a pre-quantized checkpoint's ``quantization_config`` (GPTQ or AWQ): its packed
        linears are then repacked for MatMulNBits as each layer is read, as the builder's loaders do.
        """
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
        for name, module in model.named_modules():
            big = (isinstance(module, torch.nn.Embedding) and module.weight.shape[0] == self.vocab_size) or (
                isinstance(module, torch.nn.Linear) and module.out_features == self.vocab_size
            )
            # Tied heads share the embedding's Parameter, so the first key (the embedding's) wins.
            if big and id(module.weight) not in self._lazy:
                self._lazy[id(module.weight)] = self._checkpoint_key(f"{name}.weight")
        return model

    def _checkpoint_key(self, name: str) -> str:
        if name in self._reader:
            return name
        raise ExportError(
            f"the checkpoint has no tensor '{name}', which the {type(self).__name__} export needs",
            path=self._reader.folder,
            fix="the safetensors shards do not match config.json; download the checkpoint again",
        )

    @contextlib.contextmanager
    def _materialized(self, module: Any) -> Iterator[None]:
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
                PackedLinearReader.detach(linear)

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

    # -- builder hooks -------------------------------------------------------------------------------

    def make_embedding(self, embedding: Any) -> None:
        super().make_embedding(embedding)  # type: ignore[misc]
        self._spill()

    def make_layer(self, layer_id: int, layer: Any) -> None:
        with self._materialized(layer):
            super().make_layer(layer_id, layer)  # type: ignore[misc]
            self._spill()

    def make_layernorm(self, layer_id: int, layernorm: Any, skip: bool, simple: bool, location: str) -> Any:
        if location != "final_norm":
            return super().make_layernorm(layer_id, layernorm, skip, simple, location)  # type: ignore[misc]
        with self._materialized(layernorm):
            result = super().make_layernorm(layer_id, layernorm, skip, simple, location)  # type: ignore[misc]
            self._spill()
        return result

    def make_lm_head(self, lm_head: Any) -> None:
        with self._materialized(lm_head):
            super().make_lm_head(lm_head)  # type: ignore[misc]
            self._spill()

    def make_initializer(self, tensor: Any, /, name: str, *, to: Any = None, raw: bool = False) -> None:
        """A row-streamed tensor (the embedding table) is converted block by block straight to disk."""
        key = self._lazy.get(id(tensor))
        if key is None or raw:
            super().make_initializer(tensor, name, to=to, raw=raw)  # type: ignore[misc]
            return
        from onnx_ir.tensor_adapters import to_torch_dtype

        dtype = to if to is not None else self.io_dtype
        torch_dtype = to_torch_dtype(dtype)
        shape, blocks = self._rows(tensor)
        itemsize = torch_dtype.itemsize
        length = shape[0] * shape[1] * itemsize
        offset = self._file().append((_as_bytes(block.to(torch_dtype)) for block in blocks), length)
        self._register(name, dtype, shape, offset, length)

    def make_matmul_float(self, matmul: Any, name: str, root_input: str, **kwargs: Any) -> str:
        """Quantize now what ``to_nbits`` would quantize at save time; write row-streamed float heads transposed."""
        if self._quantizes(name):
            return self._make_matmul_nbits_now(matmul.weight, name, root_input, **kwargs)
        if id(matmul.weight) not in self._lazy:
            return super().make_matmul_float(matmul, name, root_input, **kwargs)  # type: ignore[misc]
        from onnx_ir.tensor_adapters import to_torch_dtype

        weight_name = name[1:].replace("/", ".") + ".weight"
        (rows, cols), blocks = self._rows(matmul.weight)
        torch_dtype = to_torch_dtype(self.io_dtype)
        itemsize = torch_dtype.itemsize
        data = self._file()
        offset = data.reserve(rows * cols * itemsize)
        start = 0
        for block in blocks:  # W is [N, K]; the initializer is W.T, [K, N]: each block fills a column range
            columns = block.to(torch_dtype).T.contiguous()
            for k in range(cols):
                data.write_at(offset + (k * rows + start) * itemsize, _as_bytes(columns[k]))
            start += block.shape[0]
        self._register(weight_name, self.io_dtype, (cols, rows), offset, rows * cols * itemsize)
        self._make_matmul_node("MatMul", [root_input, weight_name], name, rows, kwargs)
        return name

    def make_matmul_nbits(self, matmul: Any, basename: str, root_input: str, **kwargs: Any) -> str:
        """The builder's MatMulNBits; a pre-quantized one in Qwen3.5's linear attention also under ``basename``.

        The builder names a pre-quantized MatMul ``{basename}NBits`` and returns that name, but its gated
        delta net reads ``{basename}/output_0`` without looking at the name returned (its own loader never
        hands it pre-quantized projections). An Identity makes that output, which onnxruntime folds away.
        """
        name = super().make_matmul_nbits(matmul, basename, root_input, **kwargs)  # type: ignore[misc]
        if name == basename or "/linear_attn/" not in basename:
            return str(name)
        output = f"{basename}/output_0"
        self.make_node("Identity", inputs=[f"{name}/output_0"], outputs=[output], name=f"{basename}/Identity")  # type: ignore[attr-defined]
        seq_dim = kwargs.get("seq_dim", "sequence_length")
        shape = self.make_hidden_state_shape(seq_dim=seq_dim, last_dim=matmul.out_features)  # type: ignore[attr-defined]
        self.make_value(output, self.io_dtype, shape=shape)  # type: ignore[attr-defined]
        return basename

    # -- quantization ----------------------------------------------------------------------------------

    def _quantizes(self, name: str) -> bool:
        import onnx_ir as ir

        quantized = {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8}
        attrs = self.quant_attrs
        if self.onnx_dtype not in quantized or "MatMul" not in attrs["op_types_to_quantize"]:
            return False
        if name in attrs["nodes_to_exclude"]:
            return False
        if attrs["use_qdq"] or getattr(self, "quantization_algo", "default") != "default":
            raise ExportError(
                "a streamed export quantizes with the default MatMulNBits quantizer only (no QDQ, RTN or k-quant)",
                fix="build without --streaming, or use the default quantization options",
            )
        if getattr(self, "int4_customized_weight_config", None):
            raise ExportError(
                "a streamed export does not support per-node bit widths",
                fix="build without --streaming, or drop the mixed-precision options",
            )
        return True

    def _make_matmul_nbits_now(self, weight: Any, name: str, root_input: str, **kwargs: Any) -> str:
        """MatMulNBits exactly as ``to_nbits`` would make it from a float MatMul, from blocks of rows."""
        import ml_dtypes
        import numpy as np
        import onnx_ir as ir
        from onnx_ir.tensor_adapters import to_torch_dtype
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            DefaultWeightOnlyQuantizer,
        )

        attrs = self.quant_attrs
        bits = int(attrs["bits"])
        config = DefaultWeightOnlyQuantConfig(
            block_size=attrs["matmul_block_size"],
            is_symmetric=attrs["is_symmetric"],
            accuracy_level=attrs["accuracy_level"],
            bits=bits,
        )
        quantizer = DefaultWeightOnlyQuantizer(config)
        torch_dtype = to_torch_dtype(self.io_dtype)
        (rows, cols), blocks = self._rows(weight)  # weight is [N, K]; the float MatMul's B would be [K, N]
        block_size = int(attrs["matmul_block_size"])
        k_blocks = -(-cols // block_size)
        kpack = 8 // bits
        blob = (block_size + kpack - 1) // kpack
        data = self._file()
        packed_length = rows * k_blocks * blob
        packed_offset = data.reserve(packed_length)
        position = packed_offset
        scales, zero_points = [], []
        for block in blocks:
            b_matrix = block.T.to(torch_dtype)
            bfloat16 = b_matrix.dtype == _torch_bfloat16()
            array = np.ascontiguousarray((b_matrix.float() if bfloat16 else b_matrix).numpy())
            packed, block_scales, block_zero_points = quantizer.qbits_block_quant(array)
            data.write_at(position, np.ascontiguousarray(packed).tobytes())
            position += packed.nbytes
            scales.append(block_scales.astype(ml_dtypes.bfloat16) if bfloat16 else block_scales)
            zero_points.append(block_zero_points)
            del array, packed
        weight_name = name[1:].replace("/", ".") + ".weight"
        quant_name, scales_name = f"{weight_name}_Q{bits}", f"{weight_name}_scales"
        self._register(quant_name, ir.DataType.UINT8, (rows, k_blocks, blob), packed_offset, packed_length)
        inputs = [root_input, quant_name, scales_name]
        self._register_array(scales_name, np.concatenate(scales))
        if not attrs["is_symmetric"]:
            inputs.append(f"{weight_name}_zero_points")
            self._register_array(inputs[-1], np.concatenate(zero_points))
        node_attrs: dict[str, Any] = {"K": cols, "N": rows, "bits": bits, "block_size": block_size}
        if attrs["accuracy_level"]:
            node_attrs["accuracy_level"] = attrs["accuracy_level"]
        self._make_matmul_node(
            "MatMulNBits", inputs, name, rows, kwargs, node_name=f"{name}_Q{bits}", domain="com.microsoft", **node_attrs
        )
        return name

    def _make_matmul_node(
        self,
        op_type: str,
        inputs: list[str],
        name: str,
        out_features: int,
        builder_kwargs: dict[str, Any],
        *,
        node_name: str | None = None,
        domain: str = "",
        **node_attrs: Any,
    ) -> None:
        """The node and output value ``make_matmul_float`` makes (``logits``/``seq_dim`` as the builder passes)."""
        output = "logits" if builder_kwargs.get("logits", False) else f"{name}/output_0"
        make_node = self.make_node  # type: ignore[attr-defined]
        make_node(op_type, inputs=inputs, outputs=[output], name=node_name or name, domain=domain, **node_attrs)
        seq_dim = builder_kwargs.get("seq_dim", "sequence_length")
        shape = self.make_hidden_state_shape(seq_dim=seq_dim, last_dim=out_features)  # type: ignore[attr-defined]
        self.make_value(output, self.io_dtype, shape=shape)  # type: ignore[attr-defined]

    # -- external data -----------------------------------------------------------------------------------

    def _file(self) -> ExternalDataFile:
        if self._data is None:
            self._data = ExternalDataFile(self._out_dir, os.path.basename(self.filename) + ".data")
        return self._data

    def _register(self, name: str, dtype: Any, shape: tuple[int, ...], offset: int, length: int) -> None:
        value = self.make_value(name, dtype, shape)  # type: ignore[attr-defined]
        value.const_value = self._file().external(name, dtype, shape, offset, length)
        self.model.graph.register_initializer(value)

    def _register_array(self, name: str, array: Any) -> None:
        import onnx_ir as ir

        data = memoryview(array.tobytes())
        offset = self._file().append([data], data.nbytes)
        self._register(name, ir.DataType.from_numpy(array.dtype), tuple(array.shape), offset, data.nbytes)

    def _spill(self) -> None:
        """Write every initializer still held in memory to the data file and keep only a reference."""
        import onnx_ir as ir

        for value in list(self.model.graph.initializers.values()):
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor):
                continue
            data = memoryview(tensor.tobytes())
            offset = self._file().append([data], data.nbytes)
            shape = tuple(int(d) for d in tensor.shape)
            value.const_value = self._file().external(value.name, tensor.dtype, shape, offset, data.nbytes)

    def save_model(self, out_dir: str) -> None:
        """Save the graph; its weights are already in ``model.onnx.data``."""
        import onnx
        import onnx_ir as ir
        from onnxruntime_genai.models.builders.base import Model

        self._spill()
        self._check_all_quantized()
        self.model.graph.sort()
        Model.stamp_build_metadata(self.model)
        self._file().close()
        onnx.save_model(ir.to_proto(self.model), os.path.join(out_dir, self.filename))

    def _check_all_quantized(self) -> None:
        """Fail loudly if the builder made a quantizable MatMul some other way than ``make_matmul_float``."""
        import onnx_ir as ir

        if self.onnx_dtype not in {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8}:
            return
        excluded = set(self.quant_attrs["nodes_to_exclude"])
        for node in self.model.graph:
            if node.op_type == "MatMul" and node.name not in excluded and node.inputs[1].const_value is not None:
                raise ExportError(f"the streamed export left MatMul '{node.name}' unquantized; report this")


class PackedLinearReader:
    """The packed linears of a GPTQ or AWQ checkpoint, read one at a time and repacked for MatMulNBits.

    The repacking is the builder's own (its ``GPTQModel``/``AWQModel`` loaders' ``repack_quantized_tensor``),
    applied to one linear instead of the whole checkpoint at once, and the repacked tensors are set on the
    meta module as the builder's quantized modules carry them (``qweight``, ``scales``, ``qzeros``,
    ``g_idx``, ``bits``, ``group_size``): the builder then makes the same MatMulNBits nodes from them.
    """

    ATTRIBUTES = ("qweight", "scales", "qzeros", "g_idx", "bits", "group_size")

    def __init__(self, reader: CheckpointReader, quantization: dict[str, Any]) -> None:
        from onnxruntime_genai.models.loaders.awq import AWQModel
        from onnxruntime_genai.models.loaders.gptq import GPTQModel

        method = quantization.get("quant_method")
        loaders = {"gptq": GPTQModel, "awq": AWQModel}
        if method not in loaders or quantization.get("dynamic"):
            raise ExportError(
                f"a streamed export cannot read '{method}' checkpoints with per-layer overrides"
                if quantization.get("dynamic")
                else f"a streamed export cannot read '{method}' checkpoints",
                path=reader.folder / "config.json",
                fix="build without --streaming",
            )
        # The loaders' repacking methods need no state of their own beyond the method.
        self._loader = loaders[method].__new__(loaders[method])
        self._loader.quant_type = method
        self._reader = reader
        self._bits = int(quantization.get("bits", quantization.get("w_bit", 4)))
        self._group_size = int(quantization.get("group_size", quantization.get("q_group_size", 128)))
        self._keep_g_idx = method == "gptq" and bool(quantization.get("desc_act", False))

    def holds(self, name: str) -> bool:
        """Whether linear ``name`` is packed in the checkpoint (``NAME.qweight`` is there)."""
        return f"{name}.qweight" in self._reader

    def attach(self, linear: Any, name: str) -> None:
        """Read linear ``name``'s packed tensors, repack them and set them on ``linear``."""
        from onnxruntime_genai.models.loaders.base import QuantizedTensorModule

        module = QuantizedTensorModule()
        for part in ("qweight", "scales", "qzeros", "g_idx"):
            if f"{name}.{part}" in self._reader:
                setattr(module, part, self._reader.tensor(f"{name}.{part}"))
        module.bits = self._bits
        module.group_size = self._group_size
        self._loader.set_quantized_tensor_properties(module)
        if (module.in_features, module.out_features) != (linear.in_features, linear.out_features):
            raise ExportError(
                f"'{name}' is packed as {module.in_features}x{module.out_features}, but config.json makes it "
                f"{linear.in_features}x{linear.out_features}",
                path=self._reader.folder,
                fix="the checkpoint's weights do not match its config.json",
            )
        self._loader.repack_quantized_tensor(module, clear_g_idx=not self._keep_g_idx)
        for attribute in self.ATTRIBUTES:
            object.__setattr__(linear, attribute, getattr(module, attribute))

    @classmethod
    def detach(cls, linear: Any) -> None:
        """Drop what ``attach`` set, so the module is the meta module it was."""
        for attribute in cls.ATTRIBUTES:
            linear.__dict__.pop(attribute, None)


def _torch_bfloat16() -> Any:
    import torch

    return torch.bfloat16


def _streaming_class(base: type) -> type:
    return type(f"Streaming{base.__name__}", (StreamingMixin, base), {})


def _builder_class(builder_class: str) -> type:
    import importlib

    module_name, class_name = STREAMING_BUILDERS[builder_class]
    module = importlib.import_module(f"onnxruntime_genai.models.builders.{module_name}")
    base = getattr(module, class_name)
    if class_name == "Qwen35Model":  # a composite: the decoder is the graph to stream
        decoder = _streaming_class(module.Qwen35TextModel)
        return type("StreamingQwen35Model", (base,), {"get_decoder_model_class": lambda self: decoder})
    return _streaming_class(base)


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
    import json

    builder_class = json.loads((hf_folder / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    if not supports_streaming(builder_class):
        raise ExportError(
            f"a streamed export does not support {builder_class}",
            path=hf_folder / "config.json",
            fix="build without --streaming; streamed: " + ", ".join(sorted(STREAMING_BUILDERS)),
        )
    extra = builder_extra_options(options)
    if builder_class == "Qwen3_5ForConditionalGeneration":
        extra.setdefault("exclude_mtp", "true")  # transformers does not load the MTP head's weights either
    partial = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        failure = run_logged(
            log_path,
            f"streamed builder {precision}/{provider} {extra} -> {out_dir.name}",
            lambda: _create_model(hf_folder, partial, precision, provider, cache_dir, extra, builder_class),
        )
        if failure is not None:
            if isinstance(failure, ExportError):
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


def _create_model(
    hf_folder: Path,
    out_dir: Path,
    precision: str,
    provider: str,
    cache_dir: Path,
    options: dict[str, str],
    builder_class: str,
) -> None:
    """``onnxruntime_genai.models.builder.create_model`` for one architecture, with the streaming class."""
    import json

    from onnxruntime_genai.models import builder as genai_builder

    cache_dir.mkdir(parents=True, exist_ok=True)
    pairs = [f"{key}={value}" for key, value in options.items()]
    extra = genai_builder.parse_extra_options(
        None, str(hf_folder), str(out_dir), precision, provider, str(cache_dir), pairs
    )
    effective = extra.pop("_effective_builder_config", None)
    if effective is not None:
        precision = effective.precision
    hf_details = extra.pop("hf_details")
    extra_kwargs = hf_details.pop("extra_kwargs")
    hf_name = hf_details.pop("hf_name")
    config = hf_details.pop("hf_config")
    quant_config = extra.get("_quant_config")
    if quant_config is not None:
        io_dtype, onnx_dtype = quant_config.to_onnx_dtypes()
    else:
        io_dtype = genai_builder.set_io_dtype(precision, provider, extra)
        onnx_dtype = genai_builder.set_onnx_dtype(precision, extra)
    onnx_model = _builder_class(builder_class)(config, io_dtype, onnx_dtype, provider, str(cache_dir), extra)
    if builder_class == "Qwen3_5ForConditionalGeneration" and not onnx_model.exclude_embeds:
        onnx_model.model_type = "qwen3_5_text"
    streamed = getattr(onnx_model, "decoder", onnx_model)
    streamed.streaming_setup(CheckpointReader(hf_folder), out_dir, getattr(config, "quantization_config", None))
    onnx_model.make_model(str(hf_folder))
    onnx_model.save_model(str(out_dir))
    onnx_model.make_genai_config(config, extra_kwargs, str(out_dir))
    runtime_config = effective.runtime_config if effective is not None else extra.get("_runtime_config", {})
    if runtime_config:
        path = out_dir / "genai_config.json"
        genai = genai_builder.apply_runtime_config(json.loads(path.read_text(encoding="utf-8")), runtime_config)
        path.write_text(json.dumps(copy.deepcopy(genai), indent=4), encoding="utf-8")
    onnx_model.save_processing(hf_name, extra_kwargs, str(out_dir))
