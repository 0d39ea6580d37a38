"""GPTQ as a recipe method: the weighted search's grid, codes chosen by GPTQ's column solve (issue #15)."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.quant.block_quant import quantize_matrix, weighted_error
from edgekit.quant.formats import QuantMethod, parse_format
from edgekit.quant.gptq_grid import quantize_linear
from edgekit.quant.graph_rewrite import Linear
from edgekit.quant.sensitivity import candidate_formats


def _correlated(columns: int, tokens: int = 4096, seed: int = 0) -> np.ndarray:
    """XᵀX / tokens of activations whose channels are mixed and of unequal size, as in real layers."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((columns, columns)) * 0.3 + np.eye(columns)
    x = rng.standard_normal((tokens, columns)) @ mix * rng.uniform(0.2, 3.0, size=columns)
    return (x.T @ x / tokens).astype(np.float32)


@pytest.mark.parametrize("kind", ["int4-b32-sym", "int4-b32-asym", "int4-b64-zp", "int8-b32-sym"])
def test_gptq_on_the_weighted_grid_cuts_the_output_error_on_correlated_inputs(kind: str) -> None:
    rng = np.random.default_rng(1)
    weight = (rng.standard_normal((96, 256)) * 0.05).astype(np.float32)
    hessian = _correlated(256)
    weighted = quantize_matrix(weight, parse_format(f"{kind}-weighted"), np.diagonal(hessian).copy())
    gptq = quantize_linear(weight, parse_format(f"{kind}-gptq"), hessian=hessian)
    ratio = weighted_error(weight, gptq, hessian=hessian) / weighted_error(weight, weighted, hessian=hessian)
    assert ratio < 0.7, ratio


def test_gptq_keeps_the_weighted_grid_and_only_changes_codes() -> None:
    rng = np.random.default_rng(2)
    weight = (rng.standard_normal((40, 128)) * 0.05).astype(np.float32)
    hessian = _correlated(128)
    weighted = quantize_matrix(weight, parse_format("int4-b32-asym-weighted"), np.diagonal(hessian).copy())
    gptq = quantize_linear(weight, parse_format("int4-b32-asym-gptq"), hessian=hessian)
    assert gptq.fmt.method is QuantMethod.GPTQ
    np.testing.assert_array_equal(gptq.scales, weighted.scales)
    np.testing.assert_array_equal(gptq.offset_levels, weighted.offset_levels)
    assert gptq.codes.shape == weighted.codes.shape and gptq.codes.max() <= 15
    assert (gptq.codes != weighted.codes).any()
    # Stored exactly as the format says: the bytes are the weighted fit's.
    assert gptq.packed_codes().shape == weighted.packed_codes().shape


@pytest.mark.parametrize("scale", [1.0, 1e-4])  # XᵀX / tokens is in the activations' units
def test_dead_inputs_keep_their_rounding_and_do_not_change_how_the_live_ones_are_solved(scale: float) -> None:
    rng = np.random.default_rng(3)
    weight = (rng.standard_normal((16, 128)) * 0.05).astype(np.float32)
    live = _correlated(96) * scale
    hessian = np.zeros((128, 128), np.float32)
    hessian[:96, :96] = live  # inputs 96-127 (one whole block) never fired on the calibration text
    fmt = parse_format("int4-b32-sym-gptq")
    gptq = quantize_linear(weight, fmt, hessian=hessian)
    weighted = quantize_matrix(weight, parse_format("int4-b32-sym-weighted"), np.diagonal(hessian).copy())
    np.testing.assert_array_equal(gptq.codes[:, 96:], weighted.codes[:, 96:])
    alone = quantize_linear(weight[:, :96], fmt, hessian=live)
    np.testing.assert_array_equal(gptq.codes[:, :96], alone.codes)  # as if the dead block were not there
    ratio = weighted_error(weight, gptq, hessian=hessian) / weighted_error(weight, weighted, hessian=hessian)
    assert ratio < 0.7, ratio


@pytest.mark.parametrize(
    ("hessian", "phrase"),
    [(None, "needs calibration statistics"), (np.eye(32, dtype=np.float32), "does not match"),
     (np.full((64, 64), np.inf, dtype=np.float32), "not finite")],
)  # fmt: skip
def test_gptq_without_usable_statistics_is_refused_by_name(hessian: np.ndarray | None, phrase: str) -> None:
    weight = np.ones((8, 64), dtype=np.float32)
    with pytest.raises(ValueError, match=phrase):
        quantize_linear(weight, parse_format("int4-b32-sym-gptq"), hessian=hessian)


def test_a_diagonal_hessian_gives_the_importance_weighted_error() -> None:
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((8, 64)).astype(np.float32)
    importance = rng.uniform(0.1, 2.0, 64).astype(np.float32)
    q = quantize_matrix(weight, parse_format("int4-b32-sym-rtn"))
    assert weighted_error(weight, q, hessian=np.diag(importance)) == pytest.approx(
        weighted_error(weight, q, importance), rel=1e-6
    )


def test_an_embedding_takes_a_gptq_candidate_as_the_weighted_search_of_the_same_grid() -> None:
    gptq = parse_format("int4-b32-asym-gptq")
    embedding = Linear("model/embed_tokens", "embed.weight", rows=100, cols=64, activation=None)
    linear = Linear("model/layers.0/mlp/down_proj", "down.weight", rows=64, cols=128, activation="act")
    assert candidate_formats(embedding, (gptq,), probe=False) == [parse_format("int4-b32-asym-weighted")]
    assert candidate_formats(linear, (gptq,), probe=False) == [gptq]


@pytest.mark.parametrize(("spelling", "fix"), [("int4-b32-sym-gptq", "gptq"), ("int4-b32-sym-weighted", "rtn")])
def test_statistics_no_format_can_use_stop_the_search_with_a_one_line_error(tmp_path, spelling: str, fix: str) -> None:
    from types import SimpleNamespace

    from edgekit.errors import ExportError
    from edgekit.quant.probe_session import CalibrationReference
    from edgekit.quant.sensitivity import measure_sensitivity

    linear = Linear("model/layers.0/mlp/down_proj", "down.weight", rows=8, cols=64, activation="act")
    probe = SimpleNamespace(linears=[linear], model_dir=tmp_path)
    reference = CalibrationReference([], {"act": np.ones(64)}, {"act": np.full((64, 64), np.nan, np.float32)})
    with pytest.raises(ExportError) as info:
        measure_sensitivity(
            probe,  # type: ignore[arg-type]
            reference,
            np.zeros((1, 8), np.int64),
            slice(4, 7),
            lambda _: np.ones((8, 64), np.float32),
            (parse_format(spelling),),
            {},
        )
    assert "down_proj" in info.value.problem and "not finite" in info.value.problem
    assert fix in (info.value.fix or "")


def test_candidates_that_fit_no_block_of_a_linear_are_refused_before_any_weight_is_read() -> None:
    from edgekit.errors import UsageError
    from edgekit.quant.recipe_build import _require_candidates

    qkv = Linear("model/layers.0/attn/qkv_proj", "qkv.weight", rows=960, cols=576, activation="x")
    with pytest.raises(UsageError) as info:
        _require_candidates([qkv], (parse_format("int4-b128-sym-gptq"),))
    assert "qkv_proj" in info.value.problem and "576 inputs" in info.value.problem
    _require_candidates([qkv], (parse_format("int4-b64-sym-gptq"),))  # 576 = 9 x 64: fits


def test_a_grid_handed_in_gives_the_same_codes_and_a_grid_of_another_format_is_refused() -> None:
    rng = np.random.default_rng(5)
    weight = (rng.standard_normal((24, 128)) * 0.05).astype(np.float32)
    hessian = _correlated(128)
    importance = np.diagonal(hessian).astype(np.float64)
    fmt = parse_format("int4-b32-asym-gptq")
    grid = quantize_matrix(weight, parse_format("int4-b32-asym-weighted"), importance)
    solved = quantize_linear(weight, fmt, importance, hessian)
    handed = quantize_linear(weight, fmt, importance, hessian, grid=grid)
    assert handed.fmt == fmt and np.array_equal(handed.codes, solved.codes)
    assert np.array_equal(handed.scales, solved.scales)
    other = quantize_matrix(weight, parse_format("int4-b32-sym-weighted"), importance)
    with pytest.raises(ValueError, match="int4-b32-sym-weighted"):
        quantize_linear(weight, fmt, importance, hessian, grid=other)


class _CountedSearch:
    """``gptq_grid.quantize_matrix`` with a count of the matrices it fitted (each a weighted search)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from edgekit.quant import gptq_grid

        self.calls: list[str] = []
        original = gptq_grid.quantize_matrix

        def counted(weight: np.ndarray, fmt, importance=None):  # type: ignore[no-untyped-def]
            self.calls.append(fmt.spelling)
            return original(weight, fmt, importance)

        monkeypatch.setattr(gptq_grid, "quantize_matrix", counted)


@pytest.mark.parametrize("order", ["weighted first", "gptq first"])
def test_a_build_with_gptq_and_its_weighted_twin_fits_each_grid_once(monkeypatch, tmp_path, order: str) -> None:
    from edgekit.quant.probe_session import CalibrationReference
    from edgekit.quant.recipe_build import _memoized_fit

    rng = np.random.default_rng(6)
    weight = (rng.standard_normal((16, 64)) * 0.05).astype(np.float32)
    hessian = _correlated(64)
    linear = Linear("model/layers.0/mlp/down_proj", "down.weight", rows=16, cols=64, activation="act")
    reference = CalibrationReference([], {"act": np.diagonal(hessian).astype(np.float64)}, {"act": hessian})
    weighted, gptq = parse_format("int4-b32-sym-weighted"), parse_format("int4-b32-sym-gptq")
    search = _CountedSearch(monkeypatch)
    fit = _memoized_fit(lambda _: weight, reference, tmp_path, (weighted, gptq))
    formats = [weighted, gptq] if order == "weighted first" else [gptq, weighted]
    fitted = {fmt: fit(linear, fmt) for fmt in formats}
    assert search.calls == ["int4-b32-sym-weighted"]
    assert np.array_equal(fitted[weighted].scales, fitted[gptq].scales)
    assert not np.array_equal(fitted[weighted].codes, fitted[gptq].codes)

    alone = _CountedSearch(monkeypatch)
    fit_alone = _memoized_fit(lambda _: weight, reference, tmp_path, (gptq,))
    assert np.array_equal(fit_alone(linear, gptq).codes, fitted[gptq].codes)
    assert alone.calls == ["int4-b32-sym-weighted"]


def test_the_sensitivity_proxies_fit_a_gptq_candidates_grid_once(monkeypatch, tmp_path) -> None:
    from types import SimpleNamespace

    from edgekit.quant.probe_session import CalibrationReference
    from edgekit.quant.sensitivity import _proxies

    rng = np.random.default_rng(7)
    weight = (rng.standard_normal((16, 64)) * 0.05).astype(np.float32)
    hessian = _correlated(64)
    linear = Linear("model/layers.0/mlp/down_proj", "down.weight", rows=16, cols=64, activation="act")
    reference = CalibrationReference([], {"act": np.diagonal(hessian).astype(np.float64)}, {"act": hessian})
    candidates = (parse_format("int4-b32-sym-gptq"), parse_format("int4-b32-sym-weighted"))
    search = _CountedSearch(monkeypatch)
    probe = SimpleNamespace(model_dir=tmp_path)
    proxies = _proxies(linear, probe, reference, lambda _: weight, candidates, np.random.default_rng(0))  # type: ignore[arg-type]
    # The probe format's RTN fit, and one weighted search that the GPTQ candidate's solve reuses.
    assert sorted(search.calls) == ["int4-b32-sym-rtn", "int4-b32-sym-weighted"]
    assert proxies["int4-b32-sym-gptq"] < proxies["int4-b32-sym-weighted"]
