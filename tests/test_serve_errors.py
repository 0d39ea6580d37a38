"""Bad requests get the right 4xx and OpenAI's error body (``{"error": {message, type, param, code}}``), never a
500 or a traceback: malformed JSON, wrong types, huge bodies, long prompts, unknown models and parameters,
missing or wrong API keys, full queues and timeouts."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_serve_helpers import QUESTION, openai_client, serving

import edgekit

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

KEY = "sk-test-0123456789"


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_package: Path) -> Iterator[edgekit.Model]:
    with edgekit.load(tiny_llama_package) as model:
        yield model


@pytest.fixture(scope="module")
def url(tiny_model: edgekit.Model) -> Iterator[str]:
    from edgekit.serve import create_app

    app = create_app(tiny_model, model_name="tiny", api_key=KEY, max_tokens=64, max_body_bytes=64 << 10)
    with serving(app) as base_url:
        yield base_url
    app.state.edgekit.close()


def post(url: str, body: Any = None, *, content: Any = None, key: str | None = KEY, path: str = "/v1/chat/completions",
         headers: dict[str, str] | None = None) -> httpx.Response:  # fmt: skip
    sent = dict(headers or {})
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    if content is None:
        return httpx.post(url + path, json=body, headers=sent, timeout=60)
    return httpx.post(url + path, content=content, headers=sent, timeout=60)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": QUESTION, "max_tokens": 4, **fields}


def assert_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param, error
        assert param.split(".")[0].split("[")[0] in error["message"] or error["code"] == "unsupported_parameter"
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


def test_malformed_json(url: str) -> None:
    assert_error(post(url, content=b'{"model": "tiny", "messages": ['), 400, code="invalid_json")
    assert_error(post(url, content=b"\xff\xfe not utf-8"), 400, code="invalid_json")
    assert_error(post(url, content=b'{"model": "tiny", "temperature": NaN}'), 400, code="invalid_json")


def test_a_body_that_is_not_an_object(url: str) -> None:
    assert_error(post(url, [1, 2]), 400)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"stream": "yes"}, "stream"),
        ({"stop": 5}, "stop"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": -1}, "seed"),
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"model": 5}, "model"),
    ],
)  # fmt: skip
def test_wrong_types_and_values_name_the_parameter(url: str, fields: dict[str, Any], param: str) -> None:
    assert_error(post(url, chat(**fields)), 400, param=param)


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"n": 2}, "n"), ({"logprobs": True}, "logprobs"), ({"top_logprobs": 3}, "top_logprobs"),
     ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"), ({"tool_choice": "auto"}, "tool_choice"),
     ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": 1}, "frequency_penalty"),
     ({"logit_bias": {"1": 5}}, "logit_bias"), ({"response_format": {"type": "json_object"}}, "response_format")],
)  # fmt: skip
def test_unsupported_parameters_are_refused_by_name(url: str, fields: dict[str, Any], param: str) -> None:
    assert_error(post(url, chat(**fields)), 400, param=param, code="unsupported_parameter")


def test_unsupported_parameters_at_their_neutral_value_are_accepted(url: str) -> None:
    neutral = {"n": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "logprobs": False, "tools": [],
               "response_format": {"type": "text"}, "user": "someone", "logit_bias": {}}  # fmt: skip
    assert post(url, chat(**neutral)).status_code == 200


def test_unknown_parameter_is_named(url: str) -> None:
    error = assert_error(post(url, chat(best_offer=3)), 400, param="best_offer", code="unknown_parameter")
    assert "Unrecognized request argument supplied: best_offer" in error["message"]


def test_completion_only_parameters_on_completions(url: str) -> None:
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert post(url, body, path="/v1/completions").status_code == 200
    assert_error(post(url, {**body, "echo": True}, path="/v1/completions"), 400, param="echo")
    assert_error(post(url, {**body, "prompt": [1, 2, 3]}, path="/v1/completions"), 400, param="prompt")
    assert_error(post(url, {**body, "prompt": ["a", "b"]}, path="/v1/completions"), 400, param="prompt")
    assert_error(post(url, {**body, "messages": QUESTION}, path="/v1/completions"), 400, param="messages")


def test_a_ten_megabyte_body_is_413(url: str) -> None:
    huge = chat(messages=[{"role": "user", "content": "x" * (10 << 20)}])
    assert_error(post(url, huge), 413, code="request_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(160):
            yield b"x" * (64 << 10)
        yield b'"}]}'

    assert_error(post(url, content=chunks()), 413, code="request_too_large")


def test_a_prompt_longer_than_the_context_is_400(url: str, tiny_model: edgekit.Model) -> None:
    long_text = "hello world " * tiny_model.context_length
    error = assert_error(post(url, chat(messages=[{"role": "user", "content": long_text}])), 400, param="messages",
                         code="context_length_exceeded")  # fmt: skip
    assert str(tiny_model.context_length) in error["message"]
    body = {"model": "tiny", "prompt": long_text, "max_tokens": 2}
    assert_error(post(url, body, path="/v1/completions"), 400, param="prompt", code="context_length_exceeded")


def test_max_tokens_above_the_cap_is_400(url: str) -> None:
    assert_error(post(url, chat(max_tokens=65)), 400, param="max_tokens")
    assert_error(post(url, chat(max_completion_tokens=1000)), 400, param="max_completion_tokens")
    assert post(url, chat(max_tokens=64)).status_code == 200


def test_unknown_and_missing_model(url: str) -> None:
    assert_error(post(url, chat(model="gpt-4o")), 404, param="model", code="model_not_found")
    body = chat()
    del body["model"]
    assert_error(post(url, body), 400, param="model")


def test_api_key_missing_wrong_and_right(url: str) -> None:
    assert_error(post(url, chat(), key=None), 401)
    assert_error(post(url, chat(), key=KEY + "x"), 401, code="invalid_api_key")
    assert_error(post(url, chat(), key=None, headers={"Authorization": f"Basic {KEY}"}), 401)
    assert post(url, chat(), key=KEY).status_code == 200
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/metrics").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # load balancers probe it without a key
    assert httpx.get(f"{url}/").status_code == 200  # the page asks for the key itself


def test_the_openai_client_sees_typed_errors(url: str) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai_client(url, "wrong").models.list()
    client = openai_client(url, KEY)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=QUESTION)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as several:
        client.chat.completions.create(model="tiny", messages=QUESTION, n=3)
    assert several.value.param == "n"


def test_an_unauthorized_huge_body_still_gets_its_401(url: str) -> None:
    assert_error(post(url, content=b"x" * (10 << 20), key="wrong"), 401)


def test_unknown_route_and_method(url: str) -> None:
    assert_error(httpx.get(f"{url}/v1/embeddings"), 404, code="not_found")
    assert_error(httpx.get(f"{url}/v1/chat/completions"), 405, code="method_not_allowed")


def test_a_full_queue_is_503(tiny_model: edgekit.Model, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading
    import time

    from edgekit.serve import create_app

    release = threading.Event()
    original = tiny_model.token_stream

    def held_stream(tokens: Any, config: Any) -> Iterator[int]:
        release.wait(30)  # holds the only slot until the test has seen the 503
        yield from original(tokens, config)

    monkeypatch.setattr(tiny_model, "token_stream", held_stream)
    app = create_app(tiny_model, model_name="tiny", max_concurrency=1, max_queue=0)
    try:
        with serving(app) as base:
            first = threading.Thread(target=lambda: post(base, chat(), key=None))
            first.start()
            while app.state.edgekit.scheduler.active_count == 0:
                time.sleep(0.01)
            response = post(base, chat(), key=None)
            release.set()
            first.join(timeout=60)
        error = assert_error(response, 503, code="server_busy")
        assert error["type"] == "server_error" and response.headers["retry-after"] == "1"
    finally:
        release.set()
        app.state.edgekit.close()


def test_a_request_past_its_time_limit_is_504(tiny_model: edgekit.Model) -> None:
    from edgekit.serve import create_app

    app = create_app(tiny_model, model_name="tiny", timeout_s=1e-6)
    try:
        with serving(app) as base:
            assert_error(post(base, chat(), key=None), 504, code="timeout")
            assert_error(post(base, chat(stream=True), key=None), 504, code="timeout")
    finally:
        app.state.edgekit.close()


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800"}]}',
         "messages[0].content"),
        ("/v1/chat/completions",
         b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udcff"}]}]}',
         "messages[0].content"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800"}', "prompt"),
        ("/v1/completions", b'{"model": "tiny", "prompt": "x", "stop": ["\\udfff"]}', "stop"),
        ("/v1/completions", b'{"model": "\\ud800", "prompt": "x"}', "model"),
    ],
)  # fmt: skip
def test_a_lone_surrogate_is_400_naming_the_field(url: str, path: str, body: bytes, param: str) -> None:
    """JSON can escape half a UTF-16 pair; no tokenizer encodes it (it was a 500 from inside tokenizers)."""
    assert "unicode" in assert_error(post(url, content=body, path=path), 400, param=param)["message"].lower()


def test_a_seed_beyond_what_the_sampler_takes_is_400(url: str) -> None:
    """onnxruntime-genai takes a 32-bit seed; 2**31 failed inside it with advice to rebuild the package."""
    assert_error(post(url, chat(seed=2**31)), 400, param="seed")
    assert post(url, chat(seed=2**31 - 1, temperature=0.7)).status_code == 200


def part_of_a_body(url: str, first: bytes, key: str = KEY) -> socket.socket:
    """A raw connection that has sent a completion request declaring a 100-byte body, and ``first`` of it."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode() +
                 b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n" + first)  # fmt: skip
    return sock


def whole_answer(sock: socket.socket) -> str:
    """The server's whole response: its head and body can come in separate reads."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
        piece = sock.recv(65536)
        if not piece:
            break
        data += piece
    return data.decode("latin-1")


def _content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def test_a_client_that_hangs_up_mid_body_is_not_a_server_failure(url: str) -> None:
    def failures() -> int:
        text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        return sum(int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if 'status="500"' in line)

    before = failures()
    with part_of_a_body(url, b'{"mod'):
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while 'status="499"' not in (
        metrics := httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    ):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.1)
    assert failures() == before


def test_a_body_that_stops_arriving_is_408(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that declared a body and sent part of it held its connection for as long as it liked."""
    import edgekit.serve.http_io

    monkeypatch.setattr(edgekit.serve.http_io, "BODY_TIMEOUT_S", 0.5)
    with part_of_a_body(url, b'{"mod') as sock:
        started = time.monotonic()
        answer = whole_answer(sock)
    assert answer.startswith("HTTP/1.1 408"), answer
    assert '"code":"request_timeout"' in answer.replace(" ", "") and time.monotonic() - started < 10


def test_a_body_sent_a_byte_at_a_time_still_has_one_deadline(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The limit is on the whole body: a piece every so often must not keep the connection for ever."""
    import edgekit.serve.http_io

    monkeypatch.setattr(edgekit.serve.http_io, "BODY_TIMEOUT_S", 1.0)
    with part_of_a_body(url, b"") as sock:
        started = time.monotonic()
        sock.settimeout(0.3)
        answer = b""
        while not answer and time.monotonic() - started < 10:
            try:
                answer = sock.recv(65536)
            except TimeoutError:
                sock.sendall(b" ")  # a byte every 0.3 s: each piece well within the limit
    assert answer.decode("latin-1").startswith("HTTP/1.1 408"), answer
    assert time.monotonic() - started < 5


def test_a_refused_request_whose_body_stalls_keeps_its_refusal(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgekit.serve.http_io

    monkeypatch.setattr(edgekit.serve.http_io, "BODY_TIMEOUT_S", 0.5)
    with part_of_a_body(url, b"{", key="wrong") as sock:
        answer = whole_answer(sock)
    assert answer.startswith("HTTP/1.1 401"), answer
