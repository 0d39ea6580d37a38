"""Every contact edgekit has with onnxruntime-genai's model builder internals, behind a small typed surface.

The builder (``onnxruntime_genai.models``) is a command line's library, not an API: options parsed into a
dict with private keys, a class per architecture picked in ``create_model``'s branches, the graph made by
methods of one very large class. Those internals change between minor versions, so the supported versions
are pinned (pyproject.toml) and checked here, at run time, before any of them is used. Two ways in:

- ``export_whole_model``: ``parse_extra_options`` and ``create_model``, as the builder's command line calls them,
  with Gemma's embedding scale made exact (``exact_embedding_scale``);
- ``export_streamed``: the architecture's builder class (the registry's ``StreamedBuilder``) subclassed so
  that at each point of its walk over the model a ``StreamHooks`` object (``exporters/streaming.py``) reads
  weights, quantizes MatMuls and spills initializers, seeing the builder only through ``BuilderView``;
  ``PackedLinearRepacker`` is the builder's GPTQ/AWQ repacking, one linear at a time.

The builder's objects are untyped (``Any``); this module gives each value it hands out a type.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from edgekit.errors import ExportError, MissingDependencyError
from edgekit.exporters.builder_calls import MatMulCall, NBitsSettings
from edgekit.sources.registry import StreamedBuilder

if TYPE_CHECKING:
    import onnx_ir as ir

SUPPORTED_VERSIONS = ">=0.18,<0.19"
"""The onnxruntime-genai versions whose builder internals this module is written against (pyproject.toml's)."""
_SUPPORTED = ((0, 18), (0, 19))  # (major, minor): lowest supported, first unsupported
# The builder ships in the CPU wheel and in the CUDA and DirectML ones, each its own distribution.
_DISTRIBUTIONS = ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml")
_INSTALL = f'pip install "onnxruntime-genai{SUPPORTED_VERSIONS}"'
_HOOKS = "_edgekit_stream_hooks"  # the attribute of a streamed builder instance holding its StreamHooks


# -- version and imports ---------------------------------------------------------------------------------


def installed_version() -> str | None:
    """The installed onnxruntime-genai's version, or ``None`` when it is not installed."""
    for distribution in _DISTRIBUTIONS:
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_builder_version() -> None:
    """Refuse, in one line, an onnxruntime-genai outside ``SUPPORTED_VERSIONS`` (or none at all)."""
    version = installed_version()
    if version is None:
        raise MissingDependencyError("onnxruntime-genai is not installed", fix=_INSTALL)
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None or not _SUPPORTED[0] <= (int(match[1]), int(match[2])) < _SUPPORTED[1]:
        raise MissingDependencyError(
            f"onnxruntime-genai {version} is installed, but edgekit's export supports "
            f"onnxruntime-genai{SUPPORTED_VERSIONS} only (it uses builder internals that change between versions)",
            fix=_INSTALL,
        )


def _internal(module: str) -> Any:
    """``onnxruntime_genai.models.<module>``, once the installed version is known to be a supported one."""
    check_builder_version()
    try:
        return importlib.import_module(f"onnxruntime_genai.models.{module}")
    except ImportError as exc:
        raise ExportError(
            f"onnxruntime-genai's model builder cannot be imported ({exc})",
            fix='pip install torch==2.13.0, then pip install ".[export]" in a clone of edgekit',
        ) from None


def require_builder() -> None:
    """Check the version and import the builder, so a missing or unsupported one fails before any work starts."""
    _internal("builder")


# -- the whole-model export ------------------------------------------------------------------------------


def export_whole_model(
    hf_folder: Path, out_dir: Path, *, precision: str, provider: str, cache_dir: Path, options: Mapping[str, str]
) -> None:
    """The builder's own export of ``hf_folder`` to ``out_dir``, as its command line runs it.

    ``options`` are the builder's ``extra_options`` (``KEY=VALUE`` pairs on its command line).
    """
    builder = _internal("builder")
    pairs = [f"{key}={value}" for key, value in options.items()]
    parsed = builder.parse_extra_options(None, str(hf_folder), str(out_dir), precision, provider, str(cache_dir), pairs)
    with exact_embedding_scale(builder):
        builder.create_model(None, str(hf_folder), str(out_dir), precision, provider, str(cache_dir), **parsed)


@contextlib.contextmanager
def exact_embedding_scale(builder: Any) -> Iterator[None]:
    """Gemma's builder scales the embeddings by sqrt(hidden size) rounded to two decimals; transformers by
    the exact root. The two agree only where the root is whole (hidden 64): at Gemma 3 270M's 640 the
    rounding moves the logits past the validation bound. While ``builder`` (the builder module, which
    imports its classes as the top-level ``builders`` package) exports, the scale is the exact root.
    """
    import numpy as np

    gemma = next(cls for cls in builder.Gemma3Model.__mro__ if cls.__name__ == "GemmaModel")
    original = gemma.__init__

    def exact(self: Any, config: Any, *args: Any, **kwargs: Any) -> None:
        original(self, config, *args, **kwargs)
        root = float(np.sqrt(self.hidden_size))
        if self.embed_attrs.get("scale") == np.round(root, decimals=2):  # the builder's rounding, nothing else
            self.embed_attrs["scale"] = root

    gemma.__init__ = exact
    try:
        yield
    finally:
        gemma.__init__ = original


# -- what the streamed export sees of the builder --------------------------------------------------------


class BuilderView:
    """Typed access to one builder instance: the settings and graph-making methods the streamed export uses."""

    def __init__(self, builder: Any) -> None:
        self._builder = builder

    @property
    def model(self) -> ir.Model:
        """The ``onnx_ir`` model the builder is making."""
        model: ir.Model = self._builder.model
        return model

    @property
    def io_dtype(self) -> ir.DataType:
        """The dtype of activations and float weights."""
        dtype: ir.DataType = self._builder.io_dtype
        return dtype

    @property
    def vocab_size(self) -> int:
        """Rows of the embedding table and of the LM head."""
        return int(self._builder.vocab_size)

    @property
    def filename(self) -> str:
        """The ONNX file's name (``model.onnx``); its external data is ``<filename>.data``."""
        return str(self._builder.filename)

    @property
    def quantizes_weights(self) -> bool:
        """Whether the build quantizes weights to int4/int8 (the builder's ``to_nbits`` at save time)."""
        import onnx_ir as ir

        return self._builder.onnx_dtype in {ir.DataType.INT4, ir.DataType.UINT4, ir.DataType.INT8, ir.DataType.UINT8}

    def quantizes_op(self, op_type: str) -> bool:
        """Whether ``op_type`` nodes are among those the builder quantizes."""
        return op_type in self._builder.quant_attrs["op_types_to_quantize"]

    def excluded_from_quantization(self, node_name: str) -> bool:
        """Whether node ``node_name`` stays float (the list grows while the model is made, so it is read now)."""
        return node_name in self._builder.quant_attrs["nodes_to_exclude"]

    def nbits_settings(self) -> NBitsSettings:
        """How the builder quantizes MatMuls: its MatMulNBits attributes and the options around them."""
        attrs = self._builder.quant_attrs
        level = attrs["accuracy_level"]
        return NBitsSettings(
            bits=int(attrs["bits"]),
            block_size=int(attrs["matmul_block_size"]),
            symmetric=bool(attrs["is_symmetric"]),
            accuracy_level=None if level is None else int(level),
            qdq=bool(attrs["use_qdq"]),
            algorithm=str(getattr(self._builder, "quantization_algo", "default")),
            per_node_bits=bool(getattr(self._builder, "int4_customized_weight_config", None)),
        )

    def add_initializer(self, name: str, dtype: ir.DataType, shape: tuple[int, ...], tensor: ir.TensorProtocol) -> None:
        """Register ``tensor`` as initializer ``name`` of the graph, as the builder's ``make_initializer`` does."""
        value: ir.Value = self._builder.make_value(name, dtype, shape)  # the builder tracks its values by name
        value.const_value = tensor
        self.model.graph.register_initializer(value)

    def make_matmul_node(
        self,
        call: MatMulCall,
        op_type: str,
        inputs: list[str],
        out_features: int,
        *,
        node_name: str | None = None,
        domain: str = "",
        **attributes: Any,
    ) -> None:
        """The node and output value the builder's ``make_matmul_float`` makes for ``call``, as ``op_type``."""
        self._builder.make_node(
            op_type, inputs=inputs, outputs=[call.output], name=node_name or call.name, domain=domain, **attributes
        )
        shape = self._builder.make_hidden_state_shape(seq_dim=call.seq_dim, last_dim=out_features)
        self._builder.make_value(call.output, self.io_dtype, shape=shape)

    def stamp_build_metadata(self) -> None:
        """Set the model's ``producer_version`` as the builder's own ``save_model`` does."""
        _internal("builders.base").Model.stamp_build_metadata(self.model)


class StreamHooks(Protocol):
    """What the streamed export does at each point of the builder's walk over the model."""

    def load_weights(self, input_path: str) -> Any:
        """The module tree the builder walks, in place of its ``load_weights`` (the whole model in memory)."""

    def reading(self, module: Any) -> AbstractContextManager[None]:
        """``module``'s weights readable while the builder makes its nodes (a layer, the final norm, the head)."""

    def spill(self) -> None:
        """Called after each part of the model (the embedding, each layer, the final norm, the head) is made."""

    def make_initializer(self, tensor: Any, name: str, to: ir.DataType | None) -> bool:
        """Store ``tensor`` (cast to ``to``) as initializer ``name``, or return ``False`` to leave it to the builder."""

    def make_matmul(self, weight: Any, call: MatMulCall) -> bool:
        """Make the float MatMul ``call`` (or what replaces it), or return ``False`` to leave it to the builder."""

    def save(self, out_dir: str) -> None:
        """Write the ONNX file into ``out_dir``, in place of the builder's ``save_model``."""


# -- the streamed builder classes ------------------------------------------------------------------------


def _hooks(builder: Any) -> StreamHooks:
    hooks: StreamHooks = getattr(builder, _HOOKS)
    return hooks


def _part_methods(base: Any) -> dict[str, Callable[..., Any]]:
    """Overrides of the builder methods that each make one part of the model: read it, make it, spill it."""

    def make_embedding(self: Any, embedding: Any) -> None:
        base.make_embedding(self, embedding)  # the table is read in blocks of rows by make_initializer
        _hooks(self).spill()

    def make_layer(self: Any, layer_id: int, layer: Any) -> None:
        with _hooks(self).reading(layer):
            base.make_layer(self, layer_id, layer)
            _hooks(self).spill()

    def make_layernorm(self: Any, layer_id: int, layernorm: Any, skip: bool, simple: bool, location: str) -> Any:
        if location != "final_norm":  # a layer's norms: read with their layer
            return base.make_layernorm(self, layer_id, layernorm, skip, simple, location)
        with _hooks(self).reading(layernorm):
            result = base.make_layernorm(self, layer_id, layernorm, skip, simple, location)
            _hooks(self).spill()
        return result

    def make_lm_head(self: Any, lm_head: Any) -> None:
        with _hooks(self).reading(lm_head):
            base.make_lm_head(self, lm_head)
            _hooks(self).spill()

    return {method.__name__: method for method in (make_embedding, make_layer, make_layernorm, make_lm_head)}


def _weight_methods(base: Any, nbits_output_aliases: tuple[str, ...]) -> dict[str, Callable[..., Any]]:
    """Overrides of the builder methods that store weights: loading, initializers, MatMuls, saving."""

    def load_weights(self: Any, input_path: str) -> Any:
        return _hooks(self).load_weights(input_path)

    def make_initializer(self: Any, tensor: Any, /, name: str, *, to: Any = None, raw: bool = False) -> None:
        if raw or not _hooks(self).make_initializer(tensor, name, to):
            base.make_initializer(self, tensor, name, to=to, raw=raw)

    def make_matmul_float(self: Any, matmul: Any, name: str, root_input: str, **kwargs: Any) -> str:
        output = "logits" if kwargs.get("logits", False) else f"{name}/output_0"
        call = MatMulCall(name, root_input, output, kwargs.get("seq_dim", "sequence_length"))
        if _hooks(self).make_matmul(matmul.weight, call):
            return name
        return str(base.make_matmul_float(self, matmul, name, root_input, **kwargs))

    def make_matmul_nbits(self: Any, matmul: Any, basename: str, root_input: str, **kwargs: Any) -> str:
        """The builder names a pre-quantized MatMul ``{basename}NBits`` and returns that name, but some of its
        graphs (Qwen3.5's gated delta net) read ``{basename}/output_0`` without looking at the name returned:
        there an Identity makes that output too, which onnxruntime folds away."""
        name = str(base.make_matmul_nbits(self, matmul, basename, root_input, **kwargs))
        if name == basename or not any(alias in basename for alias in nbits_output_aliases):
            return name
        output = f"{basename}/output_0"
        self.make_node("Identity", inputs=[f"{name}/output_0"], outputs=[output], name=f"{basename}/Identity")
        seq_dim = kwargs.get("seq_dim", "sequence_length")
        self.make_value(
            output, self.io_dtype, shape=self.make_hidden_state_shape(seq_dim=seq_dim, last_dim=matmul.out_features)
        )
        return basename

    def save_model(self: Any, out_dir: str) -> None:
        _hooks(self).save(out_dir)

    methods: list[Callable[..., Any]] = [load_weights, make_initializer, make_matmul_float, save_model]
    if nbits_output_aliases:
        methods.append(make_matmul_nbits)
    return {method.__name__: method for method in methods}


def _streamed_subclass(base: Any, nbits_output_aliases: tuple[str, ...]) -> type:
    """``base`` with its walk over the model routed through the instance's ``StreamHooks``."""
    methods = {**_part_methods(base), **_weight_methods(base, nbits_output_aliases)}
    # An override of a method the builder renamed would never be called, and the export would read the whole
    # model after all: refuse instead.
    missing = sorted(name for name in methods if not callable(getattr(base, name, None)))
    if missing:
        raise ExportError(
            f"onnxruntime-genai's {base.__name__} has no {', '.join(missing)}, which the streamed export hooks",
            fix=_INSTALL,
        )
    return type(f"Streaming{base.__name__}", (base,), methods)


def streamed_builder_class(spec: StreamedBuilder) -> type:
    """The builder class ``spec`` names, subclassed for the streamed export (for a composite: its decoder)."""
    module = _internal(f"builders.{spec.module}")
    if spec.decoder_class is None:
        return _streamed_subclass(getattr(module, spec.class_name), spec.nbits_output_aliases)
    decoder = _streamed_subclass(getattr(module, spec.decoder_class), spec.nbits_output_aliases)
    composite = getattr(module, spec.class_name)
    return type(f"Streaming{spec.class_name}", (composite,), {"get_decoder_model_class": lambda self: decoder})


# -- the streamed export ---------------------------------------------------------------------------------


@dataclass
class _ParsedOptions:
    """What ``create_model`` takes out of ``parse_extra_options``'s dict before it makes the builder."""

    config: Any  # the transformers config
    precision: str
    io_dtype: Any
    onnx_dtype: Any
    extra: dict[str, Any]  # the builder's extra_options, private keys removed
    extra_kwargs: Any
    hf_name: str
    effective: Any  # the builder's normalized configuration, when it made one

    def runtime_config(self) -> Mapping[str, Any]:
        """The runtime profile ``create_model`` applies to genai_config.json (read after the build, as it does)."""
        if self.effective is not None:
            runtime: Mapping[str, Any] = self.effective.runtime_config
            return runtime
        return dict(self.extra.get("_runtime_config", {}))


def _parse_options(
    builder: Any,
    hf_folder: Path,
    out_dir: Path,
    precision: str,
    provider: str,
    cache_dir: Path,
    options: Mapping[str, str],
) -> _ParsedOptions:
    """``parse_extra_options`` and the first steps of ``create_model``, which a streamed export repeats."""
    pairs = [f"{key}={value}" for key, value in options.items()]
    extra = builder.parse_extra_options(None, str(hf_folder), str(out_dir), precision, provider, str(cache_dir), pairs)
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
        io_dtype = builder.set_io_dtype(precision, provider, extra)
        onnx_dtype = builder.set_onnx_dtype(precision, extra)
    return _ParsedOptions(config, precision, io_dtype, onnx_dtype, extra, extra_kwargs, hf_name, effective)


def export_streamed(
    hf_folder: Path,
    out_dir: Path,
    *,
    precision: str,
    provider: str,
    cache_dir: Path,
    options: Mapping[str, str],
    spec: StreamedBuilder,
    make_hooks: Callable[[BuilderView, Mapping[str, Any] | None], StreamHooks],
) -> None:
    """The builder's ``create_model`` for one architecture, with its streamed class.

    ``make_hooks(view, quantization)`` makes the hooks of the streamed graph from a view of its builder and
    the checkpoint's ``quantization_config`` (``None`` for a float checkpoint).
    """
    builder = _internal("builder")
    cache_dir.mkdir(parents=True, exist_ok=True)
    parsed = _parse_options(builder, hf_folder, out_dir, precision, provider, cache_dir, options)
    model_class = streamed_builder_class(spec)
    onnx_model = model_class(parsed.config, parsed.io_dtype, parsed.onnx_dtype, provider, str(cache_dir), parsed.extra)
    if spec.text_model_type is not None and not onnx_model.exclude_embeds:
        onnx_model.model_type = spec.text_model_type
    streamed = onnx_model.decoder if spec.decoder_class is not None else onnx_model
    quantization = getattr(parsed.config, "quantization_config", None)
    setattr(streamed, _HOOKS, make_hooks(BuilderView(streamed), quantization))
    onnx_model.make_model(str(hf_folder))
    onnx_model.save_model(str(out_dir))
    onnx_model.make_genai_config(parsed.config, parsed.extra_kwargs, str(out_dir))
    runtime_config = parsed.runtime_config()
    if runtime_config:
        path = out_dir / "genai_config.json"
        genai = builder.apply_runtime_config(json.loads(path.read_text(encoding="utf-8")), runtime_config)
        path.write_text(json.dumps(copy.deepcopy(genai), indent=4), encoding="utf-8")
    onnx_model.save_processing(parsed.hf_name, parsed.extra_kwargs, str(out_dir))


# -- pre-quantized checkpoints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedLinear:
    """One linear's packed tensors, described by the builder's loader (before repacking)."""

    module: Any  # the loaders' QuantizedTensorModule
    in_features: int
    out_features: int


class PackedLinearRepacker:
    """The builder's GPTQ/AWQ loaders' repacking for MatMulNBits, applied to one linear at a time.

    The loaders (``GPTQModel``, ``AWQModel``) read and repack a whole checkpoint in their constructors; only
    their per-module methods are used here, on loader objects made without that constructor (``__new__``):
    those methods need no state beyond ``quant_type``. The repacked tensors are set on the meta module as
    the builder's quantized modules carry them, so its ``make_matmul_nbits`` makes the same nodes from them.
    """

    METHODS = ("gptq", "awq")
    ATTRIBUTES = ("qweight", "scales", "qzeros", "g_idx", "bits", "group_size")

    def __init__(self, method: str) -> None:
        if method not in self.METHODS:
            raise ValueError(f"no repacking for '{method}' checkpoints")
        loaders = _internal(f"loaders.{method}")
        loader_class = loaders.GPTQModel if method == "gptq" else loaders.AWQModel
        self._loader = loader_class.__new__(loader_class)
        self._loader.quant_type = method
        self._module_class = _internal("loaders.base").QuantizedTensorModule

    def describe(self, tensors: Mapping[str, Any], bits: int, group_size: int) -> PackedLinear:
        """The packed ``tensors`` (``qweight``, ``scales``, and ``qzeros``/``g_idx`` where present) of one linear."""
        module = self._module_class()
        for part, tensor in tensors.items():
            setattr(module, part, tensor)
        module.bits = bits
        module.group_size = group_size
        self._loader.set_quantized_tensor_properties(module)
        return PackedLinear(module, int(module.in_features), int(module.out_features))

    def repack_onto(self, packed: PackedLinear, linear: Any, *, keep_g_idx: bool) -> None:
        """Repack ``packed`` for MatMulNBits and set it on the (meta) module ``linear``."""
        self._loader.repack_quantized_tensor(packed.module, clear_g_idx=not keep_g_idx)
        for attribute in self.ATTRIBUTES:
            object.__setattr__(linear, attribute, getattr(packed.module, attribute))

    @classmethod
    def remove_from(cls, linear: Any) -> None:
        """Drop what ``repack_onto`` set, so ``linear`` is the meta module it was."""
        for attribute in cls.ATTRIBUTES:
            linear.__dict__.pop(attribute, None)
