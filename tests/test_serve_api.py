"""``edgekit serve``'s OpenAI endpoints, checked with the real ``openai`` client against a uvicorn server on the
tiny package: shapes, streaming, usage, finish reasons, stop strings, and concurrent clients."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_serve_helpers import QUESTION, openai_client, serving

import edgekit

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_package: Path) -> Iterator[edgekit.Model]:
    with edgekit.load(tiny_llama_package) as model:
        yield model


@pytest.fixture(scope="module")
def server(tiny_model: edgekit.Model) -> Iterator[dict[str, Any]]:
    from edgekit.serve import create_app

    app = create_app(tiny_model, model_name="tiny", max_concurrency=2)
    with serving(app) as base_url:
        yield {"url": base_url, "client": openai_client(base_url), "app": app}
    app.state.edgekit.close()


def greedy_chat(model: edgekit.Model, messages: list[dict[str, str]], max_tokens: int) -> str:
    return str(model.chat(messages, max_new_tokens=max_tokens))


def test_models_lists_the_variant_and_target(server: dict[str, Any], tiny_model: edgekit.Model) -> None:
    (entry,) = server["client"].models.list().data
    assert entry.id == "tiny" and entry.object == "model" and entry.owned_by == "edgekit"
    assert entry.model_extra["variant"] == tiny_model.info.variant
    assert entry.model_extra["target"] == "laptop-cpu-rtn"
    assert entry.model_extra["context_length"] == tiny_model.context_length
    assert server["client"].models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        server["client"].models.retrieve("other")


def test_chat_completion_matches_the_model_and_counts_tokens(server: dict[str, Any], tiny_model: edgekit.Model) -> None:
    reply = server["client"].chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy_chat(tiny_model, QUESTION, 12)
    prompt = tiny_model.tokenizer.encode(tiny_model.apply_chat_template(QUESTION), add_bos=False)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == len(tiny_model.generate_tokens(prompt, max_new_tokens=12))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    if reply.usage.completion_tokens == 12:
        assert choice.finish_reason == "length"


def test_max_completion_tokens_bounds_the_answer(server: dict[str, Any]) -> None:
    reply = server["client"].chat.completions.create(model="tiny", messages=QUESTION, max_completion_tokens=3,
                                                     temperature=0)  # fmt: skip
    assert reply.usage.completion_tokens <= 3


def test_streamed_chat_equals_the_whole_answer_and_reports_usage(server: dict[str, Any]) -> None:
    client = server["client"]
    whole = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_is_server_sent_events_ending_with_done(server: dict[str, Any]) -> None:
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{server['url']}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert '"usage"' not in "".join(events)  # usage only when stream_options.include_usage asks for it


def test_completions_match_generate(server: dict[str, Any], tiny_model: edgekit.Model) -> None:
    client = server["client"]
    reply = client.completions.create(model="tiny", prompt="hello world", max_tokens=10, temperature=0)
    assert reply.object == "text_completion"
    assert reply.choices[0].text == tiny_model.generate("hello world", max_new_tokens=10)
    assert reply.usage.prompt_tokens == len(tiny_model.tokenizer.encode("hello world"))
    streamed = client.completions.create(model="tiny", prompt="hello world", max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_completions_default_to_sixteen_tokens_like_openai(server: dict[str, Any]) -> None:
    reply = server["client"].completions.create(model="tiny", prompt="hello world", temperature=0)
    assert reply.usage.completion_tokens <= 16


def test_stop_string_cuts_the_answer(server: dict[str, Any]) -> None:
    client = server["client"]
    full = client.completions.create(model="tiny", prompt="hello world", max_tokens=24, temperature=0).choices[0].text
    stop = next((full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip()), None)
    if stop is None:
        pytest.skip("the tiny model's answer has no stop string to cut at")
    for stream in (False, True):
        reply = client.completions.create(model="tiny", prompt="hello world", max_tokens=24, temperature=0,
                                          stop=[stop], stream=stream)  # fmt: skip
        chunks = list(reply) if stream else [reply]
        text = "".join(c.choices[0].text for c in chunks)
        assert text == full[: full.index(stop)]
        assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]


def test_a_seed_repeats_a_sampled_answer(server: dict[str, Any]) -> None:
    client = server["client"]
    answers = {client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=1.0,
                                              seed=7).choices[0].message.content for _ in range(2)}  # fmt: skip
    assert len(answers) == 1


def test_concurrent_streams_each_get_the_answer_they_would_get_alone(server: dict[str, Any],
                                                                     tiny_model: edgekit.Model) -> None:  # fmt: skip
    questions = [[{"role": "user", "content": f"Count to {n}."}] for n in range(6)]
    alone = [greedy_chat(tiny_model, q, 20) for q in questions]
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(index: int) -> None:
        try:
            stream = server["client"].chat.completions.create(model="tiny", messages=questions[index], max_tokens=20,
                                                              temperature=0, stream=True)  # fmt: skip
            got[index] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors
    assert [got[i] for i in range(len(questions))] == alone


def test_a_client_that_hangs_up_frees_its_slot(tiny_model: edgekit.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one slot, a stream abandoned mid-answer must stop generating and not hold the next request back."""
    from edgekit.serve import create_app

    original = tiny_model.token_stream

    def slow_stream(tokens: Any, config: Any) -> Iterator[int]:
        for token in original(tokens, config):
            time.sleep(0.02)  # the tiny model is too quick to be caught mid-answer otherwise
            yield token

    monkeypatch.setattr(tiny_model, "token_stream", slow_stream)
    app = create_app(tiny_model, model_name="tiny", max_concurrency=1)
    state = app.state.edgekit
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 200, "temperature": 0, "stream": True}
    try:
        with serving(app) as url:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
                next(response.iter_lines())  # the stream has started; now hang up
            started = time.monotonic()
            reply = openai_client(url).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)
            waited = time.monotonic() - started
            assert reply.usage.completion_tokens <= 2
            assert httpx.get(f"{url}/health").json()["queued"] == 0
    finally:
        state.close()
    assert waited < 2.0, f"the next request waited {waited:.1f} s behind an abandoned one"
    assert state.metrics.completion_tokens < 100, "the abandoned generation kept running"
