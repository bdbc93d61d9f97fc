"""How long a run takes: a cost model to compare localmoa's plan with other ways of scheduling.

Pure and deterministic, like the planner: a hardware :class:`Profile`, each call's model, prompt
and output length go in; seconds come out. No I/O, no clock. It exists to answer one question
(scripts/bench_scheduler.py): does the plan, which minimises *loads*, also finish *early*, against
the exhaustive optimum and against the policies users run today (one model at a time, as
llama-swap's default group; Ollama's reactive scheduler)?

What a call costs. A call is (model bytes, prompt tokens P, output tokens T).

- *Prefill* is compute-bound: ``2·params·P`` FLOP at the device's ``compute``, with
  ``params ≈ bytes / 0.5625`` because Q4_K_M stores about 4.5 bits per weight (the byte figure
  is the model's whole footprint, so this slightly overstates params: it errs the same way for
  every policy).
- *Decode* is bandwidth-bound: every token reads the model's bytes once, so alone a stream runs
  at ``min(stream_cap, bandwidth / bytes)`` tokens/s. ``stream_cap`` is the runtime's per-token
  overhead (kernel launches, sampling): small models cannot saturate a large GPU alone, which is
  exactly when running several models at once pays.
- *Load* reads the file: ``bytes / disk + load_init_s`` (runner start, device context, warm-up).

Sharing. Streams active at the same time share the device as a fluid: stream i alone would use a
fraction ``f_i`` of it (``rate·bytes / bandwidth`` while decoding; 1 while prefilling, which
saturates compute). If ``Σf ≤ 1`` every stream runs at its solo rate, else all slow down by
``1/Σf``. Rates are constant between events (a stream starts, changes phase or ends), so the
simulation jumps from event to event and is exact, not time-stepped. Loads do not take a share:
they are disk- and bus-bound.

Execution models. :func:`simulate_plan` runs a plan (waves W_1..W_n, each with its resident set,
its loads L_w in order, its unloads U_w and the calls of its stage it runs) as localmoa's executor
does, by *dataflow*:

1. loads happen one at a time in plan order (L_1 in order, then L_2...); a load of X starts when
   the previous load has finished and the models loaded now plus X fit the budget (and X's
   previous residency, if any, has been unloaded);
2. a model Y of U_w is unloaded (instantly) as soon as each of its calls in waves before w has
   finished, and not waited for otherwise; what is left at the end is unloaded for free;
3. a call of stage s on model m in wave w starts when m's load for wave w has finished (or m was
   carried from the wave before), every call of stage s-1 has finished (its references), and m
   runs no other call (one model's calls run one at a time, in plan order: wave, then call
   order);
4. concurrent calls share the device as above.

So a wave's second load overlaps its first model's calls, and the next wave's loads start as soon
as memory is free rather than when the wave's last call ends. The budget is never exceeded by
construction (the simulation checks it). ``dataflow=False`` is the executor before that: per wave
the unloads, the loads one at a time, then every call of the wave at once; the wave ends with its
last call.

:func:`reactive` replays Ollama's scheduler rules instead (ollama/ollama server/sched.go:
fast path for loaded models, one load at a time, FIFO pending queue with head-of-line blocking,
eviction of an idle runner by keep_alive-then-name,
``OLLAMA_MAX_LOADED_MODELS``, ``OLLAMA_NUM_PARALLEL=1``). :func:`optimal` searches wave plans
under dataflow execution (branch and bound, each candidate simulated), :func:`optimal_waves` under
wave-by-wave execution (Dijkstra: there a plan's cost is a sum over its waves); each is ``≤`` the
matching localmoa figure whenever it answers.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

from localmoa.planning.fewest_loads import Plan, make_plan
from localmoa.planning.profiles import PROFILES, Profile

__all__ = [
    "BYTES_PER_PARAM",
    "PROFILES",
    "CallSpec",
    "Found",
    "PolicyResult",
    "Profile",
    "Span",
    "Timing",
    "WaveSpec",
    "call_seconds",
    "candidate_plans",
    "load_seconds",
    "localmoa",
    "one_at_a_time",
    "optimal",
    "optimal_waves",
    "reactive",
    "search",
    "simulate_plan",
    "simulate_waves",
    "wave_specs",
]

GiB = 1 << 30
GB = 10**9

BYTES_PER_PARAM = 4.5 / 8
"""Q4_K_M averages about 4.5 bits per weight (llama.cpp's k-quant mix: Q4_K 4.5 bpw, some
tensors Q6_K); llama.cpp prints 4.53 BPW for a Q4_K_M Mixtral (ggml-org/llama.cpp#5206)."""


class CallSpec(NamedTuple):
    """One call: its model, prompt tokens and output tokens."""

    model: str
    prompt_tokens: int
    output_tokens: int


class PolicyResult(NamedTuple):
    """What a policy achieved: wall-clock seconds from the first load to the last answer."""

    makespan_s: float
    loads: int


class Span(NamedTuple):
    """One load or call of a simulated run: what a timeline shows."""

    kind: str
    """"load", "call" or "unload" (an instant: start = end; a plan's last models are unloaded
    after the end, for free, and not shown)."""
    model: str
    wave: int
    """0-based wave of the plan: of the call, the wave a load is for, the wave whose unloads
    drop the model (-1 where there is no plan: :func:`reactive`)."""
    stage: int
    """0-based stage of that wave (-1 for :func:`reactive`'s loads)."""
    start_s: float
    end_s: float


@dataclass(frozen=True)
class Timing:
    """A plan's simulated run: total seconds, loads, and where the seconds went."""

    makespan_s: float
    loads: int
    load_s: float
    """Seconds spent loading (loads never overlap one another)."""
    compute_s: float
    """Seconds during which at least one call runs; the rest of the makespan the device idles,
    waiting for a load."""
    spans: tuple[Span, ...] = ()


Stages = Sequence[Sequence[CallSpec]]


def load_seconds(size: int, profile: Profile) -> float:
    """Seconds to load a model of ``size`` bytes: read the file, then start the runner."""
    return size / profile.disk + profile.load_init_s


def call_seconds(call: CallSpec, size: int, profile: Profile) -> float:
    """Seconds one call takes alone on the device (prefill, then decode)."""
    return sum(work / rate for work, rate, _ in _phases(call, size, profile))


# A phase: (work, solo rate in work/s, share of the device it uses alone).
_Phase = tuple[float, float, float]


def _phases(call: CallSpec, size: int, profile: Profile) -> tuple[_Phase, ...]:
    out: list[_Phase] = []
    if call.prompt_tokens > 0:
        flops = 2 * (size / BYTES_PER_PARAM) * call.prompt_tokens
        out.append((flops, profile.compute, 1.0))
    if call.output_tokens > 0:
        rate = min(profile.stream_cap, profile.bandwidth / size)
        out.append((float(call.output_tokens), rate, rate * size / profile.bandwidth))
    return tuple(out)


_EPS = 1e-9


class _Fluid:
    """Streams sharing the device; advanced from event to event (see the module docstring)."""

    def __init__(self) -> None:
        # Per running stream: its phases, the current one, and the work left in it.
        self._phases: dict[int, tuple[_Phase, ...]] = {}
        self._index: dict[int, int] = {}
        self._left: dict[int, float] = {}
        self._factor: float | None = None  # cached until a stream starts or changes phase

    def start(self, key: int, phases: tuple[_Phase, ...]) -> bool:
        """Start a stream; False if it has no work at all (it is done at once)."""
        if not phases:
            return False
        self._phases[key], self._index[key], self._left[key] = phases, 0, phases[0][0]
        self._factor = None
        return True

    def busy(self) -> bool:
        return bool(self._left)

    def factor(self) -> float:
        if self._factor is None:
            share = sum(self._phases[k][self._index[k]][2] for k in self._left)
            self._factor = 1.0 if share <= 1.0 else 1.0 / share
        return self._factor

    def next_dt(self) -> float:
        """Seconds until the next phase ends (inf when nothing runs)."""
        if not self._left:
            return math.inf
        factor, phases, index = self.factor(), self._phases, self._index
        return min(left / (phases[k][index[k]][1] * factor) for k, left in self._left.items())

    def advance(self, dt: float) -> list[int]:
        """Let ``dt`` seconds pass; returns the streams that finished, in key order."""
        factor = self.factor()
        finished = []
        for key in sorted(self._left):
            phases, i = self._phases[key], self._index[key]
            left = self._left[key] - phases[i][1] * factor * dt
            if left > _EPS * phases[i][0]:
                self._left[key] = left
                continue
            self._factor = None
            if i + 1 < len(phases):
                self._index[key], self._left[key] = i + 1, phases[i + 1][0]
            else:
                del self._left[key], self._phases[key], self._index[key]
                finished.append(key)
        return finished


def _wave_seconds(chains: Sequence[Sequence[tuple[_Phase, ...]]]) -> float:
    """Every chain starts at 0, its calls one after another; chains share the device."""
    fluid, t = _Fluid(), 0.0
    position = [0] * len(chains)

    def feed(c: int) -> None:
        while position[c] < len(chains[c]):
            position[c] += 1
            if fluid.start(c, chains[c][position[c] - 1]):
                return

    for c in range(len(chains)):
        feed(c)
    while fluid.busy():
        dt = fluid.next_dt()
        t += dt
        for c in fluid.advance(dt):
            feed(c)
    return t


def _chains(
    calls: Sequence[CallSpec], sizes: Mapping[str, int], profile: Profile
) -> list[list[tuple[_Phase, ...]]]:
    """Calls grouped by model, in call order (the executor's per-model lock)."""
    by_model: dict[str, list[tuple[_Phase, ...]]] = {}
    for call in calls:
        by_model.setdefault(call.model, []).append(_phases(call, sizes[call.model], profile))
    return list(by_model.values())


class WaveSpec(NamedTuple):
    """A wave as the simulation reads it: a planner
    :class:`~localmoa.planning.fewest_loads.Wave` without pydantic (the searches build hundreds
    of thousands)."""

    stage: int
    """0-based stage (the Wave's ``layer`` - 1)."""
    resident: frozenset[str]
    load: tuple[str, ...]
    """Loaded in this order."""
    unload: tuple[str, ...]
    runs: frozenset[str]
    """Models whose pending calls of ``stage`` run in this wave (all of them)."""


def wave_specs(plan: Plan) -> list[WaveSpec]:
    """``plan``'s waves as the simulation reads them."""
    return [
        WaveSpec(
            w.layer - 1, frozenset(w.resident), tuple(w.load), tuple(w.unload), frozenset(w.runs)
        )
        for w in plan.waves
    ]


def simulate_plan(
    plan: Plan,
    calls: Stages,
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    dataflow: bool = True,
    resident: Sequence[str] = (),
) -> Timing:
    """Run ``plan`` in the model; dataflow (the executor's semantics) or wave by wave.

    ``calls[k]`` are stage k's calls in the order the plan was made from (its models are
    ``[c.model for c in calls[k]]``). ``dataflow=False`` is the earlier executor: a wave's loads
    wait for the previous wave's last call and its calls for its last load. Raises ValueError for
    a plan that leaves calls unrun, loads a resident model, or can never fit its budget.
    """
    return simulate_waves(
        wave_specs(plan), calls, sizes, profile, dataflow=dataflow, resident=resident
    )


def simulate_waves(
    waves: Sequence[WaveSpec],
    calls: Stages,
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    dataflow: bool = True,
    resident: Sequence[str] = (),
) -> Timing:
    """:func:`simulate_plan` on waves already in the simulation's form; ``resident`` models
    are loaded when the run starts (a plan made mid-run)."""
    return _Run(waves, calls, sizes, profile, dataflow=dataflow, resident=resident).go()


def _simulate_prefix(
    waves: Sequence[WaveSpec],
    calls: Stages,
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    release: bool,
    resident: Sequence[str] = (),
) -> tuple[Timing, bool]:
    """The first waves of a plan, calls not placed yet left out; with ``release``, as if the
    next wave unloaded everything (the most memory any continuation could free), else as if
    every later wave kept it (the least). Also says whether that choice changed anything: an
    unload it added came before the last load started."""
    run = _Run(
        waves,
        calls,
        sizes,
        profile,
        dataflow=True,
        partial=True,
        release=release,
        resident=resident,
    )
    return run.go(), run.relaxed


class _Run:
    """One simulated execution of a wave plan (see "Execution models" in the module docstring).

    A *residency* is one stay of a model: from the wave that loads it to the wave that unloads
    it (or the end). Loads are residencies in plan order; each call belongs to the residency of
    its model in its wave.
    """

    def __init__(
        self,
        waves: Sequence[WaveSpec],
        calls: Stages,
        sizes: Mapping[str, int],
        profile: Profile,
        *,
        dataflow: bool,
        partial: bool = False,
        release: bool = False,
        resident: Sequence[str] = (),
    ) -> None:
        self.sizes, self.profile, self.dataflow = sizes, profile, dataflow
        self.n_waves = len(waves)
        self.wave_stage = [wave.stage for wave in waves]
        # Residencies: model, the wave whose unloads end it (None: kept to the end), calls left.
        self.model: list[str] = []
        self.until: list[int | None] = []
        self.left: list[int] = []
        self.queue: list[tuple[int, int]] = []  # (residency, wave) in load order
        self.wave_loads = [0] * len(waves)
        # Calls in plan order: spec, residency, stage, wave.
        self.calls: list[tuple[CallSpec, int, int, int]] = []
        self.wave_calls = [0] * len(waves)
        self.stage_calls = [0] * len(calls)
        holder: dict[str, int] = {}
        for model in resident:  # loaded before the run: residencies with no load
            holder[model] = len(self.model)
            self.model.append(model)
            self.until.append(None)
            self.left.append(0)
        self.initial = len(self.model)
        pending = [list(stage) for stage in calls]
        for w, wave in enumerate(waves):
            if w and wave.stage < waves[w - 1].stage:
                raise ValueError(f"wave {w + 1} goes back to stage {wave.stage + 1}")
            for model in wave.unload:
                if model in holder:
                    self.until[holder.pop(model)] = w
            for model in wave.load:
                if model in holder:
                    raise ValueError(f"wave {w + 1} loads {model!r}, which is resident already")
                holder[model] = len(self.model)
                self.model.append(model)
                self.until.append(None)
                self.left.append(0)
                self.queue.append((holder[model], w))
                self.wave_loads[w] += 1
            if set(holder) != wave.resident:
                raise ValueError(
                    f"wave {w + 1}: resident {sorted(wave.resident)} is not what its loads and "
                    f"unloads leave ({sorted(holder)})"
                )
            now = [c for c in pending[wave.stage] if c.model in wave.runs]
            pending[wave.stage] = [c for c in pending[wave.stage] if c.model not in wave.runs]
            for call in now:
                if call.model not in holder:
                    raise ValueError(f"wave {w + 1} runs {call.model!r}, which is not resident")
                self.calls.append((call, holder[call.model], wave.stage, w))
                self.left[holder[call.model]] += 1
                self.wave_calls[w] += 1
                self.stage_calls[wave.stage] += 1
        self.released = set(holder.values()) if partial and release else set()
        self.relaxed = False
        for r in self.released:
            self.until[r] = len(waves)
        if any(pending) and not partial:
            raise ValueError("the plan leaves calls unrun")

    def go(self) -> Timing:
        sizes, profile, dataflow = self.sizes, self.profile, self.dataflow
        budget = profile.memory_bytes
        queues: dict[str, deque[int]] = {}
        for i, (call, *_) in enumerate(self.calls):
            queues.setdefault(call.model, deque()).append(i)
        state = [_LOADED] * self.initial + [_WAITING] * (len(self.model) - self.initial)
        # model -> its residency now loading or loaded
        holding: dict[str, int] = {self.model[r]: r for r in range(self.initial)}
        running: set[str] = set()
        fluid = _Fluid()
        loading: tuple[int, float, float] | None = None  # residency, start, end
        t = busy_s = load_s = 0.0
        used = sum(sizes[model] for model in holding)
        next_load = calls_done = waves_done = 0
        began: dict[int, float] = {}
        spans: list[Span] = []

        def finish(i: int) -> None:
            nonlocal calls_done, waves_done
            call, residency, stage, w = self.calls[i]
            running.discard(call.model)
            self.left[residency] -= 1
            self.stage_calls[stage] -= 1
            self.wave_calls[w] -= 1
            calls_done += 1
            while waves_done < self.n_waves and self.wave_calls[waves_done] == 0:
                waves_done += 1
            spans.append(Span("call", call.model, w, stage, began.pop(i), t))

        def settle() -> None:
            """Start every unload, load and call whose conditions hold at ``t``."""
            nonlocal used, loading, next_load
            moved = True
            while moved:
                moved = False
                for model, r in list(holding.items()):
                    if state[r] == _LOADED and self.until[r] is not None and not self.left[r]:
                        self.relaxed |= r in self.released and next_load < len(self.queue)
                        state[r] = _GONE
                        del holding[model]
                        used -= sizes[model]
                        w = self.until[r]
                        stage = self.wave_stage[w] if w is not None and w < self.n_waves else -1
                        spans.append(Span("unload", model, w if w is not None else -1, stage, t, t))
                if loading is None and next_load < len(self.queue):
                    r, w = self.queue[next_load]
                    model = self.model[r]
                    if (
                        model not in holding
                        and used + sizes[model] <= budget
                        and (dataflow or waves_done >= w)
                    ):
                        used += sizes[model]
                        if used > budget:  # by construction never; a guard on the model itself
                            raise AssertionError(f"{used} bytes loaded over a {budget} budget")
                        state[r], holding[model] = _LOADING, r
                        loading = (r, t, t + load_seconds(sizes[model], profile))
                        next_load += 1
                        moved = True
                for model, waiting in queues.items():
                    if model in running or not waiting:
                        continue
                    i = waiting[0]
                    call, r, stage, w = self.calls[i]
                    if state[r] != _LOADED or (stage and self.stage_calls[stage - 1]):
                        continue
                    if not dataflow and (self.wave_loads[w] or waves_done < w):
                        continue
                    waiting.popleft()
                    began[i] = t
                    if fluid.start(i, _phases(call, sizes[model], profile)):
                        running.add(model)
                    else:
                        finish(i)
                    moved = True

        while True:
            settle()
            if calls_done == len(self.calls) and loading is None and next_load == len(self.queue):
                break
            until_load = loading[2] - t if loading is not None else math.inf
            dt = min(fluid.next_dt(), until_load)
            if math.isinf(dt):
                raise ValueError(
                    f"the plan cannot go on: {self.model[self.queue[next_load][0]]!r} never fits "
                    f"beside what is loaded within {budget} bytes"
                )
            if fluid.busy():
                busy_s += dt
            done = fluid.advance(dt)
            if loading is not None and until_load <= dt:
                r, start, t = loading
                state[r] = _LOADED
                self.wave_loads[self.queue[next_load - 1][1]] -= 1
                load_s += t - start
                w = self.queue[next_load - 1][1]
                spans.append(Span("load", self.model[r], w, self.wave_stage[w], start, t))
                loading = None
            else:
                t += dt
            for i in done:
                finish(i)
        return Timing(t, len(self.queue), load_s, busy_s, tuple(spans))


_WAITING, _LOADING, _LOADED, _GONE = range(4)


def localmoa(
    calls: Stages, sizes: Mapping[str, int], profile: Profile, *, dataflow: bool = True
) -> PolicyResult:
    """localmoa's own plan (fewest loads, then fewest bytes, then fewest waves), executed by
    dataflow (or wave by wave: ``dataflow=False``)."""
    plan = make_plan([[c.model for c in stage] for stage in calls], sizes, profile.memory_bytes)
    timing = simulate_plan(plan, calls, sizes, profile, dataflow=dataflow)
    return PolicyResult(timing.makespan_s, timing.loads)


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
    fluid, t, loads = _Fluid(), 0.0, 0
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
                if fluid.start(key, _phases(call, sizes[model], profile)):
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
            while len(loaded) >= profile.max_loaded or used() + sizes[model] > budget:
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
        if loading is not None and loading[2] - t <= _EPS * max(1.0, t):
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

    :func:`search` from localmoa's own fewest-loads plan, run to the end; so ``optimal ≤
    localmoa`` whenever it answers. None when there are more than ``max_models`` distinct models
    or the search would simulate more than ``max_nodes`` partial plans.
    """
    if len({c.model for stage in calls for c in stage}) > max_models:
        return None
    plan = make_plan([[c.model for c in stage] for stage in calls], sizes, profile.memory_bytes)
    found = search(calls, sizes, profile, wave_specs(plan), max_nodes=max_nodes)
    if not found.complete:
        return None
    return PolicyResult(found.makespan_s, found.loads)


class Found(NamedTuple):
    """What :func:`search` found: the waves, their simulated run, and whether it is proven the
    fastest (the search ran to its end)."""

    waves: list[WaveSpec]
    makespan_s: float
    loads: int
    complete: bool
    fewest_s: float
    """The simulated run of the fastest plan found with no more loads than the seed (the seed's
    own when none beat it): what a plan with extra loads was weighed against."""


def search(
    calls: Stages,
    sizes: Mapping[str, int],
    profile: Profile,
    seed: Sequence[WaveSpec],
    *,
    max_nodes: int,
    slack: float = 0.0,
    min_gain: float = 0.0,
    resident: Sequence[str] = (),
) -> Found:
    """The fastest wave plan found under dataflow execution, starting from ``seed``.

    Depth-first branch and bound over every sequence of waves (see :class:`_Space` for what a
    candidate is), each partial plan simulated. Two prunings: a lower bound on any completion
    (:meth:`_Space.bound`), and dominance: of two partial plans that leave the run in the same
    state (stage, models of it done, resident set), one whose every resource (the load queue,
    the stages begun, each model's memory and turn) is free no later than the other's is kept
    alone. Both assume that running a call earlier never delays the rest, which sharing can
    break (a call started earlier slows a neighbour whose unload a load was waiting for): then
    the optimum can be missed by a little (tests/planning/test_search.py compares with the
    exhaustive enumeration: when written, 1 random case in 1,100 came out 0.5 % above it).

    Two margins, because the estimate is not the run. A plan with no more loads than ``seed``
    replaces it only when faster by more than ``slack`` (a fraction): with estimated call
    lengths, a plan a hair faster on paper is as likely slower in fact. A plan with more loads
    than ``seed`` is taken only when also at least ``min_gain`` faster than the fastest plan
    found with no more loads (each extra load is a cost the estimate may understate; with
    ``min_gain`` 0 only time counts, fewer loads breaking ties). The search is anytime: after
    ``max_nodes`` partial plans it returns the best found so far (``complete`` False).
    ``resident`` models are loaded at the start (a plan made mid-run: ``seed``'s first wave
    keeps or unloads them); each must be one the run calls.
    """
    space = _Space(calls, sizes, profile, resident)
    mine = simulate_waves(seed, calls, sizes, profile, resident=resident)
    fewest = mine.loads
    # The fastest plan with no more loads than the seed (None: the seed), and the bar a plan
    # of that kind must pass to replace it: the seed less the slack (with a slack, no tie
    # goes to fewer loads), then the plan found. ``fewest_s`` is its own makespan.
    best: _Node | None = None
    best_s, best_loads = mine.makespan_s * (1 - slack), mine.loads if slack == 0 else -1
    fewest_s = mine.makespan_s
    # The fastest plan with extra loads, whether or not it pays for them yet.
    extra: _Node | None = None
    extra_s, extra_loads = math.inf, 0
    nodes = 0
    seen: dict[tuple[int, int, int, int], list[tuple[tuple[float, ...], tuple[float, ...], int]]]
    seen = {}

    def bar(loads: int) -> float:
        """What a completion with ``loads`` so far must beat to change the answer. A plan with
        no more loads than the seed must be the fastest of its kind and keep any extra-loads
        plan from paying; one with more must beat both the others, that by ``min_gain``."""
        if loads <= fewest:
            return min(best_s, extra_s / (1 - min_gain))
        return min(extra_s, best_s, fewest_s * (1 - min_gain))

    def dominated(node: _Node, early: tuple[float, ...], late: tuple[float, ...]) -> bool:
        """Has another partial plan reached the same state with everything free no later, at
        its latest, than this one at its earliest? Then its best continuation does as well
        (when extra loads must pay, only one with no more loads counts)."""
        key = (node.stage, node.done, node.resident, node.unrun)
        marks = seen.setdefault(key, [])
        loads = node.loads if min_gain > 0 else 0
        if any(n <= loads and _le(other_late, early) for _, other_late, n in marks):
            return True
        marks[:] = [(e, la, n) for e, la, n in marks if not (loads <= n and _le(late, e))]
        marks.append((early, late, loads))
        return False

    def visit(node: _Node, makespan: float) -> bool:
        nonlocal nodes, best, best_s, best_loads, fewest_s, extra, extra_s, extra_loads
        if node.stage == len(calls):  # a complete plan: its bound is its makespan
            if node.loads <= fewest:
                if (makespan, node.loads) < (best_s, best_loads):
                    best, best_s, best_loads, fewest_s = node, makespan, node.loads, makespan
            elif (makespan, node.loads) < (extra_s, extra_loads):
                extra, extra_s, extra_loads = node, makespan, node.loads
            return True
        children = sorted(space.children(node), key=lambda c: (space.quick_bound(c), c.loads))
        for child in children:
            quick = space.quick_bound(child)
            if quick >= bar(0) * (1 - 1e-12):
                break
            if quick >= bar(child.loads) * (1 - 1e-12):
                continue
            nodes += 1
            if nodes > max_nodes:
                return False
            bound, early, late = space.bound(child)
            if child.stage < len(calls) and (
                bound >= bar(child.loads) * (1 - 1e-12) or dominated(child, early, late)
            ):
                continue
            if not visit(child, bound):
                return False
        return True

    complete = visit(space.root(), math.inf)
    pays = (extra_s, extra_loads) < (best_s, best_loads) and extra_s <= fewest_s * (1 - min_gain)
    if extra is not None and pays:
        return Found(extra.waves(), extra_s, extra_loads, complete, fewest_s)
    if best is None:
        return Found(list(seed), mine.makespan_s, mine.loads, complete, fewest_s)
    return Found(best.waves(), best_s, best_loads, complete, fewest_s)


def candidate_plans(
    calls: Stages, sizes: Mapping[str, int], profile: Profile
) -> Iterator[list[WaveSpec]]:
    """Every wave plan :func:`optimal` chooses from (see :class:`_Space`), unpruned: the
    exhaustive reference for small cases. There are very many beyond a handful of calls."""
    space = _Space(calls, sizes, profile)
    stack = [space.root()]
    while stack:
        node = stack.pop()
        if node.stage == len(calls):
            yield node.waves()
        else:
            stack += reversed(space.children(node))


@dataclass(frozen=True)
class _Node:
    """A partial plan: its waves so far and where they leave the run."""

    stage: int
    done: int
    """Models of ``stage`` whose calls have run."""
    resident: int
    unrun: int
    """Resident models loaded ahead of their stage that have not run yet (they stay until they
    run: loading a model and dropping it unused only costs)."""
    loads: int
    bytes_loaded: int
    load_s: float
    """Seconds of loads so far: loads are serial, so the last one ends no sooner."""
    bound: float
    """The largest bound any load so far gives (see :meth:`_Space.bound`)."""
    count: int
    parent: _Node | None
    wave: WaveSpec | None

    def waves(self) -> list[WaveSpec]:
        out: list[WaveSpec] = []
        node: _Node | None = self
        while node is not None and node.wave is not None:
            out.append(node.wave)
            node = node.parent
        return out[::-1]


class _Space:
    """The candidate plans: every sequence of waves where each wave is a resident set within
    the budget that runs every pending call of the current stage whose model it holds (at
    least one), stages in order. Loads are what the wave holds that the previous did not, in
    the planner's order (first use in the run), unloads what it held that this wave does not.

    Three choices are left out as dominated: holding a model no later call needs (unloads are
    free and memory only delays loads), dropping a model loaded ahead of its stage before it
    ran (the load was wasted), and a wave that runs nothing.
    """

    def __init__(
        self,
        calls: Stages,
        sizes: Mapping[str, int],
        profile: Profile,
        resident: Sequence[str] = (),
    ) -> None:
        self.calls, self.sizes, self.profile = calls, sizes, profile
        self.names = list(dict.fromkeys(c.model for stage in calls for c in stage))
        index = {name: i for i, name in enumerate(self.names)}
        if any(model not in index for model in resident):
            raise ValueError("a model resident at the start must be one the run calls")
        self.resident = tuple(resident)
        self.start = _mask_of(index[model] for model in resident)
        self.size = [sizes[n] for n in self.names]
        self.load_s = [load_seconds(s, profile) for s in self.size]
        self.budget = profile.memory_bytes
        n = len(calls)
        self.demand = [_mask_of(index[c.model] for c in stage) for stage in calls]
        self.after = [0] * n  # models some later stage calls
        for k in range(n - 2, -1, -1):
            self.after[k] = self.after[k + 1] | self.demand[k + 1]
        # Seconds alone: each model's calls per stage (serialized), and what each stage needs
        # at least: its longest model chain, or its device-seconds if the device is the limit.
        self.work = [[0.0] * n for _ in self.names]
        stage_lb: list[float] = []
        for k, stage in enumerate(calls):
            device = 0.0
            for c in stage:
                phases = _phases(c, sizes[c.model], profile)
                self.work[index[c.model]][k] += sum(w / rate for w, rate, _ in phases)
                device += sum(w / rate * share for w, rate, share in phases)
            stage_lb.append(max(device, *(self.work[i][k] for i in _bits(self.demand[k]))))
        first = (
            0.0
            if self.demand[0] & self.start
            else min(self.load_s[i] for i in _bits(self.demand[0]))
        )
        self.head = [first + sum(stage_lb[:k]) for k in range(n)]
        self.tail = [sum(stage_lb[k + 1 :]) for k in range(n)]
        self.floor = self.head[-1] + stage_lb[-1]
        self.stage_lb = stage_lb
        self.bytes_of = cache(lambda mask: sum(self.size[i] for i in _bits(mask)))

    def root(self) -> _Node:
        return _Node(0, 0, self.start, 0, 0, 0, 0.0, self.floor, 0, None, None)

    def children(self, node: _Node) -> list[_Node]:
        k, resident = node.stage, node.resident
        todo = self.demand[k] & ~node.done
        live = todo | self.after[k]
        must = resident & node.unrun
        out = []
        for extra in _submasks(live & ~must):
            wave = extra | must
            if not wave & todo or self.bytes_of(wave) > self.budget:
                continue
            out.append(self._child(node, wave))
        return out

    def _child(self, node: _Node, wave: int) -> _Node:
        k = node.stage
        todo = self.demand[k] & ~node.done
        runs = wave & todo
        new = wave & ~node.resident
        load_s, bound = node.load_s, node.bound
        for i in _bits(new):
            load_s += self.load_s[i]
            # This residency runs its model's calls of this stage, or (loaded ahead) all of
            # those of its next stage; either after the load and after the stages before.
            s = k if runs >> i & 1 else self._next_use(i, k)
            bound = max(bound, max(load_s, self.head[s]) + self.work[i][s] + self.tail[s])
        done = node.done | runs
        stage, done = (k + 1, 0) if done == self.demand[k] else (k, done)
        spec = WaveSpec(
            k,
            frozenset(self.names[i] for i in _bits(wave)),
            tuple(self.names[i] for i in _bits(new)),
            tuple(self.names[i] for i in _bits(node.resident & ~wave)),
            frozenset(self.names[i] for i in _bits(runs)),
        )
        return _Node(
            stage,
            done,
            wave,
            ((node.unrun & wave) | new) & ~runs,
            node.loads + new.bit_count(),
            node.bytes_loaded + self.bytes_of(new),
            load_s,
            bound,
            node.count + 1,
            node,
            spec,
        )

    def _next_use(self, i: int, k: int) -> int:
        return next(s for s in range(k + 1, len(self.demand)) if self.demand[s] >> i & 1)

    def quick_bound(self, node: _Node) -> float:
        """A lower bound on the makespan of any plan that starts with ``node``'s waves, from
        load seconds and call seconds alone.

        Loads are serial, so the n-th ends no sooner than the first n together; a residency's
        calls start after its load and after every stage before theirs, each stage lasting at
        least its longest model chain and its device-seconds. Every model a later call needs
        that is not resident must be loaded again after all of this, and the last such load is
        followed by its model's calls and every later stage.
        """
        if node.stage == len(self.demand):
            return node.bound
        k = node.stage
        heads = {s: self.head[s] for s in range(k, len(self.demand))}
        return max(node.bound, self._reloads(node, node.load_s, heads))

    def bound(self, node: _Node) -> tuple[float, tuple[float, ...], tuple[float, ...]]:
        """:meth:`quick_bound` sharpened by simulating ``node``'s waves as if the next wave
        unloaded everything: loads then also wait for memory, and stages for real calls. With
        it, two marks of when each thing the rest of the run waits for is free (the last load,
        the stages begun, each model): at the earliest any continuation sees, and at the latest
        (they differ when the next waves' unloads could free memory for this prefix's loads).

        Exact for a complete plan. For a partial one it bounds every continuation as long as
        adding calls only slows the ones already placed (see :func:`optimal` on when sharing
        breaks that; the exhaustive comparison has not caught this bound wrong).
        """
        waves = node.waves()
        calls, sizes, profile = self.calls, self.sizes, self.profile
        timing, relaxed = _simulate_prefix(
            waves, calls, sizes, profile, release=True, resident=self.resident
        )
        if node.stage == len(self.demand):
            return timing.makespan_s, (), ()
        k = node.stage
        loads_end, ends, free = _frontier(timing)
        before = ends.get(k - 1, 0.0)
        end = ends.get(k, 0.0)  # stage k ends no sooner than its calls placed, nor the others
        for i in _bits(self.demand[k] & ~node.done):
            start = before if node.resident >> i & 1 else max(loads_end + self.load_s[i], before)
            end = max(end, start + self.work[i][k])
        heads = {k: before}
        for s in range(k + 1, len(self.demand)):
            heads[s] = end if s == k + 1 else heads[s - 1] + self.stage_lb[s - 1]
        bound = max(
            self.quick_bound(node),
            timing.makespan_s,
            end + self.tail[k],
            self._reloads(node, loads_end, heads),
        )
        early = self._mark(node, loads_end, ends, free)
        if not relaxed:
            return bound, early, early
        held, _ = _simulate_prefix(
            waves, calls, sizes, profile, release=False, resident=self.resident
        )
        return bound, early, self._mark(node, *_frontier(held))

    def _mark(
        self, node: _Node, loads_end: float, ends: Mapping[int, float], free: Sequence[float]
    ) -> tuple[float, ...]:
        """When each thing the rest of the run waits for is free. What is free before the rest
        could use it makes no difference: memory is wanted from the next load on, a resident
        model from its stage's start at the earliest."""
        before = ends.get(node.stage - 1, 0.0)
        marks = [
            max(t, min(loads_end, before) if node.resident >> i & 1 else loads_end)
            for i, t in enumerate(free)
        ]
        return (loads_end, before, max(ends.get(node.stage, 0.0), before), *marks)

    def _reloads(self, node: _Node, loads_end: float, heads: Mapping[int, float]) -> float:
        """The bound from the models a later call needs that are not resident: each loads after
        ``loads_end``, the last after all of them, and its calls start no sooner than
        ``heads[stage]``."""
        k = node.stage
        todo = self.demand[k] & ~node.done
        missing = (todo | self.after[k]) & ~node.resident
        if not missing:
            return 0.0
        total = loads_end + sum(self.load_s[i] for i in _bits(missing))
        each, last = 0.0, math.inf
        for i in _bits(missing):
            stages = [s for s in range(k + 1, len(self.demand)) if self.demand[s] >> i & 1]
            if todo >> i & 1:
                stages.append(k)
            ready = loads_end + self.load_s[i]
            each = max(
                each,
                min(max(ready, heads[s]) + self.work[i][s] + self.tail[s] for s in stages),
            )
            last = min(
                last, *(max(total, heads[s]) + self.work[i][s] + self.tail[s] for s in stages)
            )
        return max(each, last)


def _frontier(timing: Timing) -> tuple[float, dict[int, float], list[float]]:
    """From a prefix's spans: when its last load ends, when each stage's calls placed so far
    end, and when each model is last busy (by first appearance)."""
    ends: dict[int, float] = {}
    free: dict[str, float] = {}
    loads_end = 0.0
    for span in timing.spans:
        if span.kind == "unload":
            continue
        free[span.model] = max(free.get(span.model, 0.0), span.end_s)
        if span.kind == "load":
            loads_end = max(loads_end, span.end_s)
        else:
            ends[span.stage] = max(ends.get(span.stage, 0.0), span.end_s)
    return loads_end, ends, list(free.values())


def optimal_waves(
    calls: Stages,
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    max_models: int = MAX_OPTIMAL_MODELS,
    max_states: int = MAX_OPTIMAL_STATES,
) -> PolicyResult | None:
    """The fastest wave plan under wave-by-wave execution (``simulate_plan(dataflow=False)``),
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
    demand = [_mask_of(index[c.model] for c in stage) for stage in calls]
    needed = [0] * (len(calls) + 1)
    for k in range(len(calls) - 1, -1, -1):
        needed[k] = needed[k + 1] | demand[k]
    load_s = [load_seconds(s, profile) for s in size]

    @cache
    def bytes_of(mask: int) -> int:
        return sum(size[i] for i in _bits(mask))

    @cache
    def wave_s(k: int, runs: int) -> float:
        chosen = [c for c in calls[k] if runs >> index[c.model] & 1]
        return _wave_seconds(_chains(chosen, sizes, profile))

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
        for keep in _submasks(keepable):
            for new in _submasks(todo & ~resident):
                wave = keep | new
                runs = wave & todo
                if not runs or bytes_of(wave) > profile.memory_bytes:
                    continue
                step = sum(load_s[i] for i in _bits(new)) + wave_s(k, runs)
                finished = (done | runs) == demand[k]
                nxt = (k + 1, 0, wave) if finished else (k, done | runs, wave)
                value = (cost + step, nloads + new.bit_count())
                if nxt not in best or value < best[nxt]:
                    best[nxt] = value
                    heapq.heappush(heap, (value[0], value[1], nxt))
    return None


def _le(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y + 1e-9 for x, y in zip(a, b, strict=True))


def _mask_of(indices: Iterable[int]) -> int:
    mask = 0
    for i in indices:
        mask |= 1 << i
    return mask


def _bits(mask: int) -> list[int]:
    return [i for i in range(mask.bit_length()) if mask >> i & 1]


def _submasks(mask: int) -> list[int]:
    out, sub = [], mask
    while True:
        out.append(sub)
        if sub == 0:
            return out
        sub = (sub - 1) & mask
