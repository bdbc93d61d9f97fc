"""Scheduler benchmark: localmoa's plan against the optimum and the policies users run today.

    python scripts/bench_scheduler.py [--json] [--timeline NAME] [--max-nodes N] [--min-gain G]

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
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # policies.py, beside this file

from policies import (
    MAX_OPTIMAL_NODES,
    PolicyResult,
    fewest_loads,
    one_at_a_time,
    optimal,
    optimal_waves,
    reactive,
    wave_by_wave,
)

from localmoa.config import Settings
from localmoa.planning import PlanPolicy, plan_run
from localmoa.planning.fewest_loads import Plan as PlanModel
from localmoa.planning.profiles import PROFILES, Profile
from localmoa.planning.timing import CallSpec, Span, simulate_plan
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
    instance: Instance, speeds: Profile | None = None, *, min_gain: float = MIN_GAIN
) -> PlanModel:
    """The plan ``localmoa run`` makes on ``speeds`` (the instance's own profile unless given),
    from what is known before the run: every call writing ``max_tokens``."""
    calls, profile = instance.calls, instance.profile
    stages = [
        [
            Call(k + 1, i, c.model, None, 0.7, OUTPUT_TOKENS[1], k == len(calls) - 1)
            for i, c in enumerate(stage)
        ]
        for k, stage in enumerate(calls)
    ]
    policy = PlanPolicy(speeds or profile, "time", min_gain)
    prompt = "x" * (PROMPT_TOKENS * 4)
    return plan_run(stages, SIZES, profile.memory_bytes, policy, prompt=prompt)


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
    parser.add_argument("--per-profile", type=int, default=PER_PROFILE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timeline:
        timeline(args.timeline)
        return
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
