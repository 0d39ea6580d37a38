"""The embedding API: thread safety, streaming, closing, and the README's code running as written."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edgekit.errors import PackageError
from edgekit.runtimes.model import load

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [f"the quick brown fox {i}" for i in range(8)]


def test_eight_threads_get_the_serial_greedy_outputs(tiny_llama_package: Path) -> None:
    with load(tiny_llama_package, variant="fp32") as model:
        serial = [model.generate(p, max_new_tokens=12) for p in PROMPTS]
        with ThreadPoolExecutor(max_workers=8) as pool:
            parallel = list(pool.map(lambda p: model.generate(p, max_new_tokens=12), PROMPTS))
    assert parallel == serial
    assert len(set(serial)) > 1, "prompts should give different completions"


def test_streamed_pieces_join_to_the_generated_text(tiny_llama_package: Path) -> None:
    with load(tiny_llama_package) as model:
        whole = model.generate("hello world", max_new_tokens=16)
        pieces = list(model.stream("hello world", max_new_tokens=16))
    assert "".join(pieces) == whole
    assert all(isinstance(p, str) and p for p in pieces)


def test_max_new_tokens_bounds_the_output(tiny_llama_package: Path) -> None:
    with load(tiny_llama_package, variant="fp32") as model:
        tokens = model.generate_tokens([5, 6, 7, 8], max_new_tokens=5)
    assert 1 <= len(tokens) <= 5


def test_a_closed_model_refuses_to_generate(tiny_llama_package: Path) -> None:
    model = load(tiny_llama_package)
    with model:
        assert model.info.variant == "int4-rtn"
    with pytest.raises(PackageError, match="closed"):
        model.generate("hello")


def test_second_load_uses_the_cached_verdict_and_a_changed_file_is_rehashed(
    tiny_llama_package: Path, tmp_path: Path, monkeypatch
) -> None:
    import shutil

    from edgekit.package.manifest import read_manifest
    from edgekit.package.verify_cache import verify_variant

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    package = tmp_path / "pkg"
    shutil.copytree(tiny_llama_package, package)
    manifest = read_manifest(package)
    assert verify_variant(package, manifest, "int4-rtn") is False
    assert verify_variant(package, manifest, "int4-rtn") is True
    data = package / "int4-rtn" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(PackageError, match="sha256"):
        verify_variant(package, manifest, "int4-rtn")
    with pytest.raises(PackageError, match="sha256"):
        load(package)


def test_bench_reports_speed_per_variant(tiny_llama_package: Path, runner, tmp_path: Path) -> None:
    import json

    from edgekit.cli import main
    from edgekit.runtimes.tuning import DEFAULT_PREFILL_CHUNK

    out = tmp_path / "bench.json"
    args = ["bench", str(tiny_llama_package), "--prompt-tokens", "8", "--gen-tokens", "4", "--runs", "2"]
    result = runner.invoke(main, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [row["variant"] for row in rows] == ["fp32", "int4-rtn"]
    for row in rows:
        assert row["provider"] == "cpu" and row["runs"] == 2
        assert row["prefill_chunk"] == DEFAULT_PREFILL_CHUNK  # the pieces the prefill figure was taken in
        assert row["ttft_s"]["min"] <= row["ttft_s"]["median"] <= row["ttft_s"]["max"]
        assert row["decode_tps"]["median"] > 0 and row["prefill_tps"]["median"] > 0


def test_an_abandoned_stream_does_not_block_other_threads(tiny_llama_package: Path) -> None:
    """Defect 11 of the hostile-input review: a half-read stream() held the model's lock until collected."""
    with load(tiny_llama_package, variant="fp32") as model:
        abandoned = model.stream("hello world", max_new_tokens=32)
        next(abandoned)  # started, then left alone (still referenced)
        with ThreadPoolExecutor(max_workers=1) as pool:
            other = pool.submit(model.generate, "the quick brown fox", max_new_tokens=8)
            assert other.result(timeout=60) == model.generate("the quick brown fox", max_new_tokens=8)
        rest = "".join(abandoned)  # the abandoned stream still finishes correctly afterwards
    assert isinstance(rest, str)


def test_a_model_the_cpu_cannot_load_is_a_package_error_not_a_provider_error(
    tiny_llama_package: Path, tmp_path: Path, monkeypatch
) -> None:
    """Defect 9: onnxruntime-genai's own failure on the CPU is the model's fault, and says so."""
    import shutil

    import onnx
    from onnx import TensorProto, helper

    from edgekit.package.manifest import read_manifest, write_manifest

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    package = Path(shutil.copytree(tiny_llama_package, tmp_path / "pkg"))
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1, 4])
    graph = helper.make_graph([], "broken", [], [out])  # no inputs and no nodes: nothing onnxruntime-genai can run
    onnx.save_model(helper.make_model(graph), str(package / "int4-rtn" / "model.onnx"))
    (package / "int4-rtn" / "model.onnx.data").unlink()
    write_manifest(package, read_manifest(package))
    with pytest.raises(PackageError) as info:
        load(package, providers=["cpu"])
    assert "cannot load this variant on the CPU" in str(info.value) and "no provider" not in str(info.value)


@pytest.mark.parametrize(
    ("call", "phrase"),
    [
        (lambda m: m.generate("hi", temperature="0.5"), "temperature must be a number"),
        (lambda m: m.generate("hi", top_p=True), "top_p must be a number"),
        (lambda m: m.generate("hi", top_k=2**31), "top_k must be an integer in 0..2147483647"),
        (lambda m: m.generate("hi", top_k=1.5), "top_k must be an integer"),
        (lambda m: m.generate("hi", seed=2**31), "seed must be an integer in 0..2147483647"),
        (lambda m: m.generate("hi", seed=-1), "seed must be an integer"),
        (lambda m: m.generate("hi", stop=[5]), "stop must be a string or a sequence of strings"),
        (lambda m: m.generate("hi", stop=5), "stop must be a string or a sequence of strings"),
        (lambda m: m.generate("hi", colour="red"), "unknown generation option 'colour'"),
        (lambda m: m.generate(None), "the prompt must be text (a str), not NoneType"),
        (lambda m: m.generate(b"hi"), "the prompt must be text (a str), not bytes"),
        (lambda m: m.generate("hi \udcff"), "the text is not valid Unicode: it holds '\\udcff'"),
        (lambda m: m.chat("hello"), "messages must be a list of {'role': ..., 'content': ...} mappings, not str"),
        (lambda m: m.chat({"role": "user", "content": "x"}), "messages must be a list"),
        (lambda m: m.chat(5), "messages must be a list of {'role': ..., 'content': ...} mappings, not int"),
        (lambda m: m.chat(["hi"]), "mappings, not a list holding str"),
        (lambda m: m.chat([{"role": "user", "content": "hi \ud800"}]), "the text is not valid Unicode"),
        (lambda m: m.generate_tokens([-1]), "token id -1 is not in this model's vocabulary (0..511)"),
        (lambda m: m.generate_tokens([5, 512]), "token id 512 is not in this model's vocabulary"),
        (lambda m: m.generate_tokens([5, True]), "token id True is not in this model's vocabulary"),
        (lambda m: m.generate_tokens(["5"]), "token id '5' is not in"),
    ],
)  # fmt: skip
def test_bad_generation_arguments_are_one_line_usage_errors(tiny_llama_package: Path, call, phrase: str) -> None:
    """They were a TypeError from inside tokenizers, a wrapped-around token id, a misleading "unknown option",
    a string read as five messages, or a failure inside onnxruntime-genai with advice to rebuild the package."""
    from edgekit.errors import UsageError

    with load(tiny_llama_package, variant="fp32") as model:
        assert model.vocab_size == 512
        with pytest.raises(UsageError) as info:
            call(model)
    assert phrase in str(info.value) and "\n" not in str(info.value)


def test_generation_arguments_at_their_limits_work(tiny_llama_package: Path) -> None:
    import numpy as np

    messages = [{"role": "user", "content": "hello there"}]
    with load(tiny_llama_package, variant="fp32") as model:
        assert model.generate("hi", max_new_tokens=3, stop=["", "zzz"]) == model.generate("hi", max_new_tokens=3)
        assert model.generate("hi", max_new_tokens=3, stop={"zzz"}) == model.generate("hi", max_new_tokens=3)
        assert model.generate("hi", max_new_tokens=np.int64(3), temperature=np.float32(0)) == model.generate(
            "hi", max_new_tokens=3
        )
        # A generator of messages is read once: the conversation, not an empty one.
        assert model.apply_chat_template(m for m in messages) == model.apply_chat_template(messages)
        assert "hello there" in model.apply_chat_template(messages)
        sampled = model.generate_tokens(np.array([5, 511]), max_new_tokens=3, temperature=1, top_k=2**31 - 1,
                                        seed=2**31 - 1)  # fmt: skip
        assert 1 <= len(sampled) <= 3


def test_generation_config_keeps_plain_python_numbers() -> None:
    import numpy as np

    from edgekit.runtimes.generation import GenerationConfig

    config = GenerationConfig(max_new_tokens=np.int64(4), temperature=np.float32(0.5), top_k=np.int32(3),
                              seed=np.uint16(7), stop=("", "x"))  # fmt: skip
    assert [type(v) for v in (config.max_new_tokens, config.temperature, config.top_k, config.seed)] == [
        int,
        float,
        int,
        int,
    ]
    assert config.stop == ("x",)


@pytest.mark.parametrize("vocab", [8, 76, 201, 512, 151_936])
def test_benchmark_prompts_are_ordinary_ids_of_any_vocabulary(vocab: int) -> None:
    """A vocabulary of 100 tokens or fewer made bench fail (low >= high) and tune pass ids outside it."""
    from edgekit.runtimes.bench import random_prompt

    ids = random_prompt(vocab, 1000)
    assert len(ids) == 1000 and all(isinstance(i, int) and 0 <= i < vocab for i in ids)
    assert min(ids) >= (100 if vocab > 200 else vocab // 4) and max(ids) < min(vocab, 30000)
    assert random_prompt(vocab, 1000) == ids  # the same prompt for every variant


def test_bench_refuses_a_prompt_beyond_the_context_before_making_it(runner, tiny_llama_package: Path) -> None:
    """10**20 tokens was a numpy traceback; 2 * 10**7 took 20 s and 800 MB before the context check."""
    import time

    from edgekit.cli import main

    started = time.monotonic()
    result = runner.invoke(main, ["bench", str(tiny_llama_package), "--prompt-tokens", str(10**20)])
    assert result.exit_code == 2 and "does not fit the" in result.output and "Traceback" not in result.output
    assert time.monotonic() - started < 30
