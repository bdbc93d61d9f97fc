"""The web console ``localmoa serve`` answers ``GET /`` with: chat with an ensemble and watch
every agent write.

The page (``serve/static``: one HTML file, one script, one stylesheet, no build step) is served
by localmoa itself and loads nothing from anywhere else; its Content-Security-Policy says so to
the browser too (everything ``'self'``, no framing), so a console cannot leak a prompt to a CDN
and a foreign page cannot frame it.

Routes (:func:`console_routes`):

- ``GET /`` the page, ``GET /console/static/{file}`` its script and stylesheet: only the shipped
  files, by name, so no path reaches anything else on disk.
- ``POST /console/chat`` with ``{"ensemble", "messages"}``: the run as server-sent events, one
  JSON object per event (:data:`ConsoleEvent`): ``plan`` (the stages with their labels, the
  budget), ``wave`` (each wave as the engine starts it), ``agent`` (a call started), ``piece``
  (text a call wrote), ``done`` (a call ended), ``judged`` (a judge's verdict), ``memory`` (bytes
  loaded against the budget after each load and unload), ``answer`` (text of the final answer)
  and, last, ``end`` (the answer, the run's id in the run log, or the error).
- ``GET /console/runs`` and ``GET /console/runs/{id}``: past runs from the run log.

A console chat is a :class:`~localmoa.serve.app.RequestRun` like any API request: the same
checks, admission, shared pool, planning, engine and recording; only the events it streams are
richer. A client that goes away cancels its run, as on the API.

The API key. With ``api_key`` set, every console endpoint checks ``Authorization: Bearer`` with
the API's own check. The page and its two assets are not secret (the same bytes ship in the
package) and must load before the user can type the key, so they need none. The page keeps the
key in ``sessionStorage`` (gone when the tab closes) and sends it as a header, which is why it
streams with ``fetch`` rather than ``EventSource`` (that cannot send headers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from localmoa.backends.base import ChatMessage
from localmoa.errors import LocalMoaError, UserError
from localmoa.runtime.events import (
    CallFinished,
    CallPiece,
    CallStarted,
    Event,
    Judged,
    LoadFailed,
    ModelLoaded,
    ModelUnloaded,
    RunResult,
    WaveStarted,
)
from localmoa.runtime.moa import Call, stage_label
from localmoa.serve.guard import Refused, error_response, read_body
from localmoa.serve.wire import ChatCompletionRequest, invalid_request

if TYPE_CHECKING:
    from localmoa.serve.app import MoaServer, RequestRun

__all__ = ["ConsoleChat", "ConsoleEvent", "console_routes"]

STATIC = {
    "index.html": "text/html; charset=utf-8",
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
"""Every file the console serves, and its type: nothing outside this list is ever read."""

PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

RUNS_SHOWN = 50
PING_SECONDS = 15


# --- what the console reads and sends ------------------------------------------------------------


class ConsoleChat(BaseModel):
    """``POST /console/chat``: the ensemble to ask and the whole conversation so far (the page
    keeps it; the server keeps no chat state)."""

    model_config = ConfigDict(extra="forbid")

    ensemble: str = Field(description="an ensemble's name, without the moa/ prefix")
    messages: list[ChatMessage] = Field(min_length=1, description="every turn, oldest first")


class CallInfo(BaseModel):
    """Which call: ``stage`` and ``index`` name it uniquely (a judge shares its layer)."""

    stage: int = Field(description="0-based position of the call's stage in the run")
    layer: int = Field(description="1-based layer; the aggregator is layer L+1")
    index: int
    role: str = Field(description='"proposer", "judge", "roles" or "aggregator"')
    model: str
    label: str = Field(description='what a person calls it: "layer 1", "judge 1", ...')
    final: bool = Field(description="its text is the answer (the last aggregator call)")


class StageInfo(BaseModel):
    label: str
    calls: list[CallInfo]


class PlanEvent(BaseModel):
    type: Literal["plan"] = "plan"
    ensemble: str
    budget_bytes: int
    budget_source: str = Field(description="where the budget came from, e.g. nvml, flag")
    stages: list[StageInfo] = Field(description="every call the run may make, by stage")


class WaveEvent(BaseModel):
    type: Literal["wave"] = "wave"
    number: int = Field(description="0-based, counting every wave of the run (re-plans too)")
    label: str = Field(description="the stage it runs")
    load: list[str]
    unload: list[str]
    resident: list[str]
    bytes: int = Field(description="what the plan counts resident during the wave")


class AgentEvent(CallInfo):
    type: Literal["agent"] = "agent"


class PieceEvent(BaseModel):
    type: Literal["piece"] = "piece"
    stage: int
    layer: int
    index: int
    text: str


class DoneEvent(BaseModel):
    type: Literal["done"] = "done"
    stage: int
    layer: int
    index: int
    final: bool
    ok: bool
    tokens: int
    seconds: float
    error: str | None
    ttft_s: float | None
    decode_tok_s: float | None


class JudgedEvent(BaseModel):
    type: Literal["judged"] = "judged"
    stage: int
    layer: int
    selected: list[int] = Field(description="1-based numbers of the answers kept, best first")
    skipped: list[int] = Field(description="proposer layers an early stop skipped")
    reason: str | None


class MemoryEvent(BaseModel):
    type: Literal["memory"] = "memory"
    bytes: int = Field(description="bytes loaded now, every request's models together")
    budget_bytes: int
    models: dict[str, int] = Field(description="each loaded model's bytes")
    cause: str = Field(description='what changed: "loaded a in 0.3 s", "unloaded b", ...')


class AnswerEvent(BaseModel):
    type: Literal["answer"] = "answer"
    text: str


class EndEvent(BaseModel):
    type: Literal["end"] = "end"
    answer: str | None = Field(description="the whole answer; null when the run failed")
    run_id: str | None = Field(description="the run's id in the run log, when recorded")
    error: str | None
    seconds: float | None
    calls: int
    loads: int


ConsoleEvent = Annotated[
    PlanEvent
    | WaveEvent
    | AgentEvent
    | PieceEvent
    | DoneEvent
    | JudgedEvent
    | MemoryEvent
    | AnswerEvent
    | EndEvent,
    Field(discriminator="type"),
]
"""One server-sent event of ``POST /console/chat`` (its ``data``, as JSON)."""


class RunsPage(BaseModel):
    """``GET /console/runs``."""

    recording: bool = Field(description="False: no run log (record = off, or none opened)")
    message: str | None = Field(description="why there is nothing to show, for the page")
    runs: list[dict[str, Any]] = Field(description="the latest runs, as ``logs --json``")


# --- routes --------------------------------------------------------------------------------------


def console_routes(server: MoaServer) -> list[BaseRoute]:
    """The console's page, assets and endpoints, mounted beside the API."""
    console = _Console(server)
    return [
        Route("/", console.page),
        Route("/console/static/{name}", console.asset),
        Route("/console/chat", console.chat, methods=["POST"]),
        Route("/console/runs", console.runs),
        Route("/console/runs/{run_id}", console.run),
    ]


def _static(name: str) -> bytes:
    return (resources.files("localmoa.serve") / "static" / name).read_bytes()


class _Console:
    def __init__(self, server: MoaServer) -> None:
        self.server = server

    async def page(self, request: Request) -> Response:
        return self._file("index.html")

    async def asset(self, request: Request) -> Response:
        return self._file(request.path_params["name"])

    def _file(self, name: str) -> Response:
        kind = STATIC.get(name)
        if kind is None:
            return error_response(
                404, f"no console file {name!r}", "invalid_request_error", "not_found"
            )
        return Response(_static(name), media_type=kind, headers=PAGE_HEADERS)

    async def chat(self, request: Request) -> Response:
        server = self.server
        try:
            server._authorize(request)
            asked = await self._parse(request)
            if asked.ensemble not in server.config.ensembles:
                known = ", ".join(server.config.ensembles)
                raise Refused(
                    404,
                    f'no ensemble "{asked.ensemble}" here; this server has {known}',
                    "invalid_request_error",
                    "model_not_found",
                    param="ensemble",
                )
            body = ChatCompletionRequest.model_validate(
                {
                    "model": asked.ensemble,
                    "messages": [m.model_dump() for m in asked.messages],
                    "stream": True,
                }
            )
            run = await server.open_run(body)
        except Refused as refused:
            return refused.response
        stream = _Stream(server, run, asked.ensemble)
        stream.start()  # now, so the admission slot comes back even if nobody reads the stream
        return EventSourceResponse(stream.events(), ping=PING_SECONDS, sep="\n")

    async def _parse(self, request: Request) -> ConsoleChat:
        raw = await read_body(request, self.server.max_body)
        try:
            return ConsoleChat.model_validate_json(raw)
        except ValidationError as exc:
            raise invalid_request(exc) from None

    async def runs(self, request: Request) -> Response:
        try:
            self.server._authorize(request)
        except Refused as refused:
            return refused.response
        store, why = self._store()
        if store is None:
            return JSONResponse(RunsPage(recording=False, message=why, runs=[]).model_dump())
        try:  # in a thread: a log locked by another writer may keep SQLite waiting a while
            listed = await asyncio.to_thread(store.list_runs, RUNS_SHOWN)
        except UserError as exc:  # the log cannot be read
            return error_response(503, str(exc), "server_error", "run_log_unreadable")
        runs = [r.model_dump(mode="json") for r in listed]
        message = None if runs else "no runs recorded yet"
        return JSONResponse(RunsPage(recording=True, message=message, runs=runs).model_dump())

    async def run(self, request: Request) -> Response:
        try:
            self.server._authorize(request)
        except Refused as refused:
            return refused.response
        store, why = self._store()
        if store is None:
            return error_response(404, str(why), "invalid_request_error", "run_not_found")
        try:
            detail = await asyncio.to_thread(store.run, request.path_params["run_id"])
        except UserError as exc:  # no such run (or no single one), or the log cannot be read
            return error_response(404, str(exc), "invalid_request_error", "run_not_found")
        return JSONResponse(detail.model_dump(mode="json"))

    def _store(self) -> tuple[Any, str | None]:
        """The run log's store (``Store``: ``list_runs``, ``run``), or None and why not."""
        recorder = getattr(self.server, "recorder", None)
        store = getattr(recorder, "store", None)
        if store is not None:
            return store, None
        if recorder is None or getattr(recorder, "mode", None) == "off":
            return None, (
                'recording is off: this server keeps no run log (settings.record = "off" '
                "or LOCALMOA_RECORD=off)"
            )
        return None, (
            "recording is off: the run log could not be opened (the server's warning says "
            'why); fix the file, or set settings.record = "off" to silence it'
        )


# --- one chat's stream ---------------------------------------------------------------------------


class _Stream:
    """One console chat: runs the request and turns its engine events into console events."""

    def __init__(self, server: MoaServer, run: RequestRun, ensemble: str) -> None:
        self.server = server
        self.run = run
        self.ensemble = ensemble
        self.labels = [stage_label(stage) for stage in run.stages]
        self.queue: asyncio.Queue[BaseModel | None] = asyncio.Queue()
        self.task: asyncio.Task[RunResult] | None = None

    def start(self) -> None:
        self.queue.put_nowait(self._plan())
        self.queue.put_nowait(self._memory("before the run"))
        self.task = self.run._spawn(self.run.run(self.on_event))
        self.task.add_done_callback(lambda _: self.queue.put_nowait(None))

    def on_event(self, event: Event) -> None:
        put = self.queue.put_nowait
        match event:
            case WaveStarted(number=number, wave=wave):
                put(
                    WaveEvent(
                        number=number,
                        label=self._label(wave.layer - 1),
                        load=wave.load,
                        unload=wave.unload,
                        resident=wave.resident,
                        bytes=wave.bytes,
                    )
                )
            case ModelLoaded(model=model, seconds=seconds):
                put(self._memory(f"loaded {model} in {seconds:.2f} s"))
            case LoadFailed(model=model, error=error):
                put(self._memory(f"{model} failed to load: {error}"))
            case ModelUnloaded(model=model):
                put(self._memory(f"unloaded {model}"))
            case CallStarted(call=call):
                put(AgentEvent(**self._info(call).model_dump()))
            case CallPiece(call=call, text=text):
                if call.is_aggregator:
                    put(AnswerEvent(text=text))
                else:
                    put(PieceEvent(stage=call.stage, layer=call.layer, index=call.index, text=text))
            case CallFinished(call=call, record=record):
                put(
                    DoneEvent(
                        stage=call.stage,
                        layer=call.layer,
                        index=call.index,
                        final=call.is_aggregator,
                        ok=record.ok,
                        tokens=record.tokens,
                        seconds=record.seconds,
                        error=record.error,
                        ttft_s=record.ttft_s,
                        decode_tok_s=record.decode_tok_s,
                    )
                )
            case Judged(call=call, verdict=verdict, skipped=skipped):
                put(
                    JudgedEvent(
                        stage=call.stage,
                        layer=call.layer,
                        selected=list(verdict.selected),
                        skipped=list(skipped),
                        reason=verdict.reason,
                    )
                )

    async def events(self) -> AsyncIterator[dict[str, str]]:
        """The run's console events; cancels the run if the client goes away."""
        task = self.task
        assert task is not None, "start() first"
        try:
            while (event := await self.queue.get()) is not None:
                yield {"data": event.model_dump_json()}
            yield {"data": self._end(task).model_dump_json()}
            yield {"data": self._memory("after the run").model_dump_json()}
        finally:
            if not task.done():  # the client went away: stop the run, free what it held
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, LocalMoaError):
                    await task

    def _end(self, task: asyncio.Task[RunResult]) -> EndEvent:
        run_id = getattr(getattr(self.run, "recording", None), "id", None)
        try:
            result = task.result()
        except LocalMoaError as exc:
            return EndEvent(
                answer=None, run_id=run_id, error=str(exc), seconds=None, calls=0, loads=0
            )
        return EndEvent(
            answer=result.answer,
            run_id=run_id,
            error=None,
            seconds=result.seconds,
            calls=len(result.calls),
            loads=result.loads,
        )

    def _plan(self) -> PlanEvent:
        budget = self.server.budget
        stages = [
            StageInfo(label=self.labels[k], calls=[self._info(call) for call in stage])
            for k, stage in enumerate(self.run.stages)
        ]
        return PlanEvent(
            ensemble=self.ensemble,
            budget_bytes=budget.bytes,
            budget_source=budget.source,
            stages=stages,
        )

    def _memory(self, cause: str) -> MemoryEvent:
        pool = self.server.pool
        loaded = dict(pool.loaded) if pool is not None else {}
        return MemoryEvent(
            bytes=sum(loaded.values()),
            budget_bytes=self.server.budget.bytes,
            models=loaded,
            cause=cause,
        )

    def _label(self, stage: int) -> str:
        return self.labels[stage] if 0 <= stage < len(self.labels) else f"stage {stage + 1}"

    def _info(self, call: Call) -> CallInfo:
        label = self._label(call.stage)
        if call.group is not None:
            label += f" #{call.index + 1}"
        return CallInfo(
            stage=call.stage,
            layer=call.layer,
            index=call.index,
            role=call.role,
            model=call.model,
            label=label,
            final=call.is_aggregator,
        )
