"""How long a plan takes: the cost model the planner times and refines plans with.

Pure and deterministic, like the planner: a hardware :class:`~localmoa.planning.profiles.Profile`,
each call's model, prompt and output length go in; seconds come out. No I/O, no clock.
``scripts/bench_fidelity.py`` compares its estimates with real llama.cpp runs;
``scripts/bench_scheduler.py`` compares the plans it picks with the clairvoyant optimum and with
the schedulers users run today.

What a call costs. A call is (model bytes, prompt tokens P, output tokens T).

- *Prefill* is compute-bound: ``2·params·P`` FLOP at the device's ``compute``, with
  ``params ≈ bytes / 0.5625`` because Q4_K_M stores about 4.5 bits per weight (the byte figure
  is the model's whole footprint, so this slightly overstates params: it errs the same way for
  every plan).
- *Decode* is bandwidth-bound: every token reads the model's bytes once, so alone a stream runs
  at ``min(stream_cap, bandwidth / bytes)`` tokens/s. ``stream_cap`` is the runtime's per-token
  overhead (kernel launches, sampling): small models cannot saturate a large GPU alone, which is
  exactly when running several models at once pays.
- *Load* reads the file: ``bytes / disk + load_init_s`` (runner start, device context, warm-up).

Batched calls. A batch (``localmoa batch``) makes one model's calls for several prompts together,
as parallel sequences of one llama.cpp context: one ``llama_decode`` per step advances every
sequence. A :class:`CallSpec` with ``sequences = B`` is such a group, each sequence reading
``prompt_tokens`` and writing up to ``output_tokens``:

- *Prefill* is ``B`` times the FLOPs, at the same compute rate.
- *Decode* takes one step per token of the longest sequence. A step reads the weights once for
  all sequences, each sequence's KV cache (``kv_bytes_per_token`` times its context, counted at
  its mean over the decode, ``P + T/2``), and computes each further sequence's token at the
  prefill rate (:func:`decode_rate`)::

      step = (weights + B·kv·(P + T/2)) / bandwidth + (B - 1)·2·params / compute

  The first sequence's FLOPs are not added: the single-stream rate is calibrated on measured
  decode (``MEMORY_EFFICIENCY``), which includes them. So a memory-bound device decodes B
  sequences at close to B times one sequence's tokens/s until compute binds. Check on an RTX
  4090 (desktop-24g), llama 8B Q4_0 (4.66 GB): alone 151 tokens/s; 16 tokens a step, 6.6 ms +
  15 × 0.10 ms = 8.1 ms, i.e. 1973 tokens/s, where llama.cpp measures 1930 (micro-batch 16,
  ggml-org/llama.cpp#15131; 1937 in #7676); at 512 a step, where compute binds, the formula gives
  8.8k tokens/s and llama.cpp 10.4k (#7676): additive errs slow. ``stream_cap`` caps steps/s
  (its per-step overhead is assumed the same for one sequence or many).
- A sequence leaves the batch when its answer ends, and the steps after get cheaper: with
  ``total_output_tokens`` (all sequences' tokens, ``Σ T_i``) the decode's steps are timed at
  their mean, ``Σ T_i / T`` sequences a step; without it (a plan made before the run, when
  every call is assumed to write ``max_tokens``) every sequence runs to the end.
- Memory is the caller's: a group needs ``B`` contexts of KV cache, which ``sizes`` (from the
  caller, as for any plan) must hold; ``weight_bytes`` then says how much of that size is
  weights, so decode reads and parameters follow the weights, not the cache. A load still reads
  the whole size: for a size that holds a cache this overstates the load (allocating a cache
  reads no file), against the batch; it keeps the search's lower bounds, which time loads from
  sizes, valid.

Sharing. Streams active at the same time share the device as a fluid (:class:`Fluid`): stream i
alone would use a fraction ``f_i`` of it (while decoding, its steps/s times a step's seconds of
device work: ``rate·bytes / bandwidth`` for one sequence; 1 while prefilling, which saturates
compute). If ``Σf ≤ 1`` every stream runs at its solo rate, else all
slow down by ``1/Σf``. Rates are constant between events (a stream starts, changes phase or
ends), so the simulation jumps from event to event and is exact, not time-stepped. Loads do not
take a share: they are disk- and bus-bound.

Execution. :func:`simulate_plan` runs a plan (waves W_1..W_n, each with its resident set, its
loads L_w in order, its unloads U_w and the calls of its stage it runs) as localmoa's engine
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
construction (the simulation checks it).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from localmoa.planning.fewest_loads import Plan
from localmoa.planning.profiles import PROFILES, Profile

__all__ = [
    "BYTES_PER_PARAM",
    "PROFILES",
    "CallSpec",
    "Fluid",
    "Phase",
    "Profile",
    "Span",
    "Stages",
    "Timing",
    "WaveSpec",
    "call_seconds",
    "decode_rate",
    "load_seconds",
    "phases",
    "simulate_plan",
    "simulate_prefix",
    "simulate_waves",
    "wave_specs",
]

BYTES_PER_PARAM = 4.5 / 8
"""Q4_K_M averages about 4.5 bits per weight (llama.cpp's k-quant mix: Q4_K 4.5 bpw, some
tensors Q6_K); llama.cpp prints 4.53 BPW for a Q4_K_M Mixtral (ggml-org/llama.cpp#5206)."""


class CallSpec(NamedTuple):
    """One call: its model, prompt tokens and output tokens; or a group of calls to one model
    made together as ``sequences`` parallel sequences (see "Batched calls" in the module
    docstring). The defaults are one sequence, timed as the single-prompt planner always has."""

    model: str
    prompt_tokens: int
    """Per sequence."""
    output_tokens: int
    """Per sequence: of a group, its longest (the decode's steps)."""
    sequences: int = 1
    total_output_tokens: int = 0
    """Of a group, every sequence's output tokens together; 0: each writes ``output_tokens``."""
    kv_bytes_per_token: int = 0
    """KV-cache bytes one token of a sequence's context takes, read at every decode step; 0
    leaves them out (for one sequence they are a few per cent of the weights)."""
    weight_bytes: int = 0
    """Bytes of weights the model's size holds; 0: all of it. A size that holds the KV cache of
    many sequences is mostly not weights."""


class Span(NamedTuple):
    """One load or call of a simulated run: what a timeline shows."""

    kind: str
    """"load", "call" or "unload" (an instant: start = end; a plan's last models are unloaded
    after the end, for free, and not shown)."""
    model: str
    wave: int
    """0-based wave of the plan: of the call, the wave a load is for, the wave whose unloads
    drop the model (-1 where there is no plan, as for a replayed reactive scheduler)."""
    stage: int
    """0-based stage of that wave (-1 where there is no plan)."""
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
    return sum(work / rate for work, rate, _ in phases(call, size, profile))


# A phase: (work, solo rate in work/s, share of the device it uses alone).
Phase = tuple[float, float, float]


def phases(call: CallSpec, size: int, profile: Profile) -> tuple[Phase, ...]:
    """``call``'s prefill, then its decode (tokens of one sequence: steps), on a model of
    ``size`` bytes."""
    weights = call.weight_bytes or size
    out: list[Phase] = []
    if call.prompt_tokens > 0:
        flops = 2 * (weights / BYTES_PER_PARAM) * call.prompt_tokens * call.sequences
        out.append((flops, profile.compute, 1.0))
    if call.output_tokens > 0:
        steps = call.output_tokens
        active = (call.total_output_tokens or call.sequences * steps) / steps  # mean, a step
        cache = active * call.kv_bytes_per_token * (call.prompt_tokens + steps / 2)
        rate, share = decode_rate(weights, profile, sequences=active, cache_bytes=cache)
        out.append((float(steps), rate, share))
    return tuple(out)


def decode_rate(
    weights: float, profile: Profile, *, sequences: float = 1, cache_bytes: float = 0.0
) -> tuple[float, float]:
    """Decode steps per second of ``sequences`` sequences of one context, alone on the device,
    and the share of the device that takes (see "Batched calls" in the module docstring).

    Each step reads ``weights`` and ``cache_bytes`` (every sequence's KV cache) and computes
    each sequence but the first at the prefill rate; ``stream_cap`` caps the steps."""
    step_s = (weights + cache_bytes) / profile.bandwidth
    if sequences > 1:  # (a mean over the steps need not be whole)
        step_s += (sequences - 1) * 2 * (weights / BYTES_PER_PARAM) / profile.compute
    rate = min(profile.stream_cap, 1 / step_s)
    return rate, rate * step_s


_EPS = 1e-9


class Fluid:
    """Streams sharing the device; advanced from event to event (see the module docstring)."""

    def __init__(self) -> None:
        # Per running stream: its phases, the current one, and the work left in it.
        self._phases: dict[int, tuple[Phase, ...]] = {}
        self._index: dict[int, int] = {}
        self._left: dict[int, float] = {}
        self._factor: float | None = None  # cached until a stream starts or changes phase

    def start(self, key: int, phases: tuple[Phase, ...]) -> bool:
        """Start a stream; False if it has no work at all (it is done at once)."""
        if not phases:
            return False
        self._phases[key], self._index[key], self._left[key] = phases, 0, phases[0][0]
        self._factor = None
        return True

    def stop(self, key: int) -> float:
        """Take a stream off the device before it ends; returns the work left in its current
        phase (a server's batch whose sequences change mid-phase is restarted so)."""
        left = self._left.pop(key)
        del self._phases[key], self._index[key]
        self._factor = None
        return left

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
    resident: Sequence[str] = (),
) -> Timing:
    """Run ``plan`` in the model, by dataflow as the engine does (see the module docstring).

    ``calls[k]`` are stage k's calls in the order the plan was made from (its models are
    ``[c.model for c in calls[k]]``); ``resident`` models are loaded when the run starts (a
    plan made mid-run). Raises ValueError for a plan that leaves calls unrun, loads a resident
    model, or can never fit its budget.
    """
    return simulate_waves(wave_specs(plan), calls, sizes, profile, resident=resident)


def simulate_waves(
    waves: Sequence[WaveSpec],
    calls: Stages,
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    resident: Sequence[str] = (),
) -> Timing:
    """:func:`simulate_plan` on waves already in the simulation's form."""
    return _PlanSimulation(waves, calls, sizes, profile, resident=resident).go()


def simulate_prefix(
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
    run = _PlanSimulation(
        waves, calls, sizes, profile, partial=True, release=release, resident=resident
    )
    return run.go(), run.relaxed


class _PlanSimulation:
    """One simulated execution of a wave plan (see "Execution" in the module docstring).

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
        partial: bool = False,
        release: bool = False,
        resident: Sequence[str] = (),
    ) -> None:
        self.sizes, self.profile = sizes, profile
        self.n_waves = len(waves)
        self.wave_stage = [wave.stage for wave in waves]
        # Residencies: model, the wave whose unloads end it (None: kept to the end), calls left.
        self.model: list[str] = []
        self.until: list[int | None] = []
        self.left: list[int] = []
        self.queue: list[tuple[int, int]] = []  # (residency, wave) in load order
        # Calls in plan order: spec, residency, stage, wave.
        self.calls: list[tuple[CallSpec, int, int, int]] = []
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
                self.stage_calls[wave.stage] += 1
        self.released = set(holder.values()) if partial and release else set()
        self.relaxed = False
        for r in self.released:
            self.until[r] = len(waves)
        if any(pending) and not partial:
            raise ValueError("the plan leaves calls unrun")

    def go(self) -> Timing:
        sizes, profile = self.sizes, self.profile
        budget = profile.memory_bytes
        queues: dict[str, deque[int]] = {}
        for i, (call, *_) in enumerate(self.calls):
            queues.setdefault(call.model, deque()).append(i)
        state = [_LOADED] * self.initial + [_WAITING] * (len(self.model) - self.initial)
        # model -> its residency now loading or loaded
        holding: dict[str, int] = {self.model[r]: r for r in range(self.initial)}
        running: set[str] = set()
        fluid = Fluid()
        loading: tuple[int, float, float] | None = None  # residency, start, end
        t = busy_s = load_s = 0.0
        used = sum(sizes[model] for model in holding)
        next_load = calls_done = 0
        began: dict[int, float] = {}
        spans: list[Span] = []

        def finish(i: int) -> None:
            nonlocal calls_done
            call, residency, stage, w = self.calls[i]
            running.discard(call.model)
            self.left[residency] -= 1
            self.stage_calls[stage] -= 1
            calls_done += 1
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
                    r, _ = self.queue[next_load]
                    model = self.model[r]
                    if model not in holding and used + sizes[model] <= budget:
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
                    waiting.popleft()
                    began[i] = t
                    if fluid.start(i, phases(call, sizes[model], profile)):
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
