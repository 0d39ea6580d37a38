"""Parity of the exported fp32 reference against PyTorch, the check every build ends with.

The export runs a few prompts, one of them long (errors that grow with position show there), and its
logits are compared with the checkpoint's in PyTorch. What counts as equal comes from the model itself,
not from one absolute number: PyTorch runs each prompt once more in float64, and the largest gap between
its fp32 and fp64 logits is this model's float noise in fp32. It is large for a model whose logits and
activations are large (Gemma's scaled embeddings and 262k vocabulary) and tiny for a random test model;
one absolute tolerance cannot fit both. The export passes when no logit is further from PyTorch's fp32
logit than ``noise_multiple x noise + scale_floor x largest |logit|`` (the architecture's
``ParityTolerance``), plus what a known approximation of the builder's is worth on the same prompts, and
every position picks PyTorch's token, near ties excepted. A wrong export (a swapped rotary half, a wrong
norm epsilon, a transposed weight) moves the logits by a share of their scale, far above both terms.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import PackageError, SourceError, ValidationError
from edgekit.exporters.decoder_session import DecoderSession, context_length
from edgekit.sources.registry import ParityTolerance

SHORT_PROMPTS = (
    "The capital of France is Paris. Edge devices run small language models because",
    'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n    return n if n < 2 else',
    "Der schnelle braune Fuchs springt über den faulen Hund; 3.14159, 2.71828 und 1.41421 sind Zahlen, die",
)
"""Short prompts of different kinds of text: prose, code, another language with numbers."""
LONG_PROMPT_TOKENS = 512
"""Length of the long prompt (clamped to the model's context): rotary and window errors grow with position."""
LONG_TEXT = (
    "A language model reads a sequence of tokens and predicts, at every position, a distribution over the "
    "next one. Exporting it means writing the same function as a graph another runtime can execute: the "
    "embedding lookup, then a stack of decoder layers, each a normalization, an attention block whose queries "
    "and keys are rotated by their position, a residual sum, another normalization and a feed-forward block, "
    "and at the end a final normalization and a projection onto the vocabulary. Every step is a chance to get "
    "a detail wrong. The rotation may pair the wrong halves of a head; the normalization may add a different "
    "epsilon under its square root; a weight may be read transposed; a sliding window may be one token too "
    "short. Some of these mistakes change every logit at once and are easy to see. Others hide on a short "
    "prompt, because a rotation by a small angle is close to no rotation at all, and only show after a few "
    "hundred tokens, when the angles of the slowest frequencies have grown. In the old harbour town the "
    "fishing boats left before dawn. The nets were mended in the afternoon, the catch sold at the market by "
    "noon, and the children learned the names of the winds before they learned to read: the cold one from the "
    "north that emptied the streets, the warm wet one from the sea that brought the storms in autumn, and the "
    "gentle evening breeze that the old sailors said carried the smell of oranges from islands nobody had "
    "seen. Prices rose by 3.5 percent in March, 2.9 percent in April and 4.1 percent in May, while wages grew "
    "by less than two percent over the whole year; economists disagreed about whether the trend would last "
    "into the winter. To bake bread, mix 500 grams of flour with 350 millilitres of water, 10 grams of salt "
    "and a little yeast, knead the dough for ten minutes, let it rise for two hours, shape it, let it rise "
    "again and bake it at 230 degrees for about forty minutes, until the crust is dark and the loaf sounds "
    "hollow when tapped. The committee met on Tuesday to review the proposal, which asked for a new bridge "
    "across the river, a wider road to the station and a bicycle lane along the water; after three hours of "
    "debate it voted seven to four to fund the bridge and to study the rest. Light from the nearest star "
    "beyond the sun takes a little over four years to reach us, and the galaxy it belongs to is about a "
    "hundred thousand light years across; the universe holds perhaps two trillion such galaxies, most of them "
    "too faint to see without a telescope. She opened the letter slowly, read it twice, and then laughed for "
    "the first time in weeks: the job was hers, the move would happen in spring, and the small flat with the "
    "view of the railway would finally be somebody else's problem."
)
_CHUNK = 32
"""Positions compared at once: the difference of two [S, 262k] arrays is never held whole."""
_FIX = "the export is wrong for this checkpoint; report it with the build log"


@dataclass(frozen=True)
class PromptParity:
    """How far the ONNX logits are from PyTorch's on one prompt."""

    tokens: int
    max_abs_diff: float
    """Largest |ONNX - PyTorch fp32| over every position and vocabulary entry."""
    max_rel_diff: float
    """Largest per-position ratio of that difference to the position's largest |logit|."""
    top1_agreement: float
    """Share of positions where ONNX picks PyTorch's token or a near tie of it."""
    near_ties: int
    """Positions where the two picks differ but PyTorch scores them within the bound of each other."""
    noise: float | None = None
    """Largest |PyTorch fp32 - PyTorch fp64| on this prompt (None: not given to ``compare_logits``)."""


@dataclass(frozen=True)
class ParityResult:
    """How far the ONNX logits are from PyTorch's on the validation prompts, and the bound they must meet."""

    prompts: tuple[PromptParity, ...]
    tolerance: float
    """The bound every logit difference must stay within."""
    noise: float
    """Largest fp32-vs-fp64 gap of PyTorch over the prompts: the model's own float noise."""
    scale: float
    """Largest |logit| of PyTorch fp32 over the prompts."""
    rule: ParityTolerance
    known_difference: float | None = None
    """What the builder's known approximation (``rule.builder_approximation``) moves the logits by; None: none."""

    @property
    def tokens(self) -> int:
        """Tokens compared, over all prompts."""
        return sum(prompt.tokens for prompt in self.prompts)

    @property
    def max_abs_diff(self) -> float:
        """Largest |ONNX - PyTorch fp32| logit difference over all prompts."""
        return max(prompt.max_abs_diff for prompt in self.prompts)

    @property
    def max_rel_diff(self) -> float:
        """Largest difference relative to its position's largest |logit|, over all prompts."""
        return max(prompt.max_rel_diff for prompt in self.prompts)

    @property
    def top1_agreement(self) -> float:
        """Share of all compared positions whose top-1 agrees (near ties counted as agreeing)."""
        return sum(p.top1_agreement * p.tokens for p in self.prompts) / max(self.tokens, 1)

    @property
    def passed(self) -> bool:
        """True when every difference is within the bound and every position picks the same token."""
        return self.max_abs_diff <= self.tolerance and self.top1_agreement == 1.0

    def as_dict(self) -> dict[str, Any]:
        """The manifest's record of this check (the variant's name aside)."""
        fields = ("tokens", "max_abs_diff", "max_rel_diff", "noise", "top1_agreement", "near_ties")
        return {
            "prompts": [{name: getattr(prompt, name) for name in fields} for prompt in self.prompts],
            "tokens": self.tokens,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "top1_agreement": self.top1_agreement,
            "tolerance": self.tolerance,
            "noise": self.noise,
            "logit_scale": self.scale,
            "known_difference": self.known_difference,
            "rule": {
                "noise_multiple": self.rule.noise_multiple,
                "scale_floor": self.rule.scale_floor,
                "builder_approximation": _first_line(self.rule.builder_approximation),
            },
        }


@dataclass(frozen=True)
class TorchReference:
    """The validation prompts, PyTorch's fp32 logits on each, and the fp32-vs-fp64 gap on each."""

    inputs: list[np.ndarray]
    logits: list[np.ndarray]
    noise: list[float]
    known_difference: list[float] | None = None
    """Gap to PyTorch under the builder's known approximation, per prompt; None when it has none."""

    @property
    def scale(self) -> float:
        """Largest |logit| over the prompts."""
        return max(_largest(logits) for logits in self.logits)


def parity_bound(noise: float, scale: float, rule: ParityTolerance, known_difference: float = 0.0) -> float:
    """The largest logit difference a correct fp32 export may show: ``multiple x noise + floor x scale + known``.

    The noise term is measured on the model, so it grows with whatever makes its float error large (large
    activations, deep stacks, long sums); the multiple leaves room for another runtime rounding in other
    places than PyTorch. The floor covers a model whose fp32 and fp64 runs agree to a few units in the last
    place, where a different summation order alone is worth as much as the measured noise.
    """
    return rule.noise_multiple * noise + rule.scale_floor * scale + known_difference


def onnx_logits(model_dir: Path, input_ids: np.ndarray) -> np.ndarray:
    """Run an onnxruntime-genai model folder's decoder on ``input_ids`` [1, S] with an empty cache."""
    return DecoderSession(model_dir).logits(input_ids)


def validation_inputs(hf_folder: Path, max_tokens: int, long_tokens: int = LONG_PROMPT_TOKENS) -> list[np.ndarray]:
    """Token ids of the short prompts and of the long one, each [1, S] and at most ``max_tokens`` long."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf_folder), trust_remote_code=False)

    def encode(text: str) -> np.ndarray:
        return np.asarray(tokenizer(text, return_tensors="np")["input_ids"], dtype=np.int64)

    inputs = [encode(prompt)[:, :max_tokens] for prompt in SHORT_PROMPTS]
    length = min(long_tokens, max_tokens)
    once = encode(LONG_TEXT).shape[1]
    if once == 0 or any(ids.shape[1] == 0 for ids in inputs):
        raise SourceError(
            "its tokenizer turns English text into no tokens, so the model cannot be checked or used",
            path=hf_folder,
            fix="use the checkpoint's own tokenizer files (tokenizer.json and tokenizer_config.json)",
        )
    # A tokenizer with long tokens needs the text more than once: enough copies for the length, one check.
    text = " ".join([LONG_TEXT] * (-(-length // once) + 1))
    inputs.append(encode(text)[:, :length])
    return inputs


def torch_reference(
    hf_folder: Path,
    inputs: Sequence[np.ndarray],
    model_class: str,
    *,
    approximation: Callable[[], AbstractContextManager[None]] | None = None,
) -> TorchReference:
    """PyTorch's fp32 logits (eager attention) on each of ``inputs``, and their gap to the same model in float64.

    ``model_class`` is the transformers class the builder read the weights with, so both sides load the same
    modules (a multimodal checkpoint's text path). ``approximation`` (the architecture's
    ``builder_approximation``): the fp32 logits' gap to a run inside it is the known difference. The float64
    run promotes each weight as an op reads it, so the model is held once, in fp32.
    """
    model = _load_torch_model(hf_folder, model_class)
    logits = [_forward(model, ids) for ids in inputs]
    known: list[float] | None = None
    if approximation is not None:
        with approximation():
            known = [_max_abs_diff(fp32, _forward(model, ids)) for ids, fp32 in zip(inputs, logits, strict=True)]
    with _float64_everywhere():
        noise = [_max_abs_diff(fp32, _forward(model, ids)) for ids, fp32 in zip(inputs, logits, strict=True)]
    del model
    return TorchReference(list(inputs), logits, noise, known)


def validate_export(hf_folder: Path, onnx_dir: Path, model_class: str, rule: ParityTolerance) -> ParityResult:
    """Compare the fp32 ONNX export with PyTorch on the validation prompts; ``ValidationError`` when they disagree."""
    try:
        max_tokens = min(context_length(onnx_dir), _torch_context_length(hf_folder))
    except (OSError, KeyError, ValueError) as exc:
        problem = f"the {onnx_dir.name} export's genai_config.json cannot be read ({exc})"
        raise ValidationError(problem, path=onnx_dir, fix=_FIX) from None
    inputs = validation_inputs(hf_folder, max_tokens)
    reference = torch_reference(hf_folder, inputs, model_class, approximation=rule.builder_approximation)
    if not all(np.isfinite(logits).all() for logits in reference.logits):
        raise SourceError(
            "gives logits that are not finite numbers in PyTorch itself: its weights hold NaN or Inf",
            path=hf_folder,
            fix="use an intact copy of the checkpoint's weights",
        )
    return check_export(onnx_dir, reference, rule)


def check_export(onnx_dir: Path, reference: TorchReference, rule: ParityTolerance) -> ParityResult:
    """Run the export on ``reference``'s prompts and hold its logits to the bound; ``ValidationError`` beyond it."""
    noise = max(reference.noise)
    known = None if reference.known_difference is None else max(reference.known_difference)
    bound = parity_bound(noise, reference.scale, rule, known or 0.0)
    prompts = []
    try:
        session = DecoderSession(onnx_dir)  # after PyTorch has let its model go: the two never share memory
        for index, (ids, expected) in enumerate(zip(reference.inputs, reference.logits, strict=True)):
            actual = session.logits(ids)
            if actual.shape != expected.shape:
                problem = f"the {onnx_dir.name} export's logits have shape {actual.shape}, PyTorch's {expected.shape}"
                raise ValidationError(problem, path=onnx_dir, fix=_FIX)
            prompts.append(replace(compare_logits(expected, actual, bound), noise=reference.noise[index]))
    except PackageError as exc:  # a graph that cannot run at all is as wrong an export as wrong logits
        # The variant is named in the text too: a failed build replaces the path with its kept log's.
        raise ValidationError(
            f"the {onnx_dir.name} export cannot run: {exc.problem}", path=onnx_dir, fix=_FIX
        ) from None
    result = ParityResult(tuple(prompts), bound, noise, reference.scale, rule, known)
    if not result.passed:
        basis = f"PyTorch's own fp32 noise {noise:.3g}, largest |logit| {reference.scale:.3g}"
        basis += "" if known is None else f", the builder's known approximation {known:.3g}"
        raise ValidationError(
            f"the {onnx_dir.name} export's logits differ from PyTorch's by up to {result.max_abs_diff:.3g} "
            f"({result.max_rel_diff:.2%} of a position's largest logit), above the bound {bound:.3g} ({basis}); "
            f"top-1 agreement {result.top1_agreement:.1%}",
            path=onnx_dir,
            fix=_FIX,
        )
    return result


def compare_logits(expected: np.ndarray, actual: np.ndarray, bound: float) -> PromptParity:
    """Differences and top-1 agreement between PyTorch's ``expected`` and ONNX's ``actual`` [1, S, V] logits.

    A position where the two pick different tokens still agrees when PyTorch scores ONNX's pick within
    ``bound`` of its own top logit: the two candidates are tied to within float noise, and which of them
    wins is decided by rounding, not by the export.
    """
    if expected.shape != actual.shape:
        raise ValidationError(f"ONNX logits have shape {actual.shape}, PyTorch's {expected.shape}")
    expected, actual = expected[0], actual[0]
    max_abs = max_rel = 0.0
    agreed = near_ties = 0
    for start in range(0, expected.shape[0], _CHUNK):
        want = expected[start : start + _CHUNK].astype(np.float64)
        got = actual[start : start + _CHUNK].astype(np.float64)
        per_position = np.abs(want - got).max(axis=-1)
        position_scale = np.maximum(np.abs(want).max(axis=-1), np.finfo(np.float32).tiny)
        max_abs = max(max_abs, float(per_position.max()))
        max_rel = max(max_rel, float((per_position / position_scale).max()))
        ours, theirs = want.argmax(-1), got.argmax(-1)
        rows = np.arange(want.shape[0])
        same = ours == theirs
        tied = ~same & (want[rows, ours] - want[rows, theirs] <= bound)
        agreed += int(same.sum() + tied.sum())
        near_ties += int(tied.sum())
    tokens = int(expected.shape[0])
    return PromptParity(tokens, max_abs, max_rel, agreed / max(tokens, 1), near_ties)


@contextlib.contextmanager
def _float64_everywhere() -> Iterator[None]:
    """Inside: PyTorch computes in float64 whatever the dtype of the tensors it is handed.

    Every float32 tensor an op reads is promoted first (a weight, one op at a time: the model stays fp32 in
    memory, where a float64 copy would double it), and every float32 cast or creation makes float64 instead:
    transformers computes some parts in float32 whatever the model's dtype (RMSNorm, softmax, the rotary
    angles, Qwen3.5's delta rule), and those would otherwise round exactly as in the fp32 run, their error
    missing from the measured noise while ONNX, computing them its own way, shows it.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    def promote(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.double() if value.dtype == torch.float32 else value
        if isinstance(value, (list, tuple)):
            return type(value)(promote(item) for item in value)
        if isinstance(value, dict):
            return {key: promote(item) for key, item in value.items()}
        return value

    class Float64(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            kwargs = dict(kwargs or {})
            if kwargs.get("dtype") is torch.float32:
                kwargs["dtype"] = torch.float64
            if func is torch.Tensor.float:
                func = torch.Tensor.double
            elif func is torch.Tensor.to:
                args = tuple(torch.float64 if arg is torch.float32 else arg for arg in args)
            name = getattr(func, "__name__", "")
            # An in-place op writes into its first argument: a promoted copy of it would swallow the write.
            in_place = name == "__setitem__" or name.startswith("__i") or (name.endswith("_") and name[-2:] != "__")
            args = (args[0], *promote(tuple(args[1:]))) if in_place and args else promote(tuple(args))
            return func(*args, **promote(kwargs))

    with Float64():
        yield


def _first_line(function: Callable[..., Any] | None) -> str | None:
    """What a builder approximation is, from its docstring's first line."""
    doc = None if function is None else (function.__doc__ or function.__name__)
    return None if doc is None else doc.strip().splitlines()[0]


def _largest(logits: np.ndarray) -> float:
    return float(np.abs(logits).max()) if logits.size else 0.0


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| over two [1, S, V] arrays, a block of positions at a time."""
    blocks = range(0, a.shape[1], _CHUNK)
    return max((float(np.abs(a[:, s : s + _CHUNK] - b[:, s : s + _CHUNK]).max()) for s in blocks), default=0.0)


def _load_torch_model(hf_folder: Path, model_class: str) -> Any:
    import torch
    import transformers

    loader = getattr(transformers, model_class)
    # trust_remote_code=False: the staged folder holds no *.py, and an auto_map must never make transformers ask.
    model = loader.from_pretrained(
        str(hf_folder), dtype=torch.float32, attn_implementation="eager", trust_remote_code=False
    )
    return model.eval()


def _forward(model: Any, input_ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():  # no cache: nothing is written into tensors made before the float64 run
        logits = model(torch.from_numpy(input_ids.astype(np.int64)), use_cache=False).logits
    return logits.numpy()


def _torch_context_length(hf_folder: Path) -> int:
    """The longest sequence the checkpoint's config allows (its text config's, for a multimodal one)."""
    config = json.loads((hf_folder / "config.json").read_text(encoding="utf-8"))
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    value = text.get("max_position_embeddings") or config.get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else LONG_PROMPT_TOKENS
