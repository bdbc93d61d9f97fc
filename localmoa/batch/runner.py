"""Many prompts planned together: the batch engine behind ``localmoa batch`` and ``localmoa eval``.

Run one by one, every prompt pays every swap again. Here the prompts are cut into *chunks*, and
each chunk is one run of the one engine (:meth:`localmoa.runtime.engine.Executor.run_jobs`):
stage k of the run is stage k of every prompt, so the plan loads each model once per stage for
the whole chunk, and a stage's calls to one model, whatever their prompt, are made together
(:func:`localmoa.runtime.moa.batched`): on llama.cpp as parallel sequences of one context, on a
server as concurrent requests within its slots.

Each of those sequences holds its own KV cache, so a llama.cpp model serving a chunk is loaded
with as many sequences as its largest group (:func:`localmoa.runtime.prepare.run_models`) and its
footprint, which the plan counts, grows with the chunk. The chunk is therefore chosen
(:func:`choose_chunk`) as the size, up to :data:`CHUNK_MAX` prompts, whose plans need the fewest
loads for the whole batch (ties: the larger chunk, whose calls decode together more); a chunk too
large for the budget is never chosen. Each chunk is planned knowing the next
(:func:`chunk_plan`), so a model both need stays loaded from one to the other when the budget
allows.

A *system* is what answers a prompt: an ensemble's calls (``localmoa batch``, and
``moa/NAME`` in ``localmoa eval``), or one model's single call at an ensemble's settings
(``model/NAME``). Every prompt of a chunk goes through every system given, so an evaluation's
systems and questions are one plan.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from localmoa.backends.base import Backend
from localmoa.backends.configs import pinned_models, split_models
from localmoa.config import Agent, Config, Ensemble, LlamaCppModel, ModelConfig
from localmoa.errors import BudgetError, PromptTooLongError, UserError
from localmoa.footprint.estimate import Footprint
from localmoa.hardware import Budget, Device, budget_of
from localmoa.planning import PlanPolicy, plan_run
from localmoa.planning.fewest_loads import Plan, Wave
from localmoa.records.recorder import Recorder, RunRecording
from localmoa.runtime.admission import BudgetAdmission
from localmoa.runtime.engine import (
    CallFinished,
    CallPiece,
    CallStarted,
    Event,
    Executor,
    Judged,
    ModelUnloaded,
    RunResult,
)
from localmoa.runtime.moa import Call, batched, calls_for, stage_label
from localmoa.runtime.prepare import (
    check_prompt,
    footprints,
    placeable,
    plan_policy,
    run_devices,
    run_models,
    stages_for,
)

from .jobs import Job

__all__ = [
    "CHUNK_MAX",
    "BatchPlan",
    "Outcome",
    "System",
    "choose_chunk",
    "ensemble_system",
    "model_system",
    "one_call_system",
    "plan_batch",
    "run_batch",
]

log = logging.getLogger(__name__)

CHUNK_MAX = 16
"""The most prompts a chunk holds unless ``--chunk`` says otherwise: the wait for the first
results, and what an interruption can lose, stay bounded."""


@dataclass(frozen=True)
class System:
    """What answers each prompt: its calls by stage, and the ensemble it belongs to (whose
    settings it runs at, and under whose name its runs are recorded)."""

    name: str
    """"moa/NAME" or "model/NAME" in an evaluation; the ensemble's name in a batch."""
    ensemble: str
    stages: list[list[Call]]
    table: Ensemble
    """What its runs record as their ensemble's config."""


def ensemble_system(config: Config, name: str, *, label: str | None = None) -> System:
    """The ensemble ``name`` of ``config`` as a system (roles from the cache, as a run)."""
    table = config.ensemble(name)
    return System(label or name, name, stages_for(config, table), table)


def model_system(config: Config, ensemble: str, model: str) -> System:
    """One call of ``model`` alone, at the ensemble's settings (its temperature and
    max_tokens, or those of the model's first agent in it): the single-model baseline."""
    table = config.ensemble(ensemble)
    agents = [agent for layer in table.layers for agent in layer] + [table.aggregator]
    agent = next((a for a in agents if a.model == model), Agent(model=model))
    return one_call_system(
        f"model/{model}",
        ensemble,
        agent,
        temperature=table.temperature,
        max_tokens=table.max_tokens,
    )


def one_call_system(
    name: str, ensemble: str, agent: Agent, *, temperature: float, max_tokens: int
) -> System:
    """A system of one call of ``agent`` (no samples), whose answer is the prompt's answer;
    ``temperature`` and ``max_tokens`` apply where the agent sets none."""
    one = agent.model_copy(update={"samples": 1})
    alone = Ensemble(layers=[[one]], aggregator=one, temperature=temperature, max_tokens=max_tokens)
    (layer, _) = calls_for(alone)
    only = replace(layer[0], is_aggregator=True)  # one call, and it is the answer
    return System(name, ensemble, [[only]], alone)


@dataclass(frozen=True)
class Placing:
    """Where plans place models: the devices, the models pinned to one, those that may span
    several (:func:`localmoa.runtime.prepare.placeable`)."""

    devices: list[Device] = field(default_factory=list)
    pinned: dict[str, str] = field(default_factory=dict)
    splittable: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class BatchPlan:
    """A batch decided before anything loads: the chunk, the plan of a full chunk, and how
    many loads the whole batch is expected to make."""

    systems: list[System]
    chunk: int
    """Prompts per chunk."""
    chunks: int
    plan: Plan
    """The plan of the first chunk (the others are planned as they come, from what the chunk
    before left loaded)."""
    loads: int
    """Loads the batch is expected to make: the first chunk's plan, then each other chunk's
    as planned with the models the one before leaves loaded."""
    budget: Budget
    models: dict[str, ModelConfig]
    """The model tables as a chunk loads them (llama.cpp models hold a sequence per call of
    their largest group)."""
    sizes: dict[str, int]
    footprints: dict[str, Footprint]
    stages: list[list[Call]]
    """The stages of a full chunk: every prompt's calls of stage k together."""
    policy: PlanPolicy
    tried: dict[int, int | None]
    """Chunk size -> the loads the batch would make with it (None: it does not fit)."""
    sequences: int | None = None
    """The most sequences a llama.cpp model holds, when a chunk's groups had to be capped to
    fit (their calls then decode in rounds); None: each as many as its largest group."""
    placing: Placing = field(default_factory=Placing)
    """The devices every chunk is placed on, and the models pinned or split."""
    notes: list[str] = field(default_factory=list)
    """What the user should know about how the batch was planned."""


@dataclass(frozen=True)
class Outcome:
    """One prompt through one system: its result, or why there is none."""

    job: Job
    system: System
    result: RunResult | None
    """None when it never ran (its prompt cannot fit, or the run was stopped)."""
    error: str | None
    seconds: float
    run_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.result is not None

    @property
    def answer(self) -> str | None:
        return self.result.answer if self.ok and self.result is not None else None


def _stages(systems: Sequence[System], jobs: int) -> list[list[list[Call]]]:
    """Every job through every system, tagged as one run (job-major: job j's systems first)."""
    return batched([system.stages for _ in range(jobs) for system in systems])


def _merged(tagged: Sequence[Sequence[Sequence[Call]]]) -> list[list[Call]]:
    depth = max(len(stages) for stages in tagged)
    return [[c for stages in tagged if k < len(stages) for c in stages[k]] for k in range(depth)]


async def plan_batch(
    config: Config,
    systems: Sequence[System],
    prompts: int,
    backends: Mapping[str, Backend],
    *,
    memory_budget: str | None = None,
    chunk: int | None = None,
) -> BatchPlan:
    """Decide the chunk (``chunk``, or :func:`choose_chunk`) and plan a full one; raises
    BudgetError when not even one prompt fits, naming where the budget came from."""
    used = list(dict.fromkeys(c.model for s in systems for st in s.stages for c in st))
    devices, notes = placeable(config, used, backends, run_devices(config, memory_budget))
    budget = budget_of(devices)
    names = [d.name for d in devices]
    placing = Placing(devices, pinned_models(config.models, names), split_models(config.models))
    policy = plan_policy(config, used, budget)
    prompts = max(prompts, 1)

    async def attempt(size: int, cap: int | None) -> _Attempt | None:
        merged = _merged(_stages(systems, size))
        models = _capped(run_models(config.models, merged), cap)
        found = await footprints(config, used, backends, models)
        sizes = {name: fp.total for name, fp in found.items()}
        following = merged if prompts > size else None
        try:
            plan = await asyncio.to_thread(
                chunk_plan, merged, following, sizes, budget.bytes, policy, placing=placing
            )
        except BudgetError:
            return None
        loads = await asyncio.to_thread(
            _batch_loads, merged, sizes, budget.bytes, prompts, size, placing
        )
        return _Attempt(plan, loads, models, found, cap)

    async def best_for(size: int, fewest: int | None) -> _Attempt | None:
        """A chunk of ``size`` with each model holding a sequence per call of its group; when
        that does not fit, or loads more than ``fewest``, each model's sequences capped (a
        larger group then decodes in rounds): the largest cap with the fewest loads."""
        best = await attempt(size, None)
        if best is not None and (fewest is None or best.loads <= fewest):
            return best
        widest = max(len(g) for st in _merged(_stages(systems, size)) for g in _by_group(st))
        cap = 1 << ((widest - 1).bit_length() - 1) if widest > 1 else 0
        while cap >= 1:
            made = await attempt(size, cap)
            if made is not None and (best is None or made.loads < best.loads):
                best = made
            cap //= 2
        return best

    if chunk is not None:
        if chunk < 1:
            raise UserError(f"--chunk must be at least 1, not {chunk}")
        sizes_to_try = [min(chunk, prompts)]
    else:
        sizes_to_try = choose_chunk_sizes(prompts)
    tried: dict[int, int | None] = {}
    made: dict[int, _Attempt] = {}
    for size in sizes_to_try:
        fits = [loads for loads in tried.values() if loads is not None]
        found = await best_for(size, min(fits) if fits else None)
        tried[size] = None if found is None else found.loads
        if found is not None:
            made[size] = found
    best = choose_chunk(tried)
    if best is None:
        # Not even the smallest chunk fits: say why, as a single run's plan would.
        size = sizes_to_try[0]
        merged = _merged(_stages(systems, size))
        tables = _capped(run_models(config.models, merged), 1)
        least = await footprints(config, used, backends, tables)
        try:
            chunk_plan(
                merged,
                None,
                {n: fp.total for n, fp in least.items()},
                budget.bytes,
                policy,
                placing=placing,
            )
        except BudgetError as exc:
            more = "" if chunk is None or chunk == 1 else "; try a smaller --chunk"
            raise BudgetError(f"{exc} (budget from {budget.detail}){more}") from None
        raise AssertionError("a plan that failed once cannot succeed")  # pragma: no cover
    chosen = made[best]
    return BatchPlan(
        systems=list(systems),
        chunk=best,
        chunks=math.ceil(prompts / best),
        plan=chosen.plan,
        loads=chosen.loads,
        budget=budget,
        models=chosen.models,
        sizes={name: fp.total for name, fp in chosen.footprints.items()},
        footprints=chosen.footprints,
        stages=_merged(_stages(systems, best)),
        policy=policy,
        tried=tried,
        sequences=chosen.cap,
        placing=placing,
        notes=notes,
    )


@dataclass(frozen=True)
class _Attempt:
    """One chunk size (and cap) planned: what :func:`plan_batch` compares."""

    plan: Plan
    loads: int
    models: dict[str, ModelConfig]
    footprints: dict[str, Footprint]
    cap: int | None


def _by_group(stage: Sequence[Call]) -> list[list[Call]]:
    groups: dict[int | None, list[Call]] = {}
    for call in stage:
        groups.setdefault(call.group, []).append(call)
    return list(groups.values())


def _capped(models: dict[str, ModelConfig], cap: int | None) -> dict[str, ModelConfig]:
    """``models`` with no llama.cpp model holding more than ``cap`` sequences (None: as they
    are); its calls beyond that decode in rounds."""
    if cap is None:
        return models
    return {
        name: table.model_copy(update={"parallel": min(table.parallel or 1, cap)})
        if isinstance(table, LlamaCppModel)
        else table
        for name, table in models.items()
    }


def choose_chunk_sizes(prompts: int) -> list[int]:
    """The chunk sizes :func:`plan_batch` compares: powers of two up to :data:`CHUNK_MAX`, and
    the whole batch when it is smaller, in increasing order."""
    top = min(prompts, CHUNK_MAX)
    sizes = {1 << k for k in range(top.bit_length()) if 1 << k <= top} | {top}
    return sorted(sizes)


def choose_chunk(tried: Mapping[int, int | None]) -> int | None:
    """The chunk with the fewest loads for the whole batch; ties go to the larger chunk (more
    calls decode together; :data:`CHUNK_MAX` bounds the wait for the first results). None
    when none fits."""
    fits = [(loads, -size) for size, loads in tried.items() if loads is not None]
    return -min(fits)[1] if fits else None


def chunk_plan(
    stages: list[list[Call]],
    following: list[list[Call]] | None,
    sizes: Mapping[str, int],
    budget: int,
    policy: PlanPolicy,
    *,
    resident: Sequence[str] = (),
    prompt: str | None = None,
    placing: Placing | None = None,
    where: Mapping[str, str] | None = None,
) -> Plan:
    """The plan of one chunk's ``stages``, made knowing the ``following`` chunk's (None for the
    last): planned as one run and cut after this chunk's stages, so a model the next chunk
    needs stays loaded when the budget allows, rather than being unloaded because this chunk
    is done with it and loaded again. ``placing``: the devices (None: one of ``budget``),
    ``where`` the device of each resident model."""
    placing = placing or Placing()
    plan = plan_run(
        stages + (following or []),
        sizes,
        budget,
        policy,
        resident=resident,
        prompt=prompt,
        devices=placing.devices or None,
        splittable=placing.splittable,
        pinned=placing.pinned,
        where=where,
    )
    if not following:
        return plan
    waves = [wave for wave in plan.waves if wave.layer <= len(stages)]
    return plan.model_copy(
        update={
            "waves": waves,
            "loads": _loads(waves),
            "bytes_loaded": sum(sizes[m] for wave in waves for m in wave.load),
            "estimated_seconds": None,  # the estimate was of both chunks
            "fewest_loads": None,
            "fewest_loads_seconds": None,
        }
    )


def _batch_loads(
    merged: list[list[Call]],
    sizes: dict[str, int],
    budget: int,
    prompts: int,
    size: int,
    placing: Placing | None = None,
) -> int:
    """Loads of the whole batch in chunks of ``size``, as :func:`run_batch` plans them: the
    first chunk, then the second from what the first leaves loaded, which every later chunk
    repeats (the last, shorter one counted as a full one)."""
    chunks = math.ceil(prompts / size)
    untimed = PlanPolicy(None)
    first = chunk_plan(
        merged, merged if chunks > 1 else None, sizes, budget, untimed, placing=placing
    )
    if chunks == 1:
        return _loads(first.waves)
    left = _resident_after(first)
    second = chunk_plan(
        merged,
        merged if chunks > 2 else None,
        sizes,
        budget,
        untimed,
        resident=left,
        placing=placing,
        where=_where_after(first),
    )
    return _loads(first.waves) + (chunks - 1) * _loads(second.waves)


def _loads(waves: Sequence[Wave]) -> int:
    return sum(len(wave.load) for wave in waves)


def _where_after(plan: Plan) -> dict[str, str]:
    """The device of each model the plan's last wave holds (its main one, when split)."""
    last = plan.waves[-1]
    out: dict[str, str] = {}
    for device, models in last.devices.items():
        for model in models:
            shares = last.shares.get(model)
            if shares is None or device == max(shares, key=lambda d: shares[d]):
                out[model] = device
    return out


def _resident_after(plan: Plan) -> list[str]:
    """The models a plan leaves loaded: what its last wave holds, less what no wave unloads."""
    held: list[str] = []
    for wave in plan.waves:
        held = [m for m in held if m not in wave.unload] + [m for m in wave.load if m not in held]
    return sorted(held)


Report = Callable[[list[Outcome]], None]


async def run_batch(
    config: Config,
    planned: BatchPlan,
    jobs: Sequence[Job],
    backends: Mapping[str, Backend],
    *,
    on_chunk: Report,
    on_event: Callable[[Event], None] | None = None,
    recorder: Recorder | None = None,
) -> int:
    """Answer every job with every system of ``planned``, chunk by chunk; ``on_chunk`` gets
    each chunk's outcomes (job-major) as soon as it finishes. Returns the loads made.

    Before anything loads, every prompt is checked against the contexts it must fit
    (:func:`localmoa.runtime.prepare.check_prompt`); one that cannot fit fails alone. Each
    prompt through each system is one recorded run (source "batch"), its calls and the loads
    of its chunk. Cancellation (Ctrl-C) ends the chunk in flight; its outcomes are not
    reported, and every model is unloaded."""
    systems = planned.systems
    hopeless: dict[tuple[int, int], str] = {}
    for j, job in enumerate(jobs):
        for s, system in enumerate(systems):
            try:
                await check_prompt(config, system.stages, backends, job.messages)
            except PromptTooLongError as exc:
                hopeless[j, s] = str(exc)

    def units(first: int) -> list[tuple[int, Job, int, System]]:
        """The chunk from job ``first``: each of its jobs through each system that can run."""
        return [
            (j, jobs[j], s, system)
            for j in range(first, min(first + planned.chunk, len(jobs)))
            for s, system in enumerate(systems)
            if (j, s) not in hopeless
        ]

    settings = config.settings
    loads = 0
    executor = Executor(
        planned.models,
        backends,
        max_parallel_calls=settings.max_parallel_calls,
        max_calls_per_second=settings.max_calls_per_second,
        sizes=planned.sizes,
        policy=planned.policy,
        devices=planned.placing.devices,
    )
    admission = _KeepAdmission(
        executor.models, executor.backend, planned.sizes, planned.budget, planned.placing.devices
    )
    try:
        for first in range(0, len(jobs), planned.chunk):
            outcomes: dict[tuple[int, int], Outcome] = {
                key: Outcome(jobs[key[0]], systems[key[1]], None, why, 0.0)
                for key, why in hopeless.items()
                if first <= key[0] < first + planned.chunk
            }
            chunk = units(first)
            if chunk:
                following = units(first + planned.chunk)
                made, counted = await _run_chunk(
                    executor, admission, planned, chunk, following, on_event, recorder
                )
                outcomes.update(made)
                loads += counted
            on_chunk([outcomes[key] for key in sorted(outcomes)])
    finally:
        for model in await asyncio.shield(admission.drain()):
            if on_event is not None:
                on_event(ModelUnloaded(model))
    return loads


async def _run_chunk(
    executor: Executor,
    admission: _KeepAdmission,
    planned: BatchPlan,
    units: list[tuple[int, Job, int, System]],
    following: list[tuple[int, Job, int, System]],
    on_event: Callable[[Event], None] | None,
    recorder: Recorder | None,
) -> tuple[dict[tuple[int, int], Outcome], int]:
    tagged = batched([system.stages for _, _, _, system in units])
    merged = _merged(tagged)
    upcoming = _merged(batched([s.stages for _, _, _, s in following])) if following else None
    resident = admission.resident()
    plan = await asyncio.to_thread(
        chunk_plan,
        merged,
        upcoming,
        planned.sizes,
        planned.budget.bytes,
        planned.policy,
        resident=resident,
        prompt=_prompt(units[0][1]),
        placing=planned.placing,
        where={m: p.device.name for m, p in admission.where().items()},
    )
    keep = set(plan.waves[0].resident) - set(plan.waves[0].load)
    for model in resident:
        if model not in keep:
            for gone in await admission.release(model):
                if on_event is not None:
                    on_event(ModelUnloaded(gone))
    recordings = [
        _start(recorder, job, system, plan, planned) if recorder is not None else None
        for _, job, _, system in units
    ]

    def route(event: Event) -> None:
        call = _call_of(event)
        for number, recording in enumerate(recordings):
            if recording is not None and (call is None or call.job == number):
                recording.on_event(event)
        if on_event is not None:
            on_event(event)

    started = time.perf_counter()
    try:
        results = await executor.run_jobs(
            [(stages, job.messages) for stages, (_, job, _, _) in zip(tagged, units, strict=True)],
            plan,
            admission=admission,
            on_event=route,
        )
    except BaseException as exc:
        stopped = isinstance(exc, asyncio.CancelledError | KeyboardInterrupt)
        why = "interrupted (Ctrl-C or a stop signal)" if stopped else str(exc)
        for recording in recordings:
            if recording is not None:
                recording.finish(
                    "interrupted" if stopped else "failed",
                    error=why,
                    seconds=time.perf_counter() - started,
                )
        raise
    out: dict[tuple[int, int], Outcome] = {}
    counted = 0
    for (j, job, s, system), recording, (result, error) in zip(
        units, recordings, results, strict=True
    ):
        counted = result.loads
        if recording is not None:
            if error is None:
                recording.finish("ok", answer=result.answer, seconds=result.seconds)
            else:
                recording.finish("failed", error=error, seconds=result.seconds)
        run_id = None if recording is None else recording.id
        out[j, s] = Outcome(job, system, result, error, result.seconds, run_id)
    return out, counted


def _prompt(job: Job) -> str:
    return "\n".join(m.content for m in job.messages)


def _call_of(event: Event) -> Call | None:
    if isinstance(event, CallStarted | CallPiece | CallFinished | Judged):
        return event.call
    return None


def _start(
    recorder: Recorder, job: Job, system: System, plan: Plan, planned: BatchPlan
) -> RunRecording:
    config_of = planned.models
    return recorder.start(
        source="batch",
        # one model alone is not its ensemble's run: `logs -e NAME` would mix them
        ensemble=system.name if system.name.startswith("model/") else system.ensemble,
        ensemble_config=system.table,
        plan=plan,
        budget=planned.budget,
        conversation=job.messages,
        models=config_of,
        stages=[stage_label(stage) for stage in system.stages],
    )


class _KeepAdmission(BudgetAdmission):
    """A batch's memory seam: a run's budget whose models outlive each chunk's run, so the
    next chunk can start with them (its plan says which it keeps); :meth:`drain` unloads them
    when the batch ends."""

    def __init__(
        self,
        models: Mapping[str, ModelConfig],
        backend: Callable[[str], Backend],
        sizes: Mapping[str, int],
        budget: Budget,
        devices: Sequence[Device] = (),
    ) -> None:
        super().__init__(models, backend, sizes, budget.bytes, devices)

    async def finish(self) -> list[str]:
        return []  # kept for the next chunk

    async def drain(self) -> list[str]:
        return await super().finish()
