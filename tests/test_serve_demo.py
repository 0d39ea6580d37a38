"""The real demo model behind the server: the ``openai`` client asks SmolLM2-135M-Instruct for the capital of
France and gets Paris, whole and streamed (slow: builds the demo package, about two minutes)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_serve_helpers import QUESTION, openai_client, serving

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Any]]:
    from edgekit.serve import create_app

    # EDGEKIT_SERVE_DEMO_PACKAGE: reuse a demo package built before (local runs); else the session's build.
    package = Path(os.environ.get("EDGEKIT_SERVE_DEMO_PACKAGE", ""))
    if not (package / "manifest.json").is_file():
        package = request.getfixturevalue("smollm2_package")
    app = create_app(package, target="laptop-cpu", model_name="smollm2")
    with serving(app) as url:
        yield url, app.state.edgekit.model
    app.state.edgekit.close()


def test_the_openai_client_gets_paris(demo_server: tuple[str, Any]) -> None:
    client = openai_client(demo_server[0])
    reply = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=32, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    chunks = list(client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=32, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in streamed and streamed == reply.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # it came in pieces
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    assert reply.choices[0].finish_reason == "stop"  # the model ended its answer itself


def test_completions_of_the_templated_prompt_answer_paris(demo_server: tuple[str, Any]) -> None:
    """The raw endpoint: the chat template's text sent as a prompt gets the chat endpoint's answer."""
    url, model = demo_server
    prompt = model.apply_chat_template(QUESTION)
    reply = openai_client(url).completions.create(model="smollm2", prompt=prompt, max_tokens=32, temperature=0)
    assert "Paris" in reply.choices[0].text
