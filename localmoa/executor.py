"""Run a plan: swap models wave by wave, run each wave's calls concurrently, pass answers on.

What is loaded when is a :mod:`~localmoa.residency`'s decision: by default exactly what the
plan's waves say (so memory stays within the planned budget), or a pool shared by the runs of
``localmoa serve``. The executor adds what a plan cannot know:

- calls to one model are serialized (one lock per model) and calls to different models run
  concurrently, bounded by ``max_parallel_calls`` (a semaphore) and, for shared servers, by
  ``max_calls_per_second`` (asyncio-throttle, a rate limiter: it bounds starts per second, not
  concurrency, hence the semaphore beside it);
- a failed call or load is recorded and left out of the references; the run goes on while each
  layer keeps at least one usable answer (LayerFailedError otherwise);
- a backend that measures what a loaded model really holds (Ollama) can make the rest of the
  run be planned again from what is resident, with the measurement in place of the estimate;
- on every exit (done, error, Ctrl-C/cancel) the residency is told, and with the default one
  everything still resident is unloaded.

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
from localmoa.errors import LayerFailedError, LocalMoaError
from localmoa.moa import Call, build_request
from localmoa.planner import Plan, Wave, make_plan
from localmoa.residency import PlanResidency, Residency

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

REPLAN_SLACK = 0.10


class CallRecord(BaseModel):
    """What one call did: the ``calls`` entries of ``run --json``."""

    layer: int
    index: int
    model: str
    ok: bool
    error: str | None
    seconds: float
    tokens: int
    prompt_tokens: int = 0
    text: str


class RunResult(BaseModel):
    """The answer and the account of how it was made."""

    answer: str
    calls: list[CallRecord]
    loads: int
    replans: int = 0
    """Times the rest of the run was planned again after a measurement (see Executor.run)."""
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
        sizes: Mapping[str, int] | None = None,
    ) -> None:
        self.models = models
        self.sizes = sizes
        """The footprints the plan was made with; given, measurements can re-plan the run."""
        self.backends = backends
        self.on_event = on_event or (lambda event: None)
        self._slots = asyncio.Semaphore(max_parallel_calls) if max_parallel_calls else None
        self._throttler = Throttler(max_calls_per_second) if max_calls_per_second else None
        self._locks: dict[str, asyncio.Lock] = {}

    def backend(self, model: str) -> Backend:
        return self.backends[self.models[model].backend]

    async def run(
        self,
        stages: Sequence[Sequence[Call]],
        plan: Plan,
        conversation: list[ChatMessage],
        *,
        residency: Residency | None = None,
        on_event: Callable[[Event], None] | None = None,
    ) -> RunResult:
        """Run every call of ``stages`` as ``plan`` schedules them; the last stage's answer wins.

        ``residency`` decides what is loaded: by default exactly what the plan's waves say
        (everything unloaded at the end); ``localmoa serve`` passes a shared pool's view.
        ``on_event`` replaces the executor's callback for this run (a server's runs each stream
        their own answer).

        When a backend measures a loaded model (Ollama does) and the figure is larger than the
        plan assumed, or much smaller, the rest of the run is planned again from what is resident
        now, with the measurement in place of the estimate.
        """
        started = time.perf_counter()
        sizes = dict(self.sizes) if self.sizes is not None else None
        pending = [list(stage) for stage in stages]  # calls not run yet, by stage
        current, base, number = plan, 0, 0  # the plan followed, its first stage, waves done
        residency = residency or PlanResidency(self.models, self.backend)
        emit = on_event or self.on_event
        broken: dict[str, str] = {}  # model -> why its load failed
        records: list[CallRecord] = []
        references: list[str] | None = None
        loads = replans = 0
        try:
            while True:
                replan = False
                for wave in current.waves:
                    stage = base + wave.layer - 1
                    shown = wave if base == 0 else wave.model_copy(update={"layer": stage + 1})
                    emit(WaveStarted(number, shown))
                    number += 1
                    unloaded, outcomes = await residency.enter(wave)
                    for model in unloaded:
                        emit(ModelUnloaded(model))
                    for outcome in outcomes:
                        if outcome.error is not None:
                            broken[outcome.model] = outcome.error
                            continue
                        loads += 1
                        emit(ModelLoaded(outcome.model, outcome.seconds, outcome.measured))
                        replan |= self._remeasure(outcome.model, outcome.measured, sizes)
                    runs = set(wave.runs)
                    calls = [c for c in pending[stage] if c.model in runs]
                    pending[stage] = [c for c in pending[stage] if c.model not in runs]
                    try:
                        records += await asyncio.gather(
                            *(self._call(c, conversation, references, broken, emit) for c in calls)
                        )
                    finally:
                        await residency.leave(wave)
                    if not pending[stage]:
                        final = stage == len(stages) - 1
                        references = self._usable(stage + 1, records, final=final)
                    if replan and any(pending):
                        break
                else:
                    break  # the plan ran to its end
                assert sizes is not None  # _remeasure only asks for a re-plan with sizes
                base = next(k for k, calls in enumerate(pending) if calls)
                replans += 1
                current = make_plan(
                    [[c.model for c in stage] for stage in pending[base:]],
                    sizes,
                    plan.budget_bytes,
                    resident=residency.resident(),
                )
                log.info("re-planned the rest of the run with measured sizes (%d)", replans)
        finally:
            # Shielded so a second Ctrl-C cannot leave a model loaded behind our back.
            for model in await asyncio.shield(residency.finish()):
                emit(ModelUnloaded(model))
        answer = references[0] if references else ""
        return RunResult(
            answer=answer,
            calls=sorted(records, key=lambda r: (r.layer, r.index)),
            loads=loads,
            replans=replans,
            plan=plan,
            seconds=time.perf_counter() - started,
        )

    def _remeasure(self, model: str, measured: int | None, sizes: dict[str, int] | None) -> bool:
        """Take a complete measurement in place of the estimate; True when it changes the plan:
        larger than assumed (the rest might not fit) or smaller by more than REPLAN_SLACK."""
        if measured is None or sizes is None or not self.backend(model).measures_footprint:
            return False
        planned, sizes[model] = sizes[model], measured
        return measured > planned or measured < planned * (1 - REPLAN_SLACK)

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
        emit: Callable[[Event], None],
    ) -> CallRecord:
        lock = self._locks.setdefault(call.model, asyncio.Lock())
        async with lock, _maybe(self._slots), _maybe(self._throttler):
            emit(CallStarted(call))
            began = time.perf_counter()
            pieces: list[str] = []
            tokens = prompt_tokens = 0
            error: str | None = broken.get(call.model)
            if error is None:
                request = build_request(call, conversation, references)
                try:
                    async for delta in self.backend(call.model).chat(call.model, request):
                        tokens += delta.tokens
                        prompt_tokens = max(prompt_tokens, delta.prompt_tokens)
                        if delta.text:
                            pieces.append(delta.text)
                            emit(CallPiece(call, delta.text))
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
                prompt_tokens=prompt_tokens,
                text="".join(pieces),
            )
            emit(CallFinished(call, record))
            return record


@contextlib.asynccontextmanager
async def _maybe(guard: Any) -> AsyncIterator[None]:
    if guard is None:
        yield
    else:
        async with guard:
            yield
