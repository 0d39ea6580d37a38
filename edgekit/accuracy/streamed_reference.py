"""The evaluation reference of a streamed build: the checkpoint run in PyTorch one decoder layer at a time.

A streamed build has no fp32 ONNX reference (36 GB for a 9B model). Its variants are scored against the
checkpoint itself instead, computed in float32 in memory that does not grow with the model:

1. the model is built on the ``meta`` device (rotary buffers computed for real) and one stand-in per
   decoder layer records the keyword arguments (position embeddings, masks) each layer gets for each
   batch size, from a forward pass over zeros: they depend only on the batch shape, since windows are
   unpadded and start at position 0 (the capture GPTQ uses, ``edgekit/quant/gptq.py``);
2. the embedding rows of the windows' tokens are read from disk (not the whole table) and run through the
   model's own embedding module, giving layer 0's input [windows, ctx, hidden];
3. each decoder layer is read from the safetensors shards in float32, run over every window (a few at a
   time), written over its input, and dropped: memory holds one layer's weights and one activation
   tensor;
4. the final norm gives the hidden states of the scored positions, which is what the evaluation cache
   stores; the reference logits are ``hidden @ W_head`` with the LM head (the embedding when tied) read
   from the checkpoint in blocks of rows, so a 248k-row head never exists in float32 as a whole.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgekit.accuracy.metrics import log_softmax
from edgekit.accuracy.protocol import EvalProtocol, read_cached_hidden, reference_cache_path, write_cached_hidden
from edgekit.errors import UsageError
from edgekit.package.manifest import sha256_file
from edgekit.package.staging import scratch_folder
from edgekit.sources.lazy_weights import CheckpointReader
from edgekit.sources.meta_model import (
    LazyModel,
    build_meta_model,
    capture_layer_arguments,
    decoder_layers,
    return_freed_memory,
)

Progress = Callable[[str], None]

DEFAULT_BATCH_WINDOWS = 4
# Float32 bytes of one block of LM-head rows: 64 MiB is 4,096 rows of a 4,096-wide head.
_HEAD_BLOCK_BYTES = 64 << 20


class StreamedModel:
    """A causal LM of a safetensors checkpoint, built without weights and run one layer at a time."""

    def __init__(self, hf_folder: Path) -> None:
        self.folder = Path(hf_folder)
        self.model = build_meta_model(self.folder)
        self.weights = CheckpointReader(self.folder)
        self.lazy = LazyModel(self.model, self.weights)
        self.layers = decoder_layers(self.model)
        self.norm = _final_norm(self.model, self.layers)
        names = {id(module): name for name, module in self.model.named_modules()}
        self.embedding = self.model.get_input_embeddings()
        self.embedding_name = f"{names[id(self.embedding)]}.weight"
        head = self.model.get_output_embeddings()
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False)) or head is None
        self.head_name = self.embedding_name if tied else f"{names[id(head)]}.weight"

    @property
    def weight_dtype(self) -> str:
        """The stored dtype of the decoder layers' weights (``bfloat16`` for most published checkpoints)."""
        first = next(iter(self.layers[0].named_parameters()))[0]
        prefix = next(name for name, module in self.model.named_modules() if module is self.layers[0])
        return _DTYPE_NAMES.get(self.weights.location(f"{prefix}.{first}").dtype, "float32")

    def final_hidden_states(
        self,
        windows: np.ndarray,
        start: int,
        stop: int,
        *,
        batch_windows: int = DEFAULT_BATCH_WINDOWS,
        progress: Progress | None = None,
    ) -> np.ndarray:
        """Final-norm hidden states [windows, stop - start, hidden] (float32) of positions ``start:stop``.

        ``windows`` is [windows, ctx] int64 token ids; every window runs from position 0 with no padding.
        """
        if windows.ndim != 2 or batch_windows < 1:
            raise ValueError("windows must be [windows, ctx] token ids and batch_windows positive")
        say = progress or (lambda _message: None)
        count, ctx = windows.shape
        batches = [(b, min(count, b + batch_windows)) for b in range(0, count, batch_windows)]
        with torch.no_grad():
            kwargs = self._layer_kwargs(ctx, {stop_ - start_ for start_, stop_ in batches})
            hidden = self._embed(windows)
            for index, layer in enumerate(self.layers):
                say(f"reference layer {index + 1}/{len(self.layers)}")
                with self._loaded(layer):
                    for first, last in batches:
                        output = layer(hidden[first:last], **kwargs[index][last - first])
                        hidden[first:last] = output[0] if isinstance(output, tuple) else output
                return_freed_memory()  # RSS stays flat, as in GPTQ
            with self._loaded(self.norm):
                scored = self.norm(hidden[:, start:stop])
        return np.ascontiguousarray(scored.numpy(), dtype=np.float32)

    def head_logits(self, hidden: np.ndarray) -> np.ndarray:
        """Logits [positions, vocab] (float32) of ``hidden`` [positions, hidden], the head read in row blocks."""
        vocab, width = self.weights.location(self.head_name).shape
        rows = max(1, _HEAD_BLOCK_BYTES // (4 * width))
        states = torch.from_numpy(np.ascontiguousarray(hidden, dtype=np.float32))
        logits = torch.empty(states.shape[0], vocab, dtype=torch.float32)
        with torch.no_grad():
            for first in range(0, vocab, rows):
                last = min(vocab, first + rows)
                block = self.weights.rows(self.head_name, first, last).to(torch.float32)
                torch.matmul(states, block.t(), out=logits[:, first:last])
        return logits.numpy()

    def _layer_kwargs(self, ctx: int, batch_sizes: set[int]) -> list[dict[int, dict[str, Any]]]:
        """Every layer's keyword arguments for each batch size, from a forward pass over zeros."""
        width = self.weights.location(self.embedding_name).shape[1]
        calls = ({"inputs_embeds": torch.zeros(batch, ctx, width)} for batch in sorted(batch_sizes))
        return capture_layer_arguments(self.model, self.layers, calls)[1]

    def _embed(self, windows: np.ndarray) -> torch.Tensor:
        """Layer 0's input [windows, ctx, hidden]: only the rows of tokens that occur are read from disk."""
        rows, ids = self.lazy.embedding_rows(torch.from_numpy(windows.astype(np.int64)))
        meta = self.embedding.weight
        # The model's own embedding module runs (a scaled embedding scales), over a table of just these rows.
        self.embedding.weight = nn.Parameter(rows, requires_grad=False)
        try:
            return self.embedding(ids).to(torch.float32).contiguous()
        finally:
            self.embedding.weight = meta

    @contextlib.contextmanager
    def _loaded(self, module: nn.Module) -> Iterator[None]:
        self.lazy.load(module)
        try:
            yield
        finally:
            self.lazy.release(module)


_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def _final_norm(model: nn.Module, layers: nn.ModuleList) -> nn.Module:
    """The norm after the last decoder layer (``norm`` beside ``layers`` in the text model)."""
    for module in model.modules():
        norm = getattr(module, "norm", None)
        if getattr(module, "layers", None) is layers and isinstance(norm, nn.Module):
            return norm
    raise ValueError(f"cannot find the final norm of {type(model).__name__} beside its decoder layers")


class StreamedReference:
    """The evaluation reference computed from a checkpoint layer by layer; cached like the fp32 ONNX one.

    The cache key is the protocol and the sha256 of the source weights the manifest records, so a cache
    made during the build is reused by ``edgekit eval`` with the same checkpoint.
    """

    cacheable = True

    def __init__(
        self,
        root: Path,
        hf_folder: Path,
        windows: np.ndarray,
        protocol: EvalProtocol,
        manifest: dict[str, Any],
        *,
        checked: str,
        batch_windows: int = DEFAULT_BATCH_WINDOWS,
    ) -> None:
        self.model = StreamedModel(hf_folder)
        self.windows = windows
        self.start, self.stop = protocol.ctx // 2, protocol.ctx - 1
        self.batch_windows = batch_windows
        self.checked = checked
        weights = sorted(entry["sha256"] for entry in manifest.get("source", {}).get("weights", []))
        self.cache_path = reference_cache_path(
            root, {"protocol": protocol.as_dict(), "reference": "pytorch-streamed", "weights": weights}
        )
        self.hidden = read_cached_hidden(self.cache_path, len(windows), self.stop - self.start)
        self.cache_hit = self.hidden is not None

    def compute(self, progress: Progress) -> None:
        """Run the checkpoint over every window, one decoder layer at a time (nothing on a cache hit)."""
        if self.hidden is None:
            self.hidden = self.model.final_hidden_states(
                self.windows, self.start, self.stop, batch_windows=self.batch_windows, progress=progress
            )

    def logprobs(self, index: int) -> np.ndarray:
        """Log-probabilities [scored, vocab] of window ``index``: ``hidden @ W_head``, the head read in blocks."""
        if self.hidden is None:
            raise RuntimeError("compute() the streamed reference before scoring against it")
        return log_softmax(self.model.head_logits(self.hidden[index]))

    def save(self, eval_dir: Path) -> None:
        """Write the cache file, replacing caches of other texts, protocols or references."""
        if self.hidden is not None and not self.cache_hit:
            write_cached_hidden(eval_dir / self.cache_path.name, self.hidden)

    def describe(self) -> dict[str, Any]:
        """What the reference is, for the report."""
        dtype = self.model.weight_dtype
        weights = f"{dtype} weights" if dtype == "float32" else f"{dtype} weights computed in fp32"
        return {
            "kind": "pytorch-streamed",
            "description": f"streamed PyTorch from the checkpoint ({weights}, one decoder layer at a time)",
            "layers": len(self.model.layers),
            "checkpoint": self.checked,
        }


@contextlib.contextmanager
def open_streamed_reference(
    root: Path,
    checkpoint: Path,
    windows: np.ndarray,
    protocol: EvalProtocol,
    manifest: dict[str, Any],
    *,
    verify: bool = True,
    batch_windows: int = DEFAULT_BATCH_WINDOWS,
) -> Iterator[StreamedReference]:
    """The streamed reference of package ``root`` from ``checkpoint``, the folder it was built from.

    The folder is checked as a build source is and staged the same way (the builder's config.json, links
    to the rest), so the model is the one the package was exported from. With ``verify``, its weight
    files must have the sha256 the manifest records for the build's source (the build itself, handing
    over the folder it just hashed, passes False).
    """
    from edgekit.sources.checkpoint import check_folder, stage_folder

    checked = check_folder(checkpoint)
    if checked.quantization is not None:
        raise UsageError(
            f"is a {checked.quantization} checkpoint, which the streamed reference cannot run",
            path=checkpoint,
            fix="pass the unquantized checkpoint the package was built from",
        )
    if not verify:
        how = "the build's own source"
    elif _weights_match(checkpoint, checked.weight_files, manifest):
        how = "sha256 of its weight files matches the manifest's source"
    else:
        how = "not verified: the package was not built from safetensors"
    with scratch_folder(root) as work:
        staged = stage_folder(checked, work / "staged", packaged=False)
        yield StreamedReference(root, staged, windows, protocol, manifest, checked=how, batch_windows=batch_windows)


def _weights_match(checkpoint: Path, weight_files: list[Path], manifest: dict[str, Any]) -> bool:
    """True when the folder's weight files hash to the manifest's source weights; an error when they differ.

    False (not checked) when the package was built from something else than safetensors (a GGUF file).
    """
    recorded = manifest.get("source", {}).get("weights", [])
    if not recorded or not all(str(entry["name"]).endswith(".safetensors") for entry in recorded):
        return False
    expected = sorted(str(entry["sha256"]) for entry in recorded)
    if sorted(sha256_file(path, UsageError) for path in weight_files) != expected:
        raise UsageError(
            f"its weight files are not the ones the package was built from ({manifest['source'].get('location')})",
            path=checkpoint,
            fix="pass the checkpoint folder the package was built from",
        )
    return True
