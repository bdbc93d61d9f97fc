"""How a signal stops a command: unload everything first, then say truly what was unloaded.

SIGINT (Ctrl-C), SIGTERM and SIGHUP stop a command the same way: the run is cancelled, every
model any backend holds is unloaded (a load in flight included), and one line says what was
unloaded. ``run`` then exits 128 + the signal's number (130 for Ctrl-C); ``serve`` finishes the
requests it can within a few seconds, cancels the rest, and exits 0. While unloading, a second
signal is answered with a line saying so; a third quits at once, leaving what is still loaded.

The account (:data:`unloads`) is per process, as a command runs once per process: the engine's
events, the server's pool and :func:`close_backends` all add to it, so the closing line names
what really left memory, not what was meant to.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

from localmoa.backends.base import Backend
from localmoa.cli.render import stderr
from localmoa.errors import LocalMoaError

__all__ = ["STOP_SIGNALS", "Stopped", "Unloads", "arun", "close_backends", "unloads"]

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Unloads:
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


unloads = Unloads()
"""This process's account; a command runs once per process."""


class Stopped(Exception):
    """A signal stopped the command; its message is the line to print."""

    def __init__(self, signum: int, account: Unloads, *, exit_code: int | None) -> None:
        name = signal.Signals(signum).name
        what = "interrupted" if signum == signal.SIGINT else f"stopped by {name}"
        super().__init__(f"{what}; {account.summary()}")
        self.exit_code = 128 + signum if exit_code is None else exit_code


async def close_backends(backends: Mapping[str, Backend]) -> None:
    """Unload what every backend still holds (a load in flight included); never interrupted."""

    async def close_all() -> None:
        for backend in backends.values():
            held = backend.loaded()
            done: list[str] = []
            try:
                done = await backend.aclose()
            except LocalMoaError as exc:
                logging.getLogger(__name__).warning("closing a backend failed: %s", exc)
            unloads.add(done)
            unloads.failed += [m for m in held if m not in done]

    await asyncio.shield(close_all())


def arun(
    factory: Callable[[], Coroutine[Any, Any, T]],
    on_stop: Callable[[], None] | None = None,
    *,
    stopped_exit: int | None = None,
) -> T:
    """Run ``factory()``; the first SIGINT/SIGTERM/SIGHUP calls ``on_stop`` (default: cancel the
    run, whose cleanup unloads everything) and the command then exits as :class:`Stopped`,
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
                stderr().print(
                    "localmoa: unloading models, please wait; signal again to quit at once and "
                    "leave them loaded",
                    markup=False,
                )
            else:
                os._exit(128 + signum)

        installed = []
        for signum in STOP_SIGNALS:
            try:
                loop.add_signal_handler(signum, on_signal, signum)
                installed.append(signum)
            except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
                pass
        try:
            return await factory()
        except asyncio.CancelledError:
            if received:
                raise Stopped(received[0], unloads, exit_code=stopped_exit) from None
            raise
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)

    result = asyncio.run(main())
    if received:  # a signal that did not cancel (serve) still ends the command as stopped
        raise Stopped(received[0], unloads, exit_code=stopped_exit)
    return result
