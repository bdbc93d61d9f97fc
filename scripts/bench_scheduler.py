"""Scheduler benchmark: localmoa's plan against the optimum and the policies users run today.

    python scripts/bench_scheduler.py [--json] [--timeline NAME] [--max-nodes N] [--min-gain G]
    python scripts/bench_scheduler.py --batch [N] [--json]

A fixed-seed suite of MoA runs (1-3 layers, 2-6 proposers, an aggregator) built from real 4-bit
model footprints, on every hardware profile of localmoa.planning.profiles. Each run is timed, in
the cost model (localmoa.planning.timing), under these policies (scripts/policies.py holds the
ones that are not localmoa's):

- ``localmoa``: as shipped: :func:`localmoa.planning.plan_run` with the default settings
  (the fewest-loads plan refined for time, a plan with extra loads only when estimated at least
  ``--min-gain``, by default ``settings.min_gain``, faster), which knows the machine's profile,
  not the answer lengths: every call is assumed to write ``max_tokens``; executed by dataflow
  as localmoa's engine does (a load starts as soon as memory allows, a call as soon as its
  model and references are ready);
- ``localmoa_loads``: the fewest-loads plan unrefined (``settings.plan_for = "loads"``);
- ``localmoa_waves``: the fewest-loads plan executed wave by wave (the executor before
  dataflow);
- ``localmoa_misjudged``: the refinement given the wrong machine: every profile's plan refined
  with desktop-24g speeds (a CPU planned as a GPU, a GPU as another GPU): what a wrong guess
  of the hardware costs;
- ``one_at_a_time``: one model resident, calls in order (llama-swap's default group);
- ``reactive``: Ollama's scheduler rules, requests sent a layer at a time;
- ``optimal``: the fastest wave plan under dataflow execution, knowing every answer's length
  (branch and bound; only for runs with at most 6 distinct models, and "—" where the search
  gives up);
- ``optimal_waves``: the fastest wave plan under wave-by-wave execution (Dijkstra).

Tokens: every layer-1 call reads a 200-token prompt; a later layer's call and the aggregator read
the prompt plus every answer of the layer before (the references); each call writes T tokens,
drawn uniformly from 256-512. The table shows makespans (seconds) and loads; the summary gives,
per profile, the median ratio of localmoa to one_at_a_time, the median and largest ratio to
reactive and the largest to optimal; then the worst runs.

``--timeline NAME`` prints one run's plan and the simulated timelines of
localmoa and reactive.

``--batch [N]`` compares instead N prompts (default 16) through each of the first
``BATCH_PER_PROFILE`` ensembles of every profile: each prompt with answer lengths of its own,
drawn as above, and every call reading its KV cache (f16, each model's own shape) at each
decode step and its file's weights. Memory: each model holds an f16 KV cache of ``CTX`` = 4096
tokens per sequence (:func:`kv_per_token`; 128 KiB a token for llama3.1:8b and mistral:7b,
56 KiB for qwen2.5:7b: 512 and 224 MiB a sequence). Policies:

- ``batch``: ``localmoa batch``: the prompts in chunks; in a chunk, each stage's calls of one
  model are one batched call (:class:`~localmoa.planning.timing.CallSpec` ``sequences``),
  or, where the KV of that many sequences does not fit beside the model, groups of as many as
  fit, one after another; each model's size holds the KV of its largest group. A chunk is
  planned as ``plan_run`` does (the fewest loads, refined for time), from ``max_tokens``,
  with the models the chunk before left loaded; chunks of N, N/2, ... 1 prompts are planned
  and the one estimated fastest is taken (the table's "chunk");
- ``batch_uniform``: the same, but a chunk fits only where every model fits all its calls of a
  stage as one group (no groups that fit): smaller chunks where one model's KV is large;
- ``loop``: today's ``localmoa run`` once per prompt: each plans alone, starts cold;
- ``ollama_np1``: Ollama serving N MoA clients that start together (each sends its layers as
  ``reactive`` does), ``OLLAMA_NUM_PARALLEL=1``: the default since ollama/ollama#11330;
- ``ollama_np4``: the same with 4 parallel slots where a model with 4 contexts fits, else 1
  (the default before #11330); a runner decodes its slots together, joining as slots free;
- ``ollama_serial``: the prompts one after another through one client, models kept loaded
  between prompts, ``OLLAMA_NUM_PARALLEL=1``.

The summary gives, per profile, the median and worst (largest) ratio of the batch's makespan
to each other policy's, and every policy's loads (median and most).

``scripts/bench_devices.py`` plans this suite on 1 × 24 GiB, 2 × 24 GiB and 1 × 48 GiB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))  # policies.py, beside this file

from policies import (
    MAX_OPTIMAL_NODES,
    PolicyResult,
    fewest_loads,
    one_at_a_time,
    optimal,
    optimal_waves,
    reactive,
    reactive_clients,
    wave_by_wave,
)

from localmoa.config import Settings
from localmoa.errors import BudgetError
from localmoa.hardware import Device
from localmoa.planning import PlanPolicy, plan_run
from localmoa.planning.fewest_loads import Plan as PlanModel
from localmoa.planning.fewest_loads import make_plan
from localmoa.planning.profiles import PROFILES, Profile
from localmoa.planning.refine import MAX_MODELS, MAX_NODES, NODES_PER_SECOND, SLACK
from localmoa.planning.search import search
from localmoa.planning.timing import (
    CallSpec,
    Span,
    Stages,
    WaveSpec,
    simulate_plan,
    simulate_waves,
    wave_specs,
)
from localmoa.runtime.moa import Call

MiB = 1 << 20
GB = 10**9
SEED = 20240611
PER_PROFILE = 12
PROMPT_TOKENS = 200
OUTPUT_TOKENS = (256, 512)
CTX = 4096

# Q4_K_M file sizes as Ollama lists them, and the shape that sets the KV cache: (GB, layers,
# KV heads, head dim). Sizes: the model table of ollama/ollama's README ("Llama 3.2 3B 2.0GB",
# "Llama 3.1 8B 4.7GB", "Phi 4 14B 9.1GB", "Gemma 2 9B 5.5GB", "Mistral 7B 4.1GB",
# "Llama 3.3 70B 43GB"); qwen2.5 and phi3.5 from their pages on ollama.com/library
# (qwen2.5:3b 1.9GB, :7b 4.7GB, :14b 9.0GB; phi3.5 2.2GB). Shapes: each model's config.json
# (num_hidden_layers, num_key_value_heads, head_dim).
MODELS: dict[str, tuple[float, int, int, int]] = {
    "llama3.2:3b": (2.0, 28, 8, 128),
    "qwen2.5:3b": (1.9, 36, 2, 128),
    "phi3.5": (2.2, 32, 32, 96),
    "qwen2.5:7b": (4.7, 28, 4, 128),
    "llama3.1:8b": (4.7, 32, 8, 128),
    "mistral:7b": (4.1, 32, 8, 128),
    "gemma2:9b": (5.5, 42, 8, 256),
    "qwen2.5:14b": (9.0, 48, 8, 128),
    "phi4": (9.1, 40, 10, 128),
    "llama3.3:70b": (43.0, 80, 8, 128),
}


def footprint(name: str) -> int:
    """File bytes + an f16 KV cache at 4096 context: 2·layers·kv_heads·head_dim·ctx·2 bytes
    (the formula Ollama predicts with, scheduler-anchors.md §1.2)."""
    gb, layers, kv_heads, head_dim = MODELS[name]
    return int(gb * GB) + 2 * layers * kv_heads * head_dim * CTX * 2


SIZES = {name: footprint(name) for name in MODELS}


@dataclass(frozen=True)
class Instance:
    """One MoA run on one machine."""

    name: str
    profile: Profile
    calls: list[list[CallSpec]]


def _draw(rng: random.Random, profile: Profile) -> str:
    """A model, drawn again while it is bigger than the profile's budget."""
    while True:
        name = rng.choice(sorted(MODELS))
        if SIZES[name] <= profile.memory_bytes:
            return name


def _agents(rng: random.Random, profile: Profile, count: int) -> list[str]:
    """Distinct models where the pool allows; now and then one model twice (two temperatures
    of one model are a common MoA recipe)."""
    agents: list[str] = []
    while len(agents) < count:
        name = _draw(rng, profile)
        if name not in agents or rng.random() < 0.1:
            agents.append(name)
    return agents


def _calls(rng: random.Random, layers: list[list[str]], aggregator: str) -> list[list[CallSpec]]:
    stages: list[list[CallSpec]] = []
    references = 0
    for models in [*layers, [aggregator]]:
        stage = [
            CallSpec(m, PROMPT_TOKENS + references, rng.randint(*OUTPUT_TOKENS)) for m in models
        ]
        references = sum(c.output_tokens for c in stage)
        stages.append(stage)
    return stages


def suite(seed: int = SEED, per_profile: int = PER_PROFILE) -> list[Instance]:
    """The benchmark's runs: ``per_profile`` on every profile, all from one seed."""
    rng = random.Random(seed)
    out = []
    for profile in PROFILES.values():
        for i in range(per_profile):
            depth, width = rng.randint(1, 3), rng.randint(2, 6)
            first = _agents(rng, profile, width)
            same = rng.random() < 0.7  # most ensembles reuse their proposers in every layer
            layers = [
                first if same or k == 0 else _agents(rng, profile, width) for k in range(depth)
            ]
            aggregator = rng.choice(first) if rng.random() < 0.5 else _draw(rng, profile)
            name = f"{profile.name}/{i:02}-L{depth}xP{width}"
            out.append(Instance(name, profile, _calls(rng, layers, aggregator)))
    return out


POLICIES = (
    "localmoa",
    "localmoa_loads",
    "localmoa_waves",
    "localmoa_misjudged",
    "one_at_a_time",
    "reactive",
    "optimal",
    "optimal_waves",
)


MIN_GAIN = Settings().min_gain
"""The margin extra loads must pay in the shipped plan (``--min-gain``)."""

PLANNING_S: list[float] = []
"""Seconds each shipped plan took to make (fewest loads, then the refinement)."""


def shipped(
    instance: Instance, speeds: Profile | None = None, *, min_gain: float = MIN_GAIN
) -> PolicyResult:
    """localmoa as shipped (see :func:`shipped_plan`), timed with the real calls."""
    began = time.perf_counter()
    plan = shipped_plan(instance, speeds, min_gain=min_gain)
    if speeds is None:
        PLANNING_S.append(time.perf_counter() - began)
    timing = simulate_plan(plan, instance.calls, SIZES, instance.profile)
    return PolicyResult(timing.makespan_s, timing.loads)


def shipped_plan(
    instance: Instance,
    speeds: Profile | None = None,
    *,
    min_gain: float = MIN_GAIN,
    devices: Sequence[Device] | None = None,
    plan_for: Literal["time", "loads"] = "time",
) -> PlanModel:
    """The plan ``localmoa run`` makes on ``speeds`` (the instance's own profile unless given),
    from what is known before the run: every call writing ``max_tokens``. With ``devices``,
    on those devices instead of the profile's memory, every model allowed to split
    (``scripts/bench_devices.py``)."""
    calls, profile = instance.calls, instance.profile
    stages = [
        [
            Call(k + 1, i, c.model, None, 0.7, OUTPUT_TOKENS[1], k == len(calls) - 1)
            for i, c in enumerate(stage)
        ]
        for k, stage in enumerate(calls)
    ]
    policy = PlanPolicy(speeds or profile, plan_for, min_gain)
    prompt = "x" * (PROMPT_TOKENS * 4)
    return plan_run(
        stages,
        SIZES,
        profile.memory_bytes,
        policy,
        prompt=prompt,
        devices=devices,
        splittable=SIZES if devices else (),
    )


def run(
    instance: Instance, *, max_nodes: int = MAX_OPTIMAL_NODES, min_gain: float = MIN_GAIN
) -> dict[str, PolicyResult | None]:
    """Every policy on one instance."""
    args = (instance.calls, SIZES, instance.profile)
    return {
        "localmoa": shipped(instance, min_gain=min_gain),
        "localmoa_loads": fewest_loads(*args),
        "localmoa_waves": fewest_loads(*args, dataflow=False),
        "localmoa_misjudged": shipped(instance, PROFILES["desktop-24g"], min_gain=min_gain),
        "one_at_a_time": one_at_a_time(*args),
        "reactive": reactive(*args),
        "optimal": optimal(*args, max_nodes=max_nodes),
        "optimal_waves": optimal_waves(*args),
    }


# --- a batch of prompts ------------------------------------------------------------------------

BATCH = 16
BATCH_PER_PROFILE = 4
"""Ensembles per profile in the batch comparison: the suite's first on each (``--per-profile``
sets it; all 12 take about six minutes of one core)."""
OLLAMA_OLD_PARALLEL = 4
"""``OLLAMA_NUM_PARALLEL`` where memory allowed before ollama/ollama#11330 (July 2025) made 1
the default (scheduler-anchors.md §1.1)."""


def kv_per_token(name: str) -> int:
    """f16 KV-cache bytes per token of context: 2·layers·kv_heads·head_dim·2 (scheduler-anchors
    §1.2). 128 KiB for llama3.1:8b and mistral:7b, 56 KiB for qwen2.5:7b (GQA with 4 KV heads):
    512 and 224 MiB per 4096-token sequence."""
    _, layers, kv_heads, head_dim = MODELS[name]
    return 2 * layers * kv_heads * head_dim * 2


def file_bytes(name: str) -> int:
    return int(MODELS[name][0] * GB)


def sizes_with(sequences: dict[str, int]) -> dict[str, int]:
    """Each model's file plus its KV cache at ``CTX`` tokens for each of its sequences."""
    return {m: file_bytes(m) + n * kv_per_token(m) * CTX for m, n in sequences.items()}


def prompts(instance: Instance, count: int) -> list[list[list[CallSpec]]]:
    """``count`` prompts through ``instance``'s ensemble: the same models, each prompt with
    answer lengths of its own (drawn as the suite draws them, from a seed per instance)."""
    rng = random.Random(f"{SEED}/{instance.name}")
    layers = [[c.model for c in stage] for stage in instance.calls]
    out = []
    for _ in range(count):
        stages, references = [], 0
        for models in layers:
            stage = [
                CallSpec(
                    m,
                    PROMPT_TOKENS + references,
                    rng.randint(*OUTPUT_TOKENS),
                    kv_bytes_per_token=kv_per_token(m),
                    weight_bytes=file_bytes(m),
                )
                for m in models
            ]
            references = sum(c.output_tokens for c in stage)
            stages.append(stage)
        out.append(stages)
    return out


def as_planned(prompt: Stages) -> list[list[CallSpec]]:
    """A prompt's calls as known before the run: every call writes ``max_tokens`` and a later
    layer reads references of that length (as :func:`localmoa.planning.refine.calls_as_planned`
    makes them)."""
    out, references = [], 0
    for stage in prompt:
        out.append(
            [
                c._replace(prompt_tokens=PROMPT_TOKENS + references, output_tokens=OUTPUT_TOKENS[1])
                for c in stage
            ]
        )
        references = OUTPUT_TOKENS[1] * len(stage)
    return out


def grouped(chunk: Sequence[Stages], most: Mapping[str, int] | None = None) -> list[list[CallSpec]]:
    """The chunk's stages as a batch makes them: per stage, each model's calls of every prompt
    one group (``localmoa.runtime.moa.batched``), or with ``most``, groups of at most
    ``most[model]`` calls, as even as can be, run one after another. A group's sequences read
    their mean prompt (the prefill's FLOPs are exact) and each leaves when its answer ends."""
    out = []
    for k in range(len(chunk[0])):
        by_model: dict[str, list[CallSpec]] = {}
        for prompt in chunk:
            for call in prompt[k]:
                by_model.setdefault(call.model, []).append(call)
        stage = []
        for model, calls in by_model.items():
            parts = -(-len(calls) // most[model]) if most else 1
            for part in range(parts):
                group = calls[part::parts]
                stage.append(
                    group[0]._replace(
                        prompt_tokens=round(statistics.fmean(c.prompt_tokens for c in group)),
                        output_tokens=max(c.output_tokens for c in group),
                        sequences=len(group),
                        total_output_tokens=sum(c.output_tokens for c in group),
                    )
                )
        out.append(stage)
    return out


def fitting(profile: Profile) -> dict[str, int]:
    """The most sequences of each model whose KV fits ``profile`` beside the model's file."""
    return {
        m: (profile.memory_bytes - file_bytes(m)) // (kv_per_token(m) * CTX)
        for m in MODELS
        if SIZES[m] <= profile.memory_bytes
    }


def group_sizes(stages: Stages) -> dict[str, int]:
    """Each model's memory for a batch: its file and the KV of its largest group."""
    most: dict[str, int] = {}
    for stage in stages:
        for c in stage:
            most[c.model] = max(most.get(c.model, 0), c.sequences)
    return sizes_with(most)


def plan_groups(
    planned: Stages,
    sizes: dict[str, int],
    profile: Profile,
    *,
    resident: tuple[str, ...] = (),
    min_gain: float = MIN_GAIN,
) -> tuple[list[WaveSpec], float]:
    """The plan ``localmoa batch`` makes for one chunk, and its estimate: the fewest loads,
    then refined for time as :func:`localmoa.planning.refine.refine` does, with each group
    timed as a batched call. Raises BudgetError when a model with its group's KV does not fit.
    """
    plan = make_plan(
        [[c.model for c in s] for s in planned], sizes, profile.memory_bytes, resident=resident
    )
    waves = wave_specs(plan)
    estimate = simulate_waves(waves, planned, sizes, profile, resident=resident).makespan_s
    nodes = min(MAX_NODES, int(NODES_PER_SECOND * estimate))
    if len(sizes) > MAX_MODELS or nodes <= 0:
        return waves, estimate
    found = search(
        planned,
        sizes,
        profile,
        waves,
        max_nodes=nodes,
        slack=SLACK,
        min_gain=min_gain,
        resident=resident,
    )
    return found.waves, found.makespan_s


@dataclass(frozen=True)
class BatchResult:
    """The batch of prompts as localmoa runs it, in chunks of ``chunk`` prompts."""

    makespan_s: float
    loads: int
    chunk: int
    estimate_s: float
    """What the plans estimated, from ``max_tokens``: the chunk is chosen by it."""


def batch_in_chunks(
    instance: Instance,
    batch: list[list[list[CallSpec]]],
    chunk: int,
    *,
    min_gain: float,
    split: bool = True,
) -> BatchResult:
    """``batch`` in chunks of ``chunk`` prompts, one after another; each chunk planned when the
    one before is done, with what it left loaded (``plan_run``'s ``resident``). With ``split``,
    a model whose KV for all its calls of a stage does not fit makes them in groups that do."""
    profile = instance.profile
    most = fitting(profile) if split else None
    total = estimate = 0.0
    loads = 0
    resident: tuple[str, ...] = ()
    made: dict[tuple[int, tuple[str, ...]], tuple[list[WaveSpec], float]] = {}
    previous: dict[str, int] | None = None
    for first in range(0, len(batch), chunk):
        part = batch[first : first + chunk]
        planned = grouped([as_planned(p) for p in part], most)
        sizes = group_sizes(planned)
        if sizes != previous:
            resident = ()  # a chunk of another size: its models are sized anew
        key = (len(part), resident)
        if key not in made:
            made[key] = plan_groups(planned, sizes, profile, resident=resident, min_gain=min_gain)
        waves, estimated = made[key]
        timing = simulate_waves(waves, grouped(part, most), sizes, profile, resident=resident)
        total, estimate, loads = (
            total + timing.makespan_s,
            estimate + estimated,
            loads + timing.loads,
        )
        resident, previous = tuple(sorted(waves[-1].resident)), sizes
    return BatchResult(total, loads, chunk, estimate)


def localmoa_batch(
    instance: Instance,
    batch: list[list[list[CallSpec]]],
    *,
    min_gain: float = MIN_GAIN,
    split: bool = True,
) -> BatchResult:
    """``localmoa batch``: all prompts in one chunk, in chunks of half as many, and so on; of
    the chunk sizes that fit, the one estimated fastest."""
    results = []
    chunk = len(batch)
    while chunk >= 1:
        with contextlib.suppress(BudgetError):
            results.append(batch_in_chunks(instance, batch, chunk, min_gain=min_gain, split=split))
        chunk //= 2
    return min(results, key=lambda r: (r.estimate_s, -r.chunk))


def localmoa_loop(instance: Instance, batch: list[list[list[CallSpec]]]) -> PolicyResult:
    """Today's ``localmoa run`` once per prompt: each run plans alone (the same plan for every
    prompt of an ensemble, made from ``max_tokens``), starts cold and unloads at its end."""
    plan = shipped_plan(instance)
    runs = [simulate_plan(plan, prompt, SIZES, instance.profile) for prompt in batch]
    return PolicyResult(sum(r.makespan_s for r in runs), sum(r.loads for r in runs))


def ollama_parallel(models: set[str], profile: Profile) -> tuple[dict[str, int], dict[str, int]]:
    """Ollama's parallel slots before ollama/ollama#11330: 4 where the model with 4 contexts
    fits, else 1; with the sizes that takes."""
    slots = {
        m: OLLAMA_OLD_PARALLEL
        if sizes_with({m: OLLAMA_OLD_PARALLEL})[m] <= profile.memory_bytes
        else 1
        for m in models
    }
    return slots, sizes_with(slots)


BATCH_POLICIES = ("batch", "batch_uniform", "loop", "ollama_np1", "ollama_np4", "ollama_serial")


def run_batch(
    instance: Instance, count: int = BATCH, *, min_gain: float = MIN_GAIN
) -> dict[str, PolicyResult | BatchResult]:
    """``count`` prompts through ``instance``'s ensemble, under localmoa and Ollama."""
    batch = prompts(instance, count)
    profile = instance.profile
    models = {c.model for stage in instance.calls for c in stage}
    one = sizes_with(dict.fromkeys(models, 1))
    slots, parallel = ollama_parallel(models, profile)
    serial = [[stage for prompt in batch for stage in prompt]]
    return {
        "batch": localmoa_batch(instance, batch, min_gain=min_gain),
        "batch_uniform": localmoa_batch(instance, batch, min_gain=min_gain, split=False),
        "loop": localmoa_loop(instance, batch),
        "ollama_np1": reactive_clients(batch, one, profile),
        "ollama_np4": reactive_clients(batch, parallel, profile, num_parallel=slots),
        "ollama_serial": reactive_clients(serial, one, profile),
    }


def batch_report(count: int, per_profile: int, *, as_json: bool, min_gain: float) -> None:
    """The batch comparison: per instance, then per profile the median and worst ratios of
    the batch's makespan to each other policy's, and every policy's loads."""
    instances = [
        i
        for profile in PROFILES.values()
        for i in [i for i in suite() if i.profile is profile][:per_profile]
    ]
    rows = [(i, run_batch(i, count, min_gain=min_gain)) for i in instances]
    if as_json:
        doc = {
            "prompts": count,
            "instances": [
                {
                    "name": i.name,
                    "profile": i.profile.name,
                    "policies": {
                        k: {"makespan_s": round(v.makespan_s, 3), "loads": v.loads}
                        | ({"chunk": v.chunk} if isinstance(v, BatchResult) else {})
                        for k, v in r.items()
                    },
                }
                for i, r in rows
            ],
        }
        print(json.dumps(doc, indent=2))
        return
    print(f"{count} prompts per ensemble: seconds and loads; chunk: the batch's prompts per chunk")
    print(f"{'instance':24} {'chunk':>5} " + " ".join(f"{p:>15}" for p in BATCH_POLICIES))
    for i, r in rows:
        cells = " ".join(f"{r[p].makespan_s:9.1f} {r[p].loads:5}" for p in BATCH_POLICIES)
        batch = r["batch"]
        chunk = batch.chunk if isinstance(batch, BatchResult) else 0
        print(f"{i.name:24} {chunk:>5} {cells}")
    others = BATCH_POLICIES[1:]
    print("\nthe batch's makespan over each other policy's, per profile: median and worst")
    print(f"{'profile':12}" + "".join(f" {p:>15} {'worst':>6}" for p in others))
    for profile in PROFILES.values():
        mine = [r for i, r in rows if i.profile is profile]
        cells = ""
        for p in others:
            ratios = [r["batch"].makespan_s / r[p].makespan_s for r in mine]
            cells += f" {statistics.median(ratios):15.3f} {max(ratios):6.3f}"
        print(f"{profile.name:12}{cells}")
    print("\nloads for the whole batch, per profile: median and most")
    print(f"{'profile':12}" + "".join(f" {p:>15}" for p in BATCH_POLICIES))
    for profile in PROFILES.values():
        mine = [r for i, r in rows if i.profile is profile]
        cells = ""
        for p in BATCH_POLICIES:
            loads = [r[p].loads for r in mine]
            cells += f" {f'{statistics.median(loads):g} / {max(loads)}':>15}"
        print(f"{profile.name:12}{cells}")


# --- output ------------------------------------------------------------------------------------


def _cell(result: PolicyResult | None) -> str:
    return "—" if result is None else f"{result.makespan_s:8.1f} {result.loads:3}"


def _ratio(mine: PolicyResult | None, other: PolicyResult | None) -> float:
    assert mine is not None and other is not None
    return mine.makespan_s / other.makespan_s


def _loads(result: PolicyResult | None) -> int:
    assert result is not None
    return result.loads


def _known(
    rows: list[tuple[Instance, dict[str, PolicyResult | None]]], a: str, b: str
) -> list[float]:
    return [_ratio(r[a], r[b]) for _, r in rows if r[a] is not None and r[b] is not None]


def timeline(name: str) -> None:
    """One run's plan, then localmoa's and reactive's simulated timelines."""
    instance = next(i for i in suite() if i.name == name)
    calls, profile = instance.calls, instance.profile
    plan = shipped_plan(instance)
    print(f"{name}: budget {profile.memory_bytes / GB:.2f} GB")
    for k, stage in enumerate(calls):
        print(f"  stage {k + 1}: " + ", ".join(f"{c.model} ({c.output_tokens} tok)" for c in stage))
    for n, w in enumerate(plan.waves):
        print(
            f"  wave {n}: stage {w.layer} resident {w.resident} load {w.load} "
            f"unload {w.unload} ({w.bytes / GB:.1f} GB)"
        )
    dataflow = simulate_plan(plan, calls, SIZES, profile)
    waves = wave_by_wave(plan, calls, SIZES, profile)
    spans: list[Span] = []
    result = reactive(calls, SIZES, profile, spans=spans)
    print(
        "  sizes: "
        + ", ".join(
            f"{m} {SIZES[m] / GB:.2f} GB" for m in dict.fromkeys(c.model for s in calls for c in s)
        )
    )
    for title, seconds, rows in (
        ("localmoa (dataflow)", dataflow.makespan_s, dataflow.spans),
        ("localmoa (wave by wave)", waves.makespan_s, waves.spans),
        ("reactive", result.makespan_s, tuple(spans)),
    ):
        print(f"\n{title}: {seconds:.1f} s")
        for span in sorted(rows, key=lambda s: (s.start_s, s.kind != "load")):
            where = f"stage {span.stage + 1}" if span.stage >= 0 else ""
            print(f"  {span.start_s:8.2f} {span.end_s:8.2f}  {span.kind:4} {span.model:14} {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeline", metavar="NAME", help="print one run's timelines")
    parser.add_argument(
        "--max-nodes",
        type=int,
        default=MAX_OPTIMAL_NODES,
        help="partial plans the optimal search may simulate per run (default %(default)s)",
    )
    parser.add_argument(
        "--min-gain",
        type=float,
        default=MIN_GAIN,
        help="estimated gain extra loads must bring in the shipped plan (default %(default)s)",
    )
    parser.add_argument(
        "--batch",
        type=int,
        nargs="?",
        const=BATCH,
        metavar="N",
        help=f"compare a batch of N prompts (default {BATCH}) with Ollama instead",
    )
    parser.add_argument("--per-profile", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timeline:
        timeline(args.timeline)
        return
    if args.batch:
        per_profile = args.per_profile or BATCH_PER_PROFILE
        batch_report(args.batch, per_profile, as_json=args.json, min_gain=args.min_gain)
        return
    args.per_profile = args.per_profile or PER_PROFILE
    instances = suite(per_profile=args.per_profile)
    rows = [
        (instance, run(instance, max_nodes=args.max_nodes, min_gain=args.min_gain))
        for instance in instances
    ]
    if args.json:
        doc: dict[str, Any] = {
            "instances": [
                {
                    "name": instance.name,
                    "profile": instance.profile.name,
                    "policies": {
                        policy: None
                        if result is None
                        else {"makespan_s": round(result.makespan_s, 3), "loads": result.loads}
                        for policy, result in results.items()
                    },
                }
                for instance, results in rows
            ]
        }
        print(json.dumps(doc, indent=2))
        return
    print(f"{'instance':24} " + " ".join(f"{p:>15}" for p in POLICIES) + "  moa/opt")
    print(f"{'':24} " + " ".join(f"{'seconds loads':>15}" for _ in POLICIES))
    for instance, results in rows:
        best = results["optimal"]
        ratio = "" if best is None else f"{_ratio(results['localmoa'], best):7.3f}"
        print(
            f"{instance.name:24} " + " ".join(f"{_cell(results[p]):>15}" for p in POLICIES),
            ratio,
        )
    print()
    print("localmoa against the others, per profile: median and largest ratio of makespans;")
    print("then the fewest-loads plan unrefined, and the refinement given the wrong machine")
    head = (
        "profile", "moa/one", "max", "moa/react", "max", "max/opt", "known",
        "loads: max/react", "max/opt", "misjudged: max/react", "max/opt",
    )  # fmt: skip
    print(
        f"{head[0]:12} {head[1]:>8} {head[2]:>6} {head[3]:>9} {head[4]:>6} {head[5]:>8}"
        f" {head[6]:>6} {head[7]:>17} {head[8]:>8} {head[9]:>21} {head[10]:>8}"
    )

    def most(values: list[float]) -> str:
        return f"{max(values):.3f}" if values else "—"

    for profile in PROFILES.values():
        mine = [(i, r) for i, r in rows if i.profile is profile]
        vs_one = _known(mine, "localmoa", "one_at_a_time")
        vs_reactive = _known(mine, "localmoa", "reactive")
        vs_opt = _known(mine, "localmoa", "optimal")
        print(
            f"{profile.name:12} {statistics.median(vs_one):8.3f} {max(vs_one):6.3f}"
            f" {statistics.median(vs_reactive):9.3f} {max(vs_reactive):6.3f}"
            f" {most(vs_opt):>8} {len(vs_opt):>3}/{len(mine):<2}"
            f" {most(_known(mine, 'localmoa_loads', 'reactive')):>17}"
            f" {most(_known(mine, 'localmoa_loads', 'optimal')):>8}"
            f" {most(_known(mine, 'localmoa_misjudged', 'reactive')):>21}"
            f" {most(_known(mine, 'localmoa_misjudged', 'optimal')):>8}"
        )
    if PLANNING_S:
        print(
            f"\nplanning (fewest loads + refinement): median {statistics.median(PLANNING_S):.3f} s,"
            f" max {max(PLANNING_S):.3f} s per run"
        )
    print("\nworst runs against reactive and against optimal:")
    for a, b in (("localmoa", "reactive"), ("localmoa", "optimal"), ("localmoa", "one_at_a_time")):
        ranked = sorted(
            ((_ratio(r[a], r[b]), i.name) for i, r in rows if r[b] is not None), reverse=True
        )
        print(f"  {a}/{b}: " + ", ".join(f"{name} {x:.3f}" for x, name in ranked[:4]))


if __name__ == "__main__":
    main()
