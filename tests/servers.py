"""Real HTTP servers on loopback for the network backends' tests.

- :func:`llama_cpp_server` runs ``python -m llama_cpp.server`` on a tiny model: the real
  OpenAI-compatible server, with real llama.cpp behind it.
- :func:`recording_proxy` sits between a backend and a server and keeps every byte the backend
  sent, so a test can pin the exact request (body and headers) that went over the wire.
- :func:`stub_server` answers from a function, for the replies a real server will not give on
  demand (401, a 400 for an unknown field).
- :func:`serving` runs localmoa's own MoaServer under uvicorn, in a thread with its own loop.

All of them bind 127.0.0.1 only, and all run in threads or subprocesses that the context manager
stops on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import uvicorn

from localmoa.backends import make_backends
from localmoa.config import Config
from localmoa.hardware import Budget
from localmoa.serve.app import MoaServer

__all__ = [
    "Recorded",
    "RecordingProxy",
    "Serving",
    "free_port",
    "llama_cpp_server",
    "recording_proxy",
    "serving",
    "stub_server",
]

READY = "Uvicorn running on"  # uvicorn logs it once the socket listens, after app startup
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    """A port nothing listens on now (the kernel's pick, released at once)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- llama_cpp.server -----------------------------------------------------------------------------


class _Output:
    """Drains a server's output pipe in a thread, so the server never blocks on a full pipe
    (llama.cpp logs hundreds of lines while loading), and notices the readiness line."""

    def __init__(self, pipe: Any) -> None:
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.ended = threading.Event()
        self._thread = threading.Thread(target=self._drain, args=(pipe,), daemon=True)
        self._thread.start()

    def _drain(self, pipe: Any) -> None:
        try:
            for raw in iter(pipe.readline, b""):
                line = raw.decode("utf-8", errors="replace").rstrip()
                self.lines.append(line)
                if READY in line:
                    self.ready.set()
        finally:
            self.ended.set()

    def join(self) -> None:
        self._thread.join(timeout=STOP_TIMEOUT)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])


@contextlib.contextmanager
def llama_cpp_server(model_path: Path, *, alias: str = "tiny") -> Iterator[str]:
    """Run ``python -m llama_cpp.server`` on ``model_path`` and yield its API root
    ("http://127.0.0.1:PORT/v1"); the model is served under the id ``alias``.

    Ready means uvicorn said it listens (read from the server's own output, stderr and stdout in
    one pipe), not that a fixed time has passed. A port taken between choosing and binding it is
    retried with another.
    """
    for _ in range(3):
        port = free_port()
        command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model_path),
            "--model_alias",
            alias,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "2048",
        ]
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        output = _Output(process.stdout)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while not output.ready.wait(0.05):
                if output.ended.is_set() or process.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"llama_cpp.server did not start within {START_TIMEOUT:.0f} s:\n"
                        + output.tail()
                    )
            if output.ready.is_set():
                yield f"http://127.0.0.1:{port}/v1"
                return
            process.wait(timeout=STOP_TIMEOUT)
            output.join()
            if "address already in use" in output.tail().lower():
                continue
            raise RuntimeError(
                f"llama_cpp.server exited with {process.returncode}:\n{output.tail()}"
            )
        finally:
            _stop(process)
            output.join()
            if process.stdout is not None:
                process.stdout.close()
    raise RuntimeError("llama_cpp.server: no free port after 3 tries")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- a recording proxy ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """One HTTP/1.1 request as it went over the wire."""

    method: str
    path: str
    headers: dict[str, str]
    """Lower-cased names."""
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class RecordingProxy:
    """A TCP relay to ``upstream_port`` that keeps what clients sent (see :func:`recording_proxy`)."""

    upstream_port: int
    listener: socket.socket
    _sent: list[bytearray] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def port(self) -> int:
        return int(self.listener.getsockname()[1])

    def requests(self) -> list[Recorded]:
        """Every complete request received so far, in order per connection."""
        with self._lock:
            streams = [bytes(sent) for sent in self._sent]
        return [request for stream in streams for request in _parse_requests(stream)]

    def serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            sent = bytearray()
            with self._lock:
                self._sent.append(sent)
            for source, sink, record in ((client, upstream, sent), (upstream, client, None)):
                threading.Thread(
                    target=_pump, args=(source, sink, record, self._lock), daemon=True
                ).start()


def _pump(
    source: socket.socket, sink: socket.socket, record: bytearray | None, lock: threading.Lock
) -> None:
    """Copy one direction until it ends; then end the other side's writing (or both on error)."""
    try:
        while data := source.recv(65536):
            if record is not None:
                with lock:
                    record.extend(data)
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _parse_requests(stream: bytes) -> Iterator[Recorded]:
    """Split what a client sent on one connection into requests (Content-Length bodies)."""
    while (end := stream.find(b"\r\n\r\n")) >= 0:
        head = stream[:end].decode("latin-1").split("\r\n")
        method, path, _ = head[0].split(" ", 2)
        headers = {}
        for line in head[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if len(stream) < end + 4 + length:
            return
        yield Recorded(method, path, headers, stream[end + 4 : end + 4 + length])
        stream = stream[end + 4 + length :]


@contextlib.contextmanager
def recording_proxy(upstream: str) -> Iterator[RecordingProxy]:
    """Relay to the server at ``upstream`` (an http://127.0.0.1:PORT/... URL); point a backend
    at ``http://127.0.0.1:{proxy.port}/...`` and read ``proxy.requests()`` afterwards."""
    port = int(upstream.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    proxy = RecordingProxy(port, listener)
    thread = threading.Thread(target=proxy.serve, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy._stop.set()
        thread.join(timeout=STOP_TIMEOUT)
        listener.close()


# --- a scripted server --------------------------------------------------------------------------

Reply = tuple[int, str, str]
"""(status, content type, body)."""


@contextlib.contextmanager
def stub_server(answer: Callable[[Recorded], Reply]) -> Iterator[tuple[str, list[Recorded]]]:
    """An HTTP server on loopback answering every request with ``answer(request)``; yields its
    API root ("http://127.0.0.1:PORT/v1") and the list of requests it received."""
    received: list[Recorded] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _reply(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            request = Recorded(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                self.rfile.read(length),
            )
            received.append(request)
            status, kind, body = answer(request)
            data = body.encode()
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _reply

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=STOP_TIMEOUT)


class _Uvicorn(uvicorn.Server):
    """Says when it accepts connections, so tests wait on an event rather than a sleep."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self.ready = ready

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        self.ready.set()


class Serving:
    """A MoaServer on a loopback port, in its own thread and event loop."""

    def __init__(self, server: MoaServer, url: str, loop: asyncio.AbstractEventLoop) -> None:
        self.server, self.url, self.loop = server, url, loop

    def call(self, coroutine: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop (its objects belong to that loop)."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def wait_idle(self) -> None:
        self.call(self.server.idle.wait())


@contextmanager
def serving(config: Config, budget: int, **options: Any) -> Iterator[Serving]:
    port = free_port()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def main() -> None:
        server = MoaServer(
            config,
            make_backends(config.settings),
            Budget(bytes=budget, source="flag", detail="test"),
            **options,
        )
        await server.start()
        uv = _Uvicorn(
            uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"), ready
        )
        box.update(server=server, uv=uv, loop=asyncio.get_running_loop())
        try:
            await uv.serve()
        finally:
            await server.aclose()
            for backend in server.backends.values():
                await backend.aclose()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    assert ready.wait(60), "server did not start"
    try:
        yield Serving(box["server"], f"http://127.0.0.1:{port}/v1", box["loop"])
    finally:
        box["uv"].should_exit = True
        thread.join(30)
