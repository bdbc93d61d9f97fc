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

Sharing. Streams active at the same time on one device share it as a fluid (:class:`Fluid`):
stream i alone would use a fraction ``f_i`` of it (while decoding, its steps/s times a step's
seconds of device work: ``rate·bytes / bandwidth`` for one sequence; 1 while prefilling, which
saturates compute). If ``Σf ≤ 1`` every stream runs at its solo rate, else all
slow down by ``1/Σf``. Rates are constant between events (a stream starts, changes phase or
ends), so the simulation jumps from event to event and is exact, not time-stepped. Loads do not
take a share: they are disk- and bus-bound.

Several devices. A machine with several GPUs (or a GPU and its RAM, or the nodes of a cluster)
is several devices, each with its own memory and its own profile: a plan places each model on
one (:class:`WaveSpec` ``placed``; a model keeps its device while it stays resident), and

- each device is its own fluid: calls of models on different devices never slow each other,
  since each reads its own memory at its own bandwidth (``Σf`` is taken per device);
- each device has its own budget: a load waits for room on its own device, whatever room the
  others have;
- a call and a load are timed with the profile of their model's device (a model placed in RAM
  decodes at RAM speed and starts without a CUDA context);
- a model split across devices (llama.cpp's ``tensor_split``, for a model that fits on none
  alone) holds its share of bytes on each (``shares``) and is timed on its main device, the one
  that holds most of it. With a split by layers each device reads its own layers in turn, so a
  token still costs ``Σ share_d / bandwidth_d``: the main device's ``bytes / bandwidth`` when
  the devices are alike, and the split adds no bandwidth. What is left out is that the other
  devices are busy for their shares of each token: calls there are not slowed by it. A
  simplification for a case the planner makes only when nothing else fits.

Loads still come one at a time, in plan order, across all devices: the engine asks for them so
(:mod:`localmoa.runtime.engine`), and on one machine the files come off one disk, whose
bandwidth a second concurrent load would only share. So a load for a device with room waits
behind a load for a full device that comes before it in the plan. (The nodes of a cluster have
a disk each; as long as the engine asks one load at a time, so does this model.)

Execution. :func:`simulate_plan` runs a plan (waves W_1..W_n, each with its resident set, its
loads L_w in order, its unloads U_w and the calls of its stage it runs) as localmoa's engine
does, by *dataflow*:

1. loads happen one at a time in plan order (L_1 in order, then L_2...); a load of X starts when
   the previous load has finished and the models loaded now plus X fit the budget, on each
   device X is placed on (and X's previous residency, if any, has been unloaded);
2. a model Y of U_w is unloaded (instantly) as soon as each of its calls in waves before w has
   finished, and not waited for otherwise; what is left at the end is unloaded for free;
3. a call of stage s on model m in wave w starts when m's load for wave w has finished (or m was
   carried from the wave before), every call of stage s-1 has finished (its references), and m
   runs no other call (one model's calls run one at a time, in plan order: wave, then call
   order);
4. concurrent calls on one device share it as above.

So a wave's second load overlaps its first model's calls, and the next wave's loads start as soon
as memory is free rather than when the wave's last call ends. No device's budget is ever exceeded
by construction (the simulation checks it).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from localmoa.planning.fewest_loads import Plan, Wave
from localmoa.planning.profiles import PROFILES, Profile

__all__ = [
    "BYTES_PER_PARAM",
    "PROFILES",
    "CallSpec",
    "DeviceProfiles",
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
    placed: tuple[tuple[str, str], ...] = ()
    """(model, device) of every resident model, sorted: the device that runs it (a split
    model's main device). Empty: every model on one device, the first (see "Several devices"
    in the module docstring)."""
    shares: tuple[tuple[str, str, int], ...] = ()
    """(model, device, bytes) of each device a split model spans, sorted; other models hold
    all their bytes on their device."""


def wave_specs(plan: Plan) -> list[WaveSpec]:
    """``plan``'s waves as the simulation reads them, with each model's device from the
    waves' ``devices`` (left empty for a plan on one device: the first). Raises ValueError for
    a model listed on several devices without its shares."""
    used = {d for w in plan.waves for d, models in w.devices.items() if models}
    first = next(iter(plan.devices), None)
    placing = len(used) > 1 or bool(first is not None and used - {first})
    out = []
    for w in plan.waves:
        placed: tuple[tuple[str, str], ...] = ()
        shares: tuple[tuple[str, str, int], ...] = ()
        if placing:
            placed, shares = _placement(w)
        out.append(
            WaveSpec(
                w.layer - 1,
                frozenset(w.resident),
                tuple(w.load),
                tuple(w.unload),
                frozenset(w.runs),
                placed,
                shares,
            )
        )
    return out


def _placement(
    wave: Wave,
) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str, int], ...]]:
    """A wave's ``placed`` and ``shares`` from its ``devices`` and ``shares`` (a split model's
    main device holds most of it; of equal shares, the first)."""
    on: dict[str, list[str]] = {}
    for device, models in wave.devices.items():
        for model in models:
            on.setdefault(model, []).append(device)
    placed, shares = [], []
    for model, where in on.items():
        if len(where) == 1 and model not in wave.shares:
            placed.append((model, where[0]))
            continue
        parts = wave.shares.get(model)
        if not parts:
            raise ValueError(f"{model!r} is on devices {where} with no shares of its bytes")
        placed.append((model, max(parts.items(), key=lambda p: p[1])[0]))
        shares += [(model, device, part) for device, part in parts.items()]
    return tuple(sorted(placed)), tuple(sorted(shares))


DeviceProfiles = Mapping[str, Profile]
"""Each device's profile by name, in order (the first is where unplaced models go); its
``memory_bytes`` is the bytes a plan may use on that device."""


def simulate_plan(
    plan: Plan,
    calls: Stages,
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    resident: Sequence[str] = (),
    devices: DeviceProfiles | None = None,
) -> Timing:
    """Run ``plan`` in the model, by dataflow as the engine does (see the module docstring).

    ``calls[k]`` are stage k's calls in the order the plan was made from (its models are
    ``[c.model for c in calls[k]]``); ``resident`` models are loaded when the run starts (a
    plan made mid-run). ``profile`` is the one device's; with ``devices`` each model runs on
    the device its waves place it on, timed by that device's profile (``profile`` is then not
    read). Raises ValueError for a plan that leaves calls unrun, loads a resident model, places
    a model on no device of ``devices`` or moves it while resident, or can never fit a budget.
    """
    return simulate_waves(
        wave_specs(plan), calls, sizes, profile, resident=resident, devices=devices
    )


def simulate_waves(
    waves: Sequence[WaveSpec],
    calls: Stages,
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    resident: Sequence[str] = (),
    devices: DeviceProfiles | None = None,
) -> Timing:
    """:func:`simulate_plan` on waves already in the simulation's form."""
    return _PlanSimulation(waves, calls, sizes, profile, resident=resident, devices=devices).go()


def simulate_prefix(
    waves: Sequence[WaveSpec],
    calls: Stages,
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    release: bool,
    resident: Sequence[str] = (),
    devices: DeviceProfiles | None = None,
) -> tuple[Timing, bool]:
    """The first waves of a plan, calls not placed yet left out; with ``release``, as if the
    next wave unloaded everything (the most memory any continuation could free), else as if
    every later wave kept it (the least). Also says whether that choice changed anything: an
    unload it added came before the last load started."""
    run = _PlanSimulation(
        waves,
        calls,
        sizes,
        profile,
        partial=True,
        release=release,
        resident=resident,
        devices=devices,
    )
    return run.go(), run.relaxed


class _PlanSimulation:
    """One simulated execution of a wave plan (see "Execution" in the module docstring).

    A *residency* is one stay of a model: from the wave that loads it to the wave that unloads
    it (or the end). Loads are residencies in plan order; each call belongs to the residency of
    its model in its wave. A residency has one device that runs it and the bytes it holds on
    each device; with no ``devices`` there is one device, ``profile``'s.
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
        devices: DeviceProfiles | None = None,
    ) -> None:
        self.sizes = sizes
        self.n_waves = len(waves)
        self.wave_stage = [wave.stage for wave in waves]
        if devices is not None and not devices:
            raise ValueError("no devices to run the plan on")
        self.devices = list(devices or {"": profile})
        self.profiles = list(devices.values()) if devices else [profile]
        index = {name: d for d, name in enumerate(self.devices)} if devices else None
        # Residencies: model, the wave whose unloads end it (None: kept to the end), calls left,
        # the device that runs it, (device, bytes) it holds.
        self.model: list[str] = []
        self.until: list[int | None] = []
        self.left: list[int] = []
        self.main: list[int] = []
        self.holds: list[tuple[tuple[int, int], ...]] = []
        self.queue: list[tuple[int, int]] = []  # (residency, wave) in load order
        # Calls in plan order: spec, residency, stage, wave.
        self.calls: list[tuple[CallSpec, int, int, int]] = []
        self.stage_calls = [0] * len(calls)
        holder: dict[str, int] = {}
        where = _Where(waves, sizes, index)

        def stay(model: str, wave: int | None) -> int:
            holds: tuple[tuple[int, int], ...]
            if index is None:
                main, holds = 0, ((0, sizes[model]),)
            else:
                main, holds = where(model, wave)
            holder[model] = len(self.model)
            self.model.append(model)
            self.until.append(None)
            self.left.append(0)
            self.main.append(main)
            self.holds.append(holds)
            return holder[model]

        for model in resident:  # loaded before the run: residencies with no load
            first = waves[0] if waves else None
            stay(model, 0 if first and model in first.resident else None)
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
                self.queue.append((stay(model, w), w))
            if set(holder) != wave.resident:
                raise ValueError(
                    f"wave {w + 1}: resident {sorted(wave.resident)} is not what its loads and "
                    f"unloads leave ({sorted(holder)})"
                )
            if index is not None and wave.placed:
                for model, r in holder.items():
                    if where(model, w)[0] != self.main[r]:
                        raise ValueError(
                            f"wave {w + 1} moves {model!r} to another device while it is "
                            "resident: a model keeps its device until it is unloaded"
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
        sizes, profiles = self.sizes, self.profiles
        budgets = [p.memory_bytes for p in profiles]
        queues: dict[str, deque[int]] = {}
        for i, (call, *_) in enumerate(self.calls):
            queues.setdefault(call.model, deque()).append(i)
        state = [_LOADED] * self.initial + [_WAITING] * (len(self.model) - self.initial)
        # model -> its residency now loading or loaded
        holding: dict[str, int] = {self.model[r]: r for r in range(self.initial)}
        running: set[str] = set()
        fluids = [Fluid() for _ in profiles]
        one = fluids[0] if len(fluids) == 1 else None
        loading: tuple[int, float, float] | None = None  # residency, start, end
        t = busy_s = load_s = 0.0
        used = [0] * len(profiles)
        for r in range(self.initial):
            for d, held in self.holds[r]:
                used[d] += held
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
            nonlocal loading, next_load
            moved = True
            while moved:
                moved = False
                for model, r in list(holding.items()):
                    if state[r] == _LOADED and self.until[r] is not None and not self.left[r]:
                        self.relaxed |= r in self.released and next_load < len(self.queue)
                        state[r] = _GONE
                        del holding[model]
                        for d, held in self.holds[r]:
                            used[d] -= held
                        w = self.until[r]
                        stage = self.wave_stage[w] if w is not None and w < self.n_waves else -1
                        spans.append(Span("unload", model, w if w is not None else -1, stage, t, t))
                if loading is None and next_load < len(self.queue):
                    r, _ = self.queue[next_load]
                    model = self.model[r]
                    holds = self.holds[r]
                    d, held = holds[0]  # (the others only for a split model: rare)
                    if (
                        model not in holding
                        and used[d] + held <= budgets[d]
                        and (len(holds) == 1 or all(used[e] + b <= budgets[e] for e, b in holds))
                    ):
                        for d, held in holds:
                            used[d] += held
                            if used[d] > budgets[d]:  # by construction never; a guard
                                raise AssertionError(f"{used[d]} bytes over a {budgets[d]} budget")
                        state[r], holding[model] = _LOADING, r
                        seconds = load_seconds(sizes[model], profiles[self.main[r]])
                        loading = (r, t, t + seconds)
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
                    device = self.main[r]
                    if fluids[device].start(i, phases(call, sizes[model], profiles[device])):
                        running.add(model)
                    else:
                        finish(i)
                    moved = True

        while True:
            settle()
            if calls_done == len(self.calls) and loading is None and next_load == len(self.queue):
                break
            until_load = loading[2] - t if loading is not None else math.inf
            if one is not None:  # (the searches simulate a great many one-device plans)
                dt = min(one.next_dt(), until_load)
                busy = one.busy()
            else:
                dt = min(min(fluid.next_dt() for fluid in fluids), until_load)
                busy = any(fluid.busy() for fluid in fluids)
            if math.isinf(dt):
                raise ValueError(self._stuck(next_load, used, budgets))
            if busy:
                busy_s += dt
            if one is not None:
                done = one.advance(dt)
            else:
                done = sorted(i for fluid in fluids for i in fluid.advance(dt))
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

    def _stuck(self, next_load: int, used: list[int], budgets: list[int]) -> str:
        """Why the next load can never start: the first device it does not fit on."""
        r = self.queue[next_load][0]
        full = next(d for d, held in self.holds[r] if used[d] + held > budgets[d])
        on = f" on {self.devices[full]!r}" if self.devices[full] else ""
        return (
            f"the plan cannot go on: {self.model[r]!r} never fits beside what is loaded{on} "
            f"within {budgets[full]} bytes"
        )


class _Where:
    """Where wave ``w`` places a model: the device that runs it (its index in the devices) and
    the bytes it holds on each. No wave (a model resident before the run and unloaded by the
    first wave), no placement or no devices: all of it on the first device."""

    def __init__(
        self,
        waves: Sequence[WaveSpec],
        sizes: Mapping[str, int],
        index: Mapping[str, int] | None,
    ) -> None:
        self.waves, self.sizes, self.index = waves, sizes, index
        self.cache: dict[int, tuple[dict[str, str], dict[str, list[tuple[str, int]]]]] = {}

    def __call__(self, model: str, w: int | None) -> tuple[int, tuple[tuple[int, int], ...]]:
        index = self.index
        if index is None or w is None or not self.waves[w].placed:
            return 0, ((0, self.sizes[model]),)
        wave = self.waves[w]
        if w not in self.cache:
            split: dict[str, list[tuple[str, int]]] = {}
            for name, on, part in wave.shares:
                split.setdefault(name, []).append((on, part))
            self.cache[w] = dict(wave.placed), split
        placed, split = self.cache[w]
        device = placed.get(model)
        if device is None:
            raise ValueError(f"wave {w + 1} places {model!r} on no device")
        for name in (device, *(d for d, _ in split.get(model, ()))):
            if name not in index:
                raise ValueError(f"wave {w + 1} places {model!r} on {name!r}, not a device")
        if model in split:
            return index[device], tuple((index[d], part) for d, part in split[model])
        return index[device], ((index[device], self.sizes[model]),)


_WAITING, _LOADING, _LOADED, _GONE = range(4)
