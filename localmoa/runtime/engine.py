"""The one engine: every plan runs here, for ``localmoa run``, each ``serve`` request and every
re-plan, as a dataflow within a memory seam.

The plan fixes what is loaded, in which order, and which calls run with which models. The engine
removes every wait that memory does not require:

- loads are asked for one at a time in plan order, each of the memory seam
  (:class:`~localmoa.runtime.admission.Admission`), once the model's previous stay (if the plan
  reloads it) has ended; the seam decides when there is room. A *stay* is one residency of a
  model: from the wave that loads it to the wave that unloads it;
- a stay ends, and its model is released, as soon as its calls are done: its memory then lets
  the next load start while other models still compute;
- a call starts as soon as its model's load for it is done and the previous stage's answers are
  all in, whatever later loads are doing: a model loaded ahead for a later layer never holds up
  the calls before it.

These are the semantics ``localmoa.planning.timing.simulate_plan`` times. Nothing waits on
anything later in the plan, so a run cannot deadlock itself; the seam never admits beyond its
budget. With ``localmoa run`` the seam is the run's own budget
(:class:`~localmoa.runtime.admission.BudgetAdmission`); with ``localmoa serve`` it is the pool
the requests share (:class:`localmoa.serve.pool.ModelPool`, whose docstring says why runs
sharing it cannot deadlock each other either).

Around the calls:

- calls to one model take turns, and the calls that wait for a turn are made together in the
  next; calls to different models run concurrently (:mod:`localmoa.runtime.turns`);
- a failed call or load is recorded and left out of the references; the run goes on while each
  layer keeps at least one usable answer (LayerFailedError otherwise). A load fails whatever
  the reason (file gone since planning, out of memory, a runtime's own exception): that model's
  agents fail with the reason, the others go on; only cancellation ends the run;
- a backend that measures what a loaded model really holds (Ollama) can make the rest of the
  run be planned again from what is resident, with the measurement in place of the estimate,
  by the one planner entry (:func:`localmoa.planning.plan_run`) and the run's policy;
- on every exit (done, error, Ctrl-C/cancel) the seam is told (``finish``): a run's budget
  unloads everything, a shared pool keeps what it holds for the next request.

The variants (:mod:`localmoa.runtime.moa`) need three things more:

- a judge with ``early_stop`` is a *horizon*: no model is loaded for a stage after it until it
  has decided (a model needed only by layers it may skip must never load), and once it has,
  the rest is planned again from what is resident, without the stages it skipped;
- one agent's samples are made together, through the backend's ``chat_samples`` (llama.cpp
  decodes them as sequences of one context), each still its own call and record;
- before a call that reads answers, they are cut to fit its model's context
  (:func:`localmoa.runtime.fit.fit_references`), and its record says what it read.

Every call's record says when it happened and how fast it went (:class:`Timing`). Its times
are unix times read from one monotonic clock per executor (:class:`Clock`), so a run's times
are ordered as things happened even if the wall clock is set meanwhile:

- ``queued_at``: the call is ready, its model admitted for its stay and the answers it reads
  in; in the dataflow that is just before it asks for its model (a shared pool may have to load
  it again), and for a direct :meth:`Executor.calls` when it starts waiting for its model's
  turn. ``started_at - queued_at`` is the wait for the model's turn, a parallel-call slot, the
  rate limit, and the references cut to fit;
- ``started_at``: the request goes to the backend (None when its model never loaded);
- ``first_token_at``: the first delta that carries a token arrives (each sample its own);
- ``ended_at``: its last delta arrives (each sample its own), or the stream ends when it failed.

``ttft_s`` is first token − start. The rates are the runtime's own where it states them on the
last delta (Ollama and llama-server both; llama.cpp in process its prompt's: see ChatDelta);
else they come from the stream: prefill = prompt tokens / ttft (so it includes what precedes
evaluation: the request, the chat template), decode = the tokens after the first delta / (end −
first token).

Progress is reported through ``on_event`` callbacks (:mod:`localmoa.runtime.events`); the
engine itself prints nothing. What a run has done is one :class:`~localmoa.runtime.state.RunState`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from localmoa.backends.base import Backend, ChatMessage, ChatRequest
from localmoa.backends.configs import context_tokens, pinned_models, split_models
from localmoa.backends.registry import backend_for
from localmoa.errors import RunError
from localmoa.hardware import Device, Placement
from localmoa.planning import PlanPolicy, plan_run
from localmoa.planning.fewest_loads import Plan, Wave
from localmoa.runtime.admission import (
    Admission,
    BudgetAdmission,
    Changes,
    LoadOutcome,
    overridden,
)
from localmoa.runtime.events import (
    CallFinished,
    CallPiece,
    CallRecord,
    CallStarted,
    Event,
    Judged,
    LoadFailed,
    ModelLoaded,
    ModelUnloaded,
    RunResult,
    WaveStarted,
)
from localmoa.runtime.fit import fit_references
from localmoa.runtime.judge import judge_format
from localmoa.runtime.moa import Call, build_request
from localmoa.runtime.roles import RolesCache
from localmoa.runtime.state import Answer, RunState, layer_of, stage_of
from localmoa.runtime.turns import Emit, Sent, Turns

__all__ = [
    "CallFinished",
    "CallPiece",
    "CallRecord",
    "CallStarted",
    "Emit",
    "Event",
    "Executor",
    "Judged",
    "LoadFailed",
    "ModelLoaded",
    "ModelUnloaded",
    "RunResult",
    "WaveStarted",
]

log = logging.getLogger(__name__)

REPLAN_SLACK = 0.10
"""A measurement smaller than the plan's figure by less than this fraction does not re-plan:
the time a re-plan takes would not buy a better plan."""


class Executor:
    """Runs plans on backends; one executor may run many plans, one after another or (a
    server's requests, each with the shared pool's admission) at once."""

    def __init__(
        self,
        models: Mapping[str, Any],
        backends: Mapping[str, Backend],
        *,
        max_parallel_calls: int | None = None,
        max_calls_per_second: int | None = None,
        on_event: Emit | None = None,
        sizes: Mapping[str, int] | None = None,
        policy: PlanPolicy | None = None,
        roles_cache: RolesCache | None = None,
        together: bool = True,
        devices: Sequence[Device] = (),
    ) -> None:
        self.models = models
        self.devices = list(devices)
        """The devices plans are placed on (``localmoa.hardware.resolve_devices``): the engine
        loads each model where its wave placed it, and a re-plan places on those that remain."""
        self.roles_cache = roles_cache or RolesCache()
        """Where roles written by a roles call are kept for later runs."""
        self.backends = backends
        self.sizes = sizes
        """The footprints plans are made with; when None, each run reads them from the
        backends (as ``localmoa.runtime.prepare`` does) before it starts."""
        self.policy = policy or PlanPolicy(None)
        """How a re-plan is made mid-run: the policy the first plan was made with
        (``localmoa.runtime.prepare.Prepared.policy``)."""
        self.on_event = on_event or (lambda event: None)
        self.placed: dict[str, Placement] = {}
        """Where each model is loaded, as the last plan that loaded it placed it: calls and
        loads are recorded with their device and node."""
        self.turns = Turns(
            models,
            self.backend,
            max_parallel_calls=max_parallel_calls,
            max_calls_per_second=max_calls_per_second,
            together=together,
            placed=self.placed,
        )
        """How calls are made: one model's in turns, those that wait made together."""

    def now(self) -> float:
        """Unix time now, as the records of this executor's calls count it."""
        return self.turns.now()

    def backend(self, model: str) -> Backend:
        return backend_for(self.backends, self.models, model)

    async def run(
        self,
        stages: Sequence[Sequence[Call]],
        plan: Plan,
        conversation: list[ChatMessage],
        *,
        admission: Admission | None = None,
        on_event: Emit | None = None,
    ) -> RunResult:
        """Run every call of ``stages`` as ``plan`` schedules them; the last stage's answer wins.

        ``admission`` is the memory seam: by default the run owns the plan's budget
        (``localmoa run``); a server passes its shared pool's admission for this request.
        ``on_event`` replaces the executor's callback for this run (a server's runs each stream
        their own answer). When a backend measures a loaded model (Ollama does) and the figure
        is larger than the plan assumed, or much smaller, the rest of the run is planned again
        from what is resident, with the measurement in place of the estimate.
        """
        started = time.perf_counter()
        sizes = await self._sizes(stages)
        if admission is None:
            admission = self._admission(sizes, plan)
        state = RunState.of(stages, conversation)
        flow = _Dataflow(self, state, admission, sizes, on_event or self.on_event)
        await flow.run(plan)
        return state.result(plan, time.perf_counter() - started)

    async def run_jobs(
        self,
        jobs: Sequence[tuple[Sequence[Sequence[Call]], list[ChatMessage]]],
        plan: Plan,
        *,
        admission: Admission | None = None,
        on_event: Emit | None = None,
    ) -> list[tuple[RunResult, str | None]]:
        """Run several conversations as one plan (a batch chunk): ``jobs`` are each one's
        stages, tagged by :func:`localmoa.runtime.moa.batched`, and conversation; ``plan`` was
        made for the stages of all of them together. Stage by stage, every job's calls to one
        model are made together. A job whose stage has no usable answer fails alone; each job's
        result comes with why it failed (None: it answered), in ``jobs`` order."""
        started = time.perf_counter()
        state = RunState.of_jobs(jobs)
        sizes = await self._sizes(state.stages)
        if admission is None:
            admission = self._admission(sizes, plan)
        flow = _Dataflow(self, state, admission, sizes, on_event or self.on_event)
        await flow.run(plan)
        return state.results(plan, started)

    async def call(
        self,
        call: Call,
        request: ChatRequest | None,
        emit: Emit,
        *,
        error: str | None = None,
        sent: Sent | None = None,
    ) -> CallRecord:
        """Make one call and record it; with ``error`` (its model could not load) the call
        fails with it without reaching a backend. Calls to one model take turns."""
        requests = None if request is None else [request]
        (record,) = await self.calls([call], requests, emit, error=error, sent=sent)
        return record

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
        """Make calls of one model and record each (:meth:`Turns.calls`: calls to one model
        take turns, and those that wait are made together)."""
        return await self.turns.calls(
            calls, requests, emit, error=error, sent=sent, queued_at=queued_at
        )

    @property
    def together(self) -> bool:
        """Are calls that wait for one model's turn made together? (:attr:`Turns.together`)"""
        return self.turns.together

    @together.setter
    def together(self, value: bool) -> None:
        self.turns.together = value

    def _admission(self, sizes: Mapping[str, int], plan: Plan) -> BudgetAdmission:
        """The run owns the plan's budget, and each of its devices' memory."""
        devices = [d for d in self.devices if d.name in plan.devices]
        return BudgetAdmission(self.models, self.backend, sizes, plan.budget_bytes, devices)

    def placement(self, plan: Plan, wave: Wave, model: str) -> Placement | None:
        """Where ``wave`` placed ``model``, as the backend loads it; None when the plan placed
        nothing a backend should act on: one device of this machine that is not a numbered GPU
        (a budget, RAM), where the backend's own placement is what it was before devices were
        planned."""
        known = {d.name: d for d in self.devices}
        names = [d for d, models in wave.devices.items() if model in models]
        if not names or any(name not in known for name in names):
            return None
        devices = tuple(known[name] for name in names)
        pinnable = devices[0].kind == "gpu" and devices[0].index is not None
        if len(plan.devices) <= 1 and not pinnable and devices[0].node is None:
            return None  # (a cluster node's device is always placed: the model runs there)
        share = wave.shares.get(model, {})
        return Placement(devices=devices, shares=tuple(share[n] for n in names) if share else ())

    async def _sizes(self, stages: Sequence[Sequence[Call]]) -> dict[str, int]:
        if self.sizes is not None:
            return dict(self.sizes)
        used = list(dict.fromkeys(c.model for stage in stages for c in stage))
        found = await asyncio.gather(*(self.backend(m).footprint(m, self.models[m]) for m in used))
        return {model: footprint.total for model, footprint in zip(used, found, strict=True)}


class _Dataflow:
    """One run of a plan, and of its re-plans, as a dataflow (see the module docstring)."""

    def __init__(
        self,
        executor: Executor,
        state: RunState,
        admission: Admission,
        sizes: dict[str, int],
        emit: Emit,
    ) -> None:
        self.executor = executor
        self.state = state
        self.admission = admission
        self.sizes = sizes
        """The bytes plans are made with; a measurement replaces its model's estimate."""
        self.emit = emit
        self.held: set[str] = set()
        """Models this run holds through the admission (admitted, not yet released)."""
        self.changes = Changes()  # a stage closed, or the flow stopped
        self.stopped = False  # a measurement or a verdict asked for a re-plan: start nothing new
        self.horizon: int | None = None  # see _horizon
        self.gone: set[str] = set()  # devices found gone during the run

    async def run(self, plan: Plan) -> None:
        current, live = plan, list(range(len(self.state.stages)))
        try:
            # True: a measurement, or a judge's verdict, asks for a re-plan
            while await self._follow(current, live):
                current, live = await self._replan(plan.budget_bytes)
        finally:
            # Shielded so a second Ctrl-C cannot leave a model loaded behind our back.
            for model in await asyncio.shield(self.admission.finish()):
                self.emit(ModelUnloaded(model))

    async def _follow(self, plan: Plan, live: list[int]) -> bool:
        """Follow ``plan``, whose stages are the run's ``live`` ones; True when it stopped to
        re-plan."""
        self.stopped = False
        try:
            return await self._flow(plan, live)
        except BaseExceptionGroup as failed:
            # A stage with no usable answer (or a bug) ended the task group: say that, not
            # "unhandled errors in a TaskGroup".
            first = failed.exceptions[0]
            raise first if isinstance(first, Exception) else failed from None

    def _horizon(self, live: list[int]) -> int | None:
        """The first judge whose verdict may skip later stages (early stop) and is not in: no
        model is loaded for a stage after it until it has decided, and then the rest is planned
        again, so a model needed only by skipped layers is never loaded. In a batch the stage
        closes once every job's judge has decided."""
        for stage in live[:-1]:
            stopping = any(c.role == "judge" and c.early_stop for c in self.state.stages[stage])
            if stopping and not self.state.done(stage):
                return stage
        return None

    async def _flow(self, plan: Plan, live: list[int]) -> bool:
        first = plan.waves[0]
        kept = [m for m in first.resident if m not in first.load]  # resident when it was made
        for model in sorted(self.held - set(kept)):  # a re-plan that needs it no more
            await self._release(model)
        self.horizon = self._horizon(live)
        # Stay -1: resident before this plan. A model the plan counts on that this run does not
        # hold yet (a server's request planned from the pool) is admitted before the first load.
        stay: dict[str, int] = dict.fromkeys(kept, -1)
        loads: list[tuple[int, str]] = [(-1, m) for m in kept if m not in self.held]
        placed = {(-1, m): self.executor.placement(plan, first, m) for m in kept}
        ready = {key: asyncio.Event() for key in loads}  # set once the stay's load is done
        calls: dict[tuple[int, str], list[asyncio.Task[None]]] = {}
        uses: dict[tuple[int, str], int] = {}  # stay -> the first stage it serves
        after: dict[tuple[int, str], asyncio.Task[None]] = {}  # stay -> the previous one's exit
        ended: dict[str, asyncio.Task[None]] = {}  # model -> its last stay's exit
        async with asyncio.TaskGroup() as group:
            for number, wave in enumerate(plan.waves):
                stage = live[stage_of(wave.layer)]
                for model in wave.unload:
                    if model in stay:
                        key = (stay.pop(model), model)
                        leave = self._leave(model, ready.get(key), list(calls.get(key, [])))
                        ended[model] = group.create_task(leave)
                for model in wave.load:
                    stay[model] = number
                    placed[number, model] = self.executor.placement(plan, wave, model)
                    ready[number, model] = asyncio.Event()
                    loads.append((number, model))
                    if model in ended:
                        after[number, model] = ended[model]
                runs = set(wave.runs)
                for together in _groups(c for c in self.state.pending[stage] if c.model in runs):
                    key = (stay[together[0].model], together[0].model)
                    task = group.create_task(self._call(together, stage, ready.get(key)))
                    calls.setdefault(key, []).append(task)
                    uses.setdefault(key, stage)
            shown = 0
            for number, model in loads:
                gated = self.horizon is not None and uses.get((number, model), -1) > self.horizon
                if not self.stopped and not gated:  # once stopped, later waves never start
                    while shown <= number:
                        self._show(plan.waves[shown], live)
                        shown += 1
                    replan = await self._load(
                        model, after.get((number, model)), placed.get((number, model))
                    )
                    self.stopped = self.stopped or replan  # a call may have stopped it meanwhile
                ready[number, model].set()
            if self.stopped:
                self.changes.notify()  # calls waiting for answers: start nothing new
            elif self.horizon is None:
                for wave in plan.waves[shown:]:
                    self._show(wave, live)
        return self.stopped

    def _show(self, wave: Wave, live: list[int]) -> None:
        stage = live[stage_of(wave.layer)]
        shown = (
            wave
            if wave.layer == layer_of(stage)
            else wave.model_copy(update={"layer": layer_of(stage)})
        )
        self.emit(WaveStarted(self.state.waves_started, shown))
        self.state.waves_started += 1

    async def _load(
        self, model: str, previous: asyncio.Task[None] | None, placement: Placement | None
    ) -> bool:
        """Admit ``model`` for its stay; True when its measurement, or a device found gone,
        asks for a re-plan."""
        if previous is not None:  # the plan reloads a model: its last stay must end first
            await previous
        admitted = await self.admission.admit(model, placement)
        if placement is None:
            self.executor.placed.pop(model, None)
        elif admitted.outcome is not None:
            self.executor.placed[model] = placement
        for gone in admitted.unloaded:
            self.emit(ModelUnloaded(gone))
        replan = self._loaded(model, admitted.outcome) or self._lost(model)
        return replan and self.state.has_pending()

    def _lost(self, model: str) -> bool:
        """Did ``model``'s backend find a device of this run gone (a cluster node died)? Then
        its models are gone with it, and the rest of the run is planned on what remains."""
        gone = self.executor.backend(model).lost() & {d.name for d in self.executor.devices}
        if not gone:
            return False
        self.executor.devices = [d for d in self.executor.devices if d.name not in gone]
        self.gone |= gone
        for lost, placement in self.admission.where().items():
            if set(placement.names) & gone:
                self.held.discard(lost)
                self.admission.forget(lost)
        log.warning("devices gone: %s; planning the rest on the others", ", ".join(sorted(gone)))
        return True

    def _loaded(self, model: str, outcome: LoadOutcome | None) -> bool:
        """Account for an admission (``outcome`` None: resident already); True when the load's
        measurement should re-plan the rest."""
        if outcome is not None and outcome.error is not None:
            self.held.discard(model)
            self.state.failed_loads[model] = outcome.error
            self.emit(LoadFailed(model, outcome.error))
            return False
        self.held.add(model)
        self.state.failed_loads.pop(model, None)  # a reload that worked: its later calls run
        if outcome is None:
            return False
        self.state.loads += 1
        self.state.load_seconds += outcome.seconds
        estimated = self.sizes.get(model)  # what the plan counted, before a measurement
        where = self.executor.placed.get(model)
        self.emit(
            ModelLoaded(
                model,
                outcome.seconds,
                outcome.measured,
                estimated,
                outcome.peak,
                device=None if where is None else where.device.name,
                node=None if where is None else where.device.node_label,
            )
        )
        return self._remeasure(model, outcome.measured)

    def _remeasure(self, model: str, measured: int | None) -> bool:
        """Take a complete measurement in place of the estimate; True when it changes the plan:
        larger than assumed (the rest might not fit) or smaller by more than REPLAN_SLACK."""
        if measured is None or not self.executor.backend(model).measures_footprint:
            return False
        if overridden(self.executor.models[model]):
            return False  # the user's figure overrides any measurement
        planned, self.sizes[model] = self.sizes[model], measured
        return measured > planned or measured < planned * (1 - REPLAN_SLACK)

    async def _leave(
        self, model: str, loaded: asyncio.Event | None, calls: list[asyncio.Task[None]]
    ) -> None:
        """Release ``model`` once its stay's load and calls are done; not when the flow
        stopped to re-plan (the new plan decides what stays)."""
        if loaded is not None:
            await loaded.wait()
        await asyncio.gather(*calls, return_exceptions=True)
        if not self.stopped:
            await self._release(model)

    async def _release(self, model: str) -> None:
        if model in self.held:
            self.held.discard(model)
            for gone in await self.admission.release(model):
                self.emit(ModelUnloaded(gone))

    async def _call(self, calls: list[Call], stage: int, ready: asyncio.Event | None) -> None:
        """Make ``calls`` (one call, or one agent's samples) once their model is in and the
        answers they read are."""
        model = calls[0].model
        if ready is not None:
            await ready.wait()
        if model not in self.held and model not in self.state.failed_loads:
            return  # stopped to re-plan, or gated by a judge, before its model came
        await self.changes.wait_for(lambda: self.state.may_start(stage) or self.stopped)
        if self.stopped:
            return  # not started before the re-plan: the new plan runs it
        calls = [c for c in calls if c in self.state.job(c).pending[c.stage]]
        if not calls:
            return  # a batch's jobs that failed meanwhile: nothing left to make
        records = await self._make(calls, stage, self.executor.now())  # ready: queued now
        if self._lost(model) and self.state.has_pending():
            self.stopped = True  # its device is gone: plan the rest on what remains
            self.changes.notify()
        closed = False
        for call, record in zip(calls, records, strict=True):
            job_closed, stage_closed = self.state.record(call, record)
            if job_closed:
                self._closed(call)
            closed = closed or stage_closed
        if closed:
            if stage == self.horizon and self.state.has_pending():
                self.stopped = True  # plan what is left, loading nothing a skip made needless
            self.changes.notify()  # it closed its stage: wake the next one

    def _closed(self, call: Call) -> None:
        """After a job's stage closed: keep written roles, report a judge's verdict."""
        job = self.state.job(call)
        if call.role == "roles" and job.roles is not None and call.task:
            self.executor.roles_cache.put(call.task, call.model, call.roles, job.roles)
        verdict = job.verdicts.get(call.stage)
        if call.role != "judge" or verdict is None:
            return  # not a judge, or its job failed
        skipped = sorted(
            {
                job.stages[k][0].layer
                for k in job.skipped
                if k > call.stage and job.stages[k][0].role == "proposer"
            }
        )
        self.emit(Judged(call, verdict, tuple(skipped) if verdict.stop else ()))

    async def _make(self, calls: list[Call], stage: int, queued: float) -> list[CallRecord]:
        """The calls, ready since ``queued``, on their model held loaded while they run (a
        shared pool may have lent the memory to an older request meanwhile: then the model is
        loaded again first)."""
        model = calls[0].model
        make = self.executor.calls
        error = self.state.failed_loads.get(model)
        if error is not None:
            return await make(calls, None, self.emit, error=error, queued_at=queued)
        async with self.admission.using(model) as admitted:
            for gone in admitted.unloaded:
                self.emit(ModelUnloaded(gone))
            self._loaded(model, admitted.outcome)  # mid-stay: a measurement re-plans not
            error = self.state.failed_loads.get(model)
            if error is not None:
                return await make(calls, None, self.emit, error=error, queued_at=queued)
            requests, sent = await self._requests(calls)
            return await make(calls, requests, self.emit, sent=sent, queued_at=queued)

    async def _requests(self, calls: list[Call]) -> tuple[list[ChatRequest], list[Sent]]:
        """What each call sends, and reads: per job and agent (a batch makes several jobs'
        calls of one model together; an agent's samples read the same)."""
        parts: dict[tuple[int, int], list[int]] = {}
        for i, call in enumerate(calls):
            parts.setdefault((call.job, call.agent), []).append(i)
        requests: list[ChatRequest | None] = [None] * len(calls)
        sent: list[Sent] = [Sent()] * len(calls)
        for positions in parts.values():
            made, read = await self._agent_requests([calls[i] for i in positions])
            for i, request in zip(positions, made, strict=True):
                requests[i], sent[i] = request, read
        return [r for r in requests if r is not None], sent

    async def _agent_requests(self, calls: list[Call]) -> tuple[list[ChatRequest], Sent]:
        """What one agent's calls of one job send, with the references they read cut to fit
        the model's context (prompt + references + max_tokens <= n_ctx:
        :func:`localmoa.runtime.fit.fit_references`)."""
        first = calls[0]
        job = self.state.job(first)
        conversation = job.conversation
        roles = job.roles
        persona = roles[first.agent % len(roles)] if roles and first.role == "proposer" else None
        read = job.references_for(first)
        if read is None:
            requests = [build_request(c, conversation, None, persona=persona) for c in calls]
            return [self._supported(r, first.model) for r in requests], Sent()
        answers, ranked = read
        config = self.executor.models[first.model]
        backend = self.executor.backend(first.model)

        def build(texts: list[str]) -> list[ChatMessage]:
            return build_request(first, conversation, texts, persona=persona).messages

        async def count(messages: list[ChatMessage]) -> int:
            return await backend.count_tokens(first.model, config, messages)

        fitted = await fit_references(
            build,
            [a.text for a in answers],
            n_ctx=context_tokens(config),
            max_tokens=first.max_tokens,
            count=count,
            ranked=ranked,
        )
        kept = [answers[i] for i in fitted.kept]
        texts = list(fitted.texts)
        if first.role == "judge":
            job.shown[first.stage] = [
                Answer(a.layer, a.index, t) for a, t in zip(kept, texts, strict=True)
            ]
            # The schema names only numbers that exist: a grammar then cannot pick answer 7 of 4.
            calls = [replace(c, response_format=judge_format(len(kept), c.top_k)) for c in calls]
        requests = [
            self._supported(build_request(c, conversation, texts, persona=persona), c.model)
            for c in calls
        ]
        sent = Sent(
            references=[(a.layer, a.index) for a in kept],
            reference_tokens=fitted.reference_tokens,
            truncated=fitted.truncated,
        )
        return requests, sent

    def _supported(self, request: ChatRequest, model: str) -> ChatRequest:
        """A judge's or roles call's JSON format is asked only of a backend that honours it;
        the tolerant parse covers the others."""
        fmt = request.response_format
        if fmt is None or "response_format" in self.executor.backend(model).supports:
            return request
        return request.model_copy(update={"response_format": None})

    async def _replan(self, budget: int) -> tuple[Plan, list[int]]:
        """The rest of the run, planned again from what is resident with what was measured,
        on the devices that remain, each resident model where it is."""
        live = self.state.live_stages()
        if self.gone and not self.executor.devices:
            raise RunError(
                f"every device of the run is gone ({', '.join(sorted(self.gone))}: their "
                "cluster nodes stopped); restart the nodes, or run on this machine"
            )
        self.state.replans += 1
        log.info("re-planned the rest of the run (%d)", self.state.replans)
        prompt = "\n".join(m.content for m in self.state.jobs[0].conversation)
        plan = await asyncio.to_thread(  # off the event loop: a search may take a second
            plan_run,
            [self.state.pending[k] for k in live],
            dict(self.sizes),
            budget,
            self.executor.policy,
            resident=self.admission.resident(),
            prompt=prompt,
            devices=self.executor.devices or None,
            splittable=split_models(self.executor.models),
            pinned=pinned_models(self.executor.models, [d.name for d in self.executor.devices]),
            where={m: p.device.name for m, p in self.admission.where().items()},
        )
        return plan, live


def _groups(calls: Iterable[Call]) -> list[list[Call]]:
    """Calls as they are made: one agent's samples together, every other call alone."""
    together: dict[tuple[int, int], list[Call]] = {}
    out: list[list[Call]] = []
    for call in calls:
        if call.group is None:
            out.append([call])
        else:
            key = (call.stage, call.group)
            if key not in together:
                together[key] = []
                out.append(together[key])
            together[key].append(call)
    return out
