"""A fake Ollama server on loopback: Ollama's HTTP API and scheduler, without the models.

Why a fake, and why this one: localmoa's Ollama backend talks to Ollama through
``ollama.AsyncClient``, and what matters is less the text that comes back than what the backend
makes the *server* do — load, evict, reload, unload. A mock transport would only check that the
client was called; this fake is a real HTTP server (starlette on uvicorn, in a thread, on
127.0.0.1) that speaks Ollama's wire format, NDJSON streaming included, and keeps Ollama's
residency rules. Tests then assert on what it recorded: every request with its body
(:attr:`FakeOllama.requests`), every residency change (:attr:`FakeOllama.events`) and the most
memory it ever held (:attr:`FakeOllama.peak_bytes`).

What it copies, and from where (``ollama/ollama``: ``server/routes.go``, ``server/sched.go``,
``api/types.go``; ``docs/api.md``):

- Endpoints ``GET /``, ``/api/version``, ``/api/tags``, ``/api/ps``; ``POST /api/show``,
  ``/api/chat``, ``/api/generate`` with their response shapes. ``stream`` defaults to true; a
  streamed reply is ``application/x-ndjson``, one object per line, the last one ``done`` with
  ``done_reason`` and the timing metrics. An empty request (no prompt, no messages) only loads the
  model (``done_reason: "load"``); with ``keep_alive`` 0 it unloads it (``"unload"``). Both are
  answered with one plain JSON object even when streaming, as Ollama does.
- ``keep_alive``: a number is seconds, a string is a Go duration (``"5m"``, ``"1h30m"``,
  ``"300ms"``), anything negative is forever, the default is 5 minutes. The request's value
  overwrites the runner's, and the timer starts when the runner's in-flight requests reach zero.
- Runner options (``num_ctx``, ``num_batch``, ``num_gpu``, ``main_gpu``, ``use_mmap``,
  ``num_thread``; Ollama's ``api.Runner``) are compared whole, defaults filled in, like
  ``needsReload``'s ``reflect.DeepEqual``: a loaded model asked for with different ones is drained
  and reloaded. Sampling options never reload.
- Loads are serialized (``processPending``: "We can only load one model at a time"). Before a
  load, idle runners are evicted in ``ByDurationAndName`` order (shortest keep_alive first, then
  name) while the loaded count is at ``max_loaded_models`` or the new model would not fit in
  ``capacity_bytes``; if only busy runners hold the memory, the load waits for them. A model
  larger than the whole capacity still loads, alone, with ``size_vram`` capped (Ollama would
  offload the rest to the CPU).

- Parallel slots (``num_parallel``, Ollama's ``OLLAMA_NUM_PARALLEL``, default 1): a runner
  answers that many requests at once and every further request for it waits for a free slot,
  as the runner's sequence semaphore makes it wait (``runner/llamarunner``: ``seqsSem``), while
  it counts as in flight for the scheduler (no eviction, no expiry). A load and an unload take
  no slot. Each slot has its own ``num_ctx`` of KV cache (Ollama starts llama-server with
  ``-c num_ctx·np -np np``), which :func:`loaded_bytes` and so ``/api/ps`` ``size`` count;
  ``context_length`` stays the per-request ``num_ctx``.

Loads can be held (``hold_loads=True``): each load then waits, listed in /api/ps as Ollama lists
a model while its runner starts, until :meth:`FakeOllama.release_loads`; :attr:`FakeOllama.
load_started` says when one has begun. A test acts "during a load" with these, not with sleeps.
Answers can be held likewise (``hold_chats=True``): each request that has its slot waits before
its first token until :meth:`FakeOllama.release_chats` lets it (or a given number of held ones)
go on. :attr:`FakeOllama.in_flight`, :attr:`~FakeOllama.max_in_flight` and
:attr:`~FakeOllama.generations` (each answer's start and end, in order) say what ran at once, and
:meth:`FakeOllama.wait_until` waits, from another thread, for any of it to become true.
A load whose client went away still completes and keeps its keep_alive (real Ollama drops it
when it notices the disconnect before the runner is up): the worst case, which a client must
clean up after itself.

Of the sampling options it acts on ``num_predict`` (the reply is cut to that many words) and
``stop`` (the reply ends before the first stop string, which it leaves out, as Ollama does);
``seed`` and the others are only type-checked and recorded. ``format`` must be ``"json"`` or a
JSON schema object (otherwise Ollama's "invalid format" error, a 500 from ``llm/server.go``); the
reply is not made to match it.

What it simplifies: expiry is checked lazily (on each request and on :meth:`FakeOllama.resident`)
against an injectable monotonic ``clock``, so tests advance time instead of sleeping; memory is
:func:`loaded_bytes`, not a GGUF read; ``num_parallel`` is the same for every model (Ollama
forces 1 for embedding models and a few architectures); there is no ``/api/embed``, pull, push,
create or delete.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Final, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["GRAPH_ALLOWANCE", "FakeOllama", "FakeOllamaModel", "loaded_bytes"]

MiB: Final = 1 << 20

GRAPH_ALLOWANCE: Final = 300 * MiB
"""Fixed stand-in for llama.cpp's compute buffers. Ollama's own figure depends on the batch size
(0.3–2 GiB); a constant keeps the fake's arithmetic easy to predict in a test."""

VERSION: Final = "0.12.0"
DEFAULT_KEEP_ALIVE: Final = 300.0  # seconds; Ollama's OLLAMA_KEEP_ALIVE default of 5m
FOREVER: Final = math.inf
GO_FOREVER: Final = timedelta(microseconds=(2**63 - 1) // 1000)
"""What Ollama adds to now for a negative keep_alive: ``time.Duration(math.MaxInt64)``, ~292 y."""

RUNNER_DEFAULTS: Final[Mapping[str, Any]] = {
    "num_ctx": 4096,
    "num_batch": 512,
    "num_gpu": -1,
    "main_gpu": 0,
    "use_mmap": None,
    "num_thread": 0,
}
"""Options fixed when a runner starts (Ollama's ``api.Runner``); a change means a reload."""

_INT_OPTIONS: Final = frozenset(
    {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed"}
    | {"num_predict", "top_k", "repeat_last_n", "mirostat"}
)
_FLOAT_OPTIONS: Final = frozenset(
    {"temperature", "top_p", "min_p", "typical_p", "tfs_z", "repeat_penalty"}
    | {"presence_penalty", "frequency_penalty", "mirostat_tau", "mirostat_eta"}
)
_BOOL_OPTIONS: Final = frozenset(
    {"use_mmap", "use_mlock", "numa", "low_vram", "vocab_only", "penalize_newline"}
)

EventKind = Literal["load", "unload", "evict", "reload", "expire"]
Endpoint = Literal["chat", "generate"]

_PLACEHOLDER: Final = re.compile(r"\{(model|prompt|seed)\}")

REQUEST_INDEX: Final = "fake_ollama.request_index"
"""ASGI scope key under which the recording middleware leaves the request's index in
:attr:`FakeOllama.requests`, so a handler can name its request in what it records."""


def _default_model_info(arch: str) -> dict[str, Any]:
    """GGUF metadata of a Llama-3.1-8B-shaped model, under ``arch``'s key prefix."""
    return {
        "general.architecture": arch,
        "general.file_type": 15,
        "general.parameter_count": 8_030_261_248,
        "general.quantization_version": 2,
        f"{arch}.block_count": 32,
        f"{arch}.context_length": 131_072,
        f"{arch}.embedding_length": 4096,
        f"{arch}.feed_forward_length": 14_336,
        f"{arch}.attention.head_count": 32,
        f"{arch}.attention.head_count_kv": 8,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-05,
        f"{arch}.rope.freq_base": 500_000.0,
        f"{arch}.vocab_size": 128_256,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.bos_token_id": 128_000,
        "tokenizer.ggml.eos_token_id": 128_009,
        # Real files hold ~128k entries; /api/show blanks arrays like these unless verbose.
        "tokenizer.ggml.tokens": [f"<tok{i}>" for i in range(16)],
        "tokenizer.ggml.token_type": [1] * 16,
    }


@dataclass
class FakeOllamaModel:
    """One model the fake has "pulled": what /api/tags, /api/show and the scheduler see.

    ``model_info`` left empty is filled with Llama-3.1-8B-like keys under ``family``'s prefix,
    so a test only spells out the keys its assertion depends on.
    """

    name: str
    """Ollama name with tag, e.g. ``"llama3.1:8b"``; without ``:tag`` it means ``:latest``."""
    family: str = "llama"
    parameter_size: str = "8.0B"
    quantization_level: str = "Q4_K_M"
    size: int = 4_900_000_000
    """File bytes, as /api/tags reports them (≈ the weights)."""
    model_info: dict[str, Any] = field(default_factory=dict)
    """GGUF key/values as /api/show returns them (``general.architecture``, ``{arch}.*``)."""
    capabilities: list[str] = field(default_factory=lambda: ["completion"])
    vram_fraction: float = 1.0
    """``size_vram = loaded size × this``; below 1 simulates a partial CPU offload."""
    reply: str = "a fake answer from {model}"
    """Streamed one word per chunk; ``{model}``, ``{prompt}`` and ``{seed}`` (the request's
    ``options.seed``, or ``none``) are filled in, in one pass."""

    def __post_init__(self) -> None:
        if not self.model_info:
            self.model_info = _default_model_info(self.family)


def _info_int(info: Mapping[str, Any], key: str, default: int = 0) -> int:
    """An integer GGUF value; per-layer arrays (e.g. OpenELM's head counts) give their max."""
    value = info.get(key, default)
    if isinstance(value, list):
        value = max((v for v in value if isinstance(v, int | float)), default=default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return int(value)


def _context_length(model: FakeOllamaModel, num_ctx: int) -> int:
    """``num_ctx`` capped at the training context, as Ollama caps what it passes the runner."""
    arch = str(model.model_info.get("general.architecture", model.family))
    trained = _info_int(model.model_info, f"{arch}.context_length")
    return min(num_ctx, trained) if trained > 0 else num_ctx


def loaded_bytes(model: FakeOllamaModel, num_ctx: int, parallel: int = 1) -> int:
    """What ``model`` occupies once loaded with ``num_ctx`` and ``parallel`` slots: weights +
    f16 KV cache of every slot + graph.

    ``size + n_layer·n_head_kv·(head_k + head_v)·ctx·parallel·2 B + GRAPH_ALLOWANCE``, where
    ``head_k = {arch}.attention.key_length`` or else ``n_embd / n_head``, ``head_v`` likewise
    from ``value_length`` (falling back to ``head_k``), and ``ctx = min(num_ctx,
    {arch}.context_length)``. With equal key and value heads that is Ollama's current
    ``PredictServerVRAM`` (``llm/llama_server.go``): file size + 2·n_layer·n_head_kv·head_dim·
    ctx·2 with ``ctx = min(num_ctx, n_ctx_train)·np``, always assuming an f16 cache, but it
    honours a declared ``key_length``, which Ollama's ``n_embd/n_head`` gets wrong. Llama-3.1-8B at
    4096 tokens: 32·8·(128+128)·4096·2 = 512 MiB per slot.
    """
    info = model.model_info
    arch = str(info.get("general.architecture", model.family))
    n_layer = _info_int(info, f"{arch}.block_count")
    n_head = _info_int(info, f"{arch}.attention.head_count")
    n_head_kv = _info_int(info, f"{arch}.attention.head_count_kv", n_head)
    n_embd = _info_int(info, f"{arch}.embedding_length")
    head_k = _info_int(info, f"{arch}.attention.key_length") or (n_embd // n_head if n_head else 0)
    head_v = _info_int(info, f"{arch}.attention.value_length") or head_k
    ctx = _context_length(model, num_ctx) * parallel
    kv_cache = n_layer * n_head_kv * (head_k + head_v) * ctx * 2
    return model.size + kv_cache + GRAPH_ALLOWANCE


def _canonical(name: str) -> str:
    """``name`` with its tag: Ollama reads a bare ``llama3`` as ``llama3:latest``."""
    _, colon, tag = name.rpartition(":")
    return name if colon and "/" not in tag else f"{name}:latest"


def _digest(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _rfc3339(moment: datetime) -> str:
    """Go's ``time.Time`` JSON form in UTC (RFC 3339 with fractional seconds)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _now() -> str:
    return _rfc3339(datetime.now(UTC))


class _ApiError(Exception):
    """An error answered as Ollama does: the status code and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _json_kind(value: Any) -> str:
    """The JSON type name Go's decoder puts in its messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _bad_field(struct: str, key: str, go_type: str, value: Any) -> _ApiError:
    return _ApiError(
        400,
        f"json: cannot unmarshal {_json_kind(value)} into Go struct field "
        f"{struct}.{key} of type {go_type}",
    )


_DURATION_UNITS: Final[Mapping[str, float]] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # Go accepts both micro signs
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_DURATION_PART: Final = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)?")


def _parse_go_duration(text: str) -> float:
    """Seconds in a Go ``time.ParseDuration`` string (``"1h30m"``, ``"300ms"``, ``"-1s"``).

    Go requires a unit on every number except a lone ``"0"``; its error messages are kept
    because Ollama passes them on to the client.
    """
    rest, sign = text, 1.0
    if rest and rest[0] in "+-":
        sign, rest = (-1.0 if rest[0] == "-" else 1.0), rest[1:]
    if rest == "0":
        return 0.0
    if not rest:
        raise ValueError(f"time: invalid duration {json.dumps(text)}")
    total, pos = 0.0, 0
    while pos < len(rest):
        match = _DURATION_PART.match(rest, pos)
        if match is None:
            raise ValueError(f"time: invalid duration {json.dumps(text)}")
        if match.group(2) is None:
            raise ValueError(f"time: missing unit in duration {json.dumps(text)}")
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return sign * total


def _keep_alive(value: Any) -> float | None:
    """``keep_alive`` in seconds (``inf`` = forever), or None when the request left it out.

    Mirrors ``api.Duration.UnmarshalJSON``: numbers are seconds, strings Go durations, and any
    negative value means forever.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise _ApiError(400, f"Unsupported type: '{_json_kind(value)}'")
    if isinstance(value, str):
        try:
            seconds = _parse_go_duration(value)
        except ValueError as exc:
            raise _ApiError(400, str(exc)) from None
    else:
        seconds = float(value)
    return FOREVER if seconds < 0 else seconds


def _options(value: Any, struct: str) -> dict[str, Any]:
    """The request's ``options``, type-checked as Ollama's ``Options.FromMap`` does.

    Unknown keys are kept (Ollama logs and ignores them) so tests can still see them in
    :attr:`FakeOllama.requests`.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad_field(struct, "options", "map[string]interface {}", value)
    for key, item in value.items():
        if item is None:
            continue
        if key in _INT_OPTIONS and (isinstance(item, bool) or not isinstance(item, int | float)):
            raise _ApiError(400, f'option "{key}" must be of type integer')
        if key in _FLOAT_OPTIONS and (isinstance(item, bool) or not isinstance(item, int | float)):
            raise _ApiError(400, f'option "{key}" must be of type float32')
        if key in _BOOL_OPTIONS and not isinstance(item, bool):
            raise _ApiError(400, f'option "{key}" must be of type boolean')
        if key == "stop" and not (isinstance(item, list) and all(isinstance(s, str) for s in item)):
            raise _ApiError(400, f'option "{key}" must be of an array of strings')
    return dict(value)


def _runner_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The runner options a request implies: defaults overlaid with what it set.

    Leaving an option out means the default, not "whatever is loaded": a model loaded with
    ``num_ctx`` 8192 and then asked for without options is reloaded at 4096, as in Ollama.
    """
    runner = dict(RUNNER_DEFAULTS)
    for key in RUNNER_DEFAULTS:
        if options.get(key) is not None:
            value = options[key]
            runner[key] = value if isinstance(value, bool) else int(value)
    runner["num_ctx"] = max(4, runner["num_ctx"])  # GetRunner: "if opts.NumCtx < 4"
    return runner


@dataclass
class _Runner:
    """A loaded model, as ``sched.go``'s ``runnerRef`` tracks it."""

    name: str
    model: FakeOllamaModel
    options: dict[str, Any]
    context_length: int
    size: int
    size_vram: int
    keep_alive: float
    refs: int = 0
    expires_at: float | None = None
    """Clock time at which an idle runner expires; None while busy or kept forever."""
    draining: bool = False
    """Set while a load waits for this runner to go idle: new requests queue behind the load."""
    unload_reason: EventKind | None = None
    """``"unload"`` once an unload request waits for in-flight requests to finish."""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    slots: asyncio.Semaphore = field(default_factory=asyncio.Semaphore)
    """The runner's parallel slots: a request holds one from its first token to its last."""


class _StreamThenRelease(StreamingResponse):
    """NDJSON streaming that gives its runner back however the stream ends.

    Releasing here rather than in the generator's ``finally`` also covers a client that leaves
    before the first chunk, when the generator never starts and so never runs its ``finally``.
    """

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        super().__init__(content, media_type="application/x-ndjson")
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class _Server(uvicorn.Server):
    """uvicorn without its 100 ms polls, so a test's start-and-stop costs milliseconds.

    uvicorn checks ``should_exit`` every 0.1 s and sleeps another 0.1 s on shutdown; at one
    server per test that would be most of this suite's time. Here :meth:`wake` ends the main
    loop at once, and shutdown closes idle connections and polls the rest every 5 ms.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    async def main_loop(self) -> None:
        await self.on_tick(0)  # sets the default response headers (date, server)
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if not self.should_exit:  # stop() may have come before _wake existed
            await self._wake.wait()

    def wake(self) -> None:
        """Ask the server to exit, from any thread."""
        self.should_exit = True
        wake, loop = self._wake, self._loop
        if wake is not None and loop is not None:
            loop.call_soon_threadsafe(wake.set)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # closes idle keep-alive connections, ends busy ones after
        deadline = time.monotonic() + 1.0
        while (self.server_state.connections or self.server_state.tasks) and (
            time.monotonic() < deadline
        ):
            await asyncio.sleep(0.005)
        for task in self.server_state.tasks:  # streams a test left unread
            task.cancel()
        for server in self.servers:
            await server.wait_closed()


class _RecordRequests:
    """ASGI middleware: writes down each request (method, path, JSON body) before handling it.

    The body is read whole, recorded, and replayed to the app; a middleware rather than code in
    each handler so that requests to unknown paths are recorded too.
    """

    def __init__(self, app: ASGIApp, fake: FakeOllama) -> None:
        self.app = app
        self.fake = fake

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        scope[REQUEST_INDEX] = self.fake._record(scope["method"], scope["path"], body)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _json_response(payload: Any, status: int = 200) -> Response:
    return Response(
        json.dumps(payload), status_code=status, media_type="application/json; charset=utf-8"
    )


def _line(payload: Any) -> bytes:
    return json.dumps(payload).encode() + b"\n"


async def _body(request: Request, struct: str) -> dict[str, Any]:
    """The request's JSON object, or the 400 Gin's ``ShouldBindJSON`` would give."""
    raw = await request.body()
    if not raw.strip():
        raise _ApiError(400, "missing request body")
    try:
        body = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise _ApiError(400, f"invalid JSON: {exc.msg} at offset {exc.pos}") from None
    if not isinstance(body, dict):
        raise _ApiError(
            400, f"json: cannot unmarshal {_json_kind(body)} into Go value of type api.{struct}"
        )
    return body


def _str_field(body: Mapping[str, Any], key: str, struct: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _bad_field(struct, key, "string", value)
    return value


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _bad_field("ChatRequest", "messages", "[]api.Message", value)
    for message in value:
        if not isinstance(message, dict):
            raise _bad_field("ChatRequest", "messages", "api.Message", message)
        for key in ("role", "content"):
            if message.get(key) is not None and not isinstance(message[key], str):
                raise _bad_field("Message", key, "string", message[key])
    return value


def _format(value: Any) -> None:
    """``format``: absent, "" or null, "json", or a JSON schema object (``llm/server.go``)."""
    if value in (None, "", "json") or isinstance(value, dict):
        return
    shown = json.dumps(value)
    raise _ApiError(
        500, f'invalid format: {shown!r}; expected "json" or a valid JSON Schema object'
    )


def _before_stop(text: str, stop: Any) -> str:
    """The reply up to the first stop string, which is left out (Ollama's runner does so)."""
    stops = [s for s in stop if s] if isinstance(stop, list) else []
    return text[: min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))]


def _pieces(text: str) -> list[str]:
    """``text`` cut into word tokens that concatenate back to it exactly."""
    pieces = re.findall(r"\s*\S+", text)
    tail = text[len("".join(pieces)) :]
    if pieces and tail:
        pieces[-1] += tail
    return pieces


class FakeOllama:
    """Ollama on 127.0.0.1 with fake models: use as a context manager, or start()/stop().

    ``capacity_bytes`` is the GPU memory the scheduler fits ``size_vram`` into (None: unlimited);
    ``max_loaded_models`` is ``OLLAMA_MAX_LOADED_MODELS``; ``load_seconds`` and
    ``token_seconds`` add real delays per load and per streamed token; ``clock`` is the monotonic
    clock keep_alive expiry is judged by (tests pass one they can advance); ``hold_loads`` makes
    every load wait for :meth:`release_loads`; ``num_parallel`` is ``OLLAMA_NUM_PARALLEL``, the
    requests one model answers at once; ``hold_chats`` makes every answer wait in its slot for
    :meth:`release_chats`.
    """

    def __init__(
        self,
        models: list[FakeOllamaModel],
        *,
        capacity_bytes: int | None = None,
        max_loaded_models: int = 3,
        load_seconds: float = 0.0,
        token_seconds: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        hold_loads: bool = False,
        num_parallel: int = 1,
        hold_chats: bool = False,
    ) -> None:
        self._models: dict[str, tuple[str, FakeOllamaModel]] = {}
        for model in models:
            name = _canonical(model.name)
            if name.lower() in self._models:
                raise ValueError(f"model {name!r} is listed twice")
            self._models[name.lower()] = (name, model)
        if max_loaded_models < 1:
            raise ValueError("max_loaded_models must be at least 1")
        if num_parallel < 1:
            raise ValueError("num_parallel must be at least 1")
        self.num_parallel = num_parallel
        self.capacity_bytes = capacity_bytes
        self.max_loaded_models = max_loaded_models
        self.load_seconds = load_seconds
        self.token_seconds = token_seconds
        self._clock = clock
        self.hold_loads = hold_loads
        self.load_started = threading.Event()
        """Set when a load begins (the model already listed in /api/ps), held or not."""
        self._loads_released = threading.Event()
        self._release_held = asyncio.Event()
        self.hold_chats = hold_chats
        self._chats_released = threading.Event()
        self._chat_permits = 0  # held answers allowed to go on, one each
        self._chat_gate = asyncio.Event()  # set (and replaced) whenever held answers may go on
        self.requests: list[tuple[str, str, Any]] = []
        """(method, path, parsed JSON body or None), in arrival order."""
        self.events: list[tuple[str, str]] = []
        """(``"load"|"unload"|"evict"|"reload"|"expire"``, model name with tag), in order."""
        self.peak_bytes = 0
        """Most VRAM held at once: Σ size_vram, the quantity ``capacity_bytes`` bounds."""
        self.in_flight: dict[str, int] = {}
        """Model name -> requests it is answering now, each in a slot (held ones included)."""
        self.max_in_flight: dict[str, int] = {}
        """Model name -> the most requests it ever answered at once."""
        self.generations: list[tuple[Literal["start", "end"], str, int]] = []
        """(``"start"|"end"``, model name, the request's index in :attr:`requests`): each
        answer taking its slot and giving it back, in order."""
        self._modified_at = datetime.now(UTC)
        self._lock = threading.Lock()  # guards everything below, and the lists above
        self._observed = threading.Condition(self._lock)  # requests arrive, answers start or end
        self._loaded: dict[str, _Runner] = {}
        self._load_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, once started."""
        if self._port is None:
            raise RuntimeError("FakeOllama is not started; call start() or use it in a with")
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> None:
        """Serve in a background thread; return once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("FakeOllama is already started")
        # asyncio primitives bind to the loop that first waits on them: fresh ones per run.
        self._load_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._release_held = asyncio.Event()
        self._chat_gate = asyncio.Event()
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY on accepted sockets only when the
        # listener's proto says TCP, and without it every keep-alive response waits ~40 ms on
        # Nagle and delayed ACKs.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(
            self._app(),
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        server = _Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="fake-ollama", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                server.should_exit = True
                sock.close()
                raise RuntimeError("the fake Ollama server did not start; see stderr")
            time.sleep(0.002)  # polls uvicorn's started flag
        self._server, self._thread = server, thread
        self._port = int(sock.getsockname()[1])

    def stop(self) -> None:
        """Stop serving and join the thread; residency and records are kept for assertions.

        Held loads and answers are released first, so that stopping never waits on them."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self.release_loads()
        self.release_chats()
        server.wake()
        thread.join(timeout=10)
        self._server = self._thread = None
        self._port = None

    def __enter__(self) -> FakeOllama:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def release_loads(self) -> None:
        """Let every held load finish, and every later one go through at once (from any thread)."""
        self._loads_released.set()
        loop = self._server._loop if self._server is not None else None
        if loop is not None:
            loop.call_soon_threadsafe(self._release_held.set)

    def release_chats(self, count: int | None = None) -> None:
        """Let ``count`` held answers go on (the first to ask get them), or with None every held
        answer and every later one at once (from any thread)."""
        with self._lock:
            if count is None:
                self._chats_released.set()
            else:
                self._chat_permits += count
        loop = self._server._loop if self._server is not None else None
        if loop is not None:
            loop.call_soon_threadsafe(self._open_chat_gate)

    def _open_chat_gate(self) -> None:
        self._chat_gate.set()
        self._chat_gate = asyncio.Event()

    # -- observations ------------------------------------------------------------------------

    def wait_until(self, condition: Callable[[FakeOllama], bool], timeout: float = 10) -> bool:
        """Block until ``condition(self)`` holds after a request arrives or an answer starts or
        ends (or already does); False if ``timeout`` seconds pass first. Call it from a thread other than the
        one driving the client (``await asyncio.to_thread(fake.wait_until, ...)``)."""
        with self._observed:
            return self._observed.wait_for(lambda: condition(self), timeout)

    def resident(self) -> dict[str, int]:
        """Model name -> loaded bytes (/api/ps ``size``) now, after expiring what is due."""
        with self._lock:
            self._expire_due()
            return {name: runner.size for name, runner in self._loaded.items()}

    def _record(self, method: str, path: str, raw: bytes) -> int:
        """Write the request down; returns its index in :attr:`requests`."""
        body: Any = None
        if raw.strip():
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                body = None
        with self._observed:
            self.requests.append((method, path, body))
            self._expire_due()
            self._observed.notify_all()
            return len(self.requests) - 1

    # -- scheduler (all of it runs on the server's event loop) -------------------------------

    def _event(self, kind: EventKind, name: str) -> None:
        """Write down a residency change; the caller holds ``_lock``."""
        self.events.append((kind, name))
        self.peak_bytes = max(self.peak_bytes, sum(r.size_vram for r in self._loaded.values()))

    def _expire_due(self) -> None:
        """Unload idle runners whose keep_alive has run out; the caller holds ``_lock``."""
        now = self._clock()
        for name, runner in list(self._loaded.items()):
            if runner.refs == 0 and runner.expires_at is not None and runner.expires_at <= now:
                del self._loaded[name]
                self._event("expire", name)

    def _notify(self) -> None:
        """Wake loads waiting for a runner to go idle or leave."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _lookup(self, requested: str) -> tuple[str, FakeOllamaModel]:
        found = self._models.get(_canonical(requested).lower())
        if found is None:
            raise _ApiError(404, f"model {json.dumps(requested)} not found, try pulling it first")
        return found

    def _use_loaded(
        self,
        name: str,
        runner_options: Mapping[str, Any],
        keep_alive: float | None,
        *,
        queued: bool,
    ) -> _Runner | None:
        """Take a reference on the loaded runner if it serves these options (the fast path).

        A draining runner is refused to requests that have not queued behind the load lock,
        so a steady stream of requests cannot keep a model busy forever and starve a load.
        """
        with self._lock:
            runner = self._loaded.get(name)
            if runner is None or runner.options != runner_options:
                return None
            if runner.draining and not queued:
                return None
            runner.draining = False
            runner.refs += 1
            runner.expires_at = None
            if keep_alive is not None:
                runner.keep_alive = keep_alive
                runner.unload_reason = None
            return runner

    async def _acquire(
        self,
        name: str,
        model: FakeOllamaModel,
        options: Mapping[str, Any],
        keep_alive: float | None,
    ) -> _Runner:
        """A ready runner for ``name`` with one reference taken, loading it if need be."""
        wanted = _runner_options(options)
        runner = self._use_loaded(name, wanted, keep_alive, queued=False)
        if runner is None:
            async with self._load_lock:
                runner = self._use_loaded(name, wanted, keep_alive, queued=True)
                if runner is None:
                    runner = await self._load(name, model, wanted, keep_alive)
        await runner.ready.wait()
        return runner

    async def _load(
        self,
        name: str,
        model: FakeOllamaModel,
        runner_options: dict[str, Any],
        keep_alive: float | None,
    ) -> _Runner:
        """Load ``name`` (the caller holds the load lock): drain a stale runner, make room."""
        reloading = False
        while True:
            with self._lock:
                old = self._loaded.get(name)
                if old is None:
                    break
                if old.refs == 0:
                    del self._loaded[name]
                    reloading = True
                    break
                old.draining = True
                changed = self._changed
            await changed.wait()

        context_length = _context_length(model, runner_options["num_ctx"])
        size = loaded_bytes(model, runner_options["num_ctx"], self.num_parallel)
        size_vram = int(size * model.vram_fraction)
        if self.capacity_bytes is not None:
            size_vram = min(size_vram, self.capacity_bytes)
        runner = _Runner(
            name=name,
            model=model,
            options=runner_options,
            context_length=context_length,
            size=size,
            size_vram=size_vram,
            keep_alive=DEFAULT_KEEP_ALIVE if keep_alive is None else keep_alive,
            refs=1,
            slots=asyncio.Semaphore(self.num_parallel),
        )
        await self._make_room(runner)
        with self._lock:
            self._loaded[name] = runner
            self._event("reload" if reloading else "load", name)
        self.load_started.set()
        if self.hold_loads and not self._loads_released.is_set():
            await self._release_held.wait()  # set on this loop by release_loads
        if self.load_seconds > 0:
            await asyncio.sleep(self.load_seconds)
        runner.ready.set()
        return runner

    def _fits(self, runner: _Runner) -> bool:
        """Whether ``runner`` can join what is loaded; the caller holds ``_lock``."""
        others = self._loaded.values()
        if not others:
            return True  # a model too big for the whole GPU still loads alone (CPU offload)
        if len(others) >= self.max_loaded_models:
            return False
        if self.capacity_bytes is None:
            return True
        return sum(r.size_vram for r in others) + runner.size_vram <= self.capacity_bytes

    async def _make_room(self, runner: _Runner) -> None:
        """Evict idle runners in Ollama's order until ``runner`` fits; wait on busy ones."""
        while True:
            with self._lock:
                self._expire_due()
                if self._fits(runner):
                    for other in self._loaded.values():
                        other.draining = False
                    return
                by_duration_and_name = sorted(
                    self._loaded.values(), key=lambda r: (r.keep_alive, r.name)
                )
                idle = [r for r in by_duration_and_name if r.refs == 0]
                if idle:
                    del self._loaded[idle[0].name]
                    self._event("evict", idle[0].name)
                    continue
                # Like findRunnerToUnload with nothing idle: mark the first to go, then wait.
                by_duration_and_name[0].draining = True
                changed = self._changed
            await changed.wait()

    async def _take_slot(self, runner: _Runner, index: int) -> None:
        """Wait for one of ``runner``'s slots, then (when answers are held) for leave to go on;
        the answer counts as in flight from the slot on."""
        await runner.slots.acquire()
        with self._observed:
            count = self.in_flight.get(runner.name, 0) + 1
            self.in_flight[runner.name] = count
            self.max_in_flight[runner.name] = max(self.max_in_flight.get(runner.name, 0), count)
            self.generations.append(("start", runner.name, index))
            self._observed.notify_all()
        try:
            while self.hold_chats and not self._chats_released.is_set():
                with self._lock:
                    if self._chat_permits > 0:
                        self._chat_permits -= 1
                        return
                    gate = self._chat_gate
                await gate.wait()  # opened on this loop by release_chats
        except BaseException:
            self._give_slot(runner, index)
            raise

    def _give_slot(self, runner: _Runner, index: int) -> None:
        runner.slots.release()
        with self._observed:
            self.in_flight[runner.name] -= 1
            self.generations.append(("end", runner.name, index))
            self._observed.notify_all()

    def _release(self, runner: _Runner) -> None:
        """Drop one reference; an idle runner starts its keep_alive timer or, at 0, unloads."""
        with self._lock:
            runner.refs -= 1
            if runner.refs == 0 and self._loaded.get(runner.name) is runner:
                if runner.keep_alive <= 0:
                    del self._loaded[runner.name]
                    self._event(runner.unload_reason or "expire", runner.name)
                elif runner.keep_alive != FOREVER:
                    runner.expires_at = self._clock() + runner.keep_alive
        self._notify()

    def _unload(self, name: str) -> None:
        """An empty request with keep_alive 0: unload now, or once in-flight requests end."""
        with self._lock:
            runner = self._loaded.get(name)
            if runner is None:
                return
            runner.keep_alive = 0.0
            if runner.refs == 0:
                del self._loaded[name]
                self._event("unload", name)
            else:
                runner.unload_reason = "unload"
        self._notify()

    # -- HTTP --------------------------------------------------------------------------------

    def _app(self) -> ASGIApp:
        async def api_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, _ApiError)
            return _json_response({"error": exc.message}, exc.status)

        routes = [
            Route("/", self._root, methods=["GET", "HEAD"]),
            Route("/api/version", self._version, methods=["GET", "HEAD"]),
            Route("/api/tags", self._tags, methods=["GET", "HEAD"]),
            Route("/api/ps", self._ps, methods=["GET"]),
            Route("/api/show", self._show, methods=["POST"]),
            Route("/api/chat", self._chat, methods=["POST"]),
            Route("/api/generate", self._generate, methods=["POST"]),
        ]

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)
            # Gin's plain-text answers, not Starlette's, for paths and methods Ollama lacks.
            text = {404: "404 page not found", 405: "405 method not allowed"}
            return PlainTextResponse(text.get(exc.status_code, exc.detail), exc.status_code)

        app = Starlette(
            routes=routes, exception_handlers={_ApiError: api_error, HTTPException: http_error}
        )
        return _RecordRequests(app, self)

    def _details(self, model: FakeOllamaModel) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": model.family,
            "families": [model.family],
            "parameter_size": model.parameter_size,
            "quantization_level": model.quantization_level,
        }

    async def _root(self, request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def _version(self, request: Request) -> Response:
        return _json_response({"version": VERSION})

    async def _tags(self, request: Request) -> Response:
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": _rfc3339(self._modified_at),
                "size": model.size,
                "digest": _digest(name),
                "details": self._details(model),
            }
            for name, model in self._models.values()
        ]
        return _json_response({"models": models})

    async def _ps(self, request: Request) -> Response:
        wall, now = datetime.now(UTC), self._clock()
        with self._lock:
            runners = list(self._loaded.values())
            remaining = {
                r.name: (
                    math.inf
                    if r.keep_alive == FOREVER
                    else (r.expires_at - now if r.expires_at is not None else r.keep_alive)
                )
                for r in runners
            }
        runners.sort(key=lambda r: -remaining[r.name])  # longest time left first, as Ollama
        models = [
            {
                "name": r.name,
                "model": r.name,
                "size": r.size,
                "digest": _digest(r.name),
                "details": self._details(r.model),
                "expires_at": _rfc3339(
                    wall
                    + (
                        GO_FOREVER
                        if remaining[r.name] == math.inf
                        else timedelta(seconds=remaining[r.name])
                    )
                ),
                "size_vram": r.size_vram,
                "context_length": r.context_length,
            }
            for r in runners
        ]
        return _json_response({"models": models})

    async def _show(self, request: Request) -> Response:
        body = await _body(request, "ShowRequest")
        requested = _str_field(body, "model", "ShowRequest") or _str_field(
            body, "name", "ShowRequest"
        )
        if not requested:
            raise _ApiError(400, "model is required")
        found = self._models.get(_canonical(requested).lower())
        if found is None:
            raise _ApiError(404, f"model '{requested}' not found")
        name, model = found
        info = dict(model.model_info)
        if body.get("verbose") is not True:
            # getModelData: arrays longer than 5 are blanked unless verbose.
            info = {k: [] if isinstance(v, list) and len(v) > 5 else v for k, v in info.items()}
        parameters = 'stop                           "<|eot_id|>"'
        template = "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}"
        modelfile = (
            '# Modelfile generated by "ollama show"\n'
            "# To build a new Modelfile based on this, replace FROM with:\n"
            f"# FROM {name}\n\n"
            f"FROM /fake/ollama/models/blobs/sha256-{_digest(name)}\n"
            f'TEMPLATE """{template}"""\n'
            f"PARAMETER {parameters}\n"
        )
        return _json_response(
            {
                "modelfile": modelfile,
                "parameters": parameters,
                "template": template,
                "details": self._details(model),
                "model_info": info,
                "capabilities": list(model.capabilities),
                "modified_at": _rfc3339(self._modified_at),
            }
        )

    async def _chat(self, request: Request) -> Response:
        return await self._infer(request, "chat")

    async def _generate(self, request: Request) -> Response:
        return await self._infer(request, "generate")

    async def _infer(self, request: Request, endpoint: Endpoint) -> Response:
        """/api/chat and /api/generate: parse, schedule, then answer (streamed by default)."""
        started = time.perf_counter()
        struct = "ChatRequest" if endpoint == "chat" else "GenerateRequest"
        body = await _body(request, struct)
        requested = _str_field(body, "model", struct)
        if not requested:
            raise _ApiError(400, "model is required")
        stream = body.get("stream", True)
        if stream is None:
            stream = True
        if not isinstance(stream, bool):
            raise _bad_field(struct, "stream", "bool", stream)
        keep_alive = _keep_alive(body.get("keep_alive"))
        options = _options(body.get("options"), struct)
        _format(body.get("format"))
        if endpoint == "chat":
            messages = _messages(body.get("messages"))
            empty = not messages
            users = [m for m in messages if m.get("role") == "user"] or messages
            prompt = str(users[-1].get("content") or "") if users else ""
            prompt_words = sum(len(str(m.get("content") or "").split()) for m in messages)
        else:
            prompt = _str_field(body, "prompt", struct)
            empty = prompt == ""
            prompt_words = len(prompt.split()) + len(_str_field(body, "system", struct).split())
        name, model = self._lookup(requested)

        if empty and keep_alive == 0:
            self._unload(name)
            return _json_response(self._empty_reply(endpoint, requested, "unload"))
        if "completion" not in model.capabilities:
            raise _ApiError(400, f"{json.dumps(requested)} does not support {endpoint}")
        if endpoint == "chat" and body.get("tools") and "tools" not in model.capabilities:
            raise _ApiError(400, f"{json.dumps(requested)} does not support tools")

        runner = await self._acquire(name, model, options, keep_alive)
        load_ns = int((time.perf_counter() - started) * 1e9)
        if empty:
            self._release(runner)
            return _json_response(self._empty_reply(endpoint, requested, "load"))
        index = int(request.scope.get(REQUEST_INDEX, -1))
        try:
            await self._take_slot(runner, index)
        except BaseException:
            self._release(runner)
            raise
        answering = True

        def answered() -> None:
            """The answer is over (complete or abandoned): its slot is free, once."""
            nonlocal answering
            if answering:
                answering = False
                self._give_slot(runner, index)

        seed = options.get("seed")
        values = {"model": name, "prompt": prompt, "seed": "none" if seed is None else str(seed)}
        text = _PLACEHOLDER.sub(lambda match: values[match[1]], model.reply)
        pieces = _pieces(_before_stop(text, options.get("stop")))
        done_reason = "stop"
        num_predict = options.get("num_predict")
        if isinstance(num_predict, int | float) and 0 < num_predict < len(pieces):
            pieces, done_reason = pieces[: int(num_predict)], "length"
        prompt_tokens = max(1, prompt_words)

        def final(content: str, eval_ns: int) -> dict[str, Any]:
            reply = self._chunk(endpoint, requested, content)
            if endpoint == "generate":
                reply["context"] = list(range(prompt_tokens + len(pieces)))
            return reply | {
                "done": True,
                "done_reason": done_reason,
                "total_duration": int((time.perf_counter() - started) * 1e9),
                "load_duration": load_ns,
                "prompt_eval_count": prompt_tokens,
                "prompt_eval_duration": prompt_tokens * 1000,
                "eval_count": len(pieces),
                "eval_duration": max(1, eval_ns),
            }

        if not stream:
            try:
                eval_started = time.perf_counter()
                if self.token_seconds > 0:
                    await asyncio.sleep(self.token_seconds * len(pieces))
                eval_ns = int((time.perf_counter() - eval_started) * 1e9)
                return _json_response(final("".join(pieces), eval_ns))
            finally:
                answered()
                self._release(runner)

        async def chunks() -> AsyncIterator[bytes]:
            eval_started = time.perf_counter()
            for piece in pieces:
                if self.token_seconds > 0:
                    await asyncio.sleep(self.token_seconds)
                yield _line(self._chunk(endpoint, requested, piece) | {"done": False})
            last = final("", int((time.perf_counter() - eval_started) * 1e9))
            # Generation is over before the client reads its end, as in Ollama's runner: a
            # client that sends its next request on reading it finds the slot free.
            answered()
            yield _line(last)

        released = False

        def release_once() -> None:
            nonlocal released
            if not released:
                released = True
                answered()
                self._release(runner)

        return _StreamThenRelease(chunks(), release_once)

    @staticmethod
    def _chunk(endpoint: Endpoint, requested: str, content: str) -> dict[str, Any]:
        if endpoint == "chat":
            return {
                "model": requested,
                "created_at": _now(),
                "message": {"role": "assistant", "content": content},
            }
        return {"model": requested, "created_at": _now(), "response": content}

    def _empty_reply(self, endpoint: Endpoint, requested: str, reason: str) -> dict[str, Any]:
        """The answer to an empty request: one object, even when streaming was asked for."""
        return self._chunk(endpoint, requested, "") | {"done": True, "done_reason": reason}
