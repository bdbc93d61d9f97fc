"""Run a plan: swap models wave by wave, run each wave's calls concurrently, pass answers on.

The executor follows the plan to the letter (it never loads a model the plan does not load, so
memory stays within the planned budget) and adds what a plan cannot know:

- calls to one model are serialized (one lock per model) and calls to different models run
  concurrently, bounded by ``max_parallel_calls`` (a semaphore) and, for shared servers, by
  ``max_calls_per_second`` (asyncio-throttle, a rate limiter: it bounds starts per second, not
  concurrency, hence the semaphore beside it);
- a failed call or load is recorded and left out of the references; the run goes on while each
  layer keeps at least one usable answer (LayerFailedError otherwise);
- on every exit (done, error, Ctrl-C/cancel) everything still resident is unloaded.

Progress is reported through ``on_event`` callbacks; the executor itself prints nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from asyncio_throttle.throttler import Throttler
from pydantic import BaseModel

from localmoa.backends.base import Backend, ChatMessage
from localmoa.errors import BackendError, LayerFailedError, LocalMoaError
from localmoa.moa import Call, build_request
from localmoa.planner import Plan, Wave

__all__ = [
    "CallFinished",
    "CallPiece",
    "CallRecord",
    "CallStarted",
    "Event",
    "Executor",
    "ModelLoaded",
    "ModelUnloaded",
    "RunResult",
    "WaveStarted",
]

log = logging.getLogger(__name__)


class CallRecord(BaseModel):
    """What one call did: the ``calls`` entries of ``run --json``."""

    layer: int
    index: int
    model: str
    ok: bool
    error: str | None
    seconds: float
    tokens: int
    text: str


class RunResult(BaseModel):
    """The answer and the account of how it was made."""

    answer: str
    calls: list[CallRecord]
    loads: int
    plan: Plan
    seconds: float


@dataclass(frozen=True)
class WaveStarted:
    number: int
    wave: Wave


@dataclass(frozen=True)
class ModelLoaded:
    model: str
    seconds: float
    measured_bytes: int | None


@dataclass(frozen=True)
class ModelUnloaded:
    model: str


@dataclass(frozen=True)
class CallStarted:
    call: Call


@dataclass(frozen=True)
class CallPiece:
    call: Call
    text: str


@dataclass(frozen=True)
class CallFinished:
    call: Call
    record: CallRecord


Event = WaveStarted | ModelLoaded | ModelUnloaded | CallStarted | CallPiece | CallFinished


class Executor:
    """Runs plans on backends. One executor may run many plans, one at a time."""

    def __init__(
        self,
        models: Mapping[str, Any],
        backends: Mapping[str, Backend],
        *,
        max_parallel_calls: int | None = None,
        max_calls_per_second: int | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.models = models
        self.backends = backends
        self.on_event = on_event or (lambda event: None)
        self._slots = asyncio.Semaphore(max_parallel_calls) if max_parallel_calls else None
        self._throttler = Throttler(max_calls_per_second) if max_calls_per_second else None
        self._locks: dict[str, asyncio.Lock] = {}

    def backend(self, model: str) -> Backend:
        return self.backends[self.models[model].backend]

    async def run(
        self, stages: Sequence[Sequence[Call]], plan: Plan, conversation: list[ChatMessage]
    ) -> RunResult:
        """Run every call of ``stages`` as ``plan`` schedules them; the last stage's answer wins."""
        started = time.perf_counter()
        last_wave = {w.layer: i for i, w in enumerate(plan.waves)}
        resident: list[str] = []
        broken: dict[str, str] = {}  # model -> why its load failed
        records: list[CallRecord] = []
        references: list[str] | None = None
        loads = 0
        try:
            for number, wave in enumerate(plan.waves):
                self.on_event(WaveStarted(number, wave))
                for model in wave.unload:
                    if model in resident:
                        resident.remove(model)
                        await self.backend(model).unload(model)
                        self.on_event(ModelUnloaded(model))
                for model in wave.load:
                    began = time.perf_counter()
                    try:
                        await self.backend(model).load(model, self.models[model])
                    except BackendError as exc:
                        broken[model] = str(exc)
                        continue
                    loads += 1
                    resident.append(model)
                    measured = self.backend(model).resident_bytes(model)
                    self.on_event(ModelLoaded(model, time.perf_counter() - began, measured))
                runs = set(wave.runs)
                calls = [c for c in stages[wave.layer - 1] if c.model in runs]
                records += await asyncio.gather(
                    *(self._call(c, conversation, references, broken) for c in calls)
                )
                if last_wave[wave.layer] == number:
                    references = self._usable(wave.layer, records, final=wave.layer == len(stages))
        finally:
            # Shielded so a second Ctrl-C cannot leave a model loaded behind our back.
            await asyncio.shield(self._unload_all(resident))
        answer = references[0] if references else ""
        return RunResult(
            answer=answer,
            calls=sorted(records, key=lambda r: (r.layer, r.index)),
            loads=loads,
            plan=plan,
            seconds=time.perf_counter() - started,
        )

    async def _unload_all(self, resident: list[str]) -> None:
        for model in reversed(resident):
            try:
                await self.backend(model).unload(model)
            except LocalMoaError as exc:
                log.warning("unloading %s failed: %s", model, exc)
            else:
                self.on_event(ModelUnloaded(model))
        resident.clear()

    @staticmethod
    def _usable(layer: int, records: list[CallRecord], *, final: bool) -> list[str]:
        done = sorted((r for r in records if r.layer == layer), key=lambda r: r.index)
        usable = [r.text for r in done if r.ok and r.text.strip()]
        if not usable:
            why = "; ".join(r.error or f'model "{r.model}": empty answer' for r in done)
            what = "the aggregator" if final else f"every agent of layer {layer}"
            raise LayerFailedError(f"{what} failed ({why})")
        return usable

    async def _call(
        self,
        call: Call,
        conversation: list[ChatMessage],
        references: list[str] | None,
        broken: Mapping[str, str],
    ) -> CallRecord:
        lock = self._locks.setdefault(call.model, asyncio.Lock())
        async with lock, _maybe(self._slots), _maybe(self._throttler):
            self.on_event(CallStarted(call))
            began = time.perf_counter()
            pieces: list[str] = []
            tokens = 0
            error: str | None = broken.get(call.model)
            if error is None:
                request = build_request(call, conversation, references)
                try:
                    async for delta in self.backend(call.model).chat(call.model, request):
                        tokens += delta.tokens
                        if delta.text:
                            pieces.append(delta.text)
                            self.on_event(CallPiece(call, delta.text))
                except LocalMoaError as exc:
                    error = str(exc)
                except Exception as exc:  # a runtime's own failure must not end the run
                    log.debug("call to %s failed", call.model, exc_info=True)
                    error = f'model "{call.model}": {type(exc).__name__}: {exc}'
            record = CallRecord(
                layer=call.layer,
                index=call.index,
                model=call.model,
                ok=error is None,
                error=error,
                seconds=time.perf_counter() - began,
                tokens=tokens,
                text="".join(pieces),
            )
            self.on_event(CallFinished(call, record))
            return record


@contextlib.asynccontextmanager
async def _maybe(guard: Any) -> AsyncIterator[None]:
    if guard is None:
        yield
    else:
        async with guard:
            yield
