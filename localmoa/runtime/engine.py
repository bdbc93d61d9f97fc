"""Run a plan: swap models wave by wave, run each wave's calls concurrently, pass answers on.

What is loaded when is a :mod:`~localmoa.runtime.admission`'s decision: by default exactly what the
plan's waves say (so memory stays within the planned budget), or a pool shared by the runs of
``localmoa serve``. The executor adds what a plan cannot know:

- calls to one model are serialized (one lock per model) and calls to different models run
  concurrently, bounded by ``max_parallel_calls`` (a semaphore) and, for shared servers, by
  ``max_calls_per_second`` (asyncio-throttle, a rate limiter: it bounds starts per second, not
  concurrency, hence the semaphore beside it);
- a failed call or load is recorded and left out of the references; the run goes on while each
  layer keeps at least one usable answer (LayerFailedError otherwise). A load fails whatever
  the reason (file gone since planning, out of memory, a runtime's own exception): that model's
  agents fail with the reason, the others go on; only cancellation ends the run;
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
from localmoa.planning.fewest_loads import Plan, Wave, make_plan
from localmoa.planning.refine import refine
from localmoa.planning.timing import Profile
from localmoa.runtime.admission import (
    LoadOutcome,
    PlanResidency,
    Residency,
    still_loaded,
    timed_load,
)
from localmoa.runtime.moa import Call, build_request

__all__ = [
    "CallFinished",
    "CallPiece",
    "CallRecord",
    "CallStarted",
    "Event",
    "Executor",
    "LoadFailed",
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
class LoadFailed:
    """A model could not load; its agents fail with ``error``, the run goes on on quorum."""

    model: str
    error: str


@dataclass(frozen=True)
class ModelUnloaded:
    """A model that was loaded has been unloaded (never sent for one that failed to load)."""

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


Event = (
    WaveStarted | ModelLoaded | LoadFailed | ModelUnloaded | CallStarted | CallPiece | CallFinished
)


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
        timing: Profile | None = None,
    ) -> None:
        self.models = models
        self.sizes = sizes
        """The footprints the plan was made with; given, measurements can re-plan the run."""
        self.timing = timing
        """The cost-model profile the plan was refined on (localmoa.planning.refine); given, a
        re-plan is refined on it too."""
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

        By default the plan runs as a dataflow (see :class:`_Flow`): a model's calls start as
        soon as it is loaded, and a model leaves as soon as its calls are done, so loads overlap
        with calls while memory stays within the budget. This needs each model's bytes
        (``sizes``); without them, or with a ``residency`` (``localmoa serve`` passes a shared
        pool's view), waves run one after another.

        ``on_event`` replaces the executor's callback for this run (a server's runs each stream
        their own answer). When a backend measures a loaded model (Ollama does) and the figure is
        larger than the plan assumed, or much smaller, the rest of the run is planned again from
        what is resident, with the measurement in place of the estimate.
        """
        started = time.perf_counter()
        emit = on_event or self.on_event
        run = _Run(self, stages, conversation, emit)
        if residency is None and self.sizes is not None:
            await run.flow(plan, dict(self.sizes))
        else:
            await run.waves(plan, residency or PlanResidency(self.models, self.backend))
        return RunResult(
            answer=run.answer(),
            calls=sorted(run.records, key=lambda r: (r.layer, r.index)),
            loads=run.loads,
            replans=run.replans,
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


class _Run:
    """One run's state: calls still to make, records, each stage's references, loads."""

    def __init__(
        self,
        executor: Executor,
        stages: Sequence[Sequence[Call]],
        conversation: list[ChatMessage],
        emit: Callable[[Event], None],
    ) -> None:
        self.executor = executor
        self.stages = stages
        self.conversation = conversation
        self.emit = emit
        self.pending = [list(stage) for stage in stages]  # calls not made yet, by stage
        self.records: list[CallRecord] = []
        self.references: dict[int, list[str]] = {}  # stage index -> its usable answers
        self.broken: dict[str, str] = {}  # model -> why its load failed
        self.loads = self.replans = self.waves_started = 0

    def answer(self) -> str:
        final = self.references.get(len(self.stages) - 1)
        return final[0] if final else ""

    async def call(self, call: Call) -> None:
        """Make one call with the previous stage's references; close the stage when it is the
        stage's last (LayerFailedError when no usable answer came back)."""
        stage = call.layer - 1
        record = await self.executor._call(
            call, self.conversation, self.references.get(stage - 1), self.broken, self.emit
        )
        self.records.append(record)
        self.pending[stage].remove(call)
        if not self.pending[stage]:
            final = stage == len(self.stages) - 1
            self.references[stage] = Executor._usable(stage + 1, self.records, final=final)

    def start_wave(self, wave: Wave, base: int) -> None:
        stage = base + wave.layer - 1
        shown = wave if base == 0 else wave.model_copy(update={"layer": stage + 1})
        self.emit(WaveStarted(self.waves_started, shown))
        self.waves_started += 1

    def loaded(self, outcome: LoadOutcome, sizes: dict[str, int] | None) -> bool:
        """Account for a load; True when its measurement should re-plan the rest."""
        if outcome.error is not None:
            self.broken[outcome.model] = outcome.error
            self.emit(LoadFailed(outcome.model, outcome.error))
            return False
        self.broken.pop(outcome.model, None)  # a reload that worked: its later calls run
        self.loads += 1
        self.emit(ModelLoaded(outcome.model, outcome.seconds, outcome.measured))
        return self.executor._remeasure(outcome.model, outcome.measured, sizes)

    async def replan(
        self, sizes: dict[str, int], budget: int, resident: list[str]
    ) -> tuple[Plan, int]:
        base = next(k for k, calls in enumerate(self.pending) if calls)
        self.replans += 1
        log.info("re-planned the rest of the run with measured sizes (%d)", self.replans)
        stages = self.pending[base:]
        plan = make_plan(
            [[c.model for c in stage] for stage in stages], sizes, budget, resident=resident
        )
        timing = self.executor.timing
        if timing is not None:  # off the event loop: the search may take seconds
            prompt = "\n".join(m.content for m in self.conversation)
            plan = await asyncio.to_thread(
                refine, plan, stages, sizes, timing, prompt=prompt, resident=resident
            )
        return plan, base

    # --- one wave after another (a shared pool, or no sizes) ---------------------------------

    async def waves(self, plan: Plan, residency: Residency) -> None:
        sizes = dict(self.executor.sizes) if self.executor.sizes is not None else None
        current, base = plan, 0
        try:
            while True:
                replan = False
                for wave in current.waves:
                    stage = base + wave.layer - 1
                    self.start_wave(wave, base)
                    unloaded, outcomes = await residency.enter(wave)
                    for model in unloaded:
                        self.emit(ModelUnloaded(model))
                    for outcome in outcomes:
                        replan |= self.loaded(outcome, sizes)
                    runs = set(wave.runs)
                    try:
                        await asyncio.gather(
                            *(self.call(c) for c in list(self.pending[stage]) if c.model in runs)
                        )
                    finally:
                        await residency.leave(wave)
                    if replan and any(self.pending):
                        break
                else:
                    return  # the plan ran to its end
                assert sizes is not None  # _remeasure only asks for a re-plan with sizes
                current, base = await self.replan(sizes, plan.budget_bytes, residency.resident())
        finally:
            # Shielded so a second Ctrl-C cannot leave a model loaded behind our back.
            for model in await asyncio.shield(residency.finish()):
                self.emit(ModelUnloaded(model))

    # --- the plan as a dataflow --------------------------------------------------------------

    async def flow(self, plan: Plan, sizes: dict[str, int]) -> None:
        flow = _Flow(self, sizes, plan.budget_bytes)
        current, base = plan, 0
        try:
            while await flow.run(current, base):  # True: a measurement asks for a re-plan
                current, base = await self.replan(sizes, plan.budget_bytes, list(flow.loaded))
        finally:
            await asyncio.shield(flow.unload_all())


class _Flow:
    """A plan executed as a dataflow, within the same memory budget.

    The plan fixes what is loaded, in which order, and which calls run with which models; the
    flow only removes the waits between waves that memory does not require:

    - loads run one at a time in plan order; a load starts once the previous one is done, the
      model's previous stay (if the plan reloads it) has ended, and the bytes loaded now plus
      its own fit the budget;
    - a model a wave unloads leaves as soon as its calls before that wave are done (its memory
      then lets the next load start, while other models still compute);
    - a call starts as soon as its model's load for it is done and the previous stage's answers
      are all in (calls to one model still take turns), whatever later loads are doing: a model
      loaded ahead for a later layer never holds up the calls before it.

    These are the semantics ``localmoa.planning.timing.simulate_plan`` times. Nothing waits on
    anything later in the plan, so the flow cannot deadlock; every load checks the bytes
    actually loaded, so it cannot exceed the budget.
    """

    def __init__(self, run: _Run, sizes: dict[str, int], budget: int) -> None:
        self.owner = run
        self.sizes = sizes
        self.budget = budget
        self.executor = run.executor
        self.loaded: dict[str, int] = {}  # model -> bytes counted against the budget
        self.changed = asyncio.Condition()  # signalled when memory frees or a stage closes
        self.leaving: list[asyncio.Task[None]] = []
        self.stopped = False  # a measurement asked for a re-plan: start nothing new

    async def run(self, plan: Plan, base: int) -> bool:
        """Follow ``plan`` (its first stage is ``base``); True when it stopped to re-plan."""
        self.stopped = False
        try:
            return await self._follow(plan, base)
        except BaseExceptionGroup as failed:
            # A stage with no usable answer (or a bug) ended the task group: say that, not
            # "unhandled errors in a TaskGroup".
            first = failed.exceptions[0]
            raise first if isinstance(first, Exception) else failed from None

    async def _follow(self, plan: Plan, base: int) -> bool:
        # A stay: one residency of a model, from the wave that loads it (-1: loaded before this
        # plan) to the wave that unloads it. Its event is set once its load is done (or skipped).
        stay: dict[str, int] = dict.fromkeys(self.loaded, -1)  # model -> its current stay
        ready: dict[tuple[int, str], asyncio.Event] = {}
        calls: dict[tuple[int, str], list[asyncio.Task[None]]] = {}
        after: dict[tuple[int, str], asyncio.Task[None]] = {}  # stay -> the previous one's exit
        ended: dict[str, asyncio.Task[None]] = {}  # model -> its last stay's exit
        async with asyncio.TaskGroup() as group:
            for number, wave in enumerate(plan.waves):
                stage = base + wave.layer - 1
                for model in wave.unload:
                    if model in stay:
                        key = (stay.pop(model), model)
                        leave = self._leave(model, ready.get(key), list(calls.get(key, [])))
                        ended[model] = group.create_task(leave)
                        self.leaving.append(ended[model])
                for model in wave.load:
                    stay[model] = number
                    ready[number, model] = asyncio.Event()
                    if model in ended:
                        after[number, model] = ended[model]
                runs = set(wave.runs)
                for call in [c for c in self.owner.pending[stage] if c.model in runs]:
                    key = (stay[call.model], call.model)
                    task = group.create_task(self._call(call, stage, ready.get(key)))
                    calls.setdefault(key, []).append(task)
            shown = 0
            for number, wave in enumerate(plan.waves):
                for model in wave.load:
                    if not self.stopped:  # once stopped, later waves never start
                        while shown <= number:
                            self.owner.start_wave(plan.waves[shown], base)
                            shown += 1
                        self.stopped = await self._load(model, after.get((number, model)))
                    ready[number, model].set()
            if self.stopped:
                async with self.changed:
                    self.changed.notify_all()  # calls waiting for answers: start nothing new
            else:
                for wave in plan.waves[shown:]:
                    self.owner.start_wave(wave, base)
        return self.stopped

    async def _load(self, model: str, previous: asyncio.Task[None] | None) -> bool:
        """Load ``model`` once it fits; True when its measurement asks for a re-plan."""
        if previous is not None:  # the plan reloads a model: its last stay must end first
            await previous
        async with self.changed:
            await self.changed.wait_for(
                lambda: sum(self.loaded.values()) + self.sizes[model] <= self.budget
            )
            self.loaded[model] = self.sizes[model]  # reserved before the load starts
        backend = self.executor.backend(model)
        try:
            outcome = await timed_load(backend, model, self.executor.models[model])
        except BaseException:  # cancelled mid-load: unload_all frees only what is loaded
            if not still_loaded(backend, model):
                del self.loaded[model]
            raise
        if outcome.error is not None:
            async with self.changed:
                del self.loaded[model]
                self.changed.notify_all()
        replan = self.owner.loaded(outcome, self.sizes)
        if outcome.error is None and replan:
            self.loaded[model] = self.sizes[model]  # the measurement, for the rest of the run
        return replan and any(self.owner.pending)

    async def _leave(
        self, model: str, loaded: asyncio.Event | None, calls: list[asyncio.Task[None]]
    ) -> None:
        """Unload ``model`` once its stay's load and calls are done, and say memory freed; not
        when the flow stopped to re-plan (the new plan decides what stays)."""
        if loaded is not None:
            await loaded.wait()
        await asyncio.gather(*calls, return_exceptions=True)
        if not self.stopped:
            await self._unload(model)

    async def _unload(self, model: str) -> None:
        if model not in self.loaded:
            return
        try:
            await self.executor.backend(model).unload(model)
        finally:
            async with self.changed:
                del self.loaded[model]
                self.changed.notify_all()
        self.owner.emit(ModelUnloaded(model))

    async def _call(self, call: Call, stage: int, ready: asyncio.Event | None) -> None:
        if ready is not None:
            await ready.wait()
        if call.model not in self.loaded and call.model not in self.owner.broken:
            return  # stopped to re-plan before its model came: it stays pending
        if stage > 0:
            async with self.changed:
                await self.changed.wait_for(
                    lambda: stage - 1 in self.owner.references or self.stopped
                )
        if self.stopped:
            return  # not started before the re-plan: the new plan runs it
        await self.owner.call(call)
        if stage in self.owner.references:  # this call closed its stage: wake the next one
            async with self.changed:
                self.changed.notify_all()

    async def unload_all(self) -> None:
        for task in self.leaving:
            task.cancel()
        for model in list(self.loaded):
            try:
                await self._unload(model)
            except LocalMoaError as exc:
                log.warning("unloading %s failed: %s", model, exc)
