"""Parity of the exported fp32 reference against PyTorch, the check every build ends with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import ValidationError
from edgekit.runtimes.decoder_session import DecoderSession

VALIDATION_PROMPT = "The capital of France is Paris. Edge devices run small language models because"


@dataclass(frozen=True)
class ParityResult:
    """How far the ONNX logits are from PyTorch's on the validation prompt."""

    prompt: str
    tokens: int
    max_abs_diff: float
    tolerance: float
    top1_agreement: float

    @property
    def passed(self) -> bool:
        """True when the difference is within tolerance and every position picks the same token."""
        return self.max_abs_diff <= self.tolerance and self.top1_agreement == 1.0


def onnx_logits(model_dir: Path, input_ids: np.ndarray) -> np.ndarray:
    """Run an onnxruntime-genai model folder's decoder on ``input_ids`` [1, S] with an empty cache."""
    return DecoderSession(model_dir).logits(input_ids)


def torch_logits(hf_folder: Path, input_ids: np.ndarray, model_class: str) -> np.ndarray:
    """Logits of the Hugging Face model in ``hf_folder`` (fp32, eager attention) on ``input_ids``.

    ``model_class`` is the transformers class the builder read the weights with, so both sides load the
    same modules (a multimodal checkpoint's text path, for instance).
    """
    import torch
    import transformers

    loader = getattr(transformers, model_class)
    # trust_remote_code=False: the staged folder holds no *.py, and an auto_map must never make transformers ask.
    model = loader.from_pretrained(
        str(hf_folder), dtype=torch.float32, attn_implementation="eager", trust_remote_code=False
    )
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(input_ids.astype(np.int64))).logits
    return logits.float().numpy()


def encode_prompt(hf_folder: Path, prompt: str = VALIDATION_PROMPT) -> np.ndarray:
    """Token ids [1, S] of ``prompt`` with the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder), trust_remote_code=False)
    ids = tokenizer(prompt, return_tensors="np")["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def check_reference(hf_folder: Path, onnx_dir: Path, model_class: str, tolerance: float) -> ParityResult:
    """Compare the fp32 ONNX export with PyTorch; raises ``ValidationError`` when they disagree."""
    ids = encode_prompt(hf_folder)
    expected = torch_logits(hf_folder, ids, model_class)
    actual = onnx_logits(onnx_dir, ids)
    result = compare_logits(expected, actual, tolerance)
    if not result.passed:
        raise ValidationError(
            f"fp32 ONNX logits differ from PyTorch by {result.max_abs_diff:.3g} (tolerance {tolerance:g}, "
            f"top-1 agreement {result.top1_agreement:.1%})",
            path=onnx_dir,
            fix="the export is wrong for this checkpoint; report it with the build log",
        )
    return result


def compare_logits(expected: np.ndarray, actual: np.ndarray, tolerance: float) -> ParityResult:
    """Max absolute difference and top-1 agreement between two [1, S, V] logit arrays."""
    if expected.shape != actual.shape:
        raise ValidationError(f"ONNX logits have shape {actual.shape}, PyTorch's {expected.shape}")
    diff = float(np.abs(expected - actual).max())
    agreement = float((expected.argmax(-1) == actual.argmax(-1)).mean())
    return ParityResult(VALIDATION_PROMPT, int(expected.shape[1]), diff, tolerance, agreement)
