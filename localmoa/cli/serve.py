"""``localmoa serve``: every ensemble as an OpenAI-compatible model, until a signal stops it.

The port is bound before anything else (:func:`listen`), so a busy port is said at once, before
models are looked at. uvicorn runs without its own signal handling: localmoa.cli.signals stops
it, so that models are unloaded first and the last line says what was.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from localmoa.cli.options import budget_option, config_option
from localmoa.cli.render import stderr, warning
from localmoa.cli.session import open_session
from localmoa.cli.signals import arun, unloads
from localmoa.errors import AddressInUseError, UsageRefused, UserError
from localmoa.hardware import budget_of, resolve_devices
from localmoa.sizes import format_bytes

__all__ = ["SHUTDOWN_SECONDS", "listen", "serve_command"]

SHUTDOWN_SECONDS = 5
"""How long ``serve`` lets running requests finish after a signal before cancelling them."""


@click.command(name="serve")
@config_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--api-key",
    envvar="LOCALMOA_API_KEY",
    help="Require Authorization: Bearer KEY (also $LOCALMOA_API_KEY). Needed beyond loopback.",
)
@budget_option
@click.option(
    "--max-queue",
    default=16,
    show_default=True,
    type=click.IntRange(1),
    help="Requests running or waiting at once; more get 503 with Retry-After.",
)
@click.option(
    "--max-body",
    metavar="SIZE",
    default="4MiB",
    show_default=True,
    help="Largest request body accepted; larger ones get 413 before they are read.",
)
@click.option(
    "--allow-origin",
    "allow_origins",
    multiple=True,
    metavar="ORIGIN",
    help="A web origin (e.g. http://localhost:3000) whose pages may call this server; "
    "repeatable. Others are refused. Open WebUI needs none: it calls from its backend.",
)
def serve_command(
    config_path: Path | None,
    host: str,
    port: int,
    api_key: str | None,
    memory_budget: str | None,
    max_queue: int,
    max_body: str,
    allow_origins: tuple[str, ...],
) -> None:
    """Serve every ensemble as an OpenAI-compatible model (moa/NAME) at http://HOST:PORT/v1."""
    from localmoa.egress import is_loopback
    from localmoa.sizes import parse_size

    loopback = is_loopback(host)
    if not loopback and not api_key:
        raise UsageRefused(
            f"refusing to listen on {host} without --api-key: anyone who can reach this "
            "machine could use your models; pass --api-key KEY (or set LOCALMOA_API_KEY), or "
            "keep the default --host 127.0.0.1"
        )
    try:
        body_limit = parse_size(max_body)
    except ValueError as exc:
        raise UserError(f"--max-body: {exc}") from None
    for origin in allow_origins:
        if not _is_origin(origin):
            raise UserError(
                f'--allow-origin: "{origin}" is not an origin; write scheme://host[:port], '
                "e.g. http://localhost:3000"
            )
    listener = listen(host, port)  # before anything else: a busy port is said at once
    uv: Any = None
    starting: list[asyncio.Task[Any]] = []

    def stop() -> None:
        if uv is None:  # still starting: nothing serves yet, so cancel the start
            starting[0].cancel()
        else:
            uv.should_exit = True

    async def go() -> None:
        nonlocal uv
        import uvicorn

        task = asyncio.current_task()
        assert task is not None
        starting.append(task)

        from localmoa.records.recorder import Recorder
        from localmoa.serve.app import MoaServer

        async with open_session(config_path, memory_budget) as session:
            for reason in session.reasons:
                stderr().print(f"zero-config: {reason}", markup=False)
            # A server's pool keeps one budget and places nothing: it plans on one device, the
            # largest found or declared (the backends place the models themselves).
            devices = resolve_devices(memory_budget, session.config.settings)
            budget = budget_of([max(devices, key=lambda d: d.memory)])
            if len(devices) > 1:
                warning(
                    f"serve plans on one device, the largest of {len(devices)} "
                    f"({budget.detail}); `localmoa run` and `batch` place models on each"
                )
            server = MoaServer(
                session.config,
                session.backends,
                budget,
                api_key=api_key,
                max_queue=max_queue,
                max_body=body_limit,
                loopback_only=loopback,
                allowed_origins=allow_origins,
                recorder=Recorder.open(session.config.settings, warn=warning),
            )
            try:
                await server.start()
                config = uvicorn.Config(
                    server.app,
                    log_level="warning",
                    timeout_graceful_shutdown=SHUTDOWN_SECONDS,
                )
                uv = _Uvicorn(config)
                names = ", ".join(f"moa/{n}" for n in session.config.ensembles)
                stderr().print(
                    f"localmoa: serving {names} at http://{host}:{port}/v1 "
                    f"(budget {format_bytes(budget.bytes)}: {budget.detail}); "
                    f"console at http://{host}:{port}/",
                    markup=False,
                )
                await uv.serve(sockets=[listener])
            finally:
                if server.pool is not None:
                    unloads.add(server.pool.resident())
                await asyncio.shield(server.aclose())

    try:
        arun(go, stop, stopped_exit=0)
    finally:
        listener.close()


class _Uvicorn:
    """uvicorn's server without its own signal handling: localmoa's handlers stop it, so that
    models are unloaded first (uvicorn re-raises the signal after serving, which would end the
    process before the cleanup runs)."""

    def __new__(cls, config: Any) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        return Server(config)


def _is_origin(text: str) -> bool:
    """scheme://host[:port], as a browser sends it in ``Origin``."""
    import httpx

    try:
        url = httpx.URL(text)
    except httpx.InvalidURL:
        return False
    return url.scheme in ("http", "https") and bool(url.host) and url.path in ("", "/")


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound now; AddressInUseError when another program has the port.

    Loopback names (``localhost``, ``*.localhost``) bind to 127.0.0.1 without a name lookup."""
    from localmoa.egress import is_loopback

    address = host.strip("[]")
    if is_loopback(address) and not address.replace(".", "").isdigit() and ":" not in address:
        address = "127.0.0.1"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise AddressInUseError(
                f"cannot listen on {host}:{port}: another program is using that port; pick "
                "another with --port, or stop the program that holds it"
            ) from None
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.set_inheritable(True)
    return sock
