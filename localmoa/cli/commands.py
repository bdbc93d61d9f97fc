"""The ``localmoa`` command: ``run`` a prompt, show its ``plan``, list the ``models``.

stdout carries only the answer (or JSON with ``--json``), so it can be piped; progress, layer
outputs, warnings and errors go to stderr. A user's mistake exits 2 with one line naming the
culprit and no traceback; a failed run exits 1.

SIGINT (Ctrl-C), SIGTERM and SIGHUP stop a command the same way: the run is cancelled, every
model any backend holds is unloaded (a load in flight included), and one line says what was
unloaded. ``run`` then exits 128 + the signal's number (130 for Ctrl-C); ``serve`` finishes the
requests it can within a few seconds, cancels the rest, and exits 0. While unloading, a second
signal is answered with a line saying so; a third quits at once, leaving what is still loaded.

With no models.toml anywhere, ``run`` and ``plan`` build an ensemble from the models a local
Ollama has (localmoa.zeroconfig).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from localmoa.backends import OllamaBackend, make_backends
from localmoa.backends.base import Backend, ChatMessage
from localmoa.config import Config, OllamaModel, Settings, load_config
from localmoa.errors import (
    AddressInUseError,
    ConfigNotFoundError,
    LocalMoaError,
    UsageRefused,
    UserError,
)
from localmoa.footprint.estimate import Footprint
from localmoa.hardware import resolve_budget
from localmoa.runtime.engine import (
    CallFinished,
    CallPiece,
    Event,
    Executor,
    ModelUnloaded,
    RunResult,
)
from localmoa.runtime.prepare import Prepared, prepare
from localmoa.sizes import format_bytes

__all__ = ["cli", "main"]

T = TypeVar("T")


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


class _Group(click.Group):
    """Turns localmoa's errors into one line on stderr and the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LocalMoaError as exc:
            kind = "error" if isinstance(exc, UserError) else "run failed"
            _stderr().print(f"[bold red]localmoa: {kind}:[/] {escape(str(exc))}", soft_wrap=True)
            ctx.exit(exc.exit_code)
        except _Stopped as stopped:
            _stderr().print(f"localmoa: {stopped}", markup=False)
            ctx.exit(stopped.exit_code)
        except KeyboardInterrupt:  # before or after the event loop: nothing was loaded
            _stderr().print("localmoa: interrupted", markup=False)
            ctx.exit(130)


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="models.toml to use (default: ./models.toml, then the user config dir).",
)
_ensemble_option = click.option(
    "--ensemble", "-e", default="default", show_default=True, help="Which [ensembles.NAME]."
)
_budget_option = click.option(
    "--memory-budget",
    metavar="SIZE",
    help='Bytes models may hold at once, e.g. "12GiB"; "auto" detects (default: the config).',
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


@click.group(cls=_Group)
@click.version_option(package_name="localmoa")
def cli() -> None:
    """Run a Mixture-of-Agents ensemble of local models, planned against your memory."""
    handler = RichHandler(console=_stderr(), show_time=False, show_path=False)
    logging.getLogger("localmoa").addHandler(handler)
    logging.getLogger("localmoa").setLevel(logging.WARNING)


@dataclass
class _Session:
    """A config (from a file, or built from Ollama) and the backends that serve it."""

    config: Config
    backends: dict[str, Backend]
    reasons: list[str]


class _Unloads:
    """What was really unloaded during a command, so an interrupted one can tell the truth."""

    def __init__(self) -> None:
        self.unloaded: list[str] = []
        self.failed: list[str] = []

    def add(self, names: list[str]) -> None:
        self.unloaded += [n for n in names if n not in self.unloaded]

    def summary(self) -> str:
        said = f"unloaded {', '.join(self.unloaded)}" if self.unloaded else "nothing was loaded"
        if self.failed:
            said += (
                f"; could not unload {', '.join(self.failed)} (see above): it may still hold "
                "memory in its server"
            )
        return said


_unloads = _Unloads()
"""This process's account; a command runs once per process."""


class _Stopped(Exception):
    """A signal stopped the command; its message is the line to print."""

    def __init__(self, signum: int, unloads: _Unloads, *, exit_code: int | None) -> None:
        name = signal.Signals(signum).name
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {name}"
        super().__init__(f"{what}; {unloads.summary()}")
        self.exit_code = 128 + signum if exit_code is None else exit_code


@asynccontextmanager
async def _session(config_path: Path | None, memory_budget: str | None) -> AsyncIterator[_Session]:
    """Open the backends for the config (or zero-config) and close them on every exit."""
    missing: ConfigNotFoundError | None = None
    try:
        config: Config | None = load_config(config_path)
    except ConfigNotFoundError as exc:
        if config_path is not None:
            raise
        config, missing = None, exc
    backends = make_backends(config.settings if config else Settings())
    try:
        reasons: list[str] = []
        if config is None:
            from localmoa.zeroconfig import from_ollama

            assert missing is not None
            ollama = backends["ollama"]
            assert isinstance(ollama, OllamaBackend)
            budget = resolve_budget(memory_budget, "auto")
            built = await from_ollama(ollama, budget, Settings(), missing)
            config, reasons = built.config, built.reasons
        yield _Session(config, backends, reasons)
    finally:
        await _close(backends)


async def _close(backends: dict[str, Backend]) -> None:
    """Unload what every backend still holds (a load in flight included); never interrupted."""

    async def close_all() -> None:
        for backend in backends.values():
            held = backend.loaded()
            done: list[str] = []
            try:
                done = await backend.aclose()
            except LocalMoaError as exc:
                logging.getLogger(__name__).warning("closing a backend failed: %s", exc)
            _unloads.add(done)
            _unloads.failed += [m for m in held if m not in done]

    await asyncio.shield(close_all())


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _arun(
    factory: Callable[[], Coroutine[Any, Any, T]],
    on_stop: Callable[[], None] | None = None,
    *,
    stopped_exit: int | None = None,
) -> T:
    """Run ``factory()``; the first SIGINT/SIGTERM/SIGHUP calls ``on_stop`` (default: cancel the
    run, whose cleanup unloads everything) and the command then exits as :class:`_Stopped`,
    with ``stopped_exit`` (default 128 + the signal)."""
    received: list[int] = []

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stop = on_stop or task.cancel

        def on_signal(signum: int) -> None:
            received.append(signum)
            if len(received) == 1:
                stop()
            elif len(received) == 2:
                _stderr().print(
                    "localmoa: unloading models, please wait; signal again to quit at once and "
                    "leave them loaded",
                    markup=False,
                )
            else:
                os._exit(128 + signum)

        installed = []
        for signum in _STOP_SIGNALS:
            try:
                loop.add_signal_handler(signum, on_signal, signum)
                installed.append(signum)
            except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
                pass
        try:
            return await factory()
        except asyncio.CancelledError:
            if received:
                raise _Stopped(received[0], _unloads, exit_code=stopped_exit) from None
            raise
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    result = asyncio.run(main())
    if received:  # a signal that did not cancel (serve) still ends the command as stopped
        raise _Stopped(received[0], _unloads, exit_code=stopped_exit)
    return result


@cli.command()
@click.argument("prompt", required=False)
@_config_option
@_ensemble_option
@_budget_option
@click.option("--show-layers", is_flag=True, help="Print every agent's response (on stderr).")
@_json_option
def run(
    prompt: str | None,
    config_path: Path | None,
    ensemble: str,
    memory_budget: str | None,
    show_layers: bool,
    as_json: bool,
) -> None:
    """Answer PROMPT with the ensemble (PROMPT or stdin); the answer streams to stdout."""
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, or pipe one on stdin")
        prompt = _utf8(sys.stdin.buffer.read(), "stdin")
    else:  # an argument with bytes that are not UTF-8 arrives with surrogate escapes
        prompt = _utf8(os.fsencode(prompt), "the PROMPT argument")
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    question = prompt

    async def go() -> RunResult:
        async with _session(config_path, memory_budget) as session:
            for reason in session.reasons:
                _stderr().print(f"zero-config: {reason}", markup=False)
            prepared = await prepare(
                session.config,
                ensemble,
                session.backends,
                memory_budget=memory_budget,
                prompt=question,
            )
            return await _run(session, prepared, question, show_layers=show_layers, quiet=as_json)

    result = _arun(go)
    if as_json:
        click.echo(json.dumps(_run_json(result)))


def _utf8(raw: bytes, where: str) -> str:
    """The prompt as text, refused before anything loads when it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{where} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


async def _run(
    session: _Session, prepared: Prepared, prompt: str, *, show_layers: bool, quiet: bool
) -> RunResult:
    from localmoa.cli.progress import Progress

    progress = Progress(
        _stderr(),
        show_layers=show_layers,
        n_waves=len(prepared.plan.waves),
        n_layers=len(prepared.stages) - 1,
    )
    streaming = False

    def on_event(event: Event) -> None:
        nonlocal streaming
        if isinstance(event, ModelUnloaded):
            _unloads.add([event.model])
        if isinstance(event, CallPiece) and event.call.is_aggregator and not quiet:
            if not streaming:
                progress.pause()
                streaming = True
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, CallFinished) and event.call.is_aggregator and streaming:
            sys.stdout.write("\n")  # end the answer's line before stderr speaks again
            sys.stdout.flush()
            streaming = False
        progress(event)

    settings = session.config.settings
    executor = Executor(
        session.config.models,
        session.backends,
        max_parallel_calls=settings.max_parallel_calls,
        max_calls_per_second=settings.max_calls_per_second,
        on_event=on_event,
        sizes={name: fp.total for name, fp in prepared.footprints.items()},
        timing=prepared.timing,
    )
    try:
        result = await executor.run(
            prepared.stages, prepared.plan, [ChatMessage(role="user", content=prompt)]
        )
    finally:
        progress.close()
        if streaming:
            sys.stdout.write("\n")
            sys.stdout.flush()
    failed = [c for c in result.calls if not c.ok]
    replanned = f", re-planned {result.replans}x after measuring" if result.replans else ""
    summary = (
        f"{len(result.calls)} calls ({len(failed)} failed), {result.loads} loads{replanned}, "
        f"{result.seconds:.2f}s"
    )
    _stderr().print(summary, markup=False)
    return result


def _run_json(result: RunResult) -> dict[str, Any]:
    return {
        "answer": result.answer,
        "calls": [c.model_dump() for c in result.calls],
        "loads": result.loads,
        "replans": result.replans,
        "seconds": round(result.seconds, 4),
        "plan": result.plan.model_dump(),
    }


@cli.command()
@_config_option
@_ensemble_option
@_budget_option
@_json_option
def plan(config_path: Path | None, ensemble: str, memory_budget: str | None, as_json: bool) -> None:
    """Show which models will be resident together, without loading anything."""

    async def go() -> tuple[Prepared, list[str]]:
        async with _session(config_path, memory_budget) as session:
            prepared = await prepare(
                session.config, ensemble, session.backends, memory_budget=memory_budget
            )
            return prepared, session.reasons

    prepared, reasons = _arun(go)
    if as_json:
        out = prepared.plan.model_dump()
        out["models"] = {
            name: {"bytes": fp.total, "source": fp.source}
            for name, fp in prepared.footprints.items()
        }
        out["budget_source"] = prepared.budget.detail
        if reasons:
            out["zero_config"] = reasons
        click.echo(json.dumps(out))
        return
    console = Console(highlight=False)
    if reasons:
        console.print("No models.toml found: an ensemble was built from Ollama's models.")
        for reason in reasons:
            console.print(f"  {reason}", markup=False)
    _print_plan(console, prepared)


_SOURCES = {
    "gguf": "GGUF header",
    "override": "memory override",
    "ollama": "Ollama model facts",
    "measured": "measured",
    "server": "server-managed, not counted",
}


def _print_plan(console: Console, prepared: Prepared) -> None:
    plan = prepared.plan
    models = Table(title="Models", title_justify="left")
    for column in ("model", "weights", "KV cache", "compute", "total", "from"):
        models.add_column(column, justify="left" if column in ("model", "from") else "right")
    for name, fp in prepared.footprints.items():
        parts = (
            (format_bytes(fp.weights), format_bytes(fp.kv_cache), format_bytes(fp.compute))
            if fp.kv_cache or fp.compute
            else ("-", "-", "-")
        )
        models.add_row(name, *parts, format_bytes(fp.total), _SOURCES[fp.source])
    console.print(models)
    waves = Table(title=f'Plan for ensemble "{prepared.ensemble}"', title_justify="left")
    for column in ("wave", "layer", "unload", "load", "resident", "runs", "bytes"):
        waves.add_column(column, justify="right" if column in ("wave", "bytes") else "left")
    n_layers = len(prepared.stages) - 1
    for i, wave in enumerate(plan.waves, start=1):
        layer = "aggregator" if wave.layer == n_layers + 1 else str(wave.layer)
        waves.add_row(
            str(i),
            layer,
            ", ".join(wave.unload) or "-",
            ", ".join(wave.load) or "-",
            ", ".join(wave.resident),
            ", ".join(wave.runs),
            format_bytes(wave.bytes),
        )
    console.print(waves)
    if plan.fewest_loads is not None:
        proof = f"the planner's fewest is {plan.fewest_loads}; more are estimated faster"
    else:
        proof = "optimal" if plan.optimal else "heuristic: at most one load per call"
    timed = (
        f"\nestimated {plan.estimated_seconds:.1f}s with {plan.timed_for} speeds, every call "
        "writing max_tokens"
        if plan.estimated_seconds is not None
        else ""
    )
    console.print(
        f"loads: {plan.loads} (lower bound {plan.lower_bound}; {proof}), "
        f"{format_bytes(plan.bytes_loaded)} read\n"
        f"budget: {format_bytes(plan.budget_bytes)} ({prepared.budget.detail}){timed}",
        markup=False,
    )


@cli.command()
@_config_option
@_json_option
def models(config_path: Path | None, as_json: bool) -> None:
    """List every model localmoa knows (config and Ollama) and what each costs in memory."""

    async def go() -> tuple[list[dict[str, Any]], list[str]]:
        try:
            config: Config | None = load_config(config_path)
        except ConfigNotFoundError:
            if config_path is not None:
                raise
            config = None
        settings = config.settings if config else Settings()
        backends = make_backends(settings)
        rows: list[dict[str, Any]] = []
        notes: list[str] = []
        try:
            listed: set[str] = set()
            for name, model in (config.models if config else {}).items():
                backend = backends[model.backend]
                row: dict[str, Any] = {"name": name, "backend": model.backend}
                try:
                    row |= _figures(await backend.footprint(name, model))
                except UserError as exc:
                    row["error"] = str(exc)
                if isinstance(model, OllamaModel):
                    listed.add(model.model)
                rows.append(row)
            ollama = backends["ollama"]
            assert isinstance(ollama, OllamaBackend)
            try:
                installed = await ollama.installed()
            except UserError as exc:
                notes.append(f"Ollama: {exc}")
                installed = {}
            for tag, found in sorted(installed.items()):
                if tag in listed:
                    continue
                default = OllamaModel(backend="ollama", model=tag)
                row = {"name": tag, "backend": "ollama (installed)"}
                row |= _figures(ollama.estimate(found, default), ollama.measurement(found, default))
                rows.append(row)
        finally:
            await _close(backends)
        return rows, notes

    rows, notes = _arun(go)
    if as_json:
        click.echo(json.dumps({"models": rows, "notes": notes}))
        return
    console = Console(highlight=False)
    table = Table(title="Models", title_justify="left")
    for column in ("model", "backend", "estimate", "measured", "planner uses", "source"):
        table.add_column(column, justify="right" if column in ("estimate", "measured") else "left")
    for row in rows:
        if "error" in row:
            table.add_row(row["name"], row["backend"], "-", "-", "-", f"unusable: {row['error']}")
            continue
        table.add_row(
            row["name"],
            row["backend"],
            _size(row.get("estimate_bytes")),
            _size(row.get("measured_bytes")),
            _size(row["bytes"]),
            row["source"],
        )
    console.print(table)
    for note in notes:
        console.print(note, markup=False)


def _figures(used: Footprint, measured: Footprint | None = None) -> dict[str, Any]:
    """The planner's figure, and the estimate and measurement behind it where known."""
    out: dict[str, Any] = {"bytes": used.total, "source": _SOURCES[used.source]}
    if used.note:
        out["source"] += f" ({used.note})"
    if used.source == "measured":
        out["measured_bytes"] = used.total
    elif used.source in ("gguf", "ollama"):
        out["estimate_bytes"] = used.total
    if measured is not None:
        out["measured_bytes"] = measured.total
        out["bytes"], out["source"] = measured.total, _SOURCES["measured"]
    return out


def _size(value: int | None) -> str:
    return "-" if value is None else format_bytes(value)


SHUTDOWN_SECONDS = 5
"""How long ``serve`` lets running requests finish after a signal before cancelling them."""


@cli.command()
@_config_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--api-key",
    envvar="LOCALMOA_API_KEY",
    help="Require Authorization: Bearer KEY (also $LOCALMOA_API_KEY). Needed beyond loopback.",
)
@_budget_option
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
def serve(
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
    listener = _listen(host, port)  # before anything else: a busy port is said at once
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

        from localmoa.serve.app import MoaServer

        async with _session(config_path, memory_budget) as session:
            for reason in session.reasons:
                _stderr().print(f"zero-config: {reason}", markup=False)
            budget = resolve_budget(memory_budget, session.config.settings.memory_budget)
            server = MoaServer(
                session.config,
                session.backends,
                budget,
                api_key=api_key,
                max_queue=max_queue,
                max_body=body_limit,
                loopback_only=loopback,
                allowed_origins=allow_origins,
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
                _stderr().print(
                    f"localmoa: serving {names} at http://{host}:{port}/v1 "
                    f"(budget {format_bytes(budget.bytes)}: {budget.detail})",
                    markup=False,
                )
                await uv.serve(sockets=[listener])
            finally:
                if server.pool is not None:
                    _unloads.add(server.pool.resident())
                await asyncio.shield(server.aclose())

    try:
        _arun(go, stop, stopped_exit=0)
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


def _listen(host: str, port: int) -> socket.socket:
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


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
