"""Any OpenAI-compatible server on this machine: llama-server, ``python -m llama_cpp.server``,
LM Studio, vLLM.

Such a server loads its own models, so here residency is the server's business, not the plan's:

- **load does not load.** It asks ``GET {base_url}/models`` whether the server answers and lists
  ``config.model`` (an exact, case-sensitive id). That check matters more than it looks:
  llama_cpp.server answers a request for a model id it does not have with its default model,
  so a misspelt id would otherwise produce answers from the wrong model without any error.
  ``footprint`` runs the same check, so ``localmoa plan`` reports a server that is down before
  the run starts.
- **memory is outside the budget** (0 bytes, source "server") unless the model's ``memory`` is
  declared: the server holds its model whatever localmoa decides, so it is not ours to plan.

Streaming (``POST /chat/completions``, server-sent events) has a few sharp edges, all observed
against llama_cpp.server 0.3:

- **Tokens are counted from chunks.** One chunk per generated token is the common shape, but
  not exact: llama_cpp.server sends ``content: ""`` chunks for tokens whose text it holds back
  (an unfinished UTF-8 character, a possible stop string) and sometimes one chunk more than it
  generated. Every chunk carrying ``content`` counts as one token, empty ones are carried into
  the next piece (:class:`~localmoa.backends.base.ChatDelta` allows ``tokens`` > 1), and the
  count never exceeds ``max_tokens``. When the server reports usage (``stream_options:
  {"include_usage": true}``, which OpenAI, vLLM and recent llama-server honour and
  llama_cpp.server silently ignores), the final delta corrects the count to it. A server that
  rejects ``stream_options`` with a 4xx is asked again without it, once, and remembered (unless
  its error names another option of the request and not ``stream_options``: that option is the
  one refused).
- **An answer is complete only with a finish_reason.** llama_cpp.server cuts a running stream
  short when another request reaches it (its ``--interrupt_requests``, on by default), sending
  ``[DONE]`` with no finish_reason, and a prompt longer than its context window ends the stream
  with no data at all (the reason is only in the server's log). Both become a BackendError
  rather than a silently truncated answer passed on to the next layer.
- **A kept-alive connection may be dead.** A server closes idle keep-alive connections (uvicorn
  after 5 s, the same as httpx's own expiry, so they race) and after a failed stream; the next
  request on such a connection fails before any response. That one case is retried once on a
  fresh connection: nothing was answered, so nothing is repeated.
- **Closing the stream closes the response**, which closes its connection (an unread response
  is never put back in the pool); the server notices the disconnect and stops generating.
- **Timings are the server's when it gives them.** llama-server adds ``timings`` to its last
  chunk (``prompt_per_second``, ``predicted_per_second``, and the ``_n``/``_ms`` they come
  from), which become the last delta's prefill and decode rates; llama_cpp.server and OpenAI
  send none, and the engine times the stream instead.

A request's options (``stop``, ``seed``, ``response_format``) are OpenAI's own fields and pass
through as they are: whether the server honours them is the server's to say, and one that
refuses them answers with an error that becomes a BackendError in its own words (llama_cpp.server
0.3, for one, knows ``json_object`` but not ``json_schema``).

**An agent's samples** (Self-MoA) are concurrent requests, at most the model's ``parallel`` at a
time (the base :meth:`~localmoa.backends.base.Backend.chat_samples`), each with its own ``seed``:
``parallel`` is what the server answers at once (llama-server's ``--parallel``; vLLM batches
many), which localmoa cannot ask it. llama_cpp.server answers one at a time and cuts a running
answer short when the next request arrives, so there it must stay 1 (the samples then go one
after another); the cut-short error says so.

Every request goes through one ``httpx.AsyncClient`` per base URL, built with
:func:`localmoa.egress.client_options` (loopback or ``settings.allowed_hosts`` only, proxies
ignored, ``localhost`` names connected without a lookup), after
:func:`~localmoa.egress.check_url` has passed, so no socket is opened to a host the user did not
allow. A backend instance lives in one event loop (the CLI's session).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

import httpx
from httpx_sse import EventSource, SSEError, aconnect_sse

from localmoa.backends.base import REQUEST_OPTIONS, Backend, ChatDelta, ChatRequest
from localmoa.backends.configs import OpenAIModel
from localmoa.egress import (
    check_url,
    client_options,
    is_localhost_name,
    is_loopback,
    normalize_url,
)
from localmoa.errors import (
    BackendError,
    ConfigError,
    LocalMoaError,
    ServerUnavailableError,
)
from localmoa.footprint.estimate import Footprint
from localmoa.hardware import Placement

__all__ = ["OpenAIBackend"]

log = logging.getLogger(__name__)

TIMEOUT = httpx.Timeout(None, connect=5.0)
"""Connecting to a local server takes milliseconds, so 5 s means nothing is there. Reading has
no limit: before its first token a server may process a long aggregator prompt on a CPU, or wait
for another client's generation to finish (llama_cpp.server runs one at a time), and a stuck
call is the executor's to cancel (Ctrl-C), not a timer's."""

MODELS_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
"""``GET /models`` answers at once, except that llama_cpp.server makes it wait for a running
generation; 30 s tells a busy server from something that is not an OpenAI-compatible server."""

_DEAD_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
"""What a request on a connection the server has already closed fails with, before any answer
(seen after llama_cpp.server ended a failed stream: ReadError, a reset)."""

_NOT_USAGE_REJECTIONS = frozenset({401, 403, 404, 408, 429})
"""4xx statuses that say something other than "I do not know stream_options"."""

_SERVER_HINT = "python -m llama_cpp.server --model FILE --host {host} --port {port}"


@dataclass
class _Served:
    """A model this backend has checked and considers loaded."""

    config: OpenAIModel
    base: str


class OpenAIBackend(Backend):
    """Models behind OpenAI-compatible servers that load their models themselves."""

    supports = frozenset(REQUEST_OPTIONS)

    def __init__(self, *, allowed_hosts: Sequence[str] = ()) -> None:
        self.allowed_hosts = list(allowed_hosts)
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._models: dict[str, _Served] = {}
        self._no_stream_options: set[str] = set()  # base URLs that rejected stream_options

    # --- the seam ------------------------------------------------------------------------------

    async def footprint(self, name: str, config: Any) -> Footprint:
        config = _expect(config)
        await self._check(name, config, planning=True)
        if config.memory is not None:
            return Footprint.override(config.memory)
        return Footprint(
            weights=0,
            kv_cache=0,
            compute=0,
            source="server",
            note=f"held by the server at {normalize_url(config.base_url)}, outside the budget; "
            f"declare models.{name}.memory to count it",
        )

    async def load(self, name: str, config: Any, placement: Placement | None = None) -> None:
        config = _expect(config)
        if name in self._models:
            raise BackendError(name, "already loaded")
        base = await self._check(name, config, planning=False)
        self._models[name] = _Served(config, base)

    async def unload(self, name: str) -> None:
        # The server keeps its model; localmoa only stops using it.
        self._models.pop(name, None)

    async def chat(self, name: str, request: ChatRequest) -> AsyncGenerator[ChatDelta, None]:
        served = self._models.get(name)
        if served is None:
            raise BackendError(name, "called while not loaded")
        self.refuse_unsupported(name, request)
        async with contextlib.AsyncExitStack() as stack:
            source = await self._open_stream(stack, name, served, request)
            deltas = self._deltas(name, served, source, request)
            async with contextlib.aclosing(deltas):
                async for delta in deltas:
                    yield delta

    def resident_bytes(self, name: str) -> int | None:
        served = self._models.get(name)
        return served.config.memory if served else None

    def loaded(self) -> list[str]:
        return list(self._models)

    async def aclose(self) -> list[str]:
        try:
            return await super().aclose()
        finally:
            clients, self._clients = list(self._clients.values()), {}
            for client in clients:
                await client.aclose()

    # --- checking a model ----------------------------------------------------------------------

    async def _check(self, name: str, config: OpenAIModel, *, planning: bool) -> str:
        """Egress, reachability and the model id; returns the normalized base URL.

        Nothing answering is a ServerUnavailableError either way (the user must start the server
        before the run can go on). A server that answers but will not serve this model is the
        user's to fix while planning (ConfigError, ServerUnavailableError), and one model's
        failure while running (BackendError), which the run survives.
        """
        base = normalize_url(config.base_url)
        url = f"{base}/models"

        def fail(message: str, *, config_problem: bool) -> LocalMoaError:
            if not planning:
                return BackendError(name, message)
            return ConfigError(message) if config_problem else ServerUnavailableError(message)

        response = await self._get_models(name, base, self._client(base, name), config)
        status = response.status_code
        if status in (401, 403):
            raise fail(
                f"{url} refused access ({status}: {_error_text(response)}); set "
                f"models.{name}.api_key to the key the server was started with",
                config_problem=True,
            )
        if status == 404:
            raise fail(
                f"{url} does not exist (404); base_url is the API root, which usually ends "
                f'in /v1: set models.{name}.base_url to e.g. "http://127.0.0.1:8080/v1"',
                config_problem=True,
            )
        if status >= 400:
            raise fail(
                f"{url} failed ({status}: {_error_text(response)}); check the server's log",
                config_problem=False,
            )
        ids = _model_ids(response)
        if ids and config.model not in ids:
            raise fail(
                f'the server at {base} has no model "{config.model}" (it has: {", ".join(ids)}); '
                f"set models.{name}.model to one of those",
                config_problem=True,
            )
        return base

    async def _get_models(
        self, name: str, base: str, client: httpx.AsyncClient, config: OpenAIModel
    ) -> httpx.Response:
        url = f"{base}/models"
        for attempt in range(2):  # one retry on a dead kept-alive connection
            try:
                return await client.get(url, headers=_headers(config), timeout=MODELS_TIMEOUT)
            except _DEAD_CONNECTION as exc:
                if attempt:
                    raise ServerUnavailableError(
                        f"{url}: the server closed the connection without answering ({exc}); "
                        "check its log"
                    ) from None
            except httpx.ReadTimeout:
                raise ServerUnavailableError(
                    f"{url}: the server accepted the connection but did not answer within "
                    f"{MODELS_TIMEOUT.read:.0f} s; it may be busy generating for another "
                    f"client, or models.{name}.base_url may not be an OpenAI-compatible server"
                ) from None
            except httpx.HTTPError as exc:
                raise ServerUnavailableError(_nothing_answers(name, base, exc)) from None
        raise AssertionError("not reached")  # pragma: no cover

    # --- streaming -----------------------------------------------------------------------------

    async def _open_stream(
        self,
        stack: contextlib.AsyncExitStack,
        name: str,
        served: _Served,
        request: ChatRequest,
    ) -> EventSource:
        """POST the request and return its event stream once the server has said 200."""
        base, config = served.base, served.config
        url = f"{base}/chat/completions"
        client = self._client(base, name)
        body: dict[str, Any] = {
            "model": config.model,
            "messages": [m.model_dump() for m in request.messages],
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "stream": True,
        }
        if request.stop is not None:
            body["stop"] = request.stop
        if request.seed is not None:
            body["seed"] = request.seed
        if request.response_format is not None:
            body["response_format"] = request.response_format.openai()
        if base not in self._no_stream_options:
            body["stream_options"] = {"include_usage": True}
        retried = False
        while True:
            try:
                source = await stack.enter_async_context(
                    aconnect_sse(client, "POST", url, json=body, headers=_headers(config))
                )
            except _DEAD_CONNECTION:
                if retried:
                    what = "it closed the connection without answering"
                    raise self._broken(name, url, what) from None
                log.debug("%s: dead keep-alive connection, retrying once", url)
                retried = True
                continue
            except httpx.HTTPError as exc:
                raise BackendError(name, _nothing_answers(name, base, exc)) from None
            status = source.response.status_code
            if status < 400:
                return source
            await source.response.aread()
            message = _error_text(source.response)
            await source.response.aclose()
            if (
                "stream_options" in body
                and status < 500
                and status not in _NOT_USAGE_REJECTIONS
                and not _blames_an_option(message, request)
            ):
                log.debug("%s rejected stream_options (%d: %s)", url, status, message)
                self._no_stream_options.add(base)
                del body["stream_options"]
                continue
            if status in (401, 403):
                message += f"; set models.{name}.api_key to the key the server was started with"
            raise BackendError(name, f"{url} answered {status}: {message}")

    async def _deltas(
        self, name: str, served: _Served, source: EventSource, request: ChatRequest
    ) -> AsyncGenerator[ChatDelta, None]:
        url = f"{served.base}/chat/completions"
        counted = pending = 0  # tokens yielded; tokens seen whose text has not come yet
        usage: int | None = None
        prompt_tokens = 0
        prefill: float | None = None  # llama-server's own timings, when it sends them
        decode: float | None = None
        finished = done = False
        try:
            async with contextlib.aclosing(source.aiter_sse()) as events:
                async for event in events:
                    if event.data.strip() == "[DONE]":
                        done = True
                        break
                    chunk = _decode(name, event.data)
                    if chunk is None:
                        continue
                    reported = chunk.get("usage")
                    if isinstance(reported, dict) and isinstance(
                        reported.get("completion_tokens"), int
                    ):
                        usage = reported["completion_tokens"]
                        prompt_tokens = int(reported.get("prompt_tokens") or 0)
                    timings = chunk.get("timings")
                    if isinstance(timings, dict):
                        prefill = _per_second(timings, "prompt") or prefill
                        decode = _per_second(timings, "predicted") or decode
                    choices = chunk.get("choices") or []
                    choice = choices[0] if isinstance(choices, list) and choices else {}
                    if not isinstance(choice, dict):
                        continue
                    delta = choice.get("delta") or {}
                    content = delta.get("content") if isinstance(delta, dict) else None
                    if isinstance(content, str):
                        if counted + pending < request.max_tokens:
                            pending += 1
                        if content:
                            yield ChatDelta(content, pending)
                            counted, pending = counted + pending, 0
                    finished = finished or bool(choice.get("finish_reason"))
        except SSEError:
            kind = source.response.headers.get("content-type", "no content type")
            raise BackendError(
                name,
                f"{url} answered with {kind}, not an event stream; "
                f"is models.{name}.base_url an OpenAI-compatible server?",
            ) from None
        except httpx.HTTPError as exc:
            raise self._broken(name, url, f"the connection broke mid-answer ({exc})") from exc
        if not finished:
            parallel = served.config.parallel
            why = (
                "the server ended the answer without a finish_reason, so it was cut short "
                "(llama_cpp.server does this when another request arrives while it generates: "
                + (
                    f"models.{name}.parallel is {parallel}, which such a server cannot answer "
                    "at once; set it to 1, "
                    if parallel > 1
                    else ""
                )
                + "give each model its own server or start it with --interrupt_requests False)"
                if done
                else "the server closed the stream before the answer was finished; its log has "
                "the reason (often a prompt longer than the server's context window)"
            )
            raise BackendError(name, f"{url}: {why}")
        rest = pending if usage is None else usage - counted
        if rest > 0 or prompt_tokens or prefill or decode:
            yield ChatDelta("", max(rest, 0), prompt_tokens, prefill, decode)

    # --- HTTP ----------------------------------------------------------------------------------

    def _client(self, base: str, name: str) -> httpx.AsyncClient:
        """The one client for ``base``, created after the egress check passes."""
        client = self._clients.get(base)
        if client is None:
            setting = f"models.{name}.base_url"
            check_url(base, allowed_hosts=self.allowed_hosts, setting=setting)
            client = httpx.AsyncClient(
                timeout=TIMEOUT, **client_options(self.allowed_hosts, setting=setting)
            )
            self._clients[base] = client
        return client

    @staticmethod
    def _broken(name: str, url: str, what: str) -> BackendError:
        return BackendError(name, f"{url}: {what}; is the server still running?")


def _expect(config: Any) -> OpenAIModel:
    if not isinstance(config, OpenAIModel):
        raise TypeError(f"OpenAIBackend cannot serve {type(config).__name__}")
    return config


def _headers(config: OpenAIModel) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def _nothing_answers(name: str, base: str, exc: Exception) -> str:
    """One line: the URL, that nothing answered, what to start and which setting to fix."""
    url = httpx.URL(base)
    # A server binds an address: a name (x.localhost) would make it ask the resolver.
    host = url.host if is_loopback(url.host) and not is_localhost_name(url.host) else "127.0.0.1"
    hint = _SERVER_HINT.format(host=host, port=url.port or 8080)
    return (
        f"nothing answers at {base} ({type(exc).__name__}): no OpenAI-compatible server is "
        f"running there; start one (e.g. `{hint}`) or fix models.{name}.base_url"
    )


def _blames_an_option(message: str, request: ChatRequest) -> bool:
    """True when a server's error names an option the request set, and not stream_options."""
    return "stream_options" not in message and any(o in message for o in request.options())


def _model_ids(response: httpx.Response) -> list[str]:
    """The ids of ``GET /models`` (``{"data": [{"id": ...}]}``); [] when it says nothing usable."""
    try:
        listing = response.json()
    except ValueError:
        return []
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        return []
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


def _error_text(response: httpx.Response) -> str:
    """The server's own words: OpenAI's ``{"error": {"message"}}``, FastAPI's ``{"detail"}``,
    a bare ``{"error": "..."}`` or ``{"message"}``, else the body's first line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return _one_line(error["message"])
        for key in ("error", "detail", "message"):
            if isinstance(body.get(key), str):
                return _one_line(body[key])
    return _one_line(response.text) or response.reason_phrase


def _one_line(text: str) -> str:
    """An error message as one short line. Servers put tracebacks in them (llama_cpp.server
    appends the failing source line), which are cut off; what precedes them is kept whole,
    since a first line alone is often just "1 validation error:"."""
    text = text.split("Traceback (most recent call last)")[0].split('  File "')[0]
    return " ".join(text.split())[:300]


def _per_second(timings: dict[str, Any], kind: str) -> float | None:
    """llama-server's ``{kind}_per_second``, else ``{kind}_n`` over ``{kind}_ms``; None when
    neither is a positive finite number (a prompt all in its cache evaluates nothing)."""
    rate = timings.get(f"{kind}_per_second")
    if _positive(rate):
        return float(rate)
    count, ms = timings.get(f"{kind}_n"), timings.get(f"{kind}_ms")
    if _positive(count) and _positive(ms):
        rate = float(count) * 1000 / float(ms)
        return rate if _positive(rate) else None
    return None


def _positive(value: object) -> TypeGuard[float]:
    """A positive finite number (JSON's, so never a bool)."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )


def _decode(name: str, data: str) -> dict[str, Any] | None:
    """One event's JSON; an ``error`` object inside the stream becomes a BackendError."""
    if not data.strip():
        return None
    try:
        chunk = json.loads(data)
    except ValueError:
        what = f"the server sent an event that is not JSON: {data[:200]!r}"
        raise BackendError(name, what) from None
    if not isinstance(chunk, dict):
        return None
    error = chunk.get("error")
    if error is not None:
        message = error.get("message") if isinstance(error, dict) else error
        raise BackendError(name, f"the server failed mid-answer: {_one_line(str(message))}")
    return chunk
