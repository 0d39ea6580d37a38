"""One onnxruntime session over the fp32 export that can swap any linear's weight per run.

Sensitivity is measured with real forward passes: the fp32 graph, every linear's weight declared also as a
graph input (an "overridable initializer"), so a run can feed a quantized-then-dequantized copy of a few
weights while the rest stay fp32, without building a new session. The same session reports the activations
each linear multiplies, for the per-column importance (mean square, the diagonal of XᵀX / tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgekit.errors import ExportError, PackageError
from edgekit.exporters.decoder_session import DecoderSession
from edgekit.quant.graph_rewrite import Linear

_PROBE_GRAPH = "model.probe.onnx"


@dataclass
class CalibrationReference:
    """What the fp32 model does on the calibration windows: scored log-probs and the linears' input statistics."""

    logprobs: list[np.ndarray]
    """Per window, [scored positions, vocab] float32."""
    importance: dict[str, np.ndarray] = field(default_factory=dict)
    """Activation name -> mean square per input column, over every position of every window."""
    hessians: dict[str, np.ndarray] = field(default_factory=dict)
    """Activation name -> XᵀX / tokens [K, K] float32, for the activations a GPTQ format reads."""


def log_softmax32(logits: np.ndarray) -> np.ndarray:
    """Log-softmax over the last axis in float32 with torch's threads: the calibration loop scores a few
    thousand positions per probe, where ``accuracy.metrics``' float64 numpy took most of the time."""
    import torch

    return torch.log_softmax(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), -1).numpy()


def kl_divergence32(reference_logprobs: np.ndarray, variant_logprobs: np.ndarray) -> np.ndarray:
    """KL(reference || variant) per position, like ``accuracy.metrics.kl_divergence``, summed in float32."""
    import torch

    reference = torch.from_numpy(np.ascontiguousarray(reference_logprobs, dtype=np.float32))
    variant = torch.from_numpy(np.ascontiguousarray(variant_logprobs, dtype=np.float32))
    return (reference.exp() * (reference - variant)).sum(-1).double().numpy()


class ProbeSession:
    """The fp32 decoder with overridable linear weights; ``run`` scores a window, ``kl`` a set of replacements."""

    def __init__(self, model_dir: Path, linears: list[Linear], threads: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.linears = linears
        self.activations = sorted({lin.activation for lin in linears if lin.activation is not None})
        graph_path = self._write_probe_graph()
        try:
            self.decoder = DecoderSession(self.model_dir, threads, graph=graph_path)
        except PackageError as exc:
            raise ExportError(f"the fp32 export cannot run for calibration ({exc.problem})", path=model_dir) from None
        finally:
            graph_path.unlink(missing_ok=True)

    def run(self, ids: np.ndarray, overrides: dict[str, np.ndarray], activations: bool = False) -> list[np.ndarray]:
        """Logits [seq, vocab] (and, with ``activations``, every linear's input) for one window ``ids`` [seq]."""
        names = ["logits", *self.activations] if activations else ["logits"]
        values = self.decoder.run(ids[None], names, overrides)
        return [values[0][0], *values[1:]]

    def reference(
        self,
        windows: np.ndarray,
        scored: slice,
        importance: bool = True,
        keep: int | None = None,
        hessians: frozenset[str] = frozenset(),
    ) -> CalibrationReference:
        """Scored log-probs of the fp32 model (of the first ``keep`` windows; all by default) and, with
        ``importance``, the mean square of every linear's input columns over all of them; the full XᵀX of
        the activations named in ``hessians``."""
        import torch

        from edgekit.quant.gptq import HessianAccumulator

        sums: dict[str, np.ndarray] = {}
        products: dict[str, HessianAccumulator] = {}
        count = 0
        logprobs: list[np.ndarray] = []
        for ids in windows:
            logits, *acts = self.run(ids, {}, activations=importance or bool(hessians))
            if keep is None or len(logprobs) < keep:
                logprobs.append(log_softmax32(logits[scored]))
            for name, value in zip(self.activations if importance or hessians else [], acts, strict=True):
                flat = value.reshape(-1, value.shape[-1])
                if importance:
                    wide = flat.astype(np.float64)
                    sums[name] = sums.get(name, 0.0) + (wide * wide).sum(0)
                if name in hessians:
                    products.setdefault(name, HessianAccumulator(flat.shape[-1])).add(torch.from_numpy(flat))
            count += len(ids)
        return CalibrationReference(
            logprobs,
            {k: v / count for k, v in sums.items()},
            {name: products.pop(name).matrix().div_(max(count, 1)).numpy() for name in sorted(products)},
        )

    def kl(
        self, windows: np.ndarray, scored: slice, reference: CalibrationReference, overrides: dict[str, np.ndarray]
    ) -> float:
        """Mean KL(fp32 || model with ``overrides``) over the scored positions of ``windows``."""
        total, positions = 0.0, 0
        for ids, ref in zip(windows, reference.logprobs[: len(windows)], strict=True):
            logits = self.run(ids, overrides)[0]
            per_position = kl_divergence32(ref, log_softmax32(logits[scored]))
            total += float(per_position.sum())
            positions += len(per_position)
        return total / max(positions, 1)

    def _write_probe_graph(self) -> Path:
        """The fp32 graph (weights left in the export's data file) with weights as inputs and activations as outputs."""
        model = onnx.load(str(self.model_dir / "model.onnx"), load_external_data=False)
        graph = model.graph
        dims = {t.name: list(t.dims) for t in graph.initializer}
        present = {i.name for i in graph.input}
        for weight in dict.fromkeys(lin.weight for lin in self.linears):
            if weight not in present:
                graph.input.append(helper.make_tensor_value_info(weight, TensorProto.FLOAT, dims[weight]))
        outputs = {o.name for o in graph.output}
        for name in self.activations:
            if name not in outputs:
                graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        path = self.model_dir / _PROBE_GRAPH
        onnx.save_model(model, str(path))
        return path
