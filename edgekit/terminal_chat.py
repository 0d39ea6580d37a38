"""The terminal side of `edgekit run` and `edgekit demo`: answers printed as they stream, the chat loop."""

from __future__ import annotations

import sys
from typing import Any

import click

from edgekit.errors import UsageError
from edgekit.interrupts import was_interrupted


def echo_stream(pieces: Any) -> None:
    """Print ``pieces`` of an answer as they come, then end the line (also when a Ctrl-C cuts it short)."""
    try:
        for piece in pieces:
            click.echo(piece, nl=False)
            sys.stdout.flush()
    except KeyboardInterrupt:
        click.echo()  # end the half-printed answer, so the interrupt's message starts its own line
        raise
    click.echo()


def _kept(pieces: Any, into: list[str]) -> Any:
    """``pieces``, each also appended to ``into``."""
    for piece in pieces:
        into.append(piece)
        yield piece


def chat_loop(model: Any, options: dict[str, Any]) -> None:
    """Chat with ``model`` on the terminal until an empty line or end of input; a Ctrl-C raises KeyboardInterrupt."""
    history: list[dict[str, str]] = []
    while True:
        try:
            line = click.prompt("you", default="", show_default=False, prompt_suffix="> ")
        except (EOFError, click.Abort):
            if was_interrupted():  # click turns a Ctrl-C at the prompt into Abort, as it does end of input
                raise KeyboardInterrupt from None
            break
        except UnicodeDecodeError:  # a strict (UTF-8 locale) stdin; a lenient one gives surrogates the model refuses
            raise UsageError("the chat input is not UTF-8 text", fix="type or pipe UTF-8 text") from None
        if not sys.stdin.isatty():
            click.echo(line)  # a piped transcript shows what was asked, as a terminal would
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        click.echo("model> ", nl=False)
        answer: list[str] = []
        echo_stream(_kept(model.chat(history, stream=True, **options), answer))
        history.append({"role": "assistant", "content": "".join(answer)})
