"""``localmoa chat``: a multi-turn session with an ensemble, its models kept loaded between turns.

Each turn sends the whole conversation (every user turn and every answer so far) to the
ensemble, as a ``serve`` request does: its calls are made for the conversation
(``stages_for``), it is checked against the models' contexts before anything loads
(``check_prompt``), planned by the one planner entry from what is loaded now (``plan_run`` with
``resident``) and run by the one engine on a :class:`~localmoa.serve.pool.ModelPool`'s
admission. The pool keeps models loaded after a turn while nothing else needs the memory, so a
second turn reloads nothing the first left loaded when the budget holds them all; when it does
not, the plan starts from what is resident and loads only what is missing.

A turn that fails (every agent of a layer failed, a conversation too long for every model) is
said in one line and left out of the conversation; the session goes on. So is a cancelled one.

Reading turns. From a terminal, with a ``>`` prompt and readline's line editing and history;
from a pipe or a file, one turn per line, without decoration, ending at EOF with exit 0. A line
that is exactly a command is not sent: ``/layers`` toggles printing every agent's answer,
``/exit`` (or ``/quit``) ends the session, ``/help`` lists them.

Signals, as common REPLs (Python's, psql) treat them:

- Ctrl-C while an answer is written cancels that answer (the turn is left out of the
  conversation, a line says so) and returns to the prompt; the models stay loaded;
- Ctrl-C at the prompt discards the line being typed; Ctrl-D (EOF) or ``/exit`` ends the
  session. Ending it unloads everything and one line says what was unloaded;
- SIGTERM or SIGHUP, at any moment, ends the session as they end ``run``: the turn in flight is
  cancelled, everything is unloaded, and the command exits 128 + the signal's number (143 for
  SIGTERM) after the same closing line; so does Ctrl-C before the session is open (130). While
  unloading, a signal is answered with a line saying so; another quits at once, leaving what
  is still loaded.

This is why the prompt is read by ``input()`` on the main thread, outside the event loop: that
is the only place a signal can interrupt a blocked read and readline can discard its line. The
event loop (one :class:`asyncio.Runner`, so backends keep their connections between turns) runs
each turn in between, and the signal handlers (Python-level, installed once for the session)
act by phase: at the prompt they raise out of ``input()``, elsewhere they hand the signal to the
loop, which cancels the turn (or the setup) in flight.

Each turn is recorded as one run (``source="chat"``) carrying the session's ``chat_id``, so the
run log shows a chat as its turns (localmoa.records.recorder).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from collections.abc import Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from types import FrameType
from typing import Any, Literal, TypeVar

import click

from localmoa.backends.base import ChatMessage
from localmoa.cli.options import budget_option, config_option, ensemble_option
from localmoa.cli.render import run_summary, stderr, warning
from localmoa.cli.run import executor_for, run_report, stream_answer
from localmoa.cli.session import Session, open_session, plan_run
from localmoa.cli.signals import STOP_SIGNALS, Stopped, unloads
from localmoa.errors import LocalMoaError, PromptTooLongError
from localmoa.planning import plan_run as plan_turn
from localmoa.planning.fewest_loads import Plan
from localmoa.records.recorder import Recorder, RunRecording, recorded
from localmoa.records.store import new_id
from localmoa.runtime.engine import RunResult
from localmoa.runtime.moa import Call, stage_label
from localmoa.runtime.prepare import Prepared, check_prompt, stages_for
from localmoa.serve.pool import ModelPool
from localmoa.sizes import format_bytes

__all__ = ["COMMANDS", "Chat", "chat_command"]

T = TypeVar("T")

COMMANDS = {
    "/layers": "show or hide every agent's answer (on stderr)",
    "/exit": "end the session, unloading every model (also /quit, or Ctrl-D)",
    "/help": "list these commands",
}
"""What a line may say instead of a turn; ``/quit`` is ``/exit``."""

_COMMAND_LIKE = re.compile(r"/[A-Za-z]+")
"""A line of this shape that is not a command is a typo, said as one, not sent to the models."""


@click.command(name="chat")
@config_option
@ensemble_option
@budget_option
@click.option("--show-layers", is_flag=True, help="Print every agent's answer (on stderr).")
def chat_command(
    config_path: Path | None, ensemble: str, memory_budget: str | None, show_layers: bool
) -> None:
    """Chat with the ensemble, turn by turn; the models stay loaded between turns.

    From a terminal: /layers shows every agent's answer, /exit or Ctrl-D ends, Ctrl-C stops an
    answer (and clears the line at the prompt). From a pipe: one turn per line, until EOF."""
    _Repl(config_path, ensemble, memory_budget, show_layers).main()


# --- the session ----------------------------------------------------------------------------


class Chat:
    """One chat: its conversation, the pool its models stay loaded in, and its record.

    :meth:`turn` answers one user turn (the answer streamed to stdout, progress on stderr) and
    adds it and its answer to :attr:`conversation` only when it succeeded; :meth:`close`
    unloads everything. The CLI drives it (:class:`_Repl`); tests drive it directly."""

    def __init__(
        self,
        session: Session,
        prepared: Prepared,
        *,
        show_layers: bool = False,
        recorder: Recorder | None = None,
    ) -> None:
        self.session = session
        self.ensemble = prepared.ensemble
        self.budget = prepared.budget
        self.policy = prepared.policy
        self.sizes = {name: fp.total for name, fp in prepared.footprints.items()}
        self.pool = ModelPool(
            prepared.models or session.config.models,
            session.backends,
            self.sizes,
            prepared.budget.bytes,
        )
        self.executor = executor_for(session, prepared, lambda event: None)
        self.show_layers = show_layers
        self.recorder = recorder or Recorder.open(session.config.settings, warn=warning)
        """Where each turn is recorded, as a run of this chat (a bad LOCALMOA_RECORD stops the
        command here, before anything loads)."""
        self.id = new_id()
        """The chat_id every turn's record carries (a ULID, as run ids are: sorted by time)."""
        self.conversation: list[ChatMessage] = []
        """The turns that were answered, each user message followed by its answer."""

    async def turn(self, text: str) -> RunResult:
        """Answer ``text`` after the conversation so far; the conversation grows only when an
        answer came. Raises what stopped it: a LocalMoaError (a turn refused before anything
        loads, as ``run`` refuses a prompt, is not recorded; one that ran is, as failed), or
        CancelledError (recorded as interrupted, with the calls that had finished)."""
        config = self.session.config
        ensemble = config.ensemble(self.ensemble)
        conversation = [*self.conversation, ChatMessage(role="user", content=text)]
        whole = "\n".join(m.content for m in conversation)
        stages = stages_for(config, ensemble, prompt=whole)
        try:
            await check_prompt(config, stages, self.session.backends, conversation)
        except PromptTooLongError as exc:
            if not self.conversation:
                raise
            raise PromptTooLongError(
                f"{exc}; the conversation so far is part of every turn's prompt: start a new "
                "chat to go on"
            ) from None
        plan = await asyncio.to_thread(  # off the loop: a search may take a second
            plan_turn,
            stages,
            self.sizes,
            self.budget.bytes,
            self.policy,
            resident=self.pool.resident(),
            prompt=whole,
        )
        recording = self.recorder.start(
            source="chat",
            ensemble=self.ensemble,
            ensemble_config=ensemble,
            plan=plan,
            budget=self.budget,
            conversation=conversation,
            chat_id=self.id,
            models=self.pool.models,
            stages=[stage_label(stage) for stage in stages],
        )
        with recorded(recording, interrupted="interrupted (Ctrl-C or a stop signal)"):
            result = await self._answer(stages, plan, conversation, recording)
        recording.finish("ok", answer=result.answer, seconds=result.seconds)
        answer = ChatMessage(role="assistant", content=result.answer)
        self.conversation = [*conversation, answer]
        stderr().print(run_summary(run_report(result)), markup=False, soft_wrap=True)
        return result

    async def _answer(
        self,
        stages: list[list[Call]],
        plan: Plan,
        conversation: list[ChatMessage],
        recording: RunRecording,
    ) -> RunResult:
        """Run the turn on the pool, shown as ``run`` shows a run (its models stay loaded)."""
        return await stream_answer(
            self.executor,
            stages,
            plan,
            conversation,
            show_layers=self.show_layers,
            record=recording,
            admission=self.pool.admission(),
        )

    async def close(self) -> None:
        """Unload every model the pool holds, adding what really left to the account."""
        held = self.pool.resident()
        await asyncio.shield(self.pool.close())
        gone = [m for m in held if m not in self.pool.backend(m).loaded()]
        unloads.add(gone)
        for model in gone:
            self.recorder.unloaded(model)


# --- the command: lines in, turns out, signals ------------------------------------------------

Phase = Literal["setup", "idle", "prompt", "turn", "closing"]


class _EndSession(BaseException):
    """SIGTERM or SIGHUP at the prompt: raised out of the blocked read to end the session."""


class _Repl:
    """Reads lines, answers turns, and handles signals by phase (see the module docstring).

    Phases: ``setup`` (opening the session), ``prompt`` (blocked reading a line), ``idle``
    (between a line and a turn: no loop runs, nothing to interrupt), ``turn``, ``closing``
    (unloading). In ``setup``, ``turn`` and ``closing`` the event loop acts on a signal; in
    ``prompt`` and ``idle`` the handler does, since no loop runs to hear it."""

    def __init__(
        self, config_path: Path | None, ensemble: str, memory_budget: str | None, show: bool
    ) -> None:
        self.config_path = config_path
        self.ensemble = ensemble
        self.memory_budget = memory_budget
        self.show_layers = show
        self.interactive = sys.stdin is not None and sys.stdin.isatty()
        self.phase: Phase = "setup"
        self.turns = 0
        """Turns begun, so that a Ctrl-C meant for a turn that has ended since is ignored."""
        self.stopped: int | None = None
        """The SIGTERM/SIGHUP (or setup's Ctrl-C) that ends the session."""
        self.cancel = False
        """A signal asked to cancel what runs (the turn, the setup) before it had started."""
        self.task: asyncio.Future[Any] | None = None
        self.closing_signals = 0
        self.loop: asyncio.AbstractEventLoop | None = None

    def main(self) -> None:
        """The session from start to end; raises Stopped when a signal ended it."""
        if self.interactive:
            _use_readline()
        _stdin_as_utf8()
        with asyncio.Runner() as runner:
            self.loop = runner.get_loop()  # first: the handlers hand signals to it
            handlers = {signum: signal.signal(signum, self._on_signal) for signum in STOP_SIGNALS}
            try:
                self._session(runner)
            finally:
                for signum, handler in handlers.items():
                    signal.signal(signum, handler)
        if self.stopped is not None:
            raise Stopped(self.stopped, unloads, exit_code=None)
        stderr().print(f"localmoa: chat ended; {unloads.summary()}", markup=False)

    def _session(self, runner: asyncio.Runner) -> None:
        stack = AsyncExitStack()
        chat: Chat | None = None
        try:
            try:
                chat = runner.run(self._cancellable(self._open(stack)))
            except asyncio.CancelledError:
                if self.stopped is None:
                    raise
                return
            self._converse(runner, chat)
        finally:
            self.phase = "closing"
            runner.run(self._close(stack, chat))

    async def _open(self, stack: AsyncExitStack) -> Chat:
        session = await stack.enter_async_context(
            open_session(self.config_path, self.memory_budget)
        )
        for reason in session.reasons:
            stderr().print(f"zero-config: {reason}", markup=False)
        prepared = await plan_run(session, self.ensemble, self.memory_budget)
        chat = Chat(session, prepared, show_layers=self.show_layers)
        if self.interactive:
            models = ", ".join(prepared.footprints)
            stderr().print(
                f'chat with ensemble "{self.ensemble}" ({models}; budget '
                f"{format_bytes(prepared.budget.bytes)}). /layers shows every agent's answer, "
                "/exit or Ctrl-D ends, Ctrl-C stops an answer.",
                markup=False,
            )
        return chat

    async def _close(self, stack: AsyncExitStack, chat: Chat | None) -> None:
        try:
            if chat is not None:
                await chat.close()
        finally:
            await stack.aclose()  # the backends: whatever they still hold is unloaded

    def _converse(self, runner: asyncio.Runner, chat: Chat) -> None:
        """Turns until EOF, /exit or a stop."""
        self.phase = "idle"
        while self.stopped is None:
            try:
                self.phase = "prompt"
                if self.stopped is not None:  # a stop just before the read
                    raise _EndSession
                line = self._read()
                self.phase = "idle"
            except KeyboardInterrupt:  # Ctrl-C at the prompt: the line is dropped
                if self.interactive:
                    sys.stdout.write("\n")
                    sys.stdout.flush()
                continue
            except _EndSession:
                return
            if line is None:
                if self.interactive:
                    sys.stdout.write("\n")  # leave the terminal on a fresh line after Ctrl-D
                return
            text = line.strip()
            if text in ("/exit", "/quit"):
                return
            if text and not self._command(chat, text):
                self._turn(runner, chat, text)

    def _command(self, chat: Chat, text: str) -> bool:
        """Carry out ``text`` if it is a command (True), else leave it to be sent (False)."""
        if text == "/layers":
            chat.show_layers = not chat.show_layers
            said = "shown" if chat.show_layers else "hidden"
            stderr().print(f"every agent's answer: {said}", markup=False)
        elif text == "/help":
            for command, what in COMMANDS.items():
                stderr().print(f"  {command:8} {what}", markup=False)
        elif _COMMAND_LIKE.fullmatch(text):
            known = ", ".join(COMMANDS)
            stderr().print(
                f"unknown command {text} (the commands: {known}); not sent", markup=False
            )
        else:
            return False
        return True

    def _turn(self, runner: asyncio.Runner, chat: Chat, text: str) -> None:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # bytes that were not UTF-8, as surrogate escapes
            stderr().print(
                "that line is not UTF-8 text, so it was not sent; convert the input first, "
                "e.g. iconv -f latin1 -t utf-8",
                markup=False,
            )
            return
        self.turns += 1
        self.phase = "turn"
        if self.stopped is not None:  # a stop just before the turn
            return
        try:
            runner.run(self._cancellable(chat.turn(text)))
        except asyncio.CancelledError:
            if self.stopped is None:
                stderr().print(
                    "answer cancelled; this turn is left out of the conversation", markup=False
                )
        except LocalMoaError as exc:
            what = "error" if exc.exit_code == 2 else "turn failed"
            stderr().print(
                f"localmoa: {what}: {exc}; the turn is left out of the conversation",
                markup=False,
                soft_wrap=True,
            )
        finally:
            self.phase = "idle"

    def _read(self) -> str | None:
        """The next line, None at EOF; a prompt only when a person types."""
        if not self.interactive:
            line = sys.stdin.readline()
            return line.rstrip("\r\n") if line else None
        prompt = "> "
        if not sys.stdout.isatty():  # stdout is for answers: the prompt goes to the terminal
            sys.stderr.write(prompt)
            sys.stderr.flush()
            prompt = ""
        try:
            return input(prompt)
        except EOFError:
            return None

    async def _cancellable(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` as the task a signal cancels."""
        task = asyncio.ensure_future(work)
        self.task = task
        if self.cancel:
            task.cancel()
        try:
            return await task
        finally:
            self.task = None
            self.cancel = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Python-level handler, run on the main thread between bytecodes. At the prompt it
        ends the read; otherwise, while the loop runs, the loop acts on it (call_soon_threadsafe
        wakes it from its selector)."""
        if signum != signal.SIGINT:  # said here, whatever the phase: each phase looks
            self.stopped = self.stopped or signum
        if self.phase == "prompt":
            self.phase = "idle"  # a second signal must not escape the read's handlers
            raise KeyboardInterrupt if signum == signal.SIGINT else _EndSession
        if self.phase == "idle":
            return  # a Ctrl-C between a line and its turn is dropped; a stop is seen next
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._signalled, signum, self.turns)

    def _signalled(self, signum: int, turn: int) -> None:
        if self.phase == "closing":
            self.stopped = self.stopped or signum  # Ctrl-C too: the session is over
            self.closing_signals += 1
            if self.closing_signals > 1:
                os._exit(128 + signum)
            stderr().print(
                "localmoa: unloading models, please wait; signal again to quit at once and "
                "leave them loaded",
                markup=False,
            )
            return
        if signum == signal.SIGINT and self.phase == "turn" and turn != self.turns:
            return  # meant for a turn that has ended
        if self.phase == "setup":  # Ctrl-C too: nothing to go back to yet
            self.stopped = self.stopped or signum
        if self.task is None:
            self.cancel = True
        else:
            self.task.cancel()


def _use_readline() -> None:
    """Line editing and history for ``input()`` where the platform has readline."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (importing it is what enables it)


def _stdin_as_utf8() -> None:
    """Read stdin as UTF-8 whatever the locale, as ``run`` does; bytes that are not UTF-8
    arrive as surrogate escapes, so a bad line is refused by itself instead of ending the
    session."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(ValueError, OSError):  # already read, or not a text stream
            reconfigure(encoding="utf-8", errors="surrogateescape")
