"""Making calls to a model: turns, calls made together, and each call's record.

Calls to one model take turns, and the calls that wait for a turn are made *together* in the
next: one backend stream (``chat_samples``: llama.cpp decodes them as sequences of one
context, a server gets them as concurrent requests within its slots). So a batch's calls of one
model, or the calls of concurrent ``serve`` requests to one model, do not queue behind each
other. A caller that is cancelled leaves its turn; when every caller of the calls being made
has left, they are stopped. Calls to different models run concurrently, bounded by
``max_parallel_calls`` (a semaphore) and, for shared servers, by ``max_calls_per_second``
(asyncio-throttle, a rate limiter: it bounds starts per second, not concurrency, hence the
semaphore beside it). A runtime's own failure fails the calls, never the caller: it is in their
records. What a record's times mean is said in :mod:`localmoa.runtime.engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from asyncio_throttle.throttler import Throttler
from pydantic import BaseModel

from localmoa.backends.base import Backend, ChatDelta, ChatRequest
from localmoa.errors import LocalMoaError
from localmoa.hardware import Placement
from localmoa.runtime.events import CallFinished, CallPiece, CallRecord, CallStarted, Event
from localmoa.runtime.moa import Call
from localmoa.runtime.telemetry import Clock, Timing

__all__ = ["Emit", "Sent", "Turns"]

log = logging.getLogger(__name__)

Emit = Callable[[Event], None]


class Sent(BaseModel):
    """What a call was given to read, for its record: the answers (``[layer, index]``), the
    tokens they took, and whether they were cut to fit."""

    references: list[tuple[int, int]] = []
    reference_tokens: int = 0
    truncated: bool = False


class Turns:
    """Every model's turns, for one executor (see the module docstring)."""

    def __init__(
        self,
        models: Mapping[str, Any],
        backend: Callable[[str], Backend],
        *,
        max_parallel_calls: int | None = None,
        max_calls_per_second: int | None = None,
        together: bool = True,
        placed: Mapping[str, Placement] | None = None,
    ) -> None:
        self.models = models
        self.backend = backend
        self.placed = {} if placed is None else placed
        """Where each model was placed, read when its calls are recorded (the engine's)."""
        self.together = together
        """Make the calls that wait for one model's turn together (False: one caller's calls
        per turn, as before calls were made together; for comparisons)."""
        self._slots = asyncio.Semaphore(max_parallel_calls) if max_parallel_calls else None
        self._throttler = Throttler(max_calls_per_second) if max_calls_per_second else None
        self._turns: dict[str, _Turns] = {}
        self._clock = Clock()

    def now(self) -> float:
        """Unix time now, as the records of these calls count it."""
        return self._clock.unix(time.perf_counter())

    async def calls(
        self,
        calls: Sequence[Call],
        requests: Sequence[ChatRequest] | None,
        emit: Emit,
        *,
        error: str | None = None,
        sent: Sent | Sequence[Sent] | None = None,
        queued_at: float | None = None,
    ) -> list[CallRecord]:
        """Make calls of one model together (one agent's samples, or a batch's calls of one
        model: the backend's ``chat_samples`` decodes them at once where it can) and record
        each; one call is the backend's ``chat``. Calls to one model take turns. ``sent``: what
        they read (one for all, or one per call). ``queued_at`` is when they became ready (see
        :mod:`localmoa.runtime.engine`), by default now."""
        model = calls[0].model
        queued = self.now() if queued_at is None else queued_at
        read = list(sent) if isinstance(sent, Sequence) else [sent or Sent()] * len(calls)
        sending = None if requests is None else list(requests)
        entry = _Entry(list(calls), sending, emit, read, queued)
        if error is not None or requests is None:  # failed before sending: no turn needed
            (records,) = await self._make([entry], model, error)
            return records
        turns = self._turns.setdefault(model, _Turns())
        turns.waiting.append(entry)
        if turns.runner is None or turns.runner.done():
            turns.runner = asyncio.create_task(self._take_turns(model, turns))
        try:
            return await asyncio.shield(entry.done)
        except asyncio.CancelledError:
            entry.abandoned = True
            if entry in turns.waiting:
                turns.waiting.remove(entry)
            elif turns.making and all(e.abandoned for e in turns.making):
                turns.runner.cancel()  # nobody waits for what is being made: stop it
                with contextlib.suppress(BaseException):
                    await turns.runner
            raise

    async def _take_turns(self, model: str, turns: _Turns) -> None:
        """Make the calls waiting for ``model``, all that wait at once together, until none
        waits: calls that came while the model was busy (other requests' to the same model)
        are made together next, not one after another."""
        while turns.waiting:
            if self.together:
                turns.making, turns.waiting = turns.waiting, []
            else:
                turns.making, turns.waiting = turns.waiting[:1], turns.waiting[1:]
            try:
                records = await self._make(turns.making, model, None)
            except BaseException as exc:
                for entry in turns.making:
                    if not entry.done.done():
                        if isinstance(exc, Exception):
                            entry.done.set_exception(exc)
                        else:
                            entry.done.cancel()
                turns.making = []
                if not isinstance(exc, Exception):
                    raise
                continue
            for entry, made in zip(turns.making, records, strict=True):
                if not entry.done.done():
                    entry.done.set_result(made)
            turns.making = []

    async def _make(
        self, entries: list[_Entry], model: str, error: str | None
    ) -> list[list[CallRecord]]:
        """Make every entry's calls in one backend stream (one call alone: ``chat``) and
        record each call, to its own entry's ``emit``; with ``error`` they fail with it
        without reaching a backend."""
        calls = [call for entry in entries for call in entry.calls]
        requests = [r for entry in entries for r in entry.requests or []]
        emits = [entry.emit for entry in entries for _ in entry.calls]
        read = [sent for entry in entries for sent in entry.read]
        async with _maybe(self._slots), _maybe(self._throttler):
            for call, emit in zip(calls, emits, strict=True):
                emit(CallStarted(call))
            began = time.perf_counter()
            pieces: list[list[str]] = [[] for _ in calls]
            tokens = [0] * len(calls)
            prompt_tokens = [0] * len(calls)
            timing = [Timing() for _ in calls]
            sending = error is None and len(requests) == len(calls)  # else: failed before
            if sending:
                try:
                    backend = self.backend(model)
                    if len(calls) == 1:
                        stream = _tagged(backend.chat(model, requests[0]))
                    else:
                        parallel = getattr(self.models[model], "parallel", None) or len(calls)
                        stream = backend.chat_samples(model, requests, parallel)
                    async for i, delta in stream:
                        timing[i].saw(delta, time.perf_counter())
                        tokens[i] += delta.tokens
                        prompt_tokens[i] = max(prompt_tokens[i], delta.prompt_tokens)
                        if delta.text:
                            pieces[i].append(delta.text)
                            emits[i](CallPiece(calls[i], delta.text))
                except LocalMoaError as exc:
                    error = str(exc)
                except Exception as exc:  # a runtime's own failure must not end the run
                    log.debug("call to %s failed", model, exc_info=True)
                    error = f'model "{model}": {type(exc).__name__}: {exc}'
            ended = time.perf_counter()
            seconds = ended - began
            records: list[list[CallRecord]] = []
            where = self.placed.get(model)
            i = 0
            for entry in entries:
                made = []
                for call in entry.calls:
                    times = timing[i].fields(
                        self._clock,
                        queued=entry.queued,
                        started=began if sending else None,
                        ended=ended,
                        ok=error is None,
                        tokens=tokens[i],
                        prompt_tokens=prompt_tokens[i],
                    )
                    record = CallRecord(
                        layer=call.layer,
                        index=call.index,
                        model=call.model,
                        device=None if where is None else where.device.name,
                        node=None if where is None else where.device.node_label,
                        ok=error is None,
                        error=error,
                        seconds=seconds,
                        tokens=tokens[i],
                        prompt_tokens=prompt_tokens[i],
                        text="".join(pieces[i]),
                        role=call.role,
                        **read[i].model_dump(),
                        **times,
                    )
                    request = requests[i] if sending else None
                    entry.emit(CallFinished(call, record, request))
                    made.append(record)
                    i += 1
                records.append(made)
            return records


@dataclass(eq=False)
class _Entry:
    """Calls that wait for their model's turn (see :meth:`Executor.calls`)."""

    calls: list[Call]
    requests: list[ChatRequest] | None
    emit: Emit
    read: list[Sent]
    queued: float
    done: asyncio.Future[list[CallRecord]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    abandoned: bool = False
    """Its caller was cancelled: nobody reads what it makes."""


@dataclass(eq=False)
class _Turns:
    """One model's calls: those waiting for it, those being made, and who makes them."""

    waiting: list[_Entry] = field(default_factory=list)
    making: list[_Entry] = field(default_factory=list)
    runner: asyncio.Task[None] | None = None


async def _tagged(stream: AsyncIterator[ChatDelta]) -> AsyncIterator[tuple[int, ChatDelta]]:
    async for delta in stream:
        yield 0, delta


@contextlib.asynccontextmanager
async def _maybe(guard: Any) -> AsyncIterator[None]:
    if guard is None:
        yield
    else:
        async with guard:
            yield
