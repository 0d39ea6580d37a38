"""The ``edgekit serve`` command; the web stack is imported only when it runs (the ``serve`` extra)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from pathlib import Path

import click

from edgekit.serve.options import DEFAULT_PORT, ServeOptions

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


@click.command("serve")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("-t", "--target", help="Serve the variant and provider chain the manifest records for this target.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; the default takes connections from this machine only.")  # fmt: skip
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="EDGEKIT_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics.")  # fmt: skip
@click.option("--max-concurrency", default=ServeOptions.max_concurrency, show_default=True, type=click.IntRange(1),
              help="Requests generating at once; the rest wait in order.")  # fmt: skip
@click.option("--max-queue", default=ServeOptions.max_queue, show_default=True, type=click.IntRange(0),
              help="Requests that may wait; more get 503.")  # fmt: skip
@click.option("--max-tokens", default=ServeOptions.max_tokens, show_default=True, type=click.IntRange(1),
              help="Most new tokens one request may ask for (and its default).")  # fmt: skip
@click.option("--timeout", default=ServeOptions.timeout_s, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Seconds one request may take, waiting included.")  # fmt: skip
@click.option("--max-body-bytes", default=ServeOptions.max_body_bytes, show_default=True, type=click.IntRange(1024),
              help="Largest request body accepted; larger ones get 413.")  # fmt: skip
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Let pages from this origin call the API (repeatable); off by default.")  # fmt: skip
@click.option("--model-name", help="The model id clients send (default: the package folder's name).")
def serve(package: Path, target: str | None, host: str, port: int, api_key: str | None, max_concurrency: int,
          max_queue: int, max_tokens: int, timeout: float, max_body_bytes: int, cors_origins: tuple[str, ...],
          model_name: str | None) -> None:  # fmt: skip
    """Serve PACKAGE over OpenAI's HTTP API, with a chat page at /."""
    from edgekit.serve import require_web_stack

    require_web_stack("uvicorn")
    import uvicorn

    from edgekit.serve.app import create_app

    # Bound before the model loads: a taken port fails in a second, not after the load.
    with listening_socket(host, port) as listening:
        app = create_app(package, target=target, api_key=api_key or None, max_concurrency=max_concurrency,
                         max_queue=max_queue, max_tokens=max_tokens, timeout_s=timeout,
                         max_body_bytes=max_body_bytes, cors_origins=cors_origins, model_name=model_name)  # fmt: skip
        facts = app.state.edgekit.facts
        bare = host.strip("[]")
        shown = f"[{bare}]" if ":" in bare else bare
        port = listening.getsockname()[1]  # the one the system chose, for --port 0
        click.echo(f"edgekit: serving '{facts.model_id}' ({facts.variant} on {facts.provider}) at "
                   f"http://{shown}:{port}/ (chat page) and http://{shown}:{port}/v1", err=True)  # fmt: skip
        if not is_loopback(host) and not api_key:
            click.echo("edgekit: note: listening beyond this machine with no --api-key: anyone who can reach "
                       "the port can use the model", err=True)  # fmt: skip
        uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[listening])


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` for the server, or a one-line error naming what is wrong.

    IPv6 only for a host with a colon, as uvicorn binds (``localhost`` is 127.0.0.1). It listens at once:
    two bound sockets of one port are allowed until one listens, so a second ``serve`` fails here.
    """
    from edgekit.errors import UsageError

    where = f"{host}:{port}"
    bare = host.strip("[]")
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    try:
        _, kind, proto, _, address = socket.getaddrinfo(bare, port, family, socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"cannot listen on {where}: no such address ({exc})", fix="pass a valid --host") from None
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":  # as uvicorn: restart over TIME_WAIT (on Windows it would share a port in use)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        taken = exc.errno == errno.EADDRINUSE
        raise UsageError(
            f"cannot listen on {where}: " + ("the port is in use" if taken else (exc.strerror or str(exc))),
            fix="pass another --port, or stop what listens there" if taken else "pass a --host of this machine",
        ) from None
    sock.set_inheritable(True)
    return sock


def is_loopback(host: str) -> bool:
    """Whether ``host`` only takes connections from this machine."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
