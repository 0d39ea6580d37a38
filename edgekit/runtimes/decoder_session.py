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

from edgekit.errors import PackageError

_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


class DecoderSession:
    """The decoder of one onnxruntime-genai model folder, run on the CPU."""

    def __init__(self, model_dir: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.model_dir = Path(model_dir)
        config = json.loads((self.model_dir / "genai_config.json").read_text(encoding="utf-8"))
        self.genai = config["model"]
        self.decoder = self.genai["decoder"]
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        path = self.model_dir / self.decoder["filename"]
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's Fail/InvalidGraph on a model that passed edgekit's checks
            detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise PackageError(
                f"onnxruntime cannot load this model ({detail})", path=path, fix="rebuild the package"
            ) from None

    @property
    def context_length(self) -> int:
        """The longest sequence the model was exported for."""
        return int(self.genai.get("context_length") or 2048)

    @property
    def output_names(self) -> list[str]:
        """Names of the decoder's outputs (``logits``, presents, optionally ``hidden_states``)."""
        return [output.name for output in self.session.get_outputs()]

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Logits [1, S, vocab] for ``input_ids`` [1, S], starting from an empty cache."""
        return self.run(input_ids, ["logits"])[0]

    def run(self, input_ids: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """The named outputs (float32) for ``input_ids`` [1, S], starting from an empty cache."""
        seq = input_ids.shape[1]
        feed: dict[str, np.ndarray] = {}
        for spec in self.session.get_inputs():
            if spec.name == "input_ids":
                feed[spec.name] = input_ids.astype(np.int64)
            elif spec.name == "attention_mask":
                feed[spec.name] = np.ones((1, seq), dtype=np.int64)
            elif spec.name == "position_ids":
                positions = np.arange(seq, dtype=np.int64)
                # Multimodal-rope decoders (Qwen3.5) take [3, batch, seq]: one row per rope section.
                feed[spec.name] = positions[None, :] if len(spec.shape) == 2 else np.tile(positions, (3, 1, 1))
            else:
                feed[spec.name] = self._empty_state(spec)
        return [np.asarray(value, dtype=np.float32) for value in self.session.run(outputs, feed)]

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
