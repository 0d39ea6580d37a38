"""The package's tokenizer and chat template give what the source's Hugging Face tokenizer gives, checked at build
time and recorded in the manifest (issue "Real checkpoints": tokenizer and chat template)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tiny_models import TINY_MODELS, tiny_tokenizer

from edgekit.errors import SourceError, ValidationError
from edgekit.exporters.tokenizer_parity import (
    FIXED_STRINGS,
    MAX_SPECIAL_STRINGS,
    TokenizerParity,
    check_tokenizer_parity,
    special_token_strings,
)
from edgekit.tokenizer_record import TokenizerRule

NO_BOS = TokenizerRule(False, 1)
# Gemma 2's way of refusing a system message.
NO_SYSTEM_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def folders(root: Path, *, add_bos: bool = False, template: str | None = "keep") -> tuple[Path, Path]:
    """A source folder with the tiny tokenizer, and a variant folder re-saved from it as the builder does."""
    from transformers import AutoTokenizer

    source, variant = root / "source", root / "variant"
    tokenizer = tiny_tokenizer(add_bos)
    tokenizer.save_pretrained(str(source))
    if template != "keep":
        (source / "chat_template.jinja").unlink()
        if template is not None:
            (source / "chat_template.jinja").write_text(template, encoding="utf-8")
    AutoTokenizer.from_pretrained(str(source), trust_remote_code=False).save_pretrained(str(variant))
    return source, variant


def edit_tokenizer_json(folder: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data["model"])
    path.write_text(json.dumps(data), encoding="utf-8")


def first_string_tokens(source: Path) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    return tokenizer.convert_ids_to_tokens(tokenizer(FIXED_STRINGS[0], add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("add_bos", [False, True])
def test_an_unchanged_variant_passes_every_string_and_the_chat_template(tmp_path: Path, add_bos: bool) -> None:
    source, variant = folders(tmp_path, add_bos=add_bos)
    parity = check_tokenizer_parity(source, variant, TokenizerRule(add_bos, 1))
    specials = special_token_strings(tiny_tokenizer(add_bos))
    assert parity == TokenizerParity(len(FIXED_STRINGS) + len(specials), "same")
    assert parity.as_dict() == {"strings": parity.strings, "chat_template": "same"}


def test_the_strings_cover_the_special_tokens_inside_text(tmp_path: Path) -> None:
    specials = special_token_strings(tiny_tokenizer())
    assert len(specials) == MAX_SPECIAL_STRINGS
    # BOS/EOS/PAD/UNK first, then the chat template's own special token, never at a string's start.
    assert [s.split(" ")[0] for s in specials[:5]] == ["Hi<s>", "Hi</s>", "Hi<pad>", "Hi<unk>", "Hi<|assistant|>"]
    assert all(s.startswith("Hi") for s in specials)
    assert "" in FIXED_STRINGS and any("\t" in s for s in FIXED_STRINGS) and any("東京" in s for s in FIXED_STRINGS)


def test_a_wrong_bos_rule_fails_on_the_first_string(tmp_path: Path) -> None:
    source, variant = folders(tmp_path, add_bos=True)
    with pytest.raises(ValidationError) as info:
        check_tokenizer_parity(source, variant, NO_BOS)
    message = str(info.value)
    assert repr(FIXED_STRINGS[0])[:40] in message and "\n" not in message
    assert "source [1, " in message


def test_a_changed_merge_fails_naming_the_first_string_that_differs(tmp_path: Path) -> None:
    source, variant = folders(tmp_path)
    merged = next(token for token in first_string_tokens(source) if len(token) > 1)

    def drop_merge(model: dict) -> None:  # type: ignore[type-arg]
        kept = [m for m in model["merges"] if "".join(m) != merged]
        assert len(kept) == len(model["merges"]) - 1
        model["merges"] = kept

    edit_tokenizer_json(variant, drop_merge)
    with pytest.raises(ValidationError) as info:
        check_tokenizer_parity(source, variant, NO_BOS)
    message = str(info.value)
    first = repr(FIXED_STRINGS[0])[:20]
    assert message.startswith(f"{variant}: the package's tokenizer gives other ids than the source's for {first}")
    assert "package [" in message and "source [" in message and "ids)" in message and "\n" not in message


def test_swapped_vocabulary_ids_fail(tmp_path: Path) -> None:
    source, variant = folders(tmp_path)
    first, second = first_string_tokens(source)[1:3]

    def swap(model: dict) -> None:  # type: ignore[type-arg]
        vocab = model["vocab"]
        vocab[first], vocab[second] = vocab[second], vocab[first]

    edit_tokenizer_json(variant, swap)
    with pytest.raises(ValidationError, match="gives other ids than the source's for \"The quick"):
        check_tokenizer_parity(source, variant, NO_BOS)


def test_a_changed_decoder_fails_the_round_trip(tmp_path: Path) -> None:
    source, variant = folders(tmp_path)
    path = variant / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    data["decoder"] = None  # byte-level tokens come back as "Ġquick"
    path.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValidationError, match="the package's tokenizer decodes the ids of \"The quick"):
        check_tokenizer_parity(source, variant, NO_BOS)


def test_a_changed_chat_template_fails(tmp_path: Path) -> None:
    source, variant = folders(tmp_path)
    template = (variant / "chat_template.jinja").read_text(encoding="utf-8")
    (variant / "chat_template.jinja").write_text(template.replace("</s>", "</s>\n"), encoding="utf-8")
    with pytest.raises(ValidationError) as info:
        check_tokenizer_parity(source, variant, NO_BOS)
    message = str(info.value)
    assert "the package's chat template renders other text than the source's from character" in message
    assert "\n" not in message


def test_a_lost_chat_template_fails(tmp_path: Path) -> None:
    source, variant = folders(tmp_path)
    (variant / "chat_template.jinja").unlink()
    with pytest.raises(ValidationError, match="the package has no chat template but the other has one"):
        check_tokenizer_parity(source, variant, NO_BOS)


def test_no_chat_template_on_either_side_is_recorded_as_none(tmp_path: Path) -> None:
    source, variant = folders(tmp_path, template=None)
    assert check_tokenizer_parity(source, variant, NO_BOS).chat_template == "none"


def test_a_template_that_rejects_system_messages_is_checked_without_one(tmp_path: Path) -> None:
    source, variant = folders(tmp_path, template=NO_SYSTEM_TEMPLATE)
    assert check_tokenizer_parity(source, variant, NO_BOS).chat_template == "no system role"


@pytest.mark.parametrize(
    ("template", "phrase"),
    [
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "time limit"),
        ("{{ 'x' * 10**9 }}", "passed 1000000000"),
        ("{{ raise_exception('never renders') }}", "failed (never renders)"),
        # A bound passed only with a system message is a refusal, not a template without a system role.
        ("{% for m in messages %}{% if m.role == 'system' %}{{ 'x' * 10**9 }}{% endif %}{% endfor %}", "passed 10"),
    ],
)
def test_a_template_our_renderer_refuses_fails_without_reaching_transformers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, template: str, phrase: str
) -> None:
    from transformers import PreTrainedTokenizerBase

    source, variant = folders(tmp_path, template=template)

    def unbounded(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("transformers' unbounded renderer was given the template")

    monkeypatch.setattr(PreTrainedTokenizerBase, "apply_chat_template", unbounded)
    with pytest.raises(SourceError) as info:
        check_tokenizer_parity(source, variant, NO_BOS)
    message = str(info.value)
    assert phrase in message and "\n" not in message and str(source) in message


# ---- builds: every family's tiny model, a build whose export loses the template, SmolLM2 from its GGUF file


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(TINY_MODELS))
def test_every_family_build_records_parity(tiny_checkpoints, tmp_path: Path, model_type: str) -> None:
    from edgekit.pipeline import build

    build(tiny_checkpoints(model_type), tmp_path / "pkg", "laptop-cpu-rtn", evaluation=None, progress=False)
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    strings = len(FIXED_STRINGS) + len(special_token_strings(tiny_tokenizer()))
    assert manifest["tokenizer"]["parity"] == {"strings": strings, "chat_template": "same"}
    steps = [step["name"] for step in manifest["build_steps"]]
    assert "check tokenizer and chat template against the source's" in steps


@pytest.mark.slow
def test_a_build_whose_export_changes_the_template_fails(
    tiny_checkpoints, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgekit.pipeline import build
    from edgekit.sources.registry import Architecture

    original = Architecture.adapt_export

    def tamper(self, folder: Path) -> None:  # type: ignore[no-untyped-def]
        original(self, folder)
        (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")

    monkeypatch.setattr(Architecture, "adapt_export", tamper)
    with pytest.raises(ValidationError, match="the package's chat template renders"):
        build(tiny_checkpoints("llama"), tmp_path / "pkg", "laptop-cpu", evaluation=None, progress=False)
    assert not (tmp_path / "pkg").exists()


@pytest.mark.slow
def test_smollm2_from_its_gguf_file_passes(smollm2_package: Path) -> None:
    parity = json.loads((smollm2_package / "manifest.json").read_text())["tokenizer"]["parity"]
    # The fixed strings and its 17 special tokens (<|endoftext|>, <|im_start|>, <|im_end|>, <repo_name>, ...)
    assert parity == {"strings": len(FIXED_STRINGS) + 17, "chat_template": "same"}


def test_a_copied_package_folder_is_checked_as_is(tmp_path: Path) -> None:
    """The check reads the variant folder alone: a verbatim copy of the source's files passes too."""
    source, _ = folders(tmp_path)
    copy = Path(shutil.copytree(source, tmp_path / "copy"))
    assert check_tokenizer_parity(source, copy, NO_BOS).chat_template == "same"
