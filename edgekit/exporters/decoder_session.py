"""A plain onnxruntime session over a variant's decoder, for scoring whole windows of tokens.

Generation goes through onnxruntime-genai; scoring (validation, evaluation) needs the logits of every
position of a window at once, so it runs the same ``model.onnx`` (same graph, same MatMulNBits
accuracy level as the runtime) in one onnxruntime call per window with an empty cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import PackageError, first_line

_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def _every_position(path: Path, options: Any) -> str | bytes:
    """What to load: the graph file, or the graph with its head over every position again (``last_position``)."""
    import onnx

    from edgekit.exporters.last_position import restore_all_positions

    model = onnx.load(str(path), load_external_data=False)
    if not restore_all_positions(model):
        return str(path)
    # Loaded from bytes, the graph's external weights are found through this entry instead of its path.
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
    return model.SerializeToString()


def context_length(model_dir: Path) -> int:
    """The longest sequence a model folder was exported for, from its genai_config.json (no session started)."""
    return _context_length(json.loads((Path(model_dir) / "genai_config.json").read_text(encoding="utf-8"))["model"])


class DecoderSession:
    """The decoder of one onnxruntime-genai model folder, run on the CPU."""

    def __init__(self, model_dir: Path, threads: int | None = None, graph: Path | None = None) -> None:
        """Load ``model_dir``'s decoder (or ``graph``, another graph over the same folder's weights)."""
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        config = json.loads((self.model_dir / "genai_config.json").read_text(encoding="utf-8"))
        self.genai = config["model"]
        self.decoder = self.genai["decoder"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        path = graph or self.model_dir / self.decoder["filename"]
        try:
            self.session = ort.InferenceSession(
                _every_position(path, options), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime's Fail/InvalidGraph on a model that passed edgekit's checks
            raise PackageError(
                f"onnxruntime cannot load this model ({first_line(exc)})", path=path, fix="rebuild the package"
            ) from None
        # Rows of position_ids: 0 for [batch, seq], 3 for a multimodal-rope graph's [3, batch, seq].
        self.position_rows = self._position_rows(path)

    @property
    def context_length(self) -> int:
        """The longest sequence the model was exported for."""
        return _context_length(self.genai)

    @property
    def output_names(self) -> list[str]:
        """Names of the decoder's outputs (``logits``, presents, optionally ``hidden_states``)."""
        return [output.name for output in self.session.get_outputs()]

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits [1, S, vocab] for ``input_ids`` [1, S], starting from an empty cache."""
        return self.run(input_ids, ["logits"])[0]

    def run(
        self, input_ids: np.ndarray, outputs: list[str], extra: dict[str, np.ndarray] | None = None
    ) -> list[np.ndarray]:
        """The named outputs (float32) for ``input_ids`` [1, S], starting from an empty cache.

        ``extra``: more inputs to feed (a graph's overridable initializers).
        """
        seq = input_ids.shape[1]
        feed: dict[str, np.ndarray] = {}
        for spec in self.session.get_inputs():
            if spec.name == "input_ids":
                feed[spec.name] = input_ids.astype(np.int64)
            elif spec.name == "attention_mask":
                feed[spec.name] = np.ones((1, seq), dtype=np.int64)
            elif spec.name == "position_ids":
                positions = np.arange(seq, dtype=np.int64)[None, :]
                # Text alone: every section of a multimodal rope reads the same position.
                feed[spec.name] = np.tile(positions, (self.position_rows, 1, 1)) if self.position_rows else positions
            elif extra is None or spec.name not in extra:
                feed[spec.name] = self._empty_state(spec)
        feed.update(extra or {})
        try:
            values = self.session.run(outputs, feed)
        except Exception as exc:  # onnxruntime's RuntimeException/InvalidArgument from a kernel, one line of it
            raise PackageError(
                f"onnxruntime cannot run this model on {seq} tokens ({first_line(exc)})",
                path=self.model_dir,
                fix="rebuild the package; if the build made it, report it with the build log",
            ) from None
        return [np.asarray(value, dtype=np.float32) for value in values]

    def _position_rows(self, path: Path) -> int:
        """How ``position_ids`` is laid out, from the graph: its declared shape, checked against its readers.

        The builder declares Qwen3.5's ``position_ids`` [3, batch, seq] whatever the config; only with an
        ``mrope_section`` does it read them with a multimodal rope. Without one, a plain ``RotaryEmbedding``
        (at most 2-D positions) reads the 3-D input and no feed can run the graph, in onnxruntime-genai either,
        so that export is refused here by name rather than by a kernel's error mid-run.
        """
        spec = next((s for s in self.session.get_inputs() if s.name == "position_ids"), None)
        if spec is None or len(spec.shape) <= 2:
            return 0
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        plain = [node.name for node in graph.node if node.op_type == "RotaryEmbedding" and spec.name in node.input]
        if plain:
            raise PackageError(
                f"the graph declares position_ids {spec.shape} (multimodal rope) but feeds them to a plain "
                f"RotaryEmbedding ({plain[0]}), which takes at most 2-D positions: the builder was given "
                "rope_parameters without an mrope_section (transformers' default for Qwen3.5 is [11, 11, 10])",
                path=self.model_dir,
                fix="add that mrope_section to the checkpoint's rope_parameters and rebuild",
            )
        rows = spec.shape[0]
        return rows if isinstance(rows, int) else 3

    def _empty_state(self, spec: Any) -> np.ndarray:
        """A zero-length cache (or zeroed recurrent state) for one past-state input."""
        dims = []
        for dim in spec.shape:
            if isinstance(dim, int):
                dims.append(dim)
            elif "batch" in dim:
                dims.append(1)
            elif dim == "past_sliding_length":
                # A sliding-window cache has a fixed capacity; its valid length comes from attention_mask.
                dims.append(int((self.decoder.get("sliding_window") or {}).get("window_size", 0)))
            elif "sequence" in dim or "past" in dim:
                dims.append(0)
            elif dim in ("kv_cache_dim", "head_size"):
                dims.append(int(self.decoder["head_size"]))
            else:
                raise ValueError(f"cannot size input '{spec.name}': unknown dimension '{dim}'")
        return np.zeros(dims, dtype=_DTYPES[spec.type])


def _context_length(genai_model: dict[str, Any]) -> int:
    return int(genai_model.get("context_length") or 2048)
