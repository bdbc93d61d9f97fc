"""The schedulers localmoa is compared with, in the cost model: benchmark code, not localmoa's.

``scripts/bench_scheduler.py`` times every run of its suite under each of these, all in the cost
model of :mod:`localmoa.planning.timing` (the same fluid sharing of the device, the same call
and load seconds), so that only the scheduling differs:

- :func:`fewest_loads`: localmoa's fewest-loads plan unrefined, run by dataflow as the engine
  does, or wave by wave (:func:`wave_by_wave`: the executor before dataflow: per wave the
  unloads, the loads one at a time, then every call of the wave at once; the wave ends with its
  last call);
- :func:`one_at_a_time`: one model resident, calls in order (llama-swap's default group);
- :func:`reactive`: Ollama's scheduler rules replayed (ollama/ollama server/sched.go: fast path
  for loaded models, one load at a time, FIFO pending queue with head-of-line blocking, eviction
  of an idle runner by keep_alive-then-name, ``OLLAMA_MAX_LOADED_MODELS``,
  ``OLLAMA_NUM_PARALLEL=1``);
- :func:`optimal`: the fastest wave plan under dataflow execution, knowing every answer's length
  (localmoa's own search run to its end), and :func:`optimal_waves` under wave-by-wave
  execution (Dijkstra: there a plan's cost is a sum over its waves); each is ``≤`` the matching
  fewest-loads figure whenever it answers;
- :func:`candidate_plans`: every plan the search chooses from, unpruned: the exhaustive
  reference the tests hold the search to on small cases.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from functools import cache
from typing import NamedTuple

from localmoa.planning.bitsets import bits, mask_of, submasks
from localmoa.planning.fewest_loads import Plan, make_plan
from localmoa.planning.profiles import Profile
from localmoa.planning.search import PlanSpace, search
from localmoa.planning.timing import (
    CallSpec,
    Fluid,
    Span,
    Stages,
    Timing,
    WaveSpec,
    call_seconds,
    load_seconds,
    phases,
    simulate_plan,
    wave_specs,
)

__all__ = [
    "MAX_OPTIMAL_NODES",
    "OLLAMA_MAX_LOADED",
    "PolicyResult",
    "candidate_plans",
    "fewest_loads",
    "one_at_a_time",
    "optimal",
    "optimal_waves",
    "reactive",
    "wave_by_wave",
]

OLLAMA_MAX_LOADED = 3
"""``OLLAMA_MAX_LOADED_MODELS`` = 0 means 3 per GPU (scheduler-anchors.md §1.1, server/sched.go)."""

EPS = 1e-9


class PolicyResult(NamedTuple):
    """What a policy achieved: wall-clock seconds from the first load to the last answer."""

    makespan_s: float
    loads: int


def fewest_loads(
    calls: Stages, sizes: Mapping[str, int], profile: Profile, *, dataflow: bool = True
) -> PolicyResult:
    """localmoa's fewest-loads plan (fewest loads, then fewest bytes, then fewest waves),
    unrefined, run by dataflow as the engine does (or wave by wave: ``dataflow=False``)."""
    plan = make_plan([[c.model for c in stage] for stage in calls], sizes, profile.memory_bytes)
    run = simulate_plan if dataflow else wave_by_wave
    timing = run(plan, calls, sizes, profile)
    return PolicyResult(timing.makespan_s, timing.loads)


def wave_by_wave(plan: Plan, calls: Stages, sizes: Mapping[str, int], profile: Profile) -> Timing:
    """``plan`` run as localmoa's executor ran it before dataflow: per wave the unloads, the
    loads one at a time, then every call of the wave at once (one model's calls one after
    another, sharing the device with the others); the next wave starts when its last call ends.
    Raises ValueError for a wave over the profile's budget."""
    t = load_s = busy_s = 0.0
    spans: list[Span] = []
    pending = [list(stage) for stage in calls]
    for w, wave in enumerate(wave_specs(plan)):
        if sum(sizes[m] for m in wave.resident) > profile.memory_bytes:
            raise ValueError(f"wave {w + 1} holds more than {profile.memory_bytes} bytes")
        spans += [Span("unload", model, w, wave.stage, t, t) for model in wave.unload]
        for model in wave.load:
            end = t + load_seconds(sizes[model], profile)
            spans.append(Span("load", model, w, wave.stage, t, end))
            load_s, t = load_s + end - t, end
        now = [c for c in pending[wave.stage] if c.model in wave.runs]
        pending[wave.stage] = [c for c in pending[wave.stage] if c.model not in wave.runs]
        seconds = _together(now, sizes, profile, spans=spans, at=t, wave=w, stage=wave.stage)
        busy_s, t = busy_s + seconds, t + seconds
    loads = sum(len(w.load) for w in plan.waves)
    return Timing(t, loads, load_s, busy_s, tuple(spans))


def _together(
    calls: Sequence[CallSpec],
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    spans: list[Span] | None = None,
    at: float = 0.0,
    wave: int = -1,
    stage: int = -1,
) -> float:
    """Seconds for ``calls`` started together: one model's calls one after another (the
    executor's per-model lock), the models sharing the device. ``spans``, when given, receives
    each call, its times offset by ``at``."""
    chains: dict[str, list[CallSpec]] = {}
    for call in calls:
        chains.setdefault(call.model, []).append(call)
    order = list(chains.values())
    fluid, t = Fluid(), 0.0
    position = [0] * len(order)
    began: dict[int, float] = {}

    def feed(c: int) -> None:
        while position[c] < len(order[c]):
            call = order[c][position[c]]
            position[c] += 1
            began[c] = t
            if fluid.start(c, phases(call, sizes[call.model], profile)):
                return
            if spans is not None:
                spans.append(Span("call", call.model, wave, stage, at + t, at + t))

    for c in range(len(order)):
        feed(c)
    while fluid.busy():
        dt = fluid.next_dt()
        t += dt
        for c in fluid.advance(dt):
            if spans is not None:
                model = order[c][0].model
                spans.append(Span("call", model, wave, stage, at + began[c], at + t))
            feed(c)
    return t


def one_at_a_time(calls: Stages, sizes: Mapping[str, int], profile: Profile) -> PolicyResult:
    """One model resident, calls in order (layer by layer, agent order): llama-swap's default
    group, or llama-cpp-python's server with a model list. A call to the model already loaded
    needs no load."""
    total, loads, resident = 0.0, 0, None
    for stage in calls:
        for call in stage:
            if call.model != resident:
                total += load_seconds(sizes[call.model], profile)
                loads += 1
                resident = call.model
            total += call_seconds(call, sizes[call.model], profile)
    return PolicyResult(total, loads)


def reactive(
    calls: Stages,
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    max_loaded: int = OLLAMA_MAX_LOADED,
    spans: list[Span] | None = None,
) -> PolicyResult:
    """Ollama's scheduler, replayed (scheduler-anchors.md §1.1), with the MoA client on top.

    The client sends a layer's requests together, in agent order, and the next layer's once every
    answer is back (the aggregator last). A request for a loaded model goes straight to its
    runner (one request at a time: ``OLLAMA_NUM_PARALLEL=1``); any other joins one FIFO queue
    whose head is served by a single loop, one load at a time, blocking the requests behind it.
    Before a load, while ``max_loaded`` runners are loaded or the model does not fit, one idle
    runner (nothing running or waiting on it) is evicted, the first by name since every
    keep_alive is equal; with none idle, the loop waits. Loaded models stay until evicted, and
    loads overlap other models' calls (the one advantage a reactive scheduler has).

    ``spans``, when given, receives every load and call (for a timeline).
    """
    budget = profile.memory_bytes
    record: list[Span] = spans if spans is not None else []
    began: dict[int, tuple[CallSpec, float]] = {}
    fluid, t, loads = Fluid(), 0.0, 0
    loaded: dict[str, int] = {}
    running: dict[str, bool] = {}
    waiting: dict[str, deque[CallSpec]] = {}
    pending: deque[CallSpec] = deque()
    loading: tuple[str, float, float] | None = None  # model, start, end
    stage, outstanding = 0, 0
    keys: dict[int, str] = {}
    counter = itertools.count()

    def used() -> int:
        return sum(loaded.values())

    def arrive() -> None:
        nonlocal outstanding
        outstanding = len(calls[stage])
        for call in calls[stage]:
            if call.model in loaded:
                waiting[call.model].append(call)
            else:
                pending.append(call)

    def dispatch() -> None:
        nonlocal outstanding
        for model in loaded:
            while not running[model] and waiting[model]:
                call = waiting[model].popleft()
                key = next(counter)
                if fluid.start(key, phases(call, sizes[model], profile)):
                    keys[key], running[model] = model, True
                    began[key] = (call, t)
                else:
                    outstanding -= 1
                    record.append(Span("call", model, -1, stage, t, t))

    def serve_queue() -> None:
        nonlocal loading, loads
        while pending and loading is None:
            model = pending[0].model
            if model in loaded:
                waiting[model].append(pending.popleft())
                continue
            while len(loaded) >= max_loaded or used() + sizes[model] > budget:
                idle = sorted(m for m in loaded if not running[m] and not waiting[m])
                if not idle:
                    return  # wait for a runner to go idle
                del loaded[idle[0]], running[idle[0]], waiting[idle[0]]
            loading = (model, t, t + load_seconds(sizes[model], profile))
            loads += 1

    arrive()
    serve_queue()
    dispatch()
    while True:
        if outstanding == 0 and not pending and not fluid.busy():
            stage += 1
            if stage == len(calls):
                break
            arrive()
            serve_queue()
            dispatch()
            continue
        until_load = loading[2] - t if loading else math.inf
        dt = min(fluid.next_dt(), until_load)
        if math.isinf(dt):
            raise RuntimeError("reactive: nothing can proceed (a model larger than the budget?)")
        t += dt
        for key in fluid.advance(dt):
            running[keys.pop(key)] = False
            outstanding -= 1
            call, start = began.pop(key)
            record.append(Span("call", call.model, -1, stage, start, t))
        if loading is not None and loading[2] - t <= EPS * max(1.0, t):
            model = loading[0]
            record.append(Span("load", model, -1, -1, loading[1], t))
            loaded[model], running[model], waiting[model] = sizes[model], False, deque()
            loading = None
        serve_queue()
        dispatch()
    return PolicyResult(t, loads)


MAX_OPTIMAL_MODELS = 6
MAX_OPTIMAL_STATES = 200_000
MAX_OPTIMAL_NODES = 20_000


def optimal(
    calls: Stages,
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    max_models: int = MAX_OPTIMAL_MODELS,
    max_nodes: int = MAX_OPTIMAL_NODES,
) -> PolicyResult | None:
    """The fastest wave plan under dataflow execution, or None when the search is too big.

    :func:`~localmoa.planning.search.search` from localmoa's own fewest-loads plan, run to the
    end; so ``optimal ≤ fewest_loads`` whenever it answers. None when there are more than
    ``max_models`` distinct models or the search would simulate more than ``max_nodes``
    partial plans.
    """
    if len({c.model for stage in calls for c in stage}) > max_models:
        return None
    plan = make_plan([[c.model for c in stage] for stage in calls], sizes, profile.memory_bytes)
    found = search(calls, sizes, profile, wave_specs(plan), max_nodes=max_nodes)
    if not found.complete:
        return None
    return PolicyResult(found.makespan_s, found.loads)


def candidate_plans(
    calls: Stages, sizes: Mapping[str, int], profile: Profile
) -> Iterator[list[WaveSpec]]:
    """Every wave plan :func:`optimal` chooses from (see
    :class:`~localmoa.planning.search.PlanSpace`), unpruned: the exhaustive reference for small
    cases. There are very many beyond a handful of calls."""
    space = PlanSpace(calls, sizes, profile)
    stack = [space.root()]
    while stack:
        node = stack.pop()
        if node.stage == len(calls):
            yield node.waves()
        else:
            stack += reversed(space.children(node))


def optimal_waves(
    calls: Stages,
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    max_models: int = MAX_OPTIMAL_MODELS,
    max_states: int = MAX_OPTIMAL_STATES,
) -> PolicyResult | None:
    """The fastest wave plan under wave-by-wave execution (:func:`wave_by_wave`),
    or None when the search is too big.

    A wave is any resident set within the budget; it runs every pending call of the current
    stage whose model is resident; stages stay in order. Dijkstra over states (stage, models of
    the stage done, resident set) with a wave's cost = its loads (one at a time) + its calls
    (simulated): additive, because nothing crosses a wave boundary. Two restrictions lose
    nothing: a wave loads only models it runs (loading a model for a later stage early costs
    the same seconds and only takes memory sooner), and resident models no stage still needs
    leave (unloads are free). None when more than ``max_models`` distinct models or
    ``max_states`` states would be needed.
    """
    names = sorted({c.model for stage in calls for c in stage})
    if len(names) > max_models:
        return None
    index = {name: i for i, name in enumerate(names)}
    size = [sizes[n] for n in names]
    demand = [mask_of(index[c.model] for c in stage) for stage in calls]
    needed = [0] * (len(calls) + 1)
    for k in range(len(calls) - 1, -1, -1):
        needed[k] = needed[k + 1] | demand[k]
    load_s = [load_seconds(s, profile) for s in size]

    @cache
    def bytes_of(mask: int) -> int:
        return sum(size[i] for i in bits(mask))

    @cache
    def wave_s(k: int, runs: int) -> float:
        return _together([c for c in calls[k] if runs >> index[c.model] & 1], sizes, profile)

    start = (0, 0, 0)  # stage, done in it, resident
    best: dict[tuple[int, int, int], tuple[float, int]] = {start: (0.0, 0)}
    heap: list[tuple[float, int, tuple[int, int, int]]] = [(0.0, 0, start)]
    expanded = 0
    while heap:
        cost, nloads, state = heapq.heappop(heap)
        if best[state] < (cost, nloads):
            continue
        k, done, resident = state
        if k == len(calls):
            return PolicyResult(cost, nloads)
        expanded += 1
        if expanded > max_states:
            return None
        todo = demand[k] & ~done
        keepable = resident & needed[k]
        for keep in submasks(keepable):
            for new in submasks(todo & ~resident):
                wave = keep | new
                runs = wave & todo
                if not runs or bytes_of(wave) > profile.memory_bytes:
                    continue
                step = sum(load_s[i] for i in bits(new)) + wave_s(k, runs)
                finished = (done | runs) == demand[k]
                nxt = (k + 1, 0, wave) if finished else (k, done | runs, wave)
                value = (cost + step, nloads + new.bit_count())
                if nxt not in best or value < best[nxt]:
                    best[nxt] = value
                    heapq.heappush(heap, (value[0], value[1], nxt))
    return None
