"""SIGINT, SIGTERM and SIGHUP at several moments of `localmoa run` and `localmoa serve`.

A real process gets a real signal; the fake Ollama (a real HTTP server in this process) then
says what is still loaded. Nothing may stay loaded, and the last line must say truly what was
unloaded. Moments are reached by waiting on what the process prints or on the fake's own
events, never by sleeping.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import write_config
from fake_ollama import FakeOllama, FakeOllamaModel
from servers import free_port

GB = 1_000_000_000
MODELS = [
    FakeOllamaModel(name="llama3.1:8b", family="llama", size=2 * GB),
    FakeOllamaModel(name="qwen2.5:7b", family="qwen2", size=2 * GB),
]
STOPS = [
    pytest.param(signal.SIGINT, 130, "interrupted", id="SIGINT"),
    pytest.param(signal.SIGTERM, 143, "stopped by SIGTERM", id="SIGTERM"),
    pytest.param(signal.SIGHUP, 129, "stopped by SIGHUP", id="SIGHUP"),
]
WAIT = 60.0


def ollama_config(tmp_path: Path, url: str, max_tokens: int = 16) -> None:
    write_config(
        tmp_path,
        f"""
[settings]
ollama_host = "{url}"
memory_budget = "100GB"
[models.llama]
backend = "ollama"
model = "llama3.1:8b"
[models.qwen2]
backend = "ollama"
model = "qwen2.5:7b"
[ensembles.default]
layers = [["llama", "qwen2"]]
aggregator = "llama"
max_tokens = {max_tokens}
""",
    )


class Process:
    """`localmoa ARGS` in a subprocess; its stderr is read line by line in a thread."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "localmoa", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.lines: list[str] = []
        self._new = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with self._new:
                self.lines.append(line)
                self._new.notify_all()
        with self._new:
            self.lines.append("")  # end of stream
            self._new.notify_all()

    def wait_for(self, marker: str) -> None:
        with self._new:
            found = self._new.wait_for(
                lambda: any(marker in line for line in self.lines) or "" in self.lines, WAIT
            )
        assert found and any(marker in line for line in self.lines), self.stderr

    def stop(self, signum: int) -> tuple[int, str]:
        self.popen.send_signal(signum)
        return self.finish()

    def finish(self) -> tuple[int, str]:
        self.popen.wait(WAIT)
        self._reader.join(WAIT)
        return self.popen.returncode, self.stderr

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


def last_line(stderr: str) -> str:
    return stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("signum", "code", "said"), STOPS)
def test_run_stopped_during_a_call_unloads_every_fake_model(
    tmp_path: Path, processes: list[Process], signum: int, code: int, said: str
) -> None:
    reply = "word " * 400
    write_config(
        tmp_path,
        "".join(
            f'[models.{m}]\nbackend = "fake"\nmemory = "1GiB"\nseconds_per_token = 0.05\n'
            f'reply = "{reply}"\n'
            for m in "abc"
        )
        + '[ensembles.default]\nlayers = [["a", "b", "c"]]\naggregator = "a"\n',
    )
    run = Process("run", "q", "--memory-budget", "3GiB")
    processes.append(run)
    run.wait_for("loaded c")
    rc, err = run.stop(signum)
    assert rc == code and "Traceback" not in err
    line = last_line(err)
    assert line.startswith(f"localmoa: {said}; unloaded ")
    assert set(line.split("unloaded ")[1].split(", ")) == {"a", "b", "c"}


@pytest.mark.parametrize(("signum", "code", "said"), STOPS)
def test_run_stopped_while_ollama_loads_leaves_nothing_loaded(
    tmp_path: Path, processes: list[Process], signum: int, code: int, said: str
) -> None:
    with FakeOllama(MODELS, hold_loads=True) as ollama:
        ollama_config(tmp_path, ollama.url)
        run = Process("run", "q")
        processes.append(run)
        assert ollama.load_started.wait(WAIT)
        run.popen.send_signal(signum)
        ollama.release_loads()  # the preload now completes, as Ollama's would
        rc, err = run.finish()
        assert rc == code and "Traceback" not in err
        assert ollama.resident() == {}
        assert last_line(err).startswith(f"localmoa: {said}; unloaded ")
        unloads = [
            body
            for _, path, body in ollama.requests
            if path == "/api/generate" and body.get("keep_alive") == 0
        ]
        assert unloads  # told Ollama to unload what it was loading


@pytest.mark.parametrize(("signum", "code", "said"), STOPS)
def test_run_stopped_while_ollama_generates_leaves_nothing_loaded(
    tmp_path: Path, processes: list[Process], signum: int, code: int, said: str
) -> None:
    with FakeOllama(MODELS, token_seconds=0.05) as ollama:
        ollama_config(tmp_path, ollama.url, max_tokens=2000)
        run = Process("run", "q")
        processes.append(run)
        run.wait_for("loaded qwen2")
        assert ollama.resident()
        rc, err = run.stop(signum)
        assert rc == code and "Traceback" not in err
        assert ollama.resident() == {}
        line = last_line(err)
        assert line.startswith(f"localmoa: {said}; unloaded ")
        assert set(line.split("unloaded ")[1].split(", ")) == {"llama", "qwen2"}


def serve(tmp_path: Path, url: str, max_tokens: int = 16) -> tuple[Process, str]:
    ollama_config(tmp_path, url, max_tokens)
    port = free_port()
    server = Process("serve", "--port", str(port))
    server.wait_for("localmoa: serving")
    return server, f"http://127.0.0.1:{port}/v1"


QUESTION = {"model": "moa/default", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(("signum", "code", "said"), STOPS)
def test_idle_serve_that_holds_models_unloads_them_on_a_signal(
    tmp_path: Path, processes: list[Process], signum: int, code: int, said: str
) -> None:
    with FakeOllama(MODELS) as ollama:
        server, url = serve(tmp_path, ollama.url)
        processes.append(server)
        answered = httpx.post(f"{url}/chat/completions", json=QUESTION, timeout=WAIT)
        assert answered.status_code == 200
        assert set(ollama.resident()) == {"llama3.1:8b", "qwen2.5:7b"}  # kept for the next
        rc, err = server.stop(signum)
        assert rc == 0 and "Traceback" not in err
        assert ollama.resident() == {}
        line = last_line(err)
        assert line.startswith(f"localmoa: {said}; unloaded ")
        assert set(line.split("unloaded ")[1].split(", ")) == {"llama", "qwen2"}


def test_serve_stopped_mid_request_cancels_it_and_unloads(
    tmp_path: Path, processes: list[Process]
) -> None:
    with FakeOllama(MODELS, token_seconds=0.05) as ollama:
        server, url = serve(tmp_path, ollama.url, max_tokens=2000)  # ~100 s to answer
        processes.append(server)
        with httpx.stream(
            "POST", f"{url}/chat/completions", json={**QUESTION, "stream": True}, timeout=WAIT
        ) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # admitted and running
            server.popen.send_signal(signal.SIGTERM)
            for _ in lines:  # the server ends the stream when it cancels the run
                pass
        rc, err = server.finish()
        assert rc == 0 and "Traceback" not in err
        assert ollama.resident() == {}
        assert "stopped by SIGTERM; unloaded" in last_line(err)


def test_serve_stopped_while_a_request_loads_leaves_nothing_loaded(
    tmp_path: Path, processes: list[Process]
) -> None:
    with FakeOllama(MODELS, hold_loads=True) as ollama:
        server, url = serve(tmp_path, ollama.url)
        processes.append(server)
        request = threading.Thread(
            target=lambda: httpx.post(f"{url}/chat/completions", json=QUESTION, timeout=WAIT),
            daemon=True,
        )
        request.start()
        assert ollama.load_started.wait(WAIT)
        server.popen.send_signal(signal.SIGTERM)
        ollama.release_loads()
        rc, err = server.finish()
        request.join(WAIT)
        assert rc == 0 and "Traceback" not in err
        assert ollama.resident() == {}
