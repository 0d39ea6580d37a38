"""Every supported family generates (issue "Every supported family generates"): a tiny model with the family's real
window, rope and vocabulary settings answers a raw prompt through `edgekit run --raw`, greedily, with the tokens
transformers' own `generate` makes on the same weights; short prompts on sliding-window models, and generations
that run past the window, included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import REALISTIC_MODELS, load_tiny_model, make_tiny_checkpoint, tiny_tokenizer

from edgekit.cli import main

NEW_TOKENS = 40
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "once", "upon", "a", "time"]


def prompt_of(tokens: int) -> str:
    """A prompt of about ``tokens`` tokens of the tiny tokenizer."""
    text, words = "", iter(WORDS * 1000)
    while len(tiny_tokenizer()(text)["input_ids"]) < tokens:
        text += next(words) + " "
    return text.strip()


def transformers_continuation(source: Path, prompt: str) -> str:
    """The text transformers' greedy ``generate`` adds to ``prompt``, decoded as the runtime decodes it."""
    import torch

    tokenizer = tiny_tokenizer()
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    model = load_tiny_model(source)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=3)
    return str(tokenizer.decode(out[0, ids.shape[1] :].tolist(), skip_special_tokens=True))


@pytest.fixture(scope="module")
def realistic_package(tmp_path_factory: pytest.TempPathFactory):
    made: dict[str, tuple[Path, Path]] = {}

    def get(model_type: str) -> tuple[Path, Path]:
        if model_type not in made:
            from edgekit.pipeline import build

            root = tmp_path_factory.mktemp(f"real-{model_type}")
            source = make_tiny_checkpoint(model_type, root / "src", realistic=True)
            build(source, root / "pkg", progress=False, evaluation=None)
            made[model_type] = (source, root / "pkg")
        return made[model_type]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("model_type", sorted(REALISTIC_MODELS))
def test_a_short_raw_prompt_generates_what_transformers_generates(model_type, realistic_package, runner) -> None:
    source, package = realistic_package(model_type)
    prompt = prompt_of(10)
    result = runner.invoke(
        main, ["run", str(package), "--variant", "fp32", "--raw", "-p", prompt, "--max-new-tokens", str(NEW_TOKENS)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == transformers_continuation(source, prompt) + "\n"


@pytest.mark.slow
@pytest.mark.parametrize("prompt_tokens", [500, 1100], ids=["crossing-the-window", "far-past-the-window"])
def test_gemma3_generates_past_its_sliding_window(realistic_package, runner, prompt_tokens: int) -> None:
    source, package = realistic_package("gemma3_text")
    config = json.loads((package / "fp32" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["sliding_window"]["window_size"] == 512
    prompt = prompt_of(prompt_tokens)
    result = runner.invoke(
        main, ["run", str(package), "--variant", "fp32", "--raw", "-p", prompt, "--max-new-tokens", str(NEW_TOKENS)]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == transformers_continuation(source, prompt) + "\n"


@pytest.mark.slow
def test_the_deployed_int4_variant_of_every_family_answers(realistic_package, runner) -> None:
    for model_type in sorted(REALISTIC_MODELS):
        _, package = realistic_package(model_type)
        result = runner.invoke(main, ["run", str(package), "--raw", "-p", "the quick", "--max-new-tokens", "12"])
        assert result.exit_code == 0, (model_type, result.output)


@pytest.mark.slow
def test_chat_without_a_template_is_one_line_and_raw_still_works(tmp_path: Path, runner, tiny_checkpoints) -> None:
    import shutil

    from edgekit.pipeline import build

    source = Path(shutil.copytree(tiny_checkpoints("gemma3_text"), tmp_path / "src"))
    (source / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((source / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    result = build(source, tmp_path / "pkg", progress=False, evaluation=None)
    assert any("no chat template" in warning for warning in result.warnings)
    assert result.manifest["tokenizer"]["chat_template"] is False
    chat = runner.invoke(main, ["run", str(tmp_path / "pkg"), "-p", "What is the capital of France?"])
    assert chat.exit_code == 2 and "has no chat template" in chat.output and "--raw" in chat.output
    assert "Traceback" not in chat.output
    raw = runner.invoke(main, ["run", str(tmp_path / "pkg"), "--raw", "-p", "The capital", "--max-new-tokens", "5"])
    assert raw.exit_code == 0, raw.output
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    given = runner.invoke(main, ["run", str(tmp_path / "pkg"), "-p", "Hi", "--chat-template", str(template)])
    assert given.exit_code == 0, given.output


FP32_ONLY = """
schema_version: 1
targets:
  fp32-only:
    description: the fp32 reference alone
    providers: [cpu]
    precision: fp32
"""
# Configs the builder took wrong (each failed validation, or built and then failed to run, before its fix).
ODD_CONFIGS = {
    # sqrt(96) is not whole: the builder rounded Gemma's embedding scale to 9.8; a window past the context
    "gemma3-hidden-96": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=96, head_dim=16, query_pre_attn_scalar=16, sliding_window=512,
        layer_types=["sliding_attention", "full_attention"])),
    # a window on every layer, as transformers applies it: the builder dropped it (no layer_types)
    "mistral-window-8": ("MistralConfig", "MistralForCausalLM", dict(head_dim=16, sliding_window=8)),
    "phi3-window-8": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=8, original_max_position_embeddings=256)),
    "qwen3-rope-linear": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=16, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
    "mistral-rope-linear": ("MistralConfig", "MistralForCausalLM", dict(
        head_dim=16, rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ODD_CONFIGS))
def test_configs_the_builder_took_wrong_validate_and_generate_as_transformers(name: str, tmp_path: Path) -> None:
    import torch
    import transformers
    from tiny_models import _COMMON

    import edgekit
    from edgekit.pipeline import build
    from edgekit.runtimes.cpu_threads import physical_cores
    from edgekit.runtimes.tuning import RuntimeSettings

    config_class, model_class, settings = ODD_CONFIGS[name]
    config = getattr(transformers, config_class)(**{**_COMMON, **settings})
    config.architectures = [model_class]
    torch.manual_seed(0)
    getattr(transformers, model_class)(config).float().eval().save_pretrained(str(tmp_path / "src"))
    tiny_tokenizer().save_pretrained(str(tmp_path / "src"))
    (tmp_path / "targets.yaml").write_text(FP32_ONLY)
    build(
        tmp_path / "src",
        tmp_path / "pkg",
        "fp32-only",
        targets_file=tmp_path / "targets.yaml",
        progress=False,
        evaluation=None,
    )  # fmt: skip  (validation against PyTorch inside)
    prompt = tiny_tokenizer()(prompt_of(30))["input_ids"]
    with torch.no_grad():
        model = load_tiny_model(tmp_path / "src")
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=3,
                             min_new_tokens=NEW_TOKENS)  # fmt: skip
    for chunk in (None, 16):  # one pass, and two pieces each longer than a window of 8
        settings = RuntimeSettings(threads=physical_cores(), prefill_chunk=chunk)
        with edgekit.load(tmp_path / "pkg", variant="fp32", settings=settings) as package:
            made = package.generate_tokens(prompt, max_new_tokens=NEW_TOKENS)
            assert made == out[0, len(prompt) :].tolist(), f"prompt in pieces of {chunk}"
