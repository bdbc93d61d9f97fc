"""`localmoa chat`: turns that carry the conversation, models kept loaded between them, /layers,
/exit, Ctrl-C that cancels an answer and keeps the session, SIGTERM that unloads and exits 143.

The session is driven two ways: in process (:class:`~localmoa.cli.chat.Chat` on the shipped
FakeBackend, whose events and requests say what was loaded and sent), and as a user runs it (a
real process, turns written to its stdin, signals sent when its stderr shows the moment).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import write_config

from localmoa.backends import make_backends
from localmoa.backends.base import Backend, ChatMessage, ChatRequest
from localmoa.backends.fake import FakeBackend
from localmoa.cli.chat import Chat
from localmoa.cli.session import Session, plan_run
from localmoa.config import load_config
from localmoa.errors import LayerFailedError, PromptTooLongError
from localmoa.records.models import RunDetail

from .invoke import FAKE_THREE, localmoa

WAIT = 60.0

SLOW_TWO = """
[models.a]
backend = "fake"
memory = "1GiB"
seconds_per_token = 0.02
reply = "{model} on {prompt}"
[models.b]
backend = "fake"
memory = "1GiB"
seconds_per_token = 0.02
reply = "{model} on {prompt}"
[ensembles.default]
layers = [["a", "b"]]
aggregator = "a"
max_tokens = 400
"""
"""Two fake models that write a token per 20 ms and repeat the user's turn: a long turn takes
long enough to be interrupted, a short one answers at once."""

LONG = "first" + " x" * 300
"""A turn answered in 300 tokens, 6 s per call at least."""


# --- in process, on the fake backend ----------------------------------------------------------


async def open_chat(
    tmp_path: Path, toml: str, budget: str = "3GiB", fake: FakeBackend | None = None
) -> tuple[Chat, FakeBackend]:
    """A chat on ``toml``'s fake models (served by ``fake`` when given), recording into the
    test's own run log (LOCALMOA_HOME is the test's)."""
    config = load_config(write_config(tmp_path, toml))
    backends: dict[str, Backend] = make_backends(config.settings)
    if fake is not None:
        backends["fake"] = fake
    session = Session(config, backends, [])
    prepared = await plan_run(session, "default", budget)
    served = session.backends["fake"]
    assert isinstance(served, FakeBackend)
    return Chat(session, prepared), served


def runs(chat: Chat) -> list[RunDetail]:
    """The chat's turns as the run log has them, oldest first."""
    store = chat.recorder.store
    assert store is not None
    return [store.run(run.id) for run in reversed(store.list_runs())]


async def test_the_second_turn_carries_the_first_answer_and_loads_nothing(
    tmp_path: Path,
) -> None:
    chat, fake = await open_chat(tmp_path, FAKE_THREE)
    first = await chat.turn("hi")
    loaded_by_first = [m for what, m in fake.events if what == "load"]
    sent_before = len(fake.requests)
    second = await chat.turn("and then?")
    assert sorted(loaded_by_first) == ["a", "b", "c"] and first.loads == 3
    assert [what for what, _ in fake.events].count("load") == 3 and second.loads == 0
    before = [
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", content=first.answer),
        ChatMessage(role="user", content="and then?"),
    ]
    # Every call of the second turn reads the conversation: the first layer's are exactly it,
    # later ones add the answers they read after it.
    second_requests = [request for _, request in fake.requests[sent_before:]]
    assert len(second_requests) == 7
    assert [r.messages for r in second_requests[:3]] == [before] * 3
    assert all(r.messages[-3:] == before for r in second_requests)
    assert chat.conversation == [*before, ChatMessage(role="assistant", content=second.answer)]
    await chat.close()
    assert fake.resident == {}
    assert sorted(m for what, m in fake.events if what == "unload") == ["a", "b", "c"]


async def test_a_smaller_budget_reloads_only_what_the_turn_is_missing(tmp_path: Path) -> None:
    """Two of three models fit: the second turn is planned from what the first left loaded."""
    chat, fake = await open_chat(tmp_path, FAKE_THREE, budget="2GiB")
    await chat.turn("hi")
    resident = set(fake.resident)
    loads = [what for what, _ in fake.events].count("load")
    second = await chat.turn("again")
    assert len(resident) == 2
    # The plan starts from what is resident: it never loads a model that is in memory already,
    # so the second turn needs fewer loads than the first.
    assert second.loads == [what for what, _ in fake.events].count("load") - loads
    assert 0 < second.loads < loads
    await chat.close()
    assert fake.resident == {}


async def test_each_turn_is_recorded_as_a_run_of_the_same_chat(tmp_path: Path) -> None:
    chat, _ = await open_chat(tmp_path, FAKE_THREE)
    first = await chat.turn("hi")
    second = await chat.turn("and then?")
    one, two = runs(chat)
    assert (one.source, two.source) == ("chat", "chat")
    assert one.chat_id == two.chat_id == chat.id and one.id != two.id
    assert (one.status, two.status) == ("ok", "ok")
    assert (one.answer, two.answer) == (first.answer, second.answer)
    assert one.conversation == [ChatMessage(role="user", content="hi")]
    assert two.conversation == chat.conversation[:3]  # the whole conversation it was sent
    assert (len(one.calls), len(two.calls)) == (7, 7)
    assert sorted(load.model for load in one.loads) == ["a", "b", "c"] and two.loads == []
    assert one.plan is not None and one.budget_bytes == 3 << 30
    await chat.close()


async def test_a_cancelled_turn_is_left_out_and_the_models_stay_loaded(tmp_path: Path) -> None:
    answering = asyncio.Event()

    def script(model: str, request: ChatRequest) -> str:
        answering.set()
        return f"{model} on {request.messages[-1].content}"  # the template SLOW_TWO gives

    chat, fake = await open_chat(tmp_path, SLOW_TWO, "2GiB", FakeBackend(script=script))
    turn = asyncio.create_task(chat.turn(LONG))
    await asyncio.wait_for(answering.wait(), WAIT)
    turn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await turn
    assert chat.conversation == []
    assert set(fake.resident) == {"a", "b"}  # cancelled, not closed: the session goes on
    sent_before = len(fake.requests)
    result = await chat.turn("second")
    assert result.loads == 0 and result.answer == "a on second"
    sent = [r.messages for _, r in fake.requests[sent_before:]]
    assert sent[:2] == [[ChatMessage(role="user", content="second")]] * 2
    assert chat.conversation[0] == ChatMessage(role="user", content="second")
    cancelled, answered = runs(chat)
    assert (cancelled.status, answered.status) == ("interrupted", "ok")
    assert cancelled.error == "interrupted (Ctrl-C or a stop signal)"
    assert answered.conversation == [ChatMessage(role="user", content="second")]
    await chat.close()
    assert fake.resident == {}


async def test_a_turn_that_fails_says_why_and_leaves_the_conversation(tmp_path: Path) -> None:
    """Too long for every model: refused before anything loads (and, as ``run`` refuses a
    prompt, not recorded). Too long for the calls (the fake counts the estimate): every agent
    fails, LayerFailedError, recorded as failed. Neither joins the conversation; a short turn
    afterwards is answered."""
    narrow = FAKE_THREE.replace('memory = "1GiB"', 'memory = "1GiB"\nn_ctx = 200')
    narrow += "max_tokens = 8\n"
    chat, fake = await open_chat(tmp_path, narrow)
    with pytest.raises(PromptTooLongError, match="more than any model of this ensemble"):
        await chat.turn("x" * 2000)
    assert fake.events == []
    with pytest.raises(LayerFailedError, match="every agent of layer 1 failed"):
        await chat.turn("word " * 200)
    assert chat.conversation == []
    result = await chat.turn("hi")
    assert result.answer == "a has considered: hi"
    failed, answered = runs(chat)
    assert (failed.status, answered.status) == ("failed", "ok")
    assert failed.error is not None and "every agent of layer 1 failed" in failed.error
    await chat.close()


async def test_a_conversation_grown_too_long_says_to_start_a_new_chat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fake models' prompts are not counted before the run, so the context check is stood in
    for: it refuses any conversation of more than one message."""

    async def check(config: Any, stages: Any, backends: Any, messages: list[ChatMessage]) -> None:
        if len(messages) > 1:
            raise PromptTooLongError("the prompt does not fit layer 1")

    monkeypatch.setattr("localmoa.cli.chat.check_prompt", check)
    chat, _ = await open_chat(tmp_path, FAKE_THREE)
    with pytest.raises(PromptTooLongError) as refused:
        await chat.turn("hi")  # alone it fits
        await chat.turn("again")
    assert str(refused.value) == (
        "the prompt does not fit layer 1; the conversation so far is part of every turn's "
        "prompt: start a new chat to go on"
    )
    await chat.close()


# --- as a user runs it ------------------------------------------------------------------------


def loads(stderr: str) -> list[int]:
    """The loads of each turn that was answered, from its summary line."""
    return [int(n) for n in re.findall(r"calls \(0 failed\), (\d+) loads", stderr)]


def logged_turns() -> list[dict[str, Any]]:
    """The runs ``localmoa logs --json`` lists, oldest first (the test's own LOCALMOA_HOME)."""
    out = localmoa("logs", "--json")
    assert out.returncode == 0, out.stderr
    turns: list[dict[str, Any]] = json.loads(out.stdout)
    return turns[::-1]


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


def unloaded(line: str) -> set[str]:
    return set(line.split("unloaded ")[1].split(", "))


def test_piped_turns_one_per_line(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("chat", "--memory-budget", "3GiB", stdin="hi\n\nand then?\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "a has considered: hi\na has considered: and then?\n"  # no decoration
    assert loads(out.stderr) == [3, 0]
    assert out.stderr.count("  loaded ") == 3
    assert last_line(out.stderr).startswith("localmoa: chat ended; unloaded ")
    assert unloaded(last_line(out.stderr)) == {"a", "b", "c"}
    turns = logged_turns()  # two runs of one chat
    assert [(t["source"], t["status"], t["prompt"]) for t in turns] == [
        ("chat", "ok", "hi"),
        ("chat", "ok", "and then?"),
    ]
    assert turns[0]["chat_id"] == turns[1]["chat_id"] is not None
    assert [(t["calls"], t["loads"]) for t in turns] == [(7, 3), (7, 0)]


def test_tiny_llama_cpp_models_are_loaded_once_for_two_turns(tiny_config: Path) -> None:
    out = localmoa("chat", "--memory-budget", "1GiB", stdin="Hello?\nAnd then?\n")
    assert out.returncode == 0, out.stderr
    assert loads(out.stderr) == [3, 0] and out.stderr.count("7 calls (0 failed)") == 2
    assert out.stderr.count("  loaded ") == 3
    assert unloaded(last_line(out.stderr)) == {"tiny-a", "tiny-b", "tiny-c"}
    assert "Traceback" not in out.stderr


def test_layers_toggles_every_agents_answer(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("chat", "--memory-budget", "3GiB", stdin="/layers\nq1\n/layers\nq2\n")
    assert out.returncode == 0, out.stderr
    shown, hidden = out.stderr.split("every agent's answer: hidden")
    assert "every agent's answer: shown" in shown
    assert shown.count("╭") == 6 and "b has considered: q1" in shown  # a panel per proposer
    assert hidden.count("╭") == 0 and "aggregator · a: ok" in hidden
    assert out.stdout.splitlines() == ["a has considered: q1", "a has considered: q2"]


def test_show_layers_from_the_start(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("chat", "--show-layers", "--memory-budget", "3GiB", stdin="q1\n")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("╭") == 6


def test_exit_ends_the_session_and_unloads(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("chat", "--memory-budget", "3GiB", stdin="hi\n/exit\nnever sent\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "a has considered: hi\n"
    assert unloaded(last_line(out.stderr)) == {"a", "b", "c"}


def test_commands_and_lines_that_are_not_sent(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("chat", "--memory-budget", "3GiB", stdin="/help\n/layerz\n/usr/bin?\n")
    assert out.returncode == 0, out.stderr
    assert "/layers" in out.stderr and "/exit" in out.stderr
    assert "unknown command /layerz" in out.stderr
    assert out.stdout == "a has considered: /usr/bin?\n"  # a path is a turn, not a command


def test_a_line_that_is_not_utf8_is_refused_and_the_session_goes_on(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = subprocess.run(
        [sys.executable, "-m", "localmoa", "chat", "--memory-budget", "3GiB"],
        input=b"caf\xe9\nhi\n",
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0
    assert b"that line is not UTF-8 text, so it was not sent" in out.stderr
    assert out.stdout == b"a has considered: hi\n"


def test_a_failed_turn_is_one_line_and_the_session_goes_on(tmp_path: Path) -> None:
    narrow = FAKE_THREE.replace('memory = "1GiB"', 'memory = "1GiB"\nn_ctx = 200')
    write_config(tmp_path, narrow + "max_tokens = 8\n")
    lines = "x" * 2000 + "\n" + "word " * 200 + "\nhi\n"
    out = localmoa("chat", "--memory-budget", "3GiB", stdin=lines)
    assert out.returncode == 0, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("localmoa: ")]
    assert errors[0].startswith("localmoa: error: the prompt has 2,000 characters")
    assert errors[1].startswith("localmoa: turn failed: every agent of layer 1 failed")
    assert all("left out of the conversation" in line for line in errors[:2])
    assert out.stdout == "a has considered: hi\n"
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["-e", "nope"], 'no ensemble "nope" (defined: default)'),
        (["--config", "missing.toml"], "missing.toml"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], said: str) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("chat", "--memory-budget", "3GiB", *args, stdin="hi\n")
    assert out.returncode == 2
    assert said in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert out.stdout == ""


class ChatProcess:
    """`localmoa chat` in a subprocess: turns written to its stdin, stderr read line by line."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "localmoa", "chat", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self.out: list[str] = []
        self._new = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_err, daemon=True),
            threading.Thread(target=self._read_out, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_err(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()
        with self._new:
            self.lines.append("")  # end of stream
            self._new.notify_all()

    def _read_out(self) -> None:
        assert self.popen.stdout is not None
        self.out.append(self.popen.stdout.read())

    def say(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def wait_for(self, marker: str, count: int = 1) -> None:
        """Until stderr has shown ``marker`` on ``count`` lines (or ended)."""

        def seen() -> int:
            return sum(marker in line for line in self.lines)

        with self._new:
            self._new.wait_for(lambda: seen() >= count or "" in self.lines, WAIT)
            assert seen() >= count, self.stderr

    def finish(self) -> tuple[int, str, str]:
        assert self.popen.stdin is not None
        if not self.popen.stdin.closed:
            self.popen.stdin.close()
        self.popen.wait(WAIT)
        for reader in self._readers:
            reader.join(WAIT)
        return self.popen.returncode, "".join(self.out), self.stderr

    @property
    def stderr(self) -> str:
        with self._new:
            return "".join(self.lines)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
def processes() -> Iterator[list[ChatProcess]]:
    started: list[ChatProcess] = []
    yield started
    for process in started:
        process.kill()


def test_ctrl_c_during_an_answer_cancels_it_and_the_session_goes_on(
    tmp_path: Path, processes: list[ChatProcess]
) -> None:
    write_config(tmp_path, SLOW_TWO)
    chat = ChatProcess("--memory-budget", "2GiB")
    processes.append(chat)
    chat.say(LONG)
    chat.wait_for("loaded b")  # the first layer's calls are running
    chat.popen.send_signal(signal.SIGINT)
    chat.wait_for("answer cancelled; this turn is left out of the conversation")
    chat.say("second")
    code, out, err = chat.finish()
    assert code == 0, err
    assert out == "a on second\n"  # cancelled before its aggregator wrote anything
    assert loads(err) == [0]  # the models stayed loaded after Ctrl-C
    assert unloaded(last_line(err)) == {"a", "b"}
    turns = logged_turns()
    assert [(t["status"], t["prompt"]) for t in turns] == [("interrupted", LONG), ("ok", "second")]
    assert turns[0]["chat_id"] == turns[1]["chat_id"]
    assert "Traceback" not in err


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_during_an_answer_unloads_and_exits_143(
    tmp_path: Path, processes: list[ChatProcess], signum: int, code: int
) -> None:
    write_config(tmp_path, SLOW_TWO)
    chat = ChatProcess("--memory-budget", "2GiB")
    processes.append(chat)
    chat.say(LONG)
    chat.wait_for("loaded b")
    chat.popen.send_signal(signum)
    rc, _, err = chat.finish()
    assert rc == code and "Traceback" not in err
    name = signal.Signals(signum).name
    assert last_line(err).startswith(f"localmoa: stopped by {name}; unloaded ")
    assert unloaded(last_line(err)) == {"a", "b"}
    assert [t["status"] for t in logged_turns()] == ["interrupted"]


def test_sigterm_at_the_prompt_unloads_and_exits_143(
    tmp_path: Path, processes: list[ChatProcess]
) -> None:
    write_config(tmp_path, SLOW_TWO)
    chat = ChatProcess("--memory-budget", "2GiB")
    processes.append(chat)
    chat.say("first")
    chat.wait_for("calls (0 failed)")  # answered: the session now waits for the next line
    chat.popen.send_signal(signal.SIGTERM)
    code, out, err = chat.finish()
    assert code == 143 and "Traceback" not in err
    assert out == "a on first\n"
    assert unloaded(last_line(err)) == {"a", "b"}


class Terminal:
    """`localmoa chat` on a pseudo-terminal, as a person types into it."""

    def __init__(self, *args: str) -> None:
        import pty

        self.master, slave = pty.openpty()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "localmoa", "chat", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TERM": "dumb"},
        )
        os.close(slave)
        self.seen = b""

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def wait_for(self, marker: bytes, count: int = 1) -> None:
        """Until the screen has shown ``marker`` ``count`` times (a bounded poll of the pty)."""
        import select
        import time

        deadline = time.monotonic() + WAIT
        while self.seen.count(marker) < count and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.master, 65536)
                except OSError:  # the child closed the terminal
                    break
        assert self.seen.count(marker) >= count, self.seen.decode(errors="replace")

    def wait_until_reading(self) -> None:
        """Until the process sleeps in its read. CPython's readline runs a signal's handler only
        when the signal interrupts its select(); one that lands while it echoes a key waits for
        the next key, so a test that signals just after an echo must let it go back to sleep
        first (a bounded poll of /proc: a person's Ctrl-C is never microseconds after a key)."""
        import time

        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            stat = Path(f"/proc/{self.popen.pid}/stat").read_text()
            wchan = Path(f"/proc/{self.popen.pid}/wchan").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "S" and wchan not in ("", "0"):
                return
        raise AssertionError("the chat never went back to reading")

    def close(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(WAIT)
        os.close(self.master)


def test_on_a_terminal_ctrl_c_clears_the_line_and_ctrl_d_ends(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    terminal = Terminal("--memory-budget", "3GiB")
    try:
        terminal.wait_for(b"/exit or Ctrl-D ends")
        terminal.wait_for(b"> ")
        terminal.type(b"never sent")
        terminal.wait_for(b"never sent")  # echoed: readline holds the line
        terminal.wait_until_reading()
        terminal.popen.send_signal(signal.SIGINT)
        terminal.wait_for(b"> ", 2)  # a fresh prompt, the line dropped
        terminal.type(b"hello\r")
        terminal.wait_for(b"a has considered: hello")
        terminal.wait_for(b"> ", 3)
        terminal.type(b"\x04")  # Ctrl-D on an empty line
        terminal.wait_for(b"localmoa: chat ended; unloaded ")
        assert terminal.popen.wait(WAIT) == 0
        assert b"never sent" not in terminal.seen.split(b"a has considered")[1]
        assert loads(terminal.seen.decode()) == [3]
    finally:
        terminal.close()
