"""``create_app`` inside other apps (mounted in FastAPI), the page, /health and /metrics, CORS, and the
``edgekit serve`` command (its options, its localhost default, and its one-line errors)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from test_serve_helpers import QUESTION

import edgekit
from edgekit.cli import EdgekitGroup

httpx = pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_package: Path) -> Iterator[edgekit.Model]:
    with edgekit.load(tiny_llama_package) as model:
        yield model


def test_mounted_in_a_fastapi_app(tiny_model: edgekit.Model) -> None:
    fastapi = pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from edgekit.serve import create_app

    parent = fastapi.FastAPI()

    @parent.get("/hello")
    def hello() -> dict[str, str]:
        return {"hello": "world"}

    llm = create_app(tiny_model, model_name="tiny")
    parent.mount("/llm", llm)
    try:
        client = TestClient(parent)
        assert client.get("/hello").json() == {"hello": "world"}
        reply = client.post("/llm/v1/chat/completions", json={"model": "tiny", "messages": QUESTION, "max_tokens": 3})
        assert reply.status_code == 200 and reply.json()["object"] == "chat.completion"
        streamed = client.post("/llm/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3,
                                                             "stream": True})  # fmt: skip
        assert streamed.text.rstrip().endswith("data: [DONE]")
        assert client.get("/llm/v1/models").json()["data"][0]["id"] == "tiny"
        assert 'src="chat.js"' in client.get("/llm/").text  # relative links: the page works under a prefix
        assert client.get("/llm/chat.js").status_code == 200
        metrics = client.get("/llm/metrics").text
        assert 'edgekit_requests_total{endpoint="/v1/chat/completions",status="200"} 1' in metrics
    finally:
        llm.state.edgekit.close()


def test_health_metrics_and_page(tiny_model: edgekit.Model) -> None:
    from starlette.testclient import TestClient

    from edgekit.serve import create_app

    app = create_app(tiny_model, model_name="tiny")
    try:
        client = TestClient(app)
        client.post("/v1/chat/completions", json={"model": "tiny", "messages": QUESTION, "max_tokens": 3})
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["variant"] == tiny_model.info.variant
        metrics = client.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain; version=0.0.4")
        for name in ("edgekit_requests_total", "edgekit_prompt_tokens_total", "edgekit_completion_tokens_total",
                     "edgekit_time_to_first_token_seconds_bucket", "edgekit_decode_tokens_per_second_count",
                     "edgekit_queue_length", "edgekit_active_requests"):  # fmt: skip
            assert name in metrics.text
        page = client.get("/")
        assert page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "http://" not in page.text and "https://" not in page.text  # nothing from a CDN
        script = client.get("/chat.js").text
        assert "http://" not in script and "https://" not in script
    finally:
        app.state.edgekit.close()


def test_cors_is_off_unless_asked(tiny_model: edgekit.Model) -> None:
    from starlette.testclient import TestClient

    from edgekit.serve import create_app

    preflight = {"Origin": "http://dashboard.test", "Access-Control-Request-Method": "POST"}
    closed, opened = create_app(tiny_model), create_app(tiny_model, cors_origins=("http://dashboard.test",))
    try:
        assert "access-control-allow-origin" not in TestClient(closed).options("/v1/models", headers=preflight).headers
        answer = TestClient(opened).options("/v1/models", headers=preflight)
        assert answer.headers["access-control-allow-origin"] == "http://dashboard.test"
    finally:
        closed.state.edgekit.close()
        opened.state.edgekit.close()


def test_an_app_made_from_a_package_owns_its_model(tiny_llama_package: Path) -> None:
    from edgekit.serve import create_app

    app = create_app(tiny_llama_package)
    state = app.state.edgekit
    assert state.facts.model_id == tiny_llama_package.name and state.owns_model
    state.close()
    with pytest.raises(edgekit.errors.PackageError):
        state.model.generate("hi", max_new_tokens=1)


def test_a_model_passed_in_stays_open(tiny_model: edgekit.Model) -> None:
    from edgekit.serve import create_app

    create_app(tiny_model).state.edgekit.close()
    assert tiny_model.generate("hi", max_new_tokens=1) is not None


def cli() -> click.Group:
    from edgekit.serve.command import serve

    @click.group(cls=EdgekitGroup)
    def main() -> None:
        """The edgekit group, as cli.py registers the command."""

    main.add_command(serve)
    return main


def _served(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record where ``serve`` would listen and the app it would run, without listening or running."""
    import socket

    import uvicorn

    from edgekit.serve import command

    calls: list[dict[str, Any]] = []

    def bound(host: str, port: int) -> socket.socket:
        calls.append({"host": host, "port": port})
        return socket.socket()

    monkeypatch.setattr(command, "listening_socket", bound)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: calls[-1].update(app=self.config.app))
    return calls


def test_serve_command_binds_to_localhost_by_default(tiny_llama_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _served(monkeypatch)
    result = CliRunner().invoke(cli(), ["serve", str(tiny_llama_package), "--max-concurrency", "2"])
    assert result.exit_code == 0, result.output
    (call,) = calls
    assert call["host"] == "127.0.0.1" and call["port"] == 8000
    state = call["app"].state.edgekit
    assert state.options.max_concurrency == 2 and state.options.api_key is None
    assert "serving" in result.output
    state.close()


def test_serve_command_warns_when_open_without_a_key(tiny_llama_package: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _served(monkeypatch)
    result = CliRunner().invoke(cli(), ["serve", str(tiny_llama_package), "--host", "0.0.0.0"])
    assert result.exit_code == 0 and "no --api-key" in result.output
    monkeypatch.setenv("EDGEKIT_API_KEY", "secret")
    result = CliRunner().invoke(cli(), ["serve", str(tiny_llama_package), "--host", "0.0.0.0"])
    assert "no --api-key" not in result.output and calls[-1]["app"].state.edgekit.options.api_key == "secret"
    for call in calls:
        call["app"].state.edgekit.close()


def test_a_taken_port_or_a_bad_host_is_a_one_line_error_before_the_model_loads(tmp_path: Path) -> None:
    import socket

    from edgekit.errors import UsageError
    from edgekit.serve.command import listening_socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match="in use") as info:
            listening_socket("127.0.0.1", port)
        assert "--port" in (info.value.fix or "")
        # The package is not even read: a missing one would be the error otherwise.
        result = CliRunner().invoke(cli(), ["serve", str(tmp_path / "missing"), "--port", str(port)])
        assert result.exit_code == 2 and "in use" in result.output and "Traceback" not in result.output
    with pytest.raises(UsageError, match=r"cannot listen on 192\.0\.2\.1:8000") as info:
        listening_socket("192.0.2.1", 8000)  # TEST-NET-1: an address of no machine, refused without DNS
    assert "--host" in (info.value.fix or "")
    with listening_socket("127.0.0.1", 0) as free:
        assert free.getsockname()[0] == "127.0.0.1"
        with pytest.raises(UsageError, match="in use"):  # a second server on a port one is loading on
            listening_socket("127.0.0.1", free.getsockname()[1])
        with pytest.raises(UsageError, match="in use"):
            listening_socket("localhost", free.getsockname()[1])


def test_serve_command_errors_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli(), ["serve", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert result.output.startswith("edgekit: error: ") and "Traceback" not in result.output


def test_a_missing_web_stack_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from edgekit.errors import MissingDependencyError
    from edgekit.serve import require_web_stack

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(MissingDependencyError, match=r"\.\[serve\]"):
        require_web_stack("uvicorn")


def test_the_command_module_imports_no_web_stack() -> None:
    """cli.py imports the command at start-up; the runtime-only install has no Starlette."""
    code = "import sys, edgekit.serve.command; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('starlette', 'uvicorn', 'fastapi', 'onnxruntime_genai')))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    ("options", "named"),
    [({"max_concurency": 2}, "max_concurency"), ({"max_concurrency": 0}, "max_concurrency"),
     ({"max_tokens": 1.5}, "max_tokens"), ({"timeout_s": 0}, "timeout_s"), ({"cors_origins": "http://a.test"},
     "cors_origins"), ({"max_queue": -1}, "max_queue")],
)  # fmt: skip
def test_create_app_refuses_bad_options(tiny_model: edgekit.Model, options: dict[str, Any], named: str) -> None:
    from edgekit.serve import create_app

    with pytest.raises(edgekit.errors.UsageError, match=named):
        create_app(tiny_model, **options)


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        ({"max_concurrency": 0}, "max_concurrency must be a positive integer"),
        ({"max_tokens": True}, "max_tokens must be a positive integer"),
        ({"max_queue": -1}, "max_queue must be an integer of at least 0"),
        ({"timeout_s": True}, "timeout_s must be a positive number of seconds"),
        ({"timeout_s": "5"}, "timeout_s must be a positive number of seconds"),
        ({"timeout_s": 0}, "timeout_s must be a positive number of seconds"),
        ({"api_key": 5}, "api_key must be a string"),
        ({"api_key": "clé"}, "the API key must be printable ASCII"),
        ({"api_key": ""}, "the API key must be printable ASCII"),
        ({"api_key": " sk-1 "}, "the API key must be printable ASCII, without spaces at either end"),
        ({"model_name": "tiny\udce9"}, "the model name 'tiny\\udce9' is not valid Unicode"),
        ({"cors_origins": "http://x"}, "cors_origins must be a sequence of origins"),
    ],
)  # fmt: skip
def test_server_options_are_checked_when_made(options: dict[str, Any], phrase: str) -> None:
    """A non-ASCII key could never match (headers arrive as Latin-1); a key of 5 made every request a 500, a
    model name that is not Unicode every JSON answer; ``timeout_s=True`` was one second."""
    from edgekit.errors import UsageError
    from edgekit.serve.options import ServeOptions

    with pytest.raises(UsageError, match="^" + re.escape(phrase)):
        ServeOptions(**options)


def test_a_package_folder_whose_name_is_not_unicode_needs_a_model_name(tiny_model: edgekit.Model, tmp_path) -> None:
    from edgekit.errors import UsageError
    from edgekit.serve.model_facts import model_facts

    odd = tmp_path / "pkg\udce9"
    odd.symlink_to(tiny_model.info.package)
    moved = type(tiny_model.info)(**{**tiny_model.info.__dict__, "package": str(odd)})
    model = type("Stub", (), {"info": moved, "context_length": tiny_model.context_length})()
    with pytest.raises(UsageError, match="the package folder's name 'pkg\\\\udce9' is not valid Unicode"):
        model_facts(model, None, None)  # type: ignore[arg-type]
    assert model_facts(model, "tiny", None).model_id == "tiny"  # type: ignore[arg-type]
