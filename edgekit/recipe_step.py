"""What a build's ``int4-recipe`` variant is asked for, and where its sensitivity table is cached.

``build_steps.build_recipe`` calls ``make_recipe_variant`` once the fp32 and RTN variants are exported;
``quant/recipe_build.py`` does the measuring, searching and building.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgekit.accuracy.texts import Corpus
from edgekit.errors import ExportError
from edgekit.package.manifest import sha256_file
from edgekit.quant.formats import BLOCK_SIZES, DEFAULT_CANDIDATES, QuantMethod, TensorFormat, parse_format
from edgekit.quant.graph_rewrite import model_file_bytes
from edgekit.quant.recipe_build import RecipeOutcome, RecipeRequest, build_recipe_variant
from edgekit.safe_io import user_cache_path
from edgekit.targets import HeadPrecision, Target
from edgekit.version import __version__

CALIBRATION_WINDOWS = 8
"""Calibration windows of the recipe's fp32 pass and verification (seeded offsets into the text)."""
CALIBRATION_CTX = 512
SENSITIVITY_FILE = "sensitivity.json"


def recipe_candidates(target: Target) -> tuple[TensorFormat, ...]:
    """The formats ``target``'s recipe may give a tensor (``recipe.candidates``, else the built-in set)."""
    if target.recipe.candidates:
        return tuple(parse_format(spelling) for spelling in target.recipe.candidates)
    return DEFAULT_CANDIDATES


def recipe_request(
    target: Target, rtn_model_bytes: int | None = None, rtn_head: HeadPrecision | None = None
) -> RecipeRequest:
    """The recipe ``target`` asks for: its objective, its budget as the accuracy bound, its candidates.

    ``optimize: loss`` bounds the bytes by ``rtn_model_bytes``, the all-int4 RTN variant's model files.
    ``rtn_head``: that variant's LM head as built (the speed baseline's), by default the target's.
    """
    settings, budget = target.recipe, target.budget
    candidates = recipe_candidates(target)
    max_bytes = settings.max_model_bytes
    if max_bytes is None and settings.optimize == "loss":
        if rtn_model_bytes is None:
            raise ValueError("optimize: loss needs the RTN variant's model bytes")
        max_bytes = rtn_model_bytes
    return RecipeRequest(
        max_model_bytes=max_bytes,
        max_kl=None if max_bytes is not None else budget.max_kl_mean,
        min_top1=None if max_bytes is not None else budget.min_top1_agreement,
        min_decode_ratio=settings.min_decode_ratio,
        accuracy_level=target.accuracy_level,
        head_baseline=_rtn_head(target, rtn_head or target.lm_head),
        candidates=candidates,
    )


def sensitivity_key(fp32_dir: Path, corpus: Corpus, request: RecipeRequest, sampling: str) -> dict[str, str]:
    """What a sensitivity table depends on: the model, the calibration text and sampling, the candidates."""
    files = (fp32_dir / name for name in ("model.onnx", "model.onnx.data"))
    return {
        "model": " ".join(sha256_file(path, ExportError) for path in files if path.is_file()),
        "calibration": hashlib.sha256(corpus.text.encode("utf-8")).hexdigest(),
        "windows": sampling,
        "candidates": ",".join(f.spelling for f in request.candidates),
        "accuracy_level": str(request.accuracy_level),
        "edgekit": __version__,
    }


def sensitivity_cache_paths(eval_dir: Path, key: dict[str, str]) -> list[Path]:
    """The package's copy of the table, then the user's cache (a later build of the same model reuses it)."""
    digest = hashlib.sha256(repr(sorted(key.items())).encode()).hexdigest()[:32]
    cache = user_cache_path("sensitivity", f"{digest}.json")
    return [eval_dir / SENSITIVITY_FILE, cache]


def make_recipe_variant(
    fp32_dir: Path,
    rtn_dir: Path,
    out_dir: Path,
    work: Path,
    target: Target,
    windows: np.ndarray,
    calibration: tuple[Corpus, int],
    progress: Callable[[str], None],
    rtn_head: HeadPrecision | None = None,
) -> RecipeOutcome:
    """Build ``target``'s recipe variant of ``fp32_dir`` into ``out_dir`` from calibration ``windows`` (drawn
    from ``calibration``'s text with its seed); the sensitivity table goes to ``eval/`` beside ``out_dir``.
    ``rtn_head``: the RTN variant's LM head as built, where it is not the target's."""
    request = recipe_request(target, model_file_bytes(rtn_dir), rtn_head)
    corpus, seed = calibration
    # The tokens themselves: the tokenizer and BOS rule decide them as much as the text and the seed do.
    sampling = (
        f"{windows.shape[0]}x{windows.shape[1]} seed {seed} tokens {hashlib.sha256(windows.tobytes()).hexdigest()}"
    )
    key = sensitivity_key(fp32_dir, corpus, request, sampling)
    paths = sensitivity_cache_paths(out_dir.parent / "eval", key)
    return build_recipe_variant(fp32_dir, out_dir, work, rtn_dir, request, windows, key, paths, progress=progress)


def _rtn_head(target: Target, head: HeadPrecision) -> TensorFormat | None:
    """The RTN variant's LM head ``head`` as a format (None: left float), for the decode-cost bound."""
    block = min(target.block_size, BLOCK_SIZES[-1])
    if head is HeadPrecision.FLOAT:
        return None
    bits = 8 if head is HeadPrecision.INT8 else 4
    return TensorFormat(bits, block, False, QuantMethod.RTN)
