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
  ``OLLAMA_NUM_PARALLEL=1``), serving one MoA client; :func:`reactive_clients` serves several
  at once, with ``OLLAMA_NUM_PARALLEL`` slots per runner decoding together (the batch
  comparison of ``scripts/bench_scheduler.py --batch``);
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
    BYTES_PER_PARAM,
    CallSpec,
    Fluid,
    Span,
    Stages,
    Timing,
    WaveSpec,
    call_seconds,
    decode_rate,
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
    "reactive_clients",
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
    """Ollama's scheduler serving one MoA client (:func:`reactive_clients` with one client and
    ``OLLAMA_NUM_PARALLEL=1``)."""
    return reactive_clients([calls], sizes, profile, max_loaded=max_loaded, spans=spans)


class _Sequence:
    """A request a runner has admitted: its client, call and the work it has left."""

    def __init__(self, client: int, call: CallSpec, weights: float, t: float) -> None:
        self.client, self.call, self.began = client, call, t
        self.prefill = 2 * (weights / BYTES_PER_PARAM) * call.prompt_tokens * call.sequences
        self.tokens = float(call.output_tokens)


class _Runner:
    """One loaded model's runner: the requests routed to it, those it has admitted into its
    ``OLLAMA_NUM_PARALLEL`` slots, and the one fluid stream that decodes them all together."""

    def __init__(self, weights: float, capacity: int) -> None:
        self.weights, self.capacity = weights, capacity
        self.waiting: deque[tuple[int, CallSpec]] = deque()
        self.slots: list[_Sequence] = []
        self.key: int | None = None  # its stream on the device, while one runs
        self.work = 0.0  # of that stream's one phase
        self.prefilling = False

    def idle(self) -> bool:
        return not self.slots and not self.waiting


def reactive_clients(
    clients: Sequence[Stages],
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    num_parallel: int | Mapping[str, int] = 1,
    max_loaded: int = OLLAMA_MAX_LOADED,
    spans: list[Span] | None = None,
) -> PolicyResult:
    """Ollama's scheduler, replayed (scheduler-anchors.md §1.1), with MoA clients on top.

    Each client sends a layer's requests together, in agent order, and its next layer's once
    every answer of its own is back (the aggregator last); clients start together, in order.
    A request for a loaded model goes straight to its runner; any other joins one FIFO queue
    whose head is served by a single loop, one load at a time, blocking the requests behind it.
    Before a load, while ``max_loaded`` runners are loaded or the model does not fit, one idle
    runner (nothing running or waiting on it) is evicted, the first by name since every
    keep_alive is equal; with none idle, the loop waits. Loaded models stay until evicted, and
    loads overlap other models' calls (the one advantage a reactive scheduler has).

    A runner serves up to ``num_parallel`` requests at once (``OLLAMA_NUM_PARALLEL``, or per
    model: before ollama/ollama#11330 Ollama chose 4 where memory allowed, else 1; ``sizes``
    must hold that many contexts of KV cache, as Ollama allocates ``num_ctx·np``), by continuous
    batching as llama.cpp's server does: a request joins as soon as a slot is free, and the
    slots decode together, as the sequences of a batched call (:func:`~localmoa.planning.
    timing.decode_rate`), until each is done. While a joining request's prompt is read the
    others wait (the server reads it in the same steps, which a long prompt makes compute-bound).

    ``spans``, when given, receives every load and call (for a timeline).
    """
    budget = profile.memory_bytes
    record: list[Span] = spans if spans is not None else []
    fluid, t, loads = Fluid(), 0.0, 0
    loaded: dict[str, int] = {}
    runners: dict[str, _Runner] = {}
    streams: dict[int, str] = {}  # fluid key -> its runner's model
    pending: deque[tuple[int, CallSpec]] = deque()
    loading: tuple[str, float, float] | None = None  # model, start, end
    stage = [-1] * len(clients)  # -1: not started; len: done
    outstanding = [0] * len(clients)
    counter = itertools.count()
    weight = {
        c.model: c.weight_bytes or sizes[c.model] for stages in clients for st in stages for c in st
    }

    def arrive(client: int) -> None:
        outstanding[client] = len(clients[client][stage[client]])
        for call in clients[client][stage[client]]:
            if call.model in loaded:
                runners[call.model].waiting.append((client, call))
            else:
                pending.append((client, call))

    def done(runner: _Runner, sequence: _Sequence) -> None:
        outstanding[sequence.client] -= 1
        where = stage[sequence.client]
        record.append(Span("call", sequence.call.model, -1, where, sequence.began, t))

    def restart(model: str) -> None:
        """Take the runner's stream off the device, book its progress, and start the phase its
        slots are in now."""
        runner = runners[model]
        if runner.key is not None:
            left = fluid.stop(runner.key)
            del streams[runner.key]
            runner.key = None
            book(runner, runner.work - left, left)
        if not runner.slots:
            return
        if any(s.prefill > 0 for s in runner.slots):
            runner.work, runner.prefilling = sum(s.prefill for s in runner.slots), True
            phase = (runner.work, profile.compute, 1.0)
        else:
            runner.work, runner.prefilling = min(s.tokens for s in runner.slots), False
            cache = sum(
                s.call.sequences
                * s.call.kv_bytes_per_token
                * (s.call.prompt_tokens + s.call.output_tokens / 2)
                for s in runner.slots
            )
            rate, share = decode_rate(
                runner.weights,
                profile,
                sequences=sum(s.call.sequences for s in runner.slots),
                cache_bytes=cache,
            )
            phase = (runner.work, rate, share)
        runner.key = next(counter)
        streams[runner.key] = model
        fluid.start(runner.key, (phase,))

    def book(runner: _Runner, progress: float, left: float) -> None:
        """Advance the runner's slots by ``progress`` of its phase; release the finished."""
        if runner.prefilling:
            for s in runner.slots:  # every prompt read at the same pace
                s.prefill = s.prefill * left / runner.work if left > 0 else 0.0
        else:
            for s in runner.slots:
                s.tokens -= progress
        finished = [
            s for s in runner.slots if s.prefill <= 0 and s.tokens <= EPS * s.call.output_tokens
        ]
        runner.slots = [s for s in runner.slots if s not in finished]
        for s in finished:
            done(runner, s)

    def dispatch() -> None:
        for model, runner in runners.items():
            joined = False
            while len(runner.slots) < runner.capacity and runner.waiting:
                client, call = runner.waiting.popleft()
                sequence = _Sequence(client, call, runner.weights, t)
                if sequence.prefill <= 0 and sequence.tokens <= 0:
                    done(runner, sequence)
                    continue
                runner.slots.append(sequence)
                joined = True
            if joined:
                restart(model)

    def serve_queue() -> None:
        nonlocal loading, loads
        while pending and loading is None:
            call = pending[0][1]
            if call.model in loaded:
                runners[call.model].waiting.append(pending.popleft())
                continue
            while len(loaded) >= max_loaded or sum(loaded.values()) + sizes[call.model] > budget:
                idle = sorted(m for m in loaded if runners[m].idle())
                if not idle:
                    return  # wait for a runner to go idle
                del loaded[idle[0]], runners[idle[0]]
            loading = (call.model, t, t + load_seconds(sizes[call.model], profile))
            loads += 1

    def next_stages() -> None:
        """Send each client whose layer is answered its next layer (the same instant)."""
        moved = True
        while moved:
            moved = False
            for client, stages in enumerate(clients):
                if outstanding[client] == 0 and stage[client] < len(stages):
                    stage[client] += 1
                    if stage[client] < len(stages):
                        arrive(client)
                    moved = True
            serve_queue()
            dispatch()

    next_stages()
    while any(s < len(c) for s, c in zip(stage, clients, strict=True)):
        until_load = loading[2] - t if loading else math.inf
        dt = min(fluid.next_dt(), until_load)
        if math.isinf(dt):
            raise RuntimeError("reactive: nothing can proceed (a model larger than the budget?)")
        t += dt
        for key in fluid.advance(dt):
            model = streams.pop(key)
            runner = runners[model]
            runner.key = None
            book(runner, runner.work, 0.0)
            restart(model)
        if loading is not None and loading[2] - t <= EPS * max(1.0, t):
            model = loading[0]
            record.append(Span("load", model, -1, -1, loading[1], t))
            slots = num_parallel if isinstance(num_parallel, int) else num_parallel[model]
            loaded[model], runners[model] = sizes[model], _Runner(weight[model], slots)
            loading = None
        serve_queue()
        dispatch()
        next_stages()
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
