"""BOS where the model's tokenizer adds one (issue "Evaluation scores the model as it is used"): evaluation and
calibration windows start with it, the package records the rule, and raw prompts get it as transformers gives it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_models import make_tiny_checkpoint, tiny_tokenizer

from edgekit.accuracy.texts import Corpus, token_windows, with_bos


def test_windows_get_bos_in_place_of_their_first_token() -> None:
    ids = np.arange(10, 19)
    np.testing.assert_array_equal(token_windows(ids, 3, None, bos_token_id=1), [[1, 11, 12], [1, 14, 15], [1, 17, 18]])
    np.testing.assert_array_equal(token_windows(ids, 3, 2), [[10, 11, 12], [13, 14, 15]])
    assert with_bos(np.zeros((2, 4), dtype=np.int64), None).sum() == 0


def test_calibration_windows_get_bos(tmp_path: Path) -> None:
    from edgekit.quant.gptq_checkpoint import calibration_tokens

    tiny_tokenizer().save_pretrained(str(tmp_path))
    corpus = Corpus("t", "the quick brown fox jumps over the lazy dog. " * 40)
    plain = calibration_tokens(tmp_path / "tokenizer.json", corpus, 4, 16, seed=0)
    marked = calibration_tokens(tmp_path / "tokenizer.json", corpus, 4, 16, seed=0, bos_token_id=1)
    assert (marked[:, 0] == 1).all() and (plain[:, 0] != 1).all()
    assert (marked[:, 1:] == plain[:, 1:]).all()


@pytest.mark.parametrize("add_bos", [True, False])
def test_the_rule_is_read_off_the_source_tokenizer(tmp_path: Path, add_bos: bool) -> None:
    from edgekit.sources.tokenizer_rule import tokenizer_rule

    tiny_tokenizer(add_bos).save_pretrained(str(tmp_path))
    rule = tokenizer_rule(tmp_path)
    assert (rule.add_bos_token, rule.bos_token_id) == (add_bos, 1)
    # A GGUF file's own metadata decides over what the converted tokenizer does.
    assert tokenizer_rule(tmp_path, {"tokenizer.ggml.add_bos_token": not add_bos}).add_bos_token is not add_bos


@pytest.fixture(scope="module")
def bos_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[np.ndarray], list]:
    """A GPTQ build of a tiny llama whose tokenizer adds BOS; the windows evaluation and GPTQ saw."""
    import edgekit.accuracy.evaluate as evaluate
    import edgekit.quant.gptq_checkpoint as gptq_checkpoint
    from edgekit.pipeline import CalibrationSettings, EvalSettings, build

    root = tmp_path_factory.mktemp("bos")
    source = make_tiny_checkpoint("llama", root / "src", add_bos=True)
    seen_eval: list[np.ndarray] = []
    seen_calibration: list = []
    original_logits, original_tokens = evaluate.DecoderSession.logits, gptq_checkpoint.calibration_tokens

    def logits(self, input_ids):  # type: ignore[no-untyped-def]
        seen_eval.append(np.array(input_ids))
        return original_logits(self, input_ids)

    def tokens(*args, **kwargs):  # type: ignore[no-untyped-def]
        result = original_tokens(*args, **kwargs)
        seen_calibration.append(result)
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate.DecoderSession, "logits", logits)
        patch.setattr(gptq_checkpoint, "calibration_tokens", tokens)
        text = Corpus("t", "the quick brown fox jumps over the lazy dog. once upon a time " * 60)
        build(source, root / "pkg", "laptop-cpu-gptq", progress=False,
              evaluation=EvalSettings(text, windows=3, ctx=32),
              calibration=CalibrationSettings(text, samples=4, seq_len=32))  # fmt: skip
    return source, root / "pkg", seen_eval, seen_calibration


@pytest.mark.slow
def test_every_evaluation_and_calibration_window_starts_with_bos(bos_package) -> None:
    _, package, seen_eval, seen_calibration = bos_package
    manifest = json.loads((package / "manifest.json").read_text())
    tokenizer = manifest["tokenizer"]
    assert (tokenizer["add_bos_token"], tokenizer["bos_token_id"], tokenizer["chat_template"]) == (True, 1, True)
    assert manifest["evaluation"]["protocol"]["bos"] is True
    assert seen_eval and all((window[:, 0] == 1).all() for window in seen_eval)
    assert len(seen_calibration) == 1 and (seen_calibration[0][:, 0] == 1).all()


@pytest.mark.slow
@pytest.mark.parametrize("add_bos", [True, False])
def test_raw_prompt_ids_are_the_ones_transformers_gives(bos_package, tiny_llama_package: Path, add_bos: bool) -> None:
    from edgekit import load

    package = bos_package[1] if add_bos else tiny_llama_package
    reference = tiny_tokenizer(add_bos)
    with load(package) as model:
        for prompt in ("hello world", " the  quick\tfox\n", "ünïcödé 東京 🦊", ""):
            expected = reference(prompt)["input_ids"]
            assert model.tokenizer.encode(prompt) == expected, prompt
        assert (
            model.tokenizer.encode("hello", add_bos=False) == reference("hello", add_special_tokens=False)["input_ids"]
        )
