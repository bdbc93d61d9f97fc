"""``localmoa serve``: every ensemble as one model behind an OpenAI-compatible endpoint.

Any local chat tool that takes an OpenAI base URL (Open WebUI, the ``llm`` CLI, IDE plugins,
LangChain) can then talk to an ensemble as if it were one model, streaming included.

- ``GET /v1/models`` lists each ensemble as ``moa/<name>``; ``POST /v1/chat/completions``
  answers, non-streamed or as ``chat.completion.chunk`` server-sent events ending with
  ``data: [DONE]`` (``finish_reason`` exactly once); ``GET /health`` says the server is up.
  Every error, 404 and 405 included, uses OpenAI's shape
  ``{"error": {"message", "type", "param", "code"}}`` (localmoa.serve.guard); a client's
  mistake is a 4xx, and only what fails on the server's side is a 5xx.
- The request's ``messages`` are the conversation every agent sees; its ``temperature`` and
  ``max_tokens`` (or ``max_completion_tokens``) apply to the aggregator, the ensemble's own
  settings to the proposers. ``usage`` counts every call of the ensemble, since all of them were
  generated for this request.
- One :class:`~localmoa.serve.pool.ModelPool` owns the hardware for all requests: concurrent
  requests share loaded models, never load one twice and never exceed the budget; requests are
  served in arrival order; models stay loaded between requests while nothing else needs the
  memory. Each request is planned as ``localmoa run`` plans (``localmoa.planning.plan_run``,
  with ``plan_for``, ``min_gain`` and ``timing_profile``), from what the pool holds, and run by
  the same engine, its loads overlapping its calls within the pool's budget. At most
  ``max_queue`` requests are admitted at once; the next gets 503 with ``Retry-After``. A client
  that disconnects cancels its run, which releases what it held.
- With ``api_key`` set, every ``/v1`` request needs ``Authorization: Bearer <key>`` (401
  otherwise). ``localmoa serve`` refuses to listen beyond loopback without a key.
- Hostile input is refused before it costs anything (localmoa.serve.guard): foreign ``Host`` and
  ``Origin`` headers, a POST that is not JSON, a body over ``max_body``; then JSON nested too
  deeply, text that is not valid Unicode, and a conversation longer than the ensemble's largest
  context (checked in characters first, then in tokens, before any model loads:
  localmoa.runtime.prepare.check_prompt). So no request can keep a tokenizer busy for minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from typing import Any, Literal

from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from localmoa.backends.base import Backend, ChatMessage
from localmoa.backends.registry import backend_for
from localmoa.config import Agent, Config, Ensemble
from localmoa.errors import (
    BudgetError,
    ConfigError,
    LayerFailedError,
    LocalMoaError,
    PromptTooLongError,
)
from localmoa.footprint.estimate import Footprint
from localmoa.hardware import Budget
from localmoa.planning import PlanPolicy, plan_run
from localmoa.records.recorder import Recorder, RunRecording, recorded
from localmoa.runtime.engine import Emit, Executor
from localmoa.runtime.events import CallPiece, Event, RunResult
from localmoa.runtime.moa import stage_label
from localmoa.runtime.prepare import (
    check_prompt,
    footprints,
    plan_policy,
    run_models,
    stages_for,
)
from localmoa.serve.console import console_routes
from localmoa.serve.guard import (
    DEFAULT_MAX_BODY,
    ErrorBody,
    ErrorDetail,
    Refused,
    RequestGuard,
    http_error,
    read_body,
    server_error,
)
from localmoa.serve.pool import ModelPool
from localmoa.serve.wire import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Message,
    ModelCard,
    ModelList,
    RunFacts,
    Usage,
    invalid_request,
    to_chat,
)

__all__ = ["ChatCompletionRequest", "MoaServer"]

log = logging.getLogger(__name__)

PREFIX = "moa/"
RETRY_AFTER_SECONDS = 5
PING_SECONDS = 15
CANCELLED = "the request was cancelled (the client went away, or the server stopped)"
"""A cancelled request's error in the run log."""


class MoaServer:
    """The ensembles of one config, served; :meth:`start` before serving, :meth:`aclose` after."""

    def __init__(
        self,
        config: Config,
        backends: Mapping[str, Backend],
        budget: Budget,
        *,
        api_key: str | None = None,
        max_queue: int = 16,
        max_body: int = DEFAULT_MAX_BODY,
        loopback_only: bool = True,
        allowed_origins: Sequence[str] = (),
        recorder: Recorder | None = None,
    ) -> None:
        self.config = config
        self.recorder = recorder or Recorder.open(config.settings)
        """Where every request's run is recorded (the run log; ``settings.record``)."""
        self.backends = backends
        self.budget = budget
        self.api_key = api_key
        self.max_queue = max_queue
        self.max_body = max_body
        self.admitted = 0
        self.idle = asyncio.Event()
        """Set while no request is admitted (for tests and graceful shutdown)."""
        self.idle.set()
        self.created = int(time.time())
        self._tickets = itertools.count()
        self._footprints: dict[str, Footprint] = {}
        self.runs: set[asyncio.Task[RunResult]] = set()
        """Runs in progress, so that a shutdown can cancel them before it unloads."""
        self.pool: ModelPool | None = None
        self.policy = PlanPolicy(None)
        """How each request is planned (:meth:`start` sets it from the settings)."""
        self.executor = Executor(
            config.models,
            backends,
            max_parallel_calls=config.settings.max_parallel_calls,
            max_calls_per_second=config.settings.max_calls_per_second,
        )
        guard = Middleware(
            RequestGuard,
            loopback_only=loopback_only,
            allowed_origins=allowed_origins,
            max_body=max_body,
        )
        self.app = Starlette(
            routes=[
                Route("/health", self.health),
                Route("/v1/models", self.list_models),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                *console_routes(self),
            ],
            middleware=[guard],
            exception_handlers={HTTPException: http_error, Exception: server_error},
        )

    async def start(self) -> None:
        """Size every model, check every ensemble can be planned, and settle how requests are
        planned (the settings' policy, as ``localmoa run``'s), before serving anything."""
        if not self.config.ensembles:
            raise ConfigError("no ensembles defined: add an [ensembles.NAME] table to serve")
        every = {
            name: stages_for(self.config, ensemble)
            for name, ensemble in self.config.ensembles.items()
        }
        used = list(
            dict.fromkeys(c.model for stages in every.values() for stage in stages for c in stage)
        )
        # One table per model for every request: sequences for the most samples any asks.
        models = run_models(self.config.models, [s for stages in every.values() for s in stages])
        self.executor.models = models
        self._footprints = await footprints(self.config, used, self.backends, models)
        sizes = {name: fp.total for name, fp in self._footprints.items()}
        for name, stages in every.items():
            try:  # whether a plan exists at all: the fewest loads say, timing would not change it
                plan_run(stages, sizes, self.budget.bytes, PlanPolicy(None))
            except BudgetError as exc:
                raise BudgetError(
                    f"ensemble {name}: {exc} (budget from {self.budget.detail})"
                ) from None
        self.policy = plan_policy(self.config, used, self.budget)
        self.pool = ModelPool(models, self.backends, sizes, self.budget.bytes)
        self.executor.sizes = sizes
        self.executor.policy = self.policy

    async def aclose(self) -> None:
        """Cancel every run still going (a shutdown does not wait for answers), then unload."""
        runs = list(self.runs)
        for task in runs:
            task.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        if self.pool is not None:
            held = self.pool.resident()
            await self.pool.close()
            for model in held:
                self.recorder.unloaded(model)
        self.recorder.close()

    # --- endpoints -------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def list_models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except Refused as refused:
            return refused.response
        cards = [
            ModelCard(id=PREFIX + name, created=self.created) for name in self.config.ensembles
        ]
        return JSONResponse(ModelList(data=cards).model_dump())

    async def open_run(self, body: ChatCompletionRequest) -> RequestRun:
        """A parsed request admitted as a run, its prompt checked before anything loads; the API
        and the console both start here. Refused (the admission slot given back) otherwise."""
        ensemble = self._ensemble(body)
        conversation = [to_chat(i, m) for i, m in enumerate(body.messages)]
        self._admit()
        run = RequestRun(self, next(self._tickets), body, ensemble, conversation)
        try:
            await check_prompt(self.config, run.stages, self.backends, conversation)
        except PromptTooLongError as exc:
            self.finished()
            raise Refused(
                400, str(exc), "invalid_request_error", "context_length_exceeded", param="messages"
            ) from None
        except BaseException:
            self.finished()
            raise
        return run

    async def chat_completions(self, request: Request) -> Response:
        try:
            self._authorize(request)
            body = await self._parse(request)
            run = await self.open_run(body)
        except Refused as refused:
            return refused.response
        if body.stream:
            run.start()  # now, so the admission slot comes back even if nobody reads the stream
            return EventSourceResponse(run.events(), ping=PING_SECONDS, sep="\n")
        try:
            result = await run.to_completion(request)
        except Refused as refused:
            return refused.response
        return JSONResponse(run.completion(result).model_dump())

    # --- request checks --------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        # Bytes, not str: compare_digest refuses non-ASCII str, and a header may carry any byte.
        given_bytes = given.strip().encode("latin-1", errors="replace")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given_bytes, self.api_key.encode("utf-8")
        ):
            raise Refused(
                401,
                "missing or wrong API key: send Authorization: Bearer <the key given to "
                "localmoa serve>",
                "invalid_request_error",
                "invalid_api_key",
            )

    async def _parse(self, request: Request) -> ChatCompletionRequest:
        raw = await read_body(request, self.max_body)
        try:
            parsed = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise Refused(
                400, "the body is not JSON", "invalid_request_error", "invalid_json"
            ) from None
        except RecursionError:
            raise Refused(
                400,
                "the body's JSON is nested too deeply to read",
                "invalid_request_error",
                "invalid_json",
            ) from None
        try:
            return ChatCompletionRequest.model_validate(parsed)
        except ValidationError as exc:
            raise invalid_request(exc) from None

    def _ensemble(self, body: ChatCompletionRequest) -> Ensemble:
        name = body.model.removeprefix(PREFIX)
        ensemble = self.config.ensembles.get(name)
        if ensemble is None:
            known = ", ".join(PREFIX + n for n in self.config.ensembles)
            raise Refused(
                404,
                f'no model "{body.model}" here; this server has {known}',
                "invalid_request_error",
                "model_not_found",
            )
        refused = body.refused_field()
        if refused is not None:
            field, why = refused
            raise Refused(400, why, "invalid_request_error", "unsupported_parameter", param=field)
        backend = backend_for(self.backends, self.config.models, ensemble.aggregator.model)
        for option in body.options():
            if option not in backend.supports:
                raise Refused(
                    400,
                    f'{option} is not supported by the aggregator of "{body.model}" (model '
                    f'"{ensemble.aggregator.model}", backend '
                    f'"{self.config.models[ensemble.aggregator.model].backend}"); send the '
                    f"request without {option}",
                    "invalid_request_error",
                    "unsupported_parameter",
                    param=option,
                )
        settings = body.aggregator_settings()
        if not settings:
            return ensemble
        aggregator = ensemble.aggregator.model_copy(update=settings)
        return ensemble.model_copy(update={"aggregator": Agent.model_validate(aggregator)})

    def _admit(self) -> None:
        if self.admitted >= self.max_queue:
            raise Refused(
                503,
                f"busy: {self.admitted} requests are running or waiting (the limit is "
                f"{self.max_queue}); retry in a few seconds",
                "server_error",
                "queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        self.admitted += 1
        self.idle.clear()

    def finished(self) -> None:
        """A request admitted by :meth:`_admit` is over: its slot comes back."""
        self.admitted -= 1
        if self.admitted == 0:
            self.idle.set()


class RequestRun:
    """One request's run of its ensemble on the shared pool, and its answer in OpenAI's shape."""

    def __init__(
        self,
        server: MoaServer,
        ticket: int,
        body: ChatCompletionRequest,
        ensemble: Ensemble,
        conversation: list[ChatMessage],
    ) -> None:
        self.server = server
        self.ticket = ticket
        self.body = body
        self.ensemble = ensemble
        """The ensemble as this request runs it (the request's aggregator settings applied)."""
        self.stages = stages_for(
            server.config, ensemble, prompt="\n".join(m.content for m in conversation)
        )
        self.selecting = not any(c.is_aggregator for stage in self.stages for c in stage)
        """final = "select": no call writes the answer, so it is sent whole at the end."""
        self.conversation = conversation
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.max_tokens = self.stages[-1][0].max_tokens
        self.pieces: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.task: asyncio.Task[RunResult] | None = None
        self.recording: RunRecording | None = None
        """This request's run in the run log, once it started (the console reports its id)."""

    def start(self) -> None:
        """Run in the background, the aggregator's text going to :attr:`pieces`."""

        def on_event(event: Event) -> None:
            if isinstance(event, CallPiece) and event.call.is_aggregator:
                self.pieces.put_nowait(("text", event.text))

        self.task = self._spawn(self.run(on_event))
        self.task.add_done_callback(lambda _: self.pieces.put_nowait(("end", "")))

    def _spawn(self, run: Coroutine[Any, Any, RunResult]) -> asyncio.Task[RunResult]:
        task = asyncio.create_task(run)
        self.server.runs.add(task)
        task.add_done_callback(self.server.runs.discard)
        return task

    async def run(self, on_event: Any = None) -> RunResult:
        """Plan from what the pool holds now, then run the one engine on the pool's admission,
        recording the run (a cancelled one, the client gone, as "interrupted"); every event
        also goes to ``on_event``. Always gives the admission slot back."""
        server = self.server
        pool, sizes = server.pool, server.executor.sizes
        assert pool is not None and sizes is not None, "MoaServer.start() first"
        passed_on: Emit = on_event or server.executor.on_event
        try:
            plan = await asyncio.to_thread(  # off the event loop: a search may take a second
                plan_run,
                self.stages,
                sizes,
                server.budget.bytes,
                server.policy,
                resident=pool.resident(),
                prompt="\n".join(m.content for m in self.conversation),
            )
            recording = server.recorder.start(
                source="serve",
                ensemble=self.body.model.removeprefix(PREFIX),
                ensemble_config=self.ensemble,
                plan=plan,
                budget=server.budget,
                conversation=self.conversation,
                models=server.executor.models,
                stages=[stage_label(stage) for stage in self.stages],
            )
            self.recording = recording

            def emit(event: Event) -> None:
                recording.on_event(event)
                passed_on(event)

            with recorded(recording, interrupted=CANCELLED):
                result = await server.executor.run(
                    self.stages,
                    plan,
                    self.conversation,
                    admission=pool.admission(self.ticket),
                    on_event=emit,
                )
            recording.finish("ok", answer=result.answer, seconds=result.seconds)
            return result
        finally:
            server.finished()

    async def to_completion(self, request: Request) -> RunResult:
        """Run to the end, or until the client goes away (then the run is cancelled)."""
        task = self._spawn(self.run())
        watcher = asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # the client went away, or this handler was cancelled (shutdown)
            watcher.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, LocalMoaError):
                    await task
        if task.cancelled():
            raise Refused(499, "client disconnected", "invalid_request_error", "cancelled")
        try:
            return task.result()
        except LocalMoaError as exc:
            raise Refused(*_failure(exc)) from None

    async def events(self) -> AsyncIterator[dict[str, str]]:
        """The run as chat.completion.chunk events; cancelled if the client disconnects."""
        task = self.task
        assert task is not None, "start() first"
        try:
            yield self._chunk([ChunkChoice(delta=Delta(role="assistant", content=""))])
            while (item := await self.pieces.get())[0] == "text":
                yield self._chunk([ChunkChoice(delta=Delta(content=item[1]))])
            try:
                result = task.result()
            except LocalMoaError as exc:
                _, message, kind, code = _failure(exc)
                error = ErrorBody(error=ErrorDetail(message=message, type=kind, code=code))
                yield {"data": error.model_dump_json()}
                yield {"data": "[DONE]"}
                return
            if self.selecting:
                yield self._chunk([ChunkChoice(delta=Delta(content=result.answer))])
            finish = self._finish_reason(result)
            yield self._chunk([ChunkChoice(delta=Delta(), finish_reason=finish)])
            if self.body.stream_options and self.body.stream_options.include_usage:
                yield self._chunk([], usage=_usage(result))
            yield {"data": "[DONE]"}
        finally:
            if not task.done():  # the client went away: stop the run, free what it held
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, LocalMoaError):
                    await task

    def completion(self, result: RunResult) -> ChatCompletion:
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.body.model,
            choices=[
                Choice(
                    message=Message(content=result.answer),
                    finish_reason=self._finish_reason(result),
                )
            ],
            usage=_usage(result),
            localmoa=RunFacts(calls=len(result.calls), loads=result.loads),
        )

    def _finish_reason(self, result: RunResult) -> Literal["stop", "length"]:
        return "length" if result.calls and result.calls[-1].tokens >= self.max_tokens else "stop"

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> dict[str, str]:
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.body.model, choices=choices, usage=usage
        )
        return {"data": json.dumps(chunk.dump())}


def _usage(result: RunResult) -> Usage:
    prompt = sum(c.prompt_tokens for c in result.calls)
    completion = sum(c.tokens for c in result.calls)
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def _failure(exc: LocalMoaError) -> tuple[int, str, str, str]:
    if isinstance(exc, LayerFailedError):
        return 500, str(exc), "server_error", "ensemble_failed"
    if exc.exit_code == 1:
        return 500, str(exc), "server_error", "run_failed"
    return 400, str(exc), "invalid_request_error", "run_failed"


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
