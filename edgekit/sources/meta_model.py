"""A transformers model whose weights stay on disk until a layer-by-layer pass reaches them.

The one place edgekit builds a model on the meta device and captures what its decoder layers are called
with; GPTQ (``quant/gptq_layers.py``) and the streamed reference (``accuracy/streamed_reference.py``) both
run through it. The model is built with its parameters on the meta device (buffers such as rotary
frequencies are computed for real); only the embedding rows the tokens use are read (a 248k-row table
is 4 GB in float32, the rows a calibration set uses a few MB), and each decoder layer is read from the
safetensors shards (``CheckpointReader``) just before it runs and released after. Peak memory is then
one layer's weights plus the activations, not the whole float32 model.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from edgekit.sources.lazy_weights import CheckpointReader

_NEVER_RUN = ("visual.", "vision_tower.", "mtp.")


class LazyModel:
    """A causal LM built without weights, and the checkpoint its weights are read from on demand."""

    def __init__(self, model: nn.Module, weights: CheckpointReader) -> None:
        self.model = model
        self.weights = weights
        self._names = {id(module): name for name, module in model.named_modules()}

    def load(self, module: nn.Module) -> None:
        """Read ``module``'s parameters (float32) from the checkpoint."""
        prefix = self._names[id(module)]
        for name, _ in list(module.named_parameters()):
            owner, attribute = _split(module, name)
            tensor = self.weights.tensor(f"{prefix}.{name}").to(torch.float32)
            setattr(owner, attribute, nn.Parameter(tensor, requires_grad=False))

    def embedding_rows(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The input-embedding rows that ``token_ids`` use (in id order, float32), and the ids renumbered into them.

        Only those rows are read from disk, one read per run of consecutive ids.
        """
        embedding = cast(nn.Embedding, cast(Any, self.model).get_input_embeddings())
        key = f"{self._names[id(embedding)]}.weight"
        used, renumbered = torch.unique(token_ids, sorted=True, return_inverse=True)
        ids = used.tolist()
        blocks: list[torch.Tensor] = []
        start = 0
        for end in range(1, len(ids) + 1):
            if end == len(ids) or ids[end] != ids[end - 1] + 1:
                blocks.append(self.weights.rows(key, ids[start], ids[end - 1] + 1).to(torch.float32))
                start = end
        table = torch.cat(blocks) if blocks else torch.empty(0, embedding.embedding_dim)
        return table, renumbered.reshape(token_ids.shape)

    def load_embedding_rows(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Make the input embedding a table of only the rows ``token_ids`` use; return the ids renumbered into it.

        The model then computes exactly what it would with the whole table when fed the renumbered ids,
        since calibration windows are plain text (no id is looked up for anything but its embedding row).
        """
        table, renumbered = self.embedding_rows(token_ids)
        cast(Any, self.model).get_input_embeddings().weight = nn.Parameter(table, requires_grad=False)
        return renumbered

    def release(self, module: nn.Module) -> None:
        """Drop ``module``'s parameters (back to the meta device)."""
        module.to("meta")


def build_meta_model(hf_folder: Path) -> Any:
    """The model of ``hf_folder`` (its config's class, sdpa attention) with its parameters on the meta device."""
    import transformers
    from accelerate import init_empty_weights

    model_config = json.loads((hf_folder / "config.json").read_text(encoding="utf-8"))
    config = transformers.AutoConfig.from_pretrained(str(hf_folder), trust_remote_code=False)
    config._attn_implementation = "sdpa"
    loader = getattr(transformers, model_config["architectures"][0])
    with init_empty_weights(include_buffers=False):
        model = loader(config)
    return model.eval()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (``model.model.layers``; Qwen3.5's text model too).

    Raises ``ValueError`` naming the model class when the layout is not one edgekit knows.
    """
    inner = getattr(model, "model", None)
    for holder in (inner, getattr(inner, "language_model", None)):
        layers = getattr(holder, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: edgekit supports models whose layers are "
        "model.model.layers (llama, mistral, qwen2, qwen3, phi3, gemma3) or model.model.language_model.layers"
    )


class StopForward(Exception):
    """Raised by a stand-in to end a forward pass early (once the wanted arguments are recorded)."""


class _StandIn(nn.Module):
    """Stands in for decoder layer ``index`` while capturing: records its keyword arguments, passes through.

    Keyword arguments (masks, position embeddings) depend only on the batch shape, since the windows are
    unpadded and start at position 0, so they are kept once per (layer, batch size); hybrid and
    sliding-window models (Qwen3.5, Gemma3) give their layers different masks, hence one record per layer.
    With ``keep_inputs``, layer 0's stand-in also keeps each batch's hidden states and ends the pass as
    soon as every layer's arguments for that batch size are known.
    """

    def __init__(self, index: int, last: bool, state: dict[str, Any], keep_inputs: bool) -> None:
        super().__init__()
        self.index, self.last, self.state, self.keep_inputs = index, last, state, keep_inputs

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise ValueError("edgekit expects decoder layers to get everything but hidden_states as keywords")
        batch = hidden_states.shape[0]
        if self.index == 0 and self.keep_inputs:
            self.state["inputs"].append(hidden_states.detach())
            if all(batch in per_layer for per_layer in self.state["kwargs"]):
                raise StopForward
        self.state["kwargs"][self.index].setdefault(batch, kwargs)
        if self.last:
            raise StopForward
        return hidden_states


def capture_layer_arguments(
    model: nn.Module, layers: nn.ModuleList, calls: Iterable[dict[str, Any]], *, keep_inputs: bool = False
) -> tuple[list[torch.Tensor], list[dict[int, dict[str, Any]]]]:
    """Run ``model(**call, use_cache=False)`` for each call with stand-ins for its decoder layers.

    Returns layer 0's inputs per call (with ``keep_inputs``) and every layer's keyword arguments per batch
    size. The layers are put back whatever happens.
    """
    state: dict[str, Any] = {"inputs": [], "kwargs": [{} for _ in layers]}
    originals = list(layers)
    for index in range(len(layers)):
        layers[index] = _StandIn(index, index == len(layers) - 1, state, keep_inputs)
    try:
        for call in calls:
            with contextlib.suppress(StopForward):
                model(**call, use_cache=False)
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer
    return state["inputs"], state["kwargs"]


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc only; elsewhere nothing to do).

    Each layer of a layer-by-layer pass frees tens of MB in blocks below glibc's dynamic mmap threshold;
    left in the heap they fragment and the process grows by about that much per layer. Lowering the mmap
    threshold instead also keeps it flat, but every activation then becomes a fresh mapping, and the page
    faults cost more time than the trim.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def open_lazily(hf_folder: Path) -> LazyModel | None:
    """The model in ``hf_folder`` with its decoder layers and embeddings left on disk.

    Returns ``None`` when the checkpoint's tensor names are not the model's parameter names (a layout
    transformers renames on load): the caller then loads the whole model the ordinary way. Before the
    capture, read the calibration tokens' embedding rows (``load_embedding_rows``); release them after.
    """
    model = build_meta_model(hf_folder)
    weights = CheckpointReader(hf_folder)
    head = model.get_output_embeddings()
    head_params = {id(p) for p in head.parameters()} if head is not None else set()
    input_params = {id(p) for p in model.get_input_embeddings().parameters()}
    # The LM head never runs during GPTQ (the capture stops at the last layer); a tied head is the embedding.
    needed = [name for name, p in model.named_parameters() if id(p) not in head_params or id(p) in input_params]
    if any(name not in weights for name in needed):
        return None
    lazy = LazyModel(model, weights)
    layers = {id(p) for p in decoder_layers(model).parameters()}
    for name, parameter in model.named_parameters():
        # Final norms and other small non-layer parameters: read now, they are tiny.
        if id(parameter) in layers or id(parameter) in head_params or id(parameter) in input_params:
            continue
        if name.startswith(_NEVER_RUN) or any(f".{part}" in name for part in _NEVER_RUN):
            continue  # a vision tower or MTP head: not on the text path GPTQ runs, left on the meta device
        if parameter.device.type == "meta":
            owner, attribute = _split(model, name)
            setattr(owner, attribute, nn.Parameter(weights.tensor(name).to(torch.float32), requires_grad=False))
    return lazy


def _split(root: nn.Module, name: str) -> tuple[Any, str]:
    """The module that owns parameter ``name`` (dotted, relative to ``root``) and the attribute name."""
    path, _, attribute = name.rpartition(".")
    return (root.get_submodule(path) if path else root), attribute
