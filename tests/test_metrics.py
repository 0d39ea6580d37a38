"""Accuracy metrics on hand-computed arrays, the evaluation texts, and the reference cache."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgekit.accuracy.evaluate import EVAL_DIR, evaluate_package
from edgekit.accuracy.metrics import kl_divergence, log_softmax, percentile, perplexity, token_nll, top1_agreement
from edgekit.accuracy.texts import builtin_corpus, load_text, token_windows
from edgekit.errors import UsageError
from edgekit.package.manifest import read_manifest, write_manifest
from edgekit.package.verify import verify_files

WINDOWS = 3
CTX = 64


# --- metric functions against values computed by hand ---------------------------------------------


def test_log_softmax_of_log_probabilities_gives_them_back() -> None:
    logits = np.log(np.array([[1.0, 2.0, 1.0], [1.0, 1.0, 2.0]], dtype=np.float32))
    expected = np.log(np.array([[0.25, 0.5, 0.25], [0.25, 0.25, 0.5]]))
    got = log_softmax(logits)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, atol=1e-7)
    np.testing.assert_allclose(np.exp(got).sum(axis=-1), [1.0, 1.0], atol=1e-12)


def test_log_softmax_is_shift_invariant_and_stable_for_large_logits() -> None:
    big = np.array([[1000.0, 1001.0]], dtype=np.float32)
    got = log_softmax(big)
    assert np.isfinite(got).all()
    # log(1 / (1 + e)) and log(e / (1 + e))
    np.testing.assert_allclose(got, [[-math.log1p(math.e), 1 - math.log1p(math.e)]], atol=1e-9)
    np.testing.assert_allclose(log_softmax(np.array([[0.0, 1.0]])), got, atol=1e-9)


def test_kl_divergence_of_two_token_distributions() -> None:
    p = np.log(np.array([[0.5, 0.5]]))
    q = np.log(np.array([[0.25, 0.75]]))
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3)
    np.testing.assert_allclose(kl_divergence(p, q), [0.5 * math.log(4 / 3)], rtol=1e-12)
    # KL(q || p) = 0.25 ln(0.5) + 0.75 ln(1.5): not symmetric
    np.testing.assert_allclose(kl_divergence(q, p), [0.25 * math.log(0.5) + 0.75 * math.log(1.5)], rtol=1e-12)


def test_kl_divergence_of_three_token_distributions_per_position() -> None:
    reference = np.log(np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]))
    variant = np.log(np.array([[1 / 3, 1 / 3, 1 / 3], [0.2, 0.3, 0.5]]))
    got = kl_divergence(reference, variant)
    assert got.shape == (2,)
    # 0.5 ln 1.5 + 0.25 ln 0.75 + 0.25 ln 0.75 = 0.5 ln 1.125; identical rows give 0
    np.testing.assert_allclose(got, [0.5 * math.log(1.125), 0.0], atol=1e-12)


def test_token_nll_picks_each_positions_target() -> None:
    logprobs = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]))
    np.testing.assert_allclose(token_nll(logprobs, np.array([0, 2])), [math.log(2), -math.log(0.3)], rtol=1e-12)
    np.testing.assert_allclose(token_nll(logprobs, np.array([1, 1])), [math.log(4), -math.log(0.6)], rtol=1e-12)


def test_perplexity_is_exp_of_mean_nll() -> None:
    assert perplexity(np.array([math.log(2), math.log(8)])) == pytest.approx(4.0, rel=1e-12)
    assert perplexity(np.array([0.0, 0.0, 0.0])) == pytest.approx(1.0)
    # a uniform distribution over V tokens has perplexity V
    uniform = log_softmax(np.zeros((5, 7)))
    assert perplexity(token_nll(uniform, np.array([0, 1, 2, 3, 6]))) == pytest.approx(7.0, rel=1e-12)


def test_top1_agreement_is_the_share_of_equal_argmaxes() -> None:
    assert top1_agreement(np.array([1, 2, 3, 4]), np.array([1, 0, 3, 0])) == pytest.approx(0.5)
    assert top1_agreement(np.array([5, 5, 5]), np.array([5, 5, 5])) == 1.0
    assert top1_agreement(np.array([1, 2, 3]), np.array([0, 0, 0])) == 0.0


def test_percentile_interpolates_linearly() -> None:
    assert percentile(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 50) == pytest.approx(3.0)
    assert percentile(np.array([0.0, 10.0]), 25) == pytest.approx(2.5)
    assert percentile(np.arange(101, dtype=float), 99) == pytest.approx(99.0)
    assert percentile(np.array([3.0, 1.0, 2.0]), 100) == pytest.approx(3.0)


# --- texts ------------------------------------------------------------------------------------------


def test_builtin_corpus_parts_are_non_empty_and_deterministic() -> None:
    calibration, evaluation = builtin_corpus("calibration"), builtin_corpus("evaluation")
    assert len(calibration.text) > 10_000 and len(evaluation.text) > 10_000
    assert calibration.name == "builtin:calibration" and evaluation.name == "builtin:evaluation"
    assert builtin_corpus("calibration") == calibration
    assert builtin_corpus("evaluation").sha256 == evaluation.sha256
    assert calibration.sha256 != evaluation.sha256
    with pytest.raises(ValueError):
        builtin_corpus("training")


def test_builtin_corpus_parts_share_no_text() -> None:
    """GPTQ calibrates on one part and eval measures on the other: no paragraph may be in both."""

    def paragraphs(text: str) -> set[str]:
        return {p.strip() for p in text.split("\n\n") if len(p.strip()) >= 80}

    calibration = paragraphs(builtin_corpus("calibration").text)
    evaluation = paragraphs(builtin_corpus("evaluation").text)
    assert calibration and evaluation
    shared = calibration & evaluation
    assert not shared, f"{len(shared)} paragraphs are in both parts, e.g. {sorted(shared, key=len)[-1][:120]!r}"


def test_load_text_reads_txt(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("héllo\nworld\n", encoding="utf-8")
    corpus = load_text(path)
    assert corpus.text == "héllo\nworld\n"
    assert corpus.name == str(path)


def test_load_text_reads_jsonl_text_fields(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    assert load_text(path).text == "one\n\ntwo"


@pytest.mark.parametrize(
    ("body", "line", "words"),
    [
        ('{"text": "ok"}\nnot json\n', 2, "not JSON"),
        ('{"text": "ok"}\n\n{"body": "no text"}\n', 3, "no 'text'"),
        ('["text"]\n', 1, "no 'text'"),
        ('{"text": 5}\n', 1, "no 'text'"),
    ],
)
def test_load_text_names_the_bad_jsonl_line_and_file(tmp_path: Path, body: str, line: int, words: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(UsageError) as caught:
        load_text(path)
    message = str(caught.value)
    assert f"line {line}" in message
    assert words in message
    assert str(path) in message


@pytest.mark.parametrize(("name", "body"), [("e.txt", ""), ("w.txt", " \n\n\t"), ("e.jsonl", "\n\n")])
def test_load_text_refuses_an_empty_file(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    with pytest.raises(UsageError, match="no text") as caught:
        load_text(path)
    assert str(path) in str(caught.value)


def test_load_text_refuses_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"missing\.txt: does not exist"):
        load_text(tmp_path / "missing.txt")
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UsageError, match="cannot read"):
        load_text(binary)


def test_token_windows_cuts_non_overlapping_windows() -> None:
    ids = np.arange(10)
    np.testing.assert_array_equal(token_windows(ids, 3, None), [[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    np.testing.assert_array_equal(token_windows(ids, 3, 2), [[0, 1, 2], [3, 4, 5]])
    assert token_windows(ids, 3, 50).shape == (3, 3)
    with pytest.raises(UsageError, match="smaller --ctx"):
        token_windows(ids, 11, None)


# --- evaluate_package on a package --------------------------------------------------------------------


@pytest.fixture
def package(tiny_llama_package: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny llama package, free to change."""
    return Path(shutil.copytree(tiny_llama_package, tmp_path / "pkg"))


def long_text_file(folder: Path, name: str = "text.txt", start: int = 0) -> Path:
    path = folder / name
    path.write_text(builtin_corpus("evaluation").text[start : start + 6000], encoding="utf-8")
    return path


METRICS = ("perplexity", "ppl_ratio", "kl_mean", "kl_p99", "top1_agreement")


def metrics(report: dict) -> dict[str, dict[str, float]]:
    """The accuracy numbers of a report (not timings or sizes)."""
    return {name: {m: row[m] for m in METRICS} for name, row in report["variants"].items()}


def caches(root: Path) -> list[str]:
    return sorted(p.name for p in (root / EVAL_DIR).glob("reference-*.npz"))


def test_identical_variant_has_no_accuracy_loss(package: Path) -> None:
    shutil.copytree(package / "fp32", package / "fp32copy")
    manifest = read_manifest(package)
    manifest["variants"]["fp32copy"] = {**manifest["variants"]["fp32"], "path": "fp32copy"}
    write_manifest(package, manifest)
    verify_files(package, read_manifest(package))
    for expected_cache in ("stored", "hit"):
        report = evaluate_package(package, windows=WINDOWS, ctx=CTX)
        assert report["reference_cache"] == expected_cache
        copy = report["variants"]["fp32copy"]
        assert copy["kl_mean"] == pytest.approx(0.0, abs=1e-6)
        assert copy["kl_p99"] == pytest.approx(0.0, abs=1e-6)
        assert copy["ppl_ratio"] == pytest.approx(1.0, abs=1e-6)
        assert copy["perplexity"] == pytest.approx(report["variants"]["fp32"]["perplexity"], rel=1e-6)
        assert copy["top1_agreement"] == 1.0
        # the real int4 variant is measurably different from the reference
        assert report["variants"]["int4-rtn"]["kl_mean"] > 1e-6
        assert report["variants"]["int4-rtn"]["top1_agreement"] < 1.0


def test_report_describes_the_protocol(package: Path) -> None:
    report = evaluate_package(package, windows=WINDOWS, ctx=CTX, write=False)
    protocol = report["protocol"]
    assert protocol["text"] == "builtin:evaluation"
    assert protocol["text_sha256"] == builtin_corpus("evaluation").sha256
    assert (protocol["ctx"], protocol["windows"]) == (CTX, WINDOWS)
    assert protocol["scored_positions"] == f"{CTX // 2}..{CTX - 2} of each window"
    assert protocol["tokens_scored"] == WINDOWS * (CTX // 2 - 1)
    fp32 = report["variants"]["fp32"]
    assert (fp32["kl_mean"], fp32["ppl_ratio"], fp32["top1_agreement"]) == (0.0, 1.0, 1.0)
    # a random 512-token model is close to uniform
    assert 100 < fp32["perplexity"] < 2000
    assert set(report["variants"]) == {"fp32", "int4-rtn"}


def test_ctx_is_capped_at_the_context_length(package: Path) -> None:
    report = evaluate_package(package, windows=1, ctx=4096, write=False)
    assert report["protocol"]["ctx"] == 256


def test_reference_cache_is_stored_hit_and_invalidated(package: Path, tmp_path: Path) -> None:
    built = caches(package)
    assert len(built) == 1  # the build's own evaluation (other protocol)

    first = evaluate_package(package, windows=WINDOWS, ctx=CTX)
    assert first["reference_cache"] == "stored"
    stored = caches(package)
    assert len(stored) == 1 and stored != built

    second = evaluate_package(package, windows=WINDOWS, ctx=CTX)
    assert second["reference_cache"] == "hit"
    assert metrics(second) == metrics(first)
    assert caches(package) == stored

    corpus = load_text(long_text_file(tmp_path))
    other_text = evaluate_package(package, corpus=corpus, windows=WINDOWS, ctx=CTX)
    assert other_text["reference_cache"] == "stored"
    assert other_text["protocol"]["text"] == corpus.name
    by_text = caches(package)
    assert len(by_text) == 1 and by_text != stored
    assert evaluate_package(package, corpus=corpus, windows=WINDOWS, ctx=CTX)["reference_cache"] == "hit"

    # the same file name with other content is another text
    changed = load_text(long_text_file(tmp_path, start=7000))
    assert changed.name == corpus.name
    assert evaluate_package(package, corpus=changed, windows=WINDOWS, ctx=CTX)["reference_cache"] == "stored"
    by_changed = caches(package)
    assert len(by_changed) == 1 and by_changed != by_text

    seen = set(built + stored + by_text + by_changed)
    for windows, ctx in ((WINDOWS, 32), (2, 32)):
        report = evaluate_package(package, corpus=changed, windows=windows, ctx=ctx)
        assert report["reference_cache"] == "stored", (windows, ctx)
        now = caches(package)
        assert len(now) == 1 and now[0] not in seen
        seen.add(now[0])


def test_cached_reference_gives_the_metrics_of_a_fresh_one(package: Path) -> None:
    shutil.rmtree(package / EVAL_DIR)
    cold = evaluate_package(package, windows=WINDOWS, ctx=CTX, write=False)
    assert not (package / EVAL_DIR).exists()  # write=False stores nothing
    evaluate_package(package, windows=WINDOWS, ctx=CTX)
    warm = evaluate_package(package, windows=WINDOWS, ctx=CTX)
    assert warm["reference_cache"] == "hit"
    for name, row in cold["variants"].items():
        for metric in METRICS:
            assert warm["variants"][name][metric] == pytest.approx(row[metric], rel=1e-9, abs=1e-12)


def test_txt_and_jsonl_with_the_same_text_measure_the_same(package: Path, tmp_path: Path) -> None:
    text = builtin_corpus("evaluation").text[:6000]
    halves = [text[:3000], text[3000:]]
    txt = tmp_path / "t.txt"
    txt.write_text("\n\n".join(halves), encoding="utf-8")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps({"text": h}) + "\n" for h in halves), encoding="utf-8")
    from_txt = evaluate_package(package, corpus=load_text(txt), windows=2, ctx=CTX, write=False)
    from_jsonl = evaluate_package(package, corpus=load_text(jsonl), windows=2, ctx=CTX, write=False)
    assert from_jsonl["protocol"]["text"] == str(jsonl)
    assert from_jsonl["protocol"]["text_sha256"] == from_txt["protocol"]["text_sha256"]
    assert metrics(from_jsonl) == metrics(from_txt)
    builtin = evaluate_package(package, windows=2, ctx=CTX, write=False)
    assert builtin["protocol"]["text_sha256"] != from_txt["protocol"]["text_sha256"]


def test_text_shorter_than_one_window_is_refused(package: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("a few words only", encoding="utf-8")
    with pytest.raises(UsageError) as caught:
        evaluate_package(package, corpus=load_text(short), windows=2, ctx=CTX)
    message = str(caught.value)
    assert "fewer than one window of 64" in message
    assert "smaller --ctx" in message and "longer text" in message
    assert str(short) in message  # the file named


def test_unknown_variant_is_refused(package: Path) -> None:
    from edgekit.errors import PackageError

    with pytest.raises(PackageError, match="no variant 'int8'"):
        evaluate_package(package, windows=1, ctx=CTX, variants=["int8"], write=False)
