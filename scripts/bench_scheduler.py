"""Scheduler benchmark: localmoa's plan against the optimum and the policies users run today.

    python scripts/bench_scheduler.py [--json] [--rules] [--timeline NAME] [--max-nodes N]

A fixed-seed suite of MoA runs (1-3 layers, 2-6 proposers, an aggregator) built from real 4-bit
model footprints, on every hardware profile of localmoa.costmodel. Each run is timed, in the cost
model, under these policies:

- ``localmoa``: the planner's waves, executed by dataflow as localmoa's executor does (a load
  starts as soon as memory allows, a call as soon as its model and references are ready);
- ``localmoa_waves``: the same plan executed wave by wave (the executor before dataflow);
- ``one_at_a_time``: one model resident, calls in order (llama-swap's default group);
- ``reactive``: Ollama's scheduler rules, requests sent a layer at a time;
- ``optimal``: the fastest wave plan under dataflow execution (branch and bound; only for runs
  with at most 6 distinct models, and "—" where the search gives up);
- ``optimal_waves``: the fastest wave plan under wave-by-wave execution (Dijkstra).

Tokens: every layer-1 call reads a 200-token prompt; a later layer's call and the aggregator read
the prompt plus every answer of the layer before (the references); each call writes T tokens,
drawn uniformly from 256-512. The table shows makespans (seconds) and loads; the summary gives,
per profile, the median ratio of localmoa to one_at_a_time, the median and largest ratio to
reactive and the largest to optimal; then the worst runs.

``--rules`` tries, in the model only, rules the planner or executor could adopt: the load order
within a wave, the order of waves within a stage, and a tie-break between plans of equal cost
(see :data:`RULES`). ``--timeline NAME`` prints one run's plan and the simulated timelines of
localmoa and reactive.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from localmoa.costmodel import (
    MAX_OPTIMAL_NODES,
    PROFILES,
    CallSpec,
    PolicyResult,
    Profile,
    Span,
    WaveSpec,
    call_seconds,
    equal_cost_plans,
    localmoa,
    one_at_a_time,
    optimal,
    optimal_waves,
    reactive,
    simulate_plan,
    simulate_waves,
    wave_specs,
)
from localmoa.planner import make_plan

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


POLICIES = ("localmoa", "localmoa_waves", "one_at_a_time", "reactive", "optimal", "optimal_waves")


def run(
    instance: Instance, *, max_nodes: int = MAX_OPTIMAL_NODES
) -> dict[str, PolicyResult | None]:
    """Every policy on one instance."""
    args = (instance.calls, SIZES, instance.profile)
    return {
        "localmoa": localmoa(*args),
        "localmoa_waves": localmoa(*args, dataflow=False),
        "one_at_a_time": one_at_a_time(*args),
        "reactive": reactive(*args),
        "optimal": optimal(*args, max_nodes=max_nodes),
        "optimal_waves": optimal_waves(*args),
    }


# --- rules to try ------------------------------------------------------------------------------

Plan = list[WaveSpec]


def _plan(instance: Instance) -> Plan:
    calls = instance.calls
    plan = make_plan([[c.model for c in s] for s in calls], SIZES, instance.profile.memory_bytes)
    return wave_specs(plan)


def _stage_seconds(instance: Instance, stage: int, models: frozenset[str] | set[str]) -> float:
    """Seconds alone of the stage's calls to ``models``."""
    return sum(
        call_seconds(c, SIZES[c.model], instance.profile)
        for c in instance.calls[stage]
        if c.model in models
    )


def _rederive(waves: Sequence[WaveSpec], order: Callable[[WaveSpec, str], Any]) -> Plan:
    """Loads and unloads again from the resident sets, loads sorted by ``order``."""
    out: Plan = []
    before: frozenset[str] = frozenset()
    for w in waves:

        def key(model: str, wave: WaveSpec = w) -> Any:
            return order(wave, model)

        load = tuple(sorted(w.resident - before, key=key))
        out.append(w._replace(load=load, unload=tuple(sorted(before - w.resident))))
        before = w.resident
    return out


def _first_use(instance: Instance) -> Callable[[WaveSpec, str], int]:
    """The planner's load order: first use in the run."""
    names = list(dict.fromkeys(c.model for s in instance.calls for c in s))
    return lambda w, m: names.index(m)


def loads_longest_first(instance: Instance, waves: Plan) -> Plan:
    """(a) Within a wave, load first the model whose calls of the stage take longest."""
    first = _first_use(instance)
    return _rederive(
        waves, lambda w, m: (-_stage_seconds(instance, w.stage, {m} & w.runs), first(w, m))
    )


def loads_largest_first(instance: Instance, waves: Plan) -> Plan:
    """(a') Within a wave, load the largest model first."""
    first = _first_use(instance)
    return _rederive(waves, lambda w, m: (-SIZES[m], first(w, m)))


def _waves_by_time(instance: Instance, waves: Plan, longest: bool) -> Plan:
    """(b) Waves of a stage sorted by their calls' total seconds, except a first wave that runs
    models resident from the stage before and a last one that keeps models for the next."""
    out: Plan = []
    i = 0
    while i < len(waves):
        j = i
        while j < len(waves) and waves[j].stage == waves[i].stage:
            j += 1
        group = list(waves[i:j])
        before = out[-1].resident if out else frozenset()
        after = waves[j].resident if j < len(waves) else frozenset()
        head = [group.pop(0)] if group and group[0].runs & before else []
        tail = [group.pop()] if group and group[-1].resident & after else []
        sign = -1 if longest else 1
        group.sort(key=lambda w: sign * _stage_seconds(instance, w.stage, w.runs))
        out += head + group + tail
        i = j
    return _rederive(out, _first_use(instance))


def waves_longest_first(instance: Instance, waves: Plan) -> Plan:
    return _waves_by_time(instance, waves, True)


def waves_shortest_first(instance: Instance, waves: Plan) -> Plan:
    return _waves_by_time(instance, waves, False)


def _keeps(waves: Sequence[WaveSpec]) -> int:
    return sum(len(a.resident & b.resident) for a, b in itertools.pairwise(waves))


def _ties(instance: Instance) -> list[Plan] | None:
    calls, profile = instance.calls, instance.profile
    plan = make_plan([[c.model for c in s] for s in calls], SIZES, profile.memory_bytes)
    return equal_cost_plans(calls, SIZES, profile, plan)


RULES: dict[str, Callable[[Instance, Plan], Plan]] = {
    "plan": lambda instance, waves: waves,
    "a:longest-calls-first": loads_longest_first,
    "a:largest-first": loads_largest_first,
    "b:longest-wave-first": waves_longest_first,
    "b:shortest-wave-first": waves_shortest_first,
    "a+b:longest": lambda i, w: loads_longest_first(i, waves_longest_first(i, w)),
}
"""Each rule rewrites localmoa's plan: (a) the load order within a wave, (b) the order of waves
within a stage; (c), tie-breaks among the plans the planner ranks equal, need the enumeration
and are in :data:`TIES`."""


TIES = ("c:keep-most", "c:sim-tie", "c:best-tie")
"""Tie-breaks among the plans the planner ranks equal (same loads, bytes loaded and waves):
``keep-most`` prefers plans whose waves keep the most models of the wave before; ``sim-tie``
the shortest dataflow simulation when every call writes ``max_tokens`` (what a planner knows
before the run: no answer lengths); ``best-tie`` the shortest real simulation (an oracle: what
any tie-break could reach at best)."""


def _as_planned(calls: list[list[CallSpec]]) -> list[list[CallSpec]]:
    """The calls as a planner sees them before the run: each writes ``max_tokens``."""
    out, references = [], 0
    for stage in calls:
        out.append([CallSpec(c.model, PROMPT_TOKENS + references, OUTPUT_TOKENS[1]) for c in stage])
        references = OUTPUT_TOKENS[1] * len(stage)
    return out


def rule_results(instance: Instance) -> dict[str, PolicyResult | None]:
    """Every rule's plan, simulated by dataflow; the tie-breaks None when there are too many
    equal-cost plans to enumerate."""
    args = (instance.calls, SIZES, instance.profile)
    base = _plan(instance)
    out: dict[str, PolicyResult | None] = {}
    for name, rule in RULES.items():
        timing = simulate_waves(rule(instance, base), *args)
        out[name] = PolicyResult(timing.makespan_s, timing.loads)
    ties = _ties(instance)
    if not ties:
        return out | dict.fromkeys(TIES)
    guess = _as_planned(instance.calls)
    picks = {
        "c:keep-most": max(ties, key=_keeps),
        "c:sim-tie": min(
            ties, key=lambda t: simulate_waves(t, guess, SIZES, instance.profile).makespan_s
        ),
        "c:best-tie": min(ties, key=lambda t: simulate_waves(t, *args).makespan_s),
    }
    for name, waves in picks.items():
        timing = simulate_waves(waves, *args)
        out[name] = PolicyResult(timing.makespan_s, timing.loads)
    return out


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
    plan = make_plan([[c.model for c in s] for s in calls], SIZES, profile.memory_bytes)
    print(f"{name}: budget {profile.memory_bytes / GB:.2f} GB")
    for k, stage in enumerate(calls):
        print(f"  stage {k + 1}: " + ", ".join(f"{c.model} ({c.output_tokens} tok)" for c in stage))
    for n, w in enumerate(plan.waves):
        print(
            f"  wave {n}: stage {w.layer} resident {w.resident} load {w.load} "
            f"unload {w.unload} ({w.bytes / GB:.1f} GB)"
        )
    dataflow = simulate_plan(plan, calls, SIZES, profile)
    waves = simulate_plan(plan, calls, SIZES, profile, dataflow=False)
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
    parser.add_argument("--rules", action="store_true", help="try the rules of RULES too")
    parser.add_argument("--timeline", metavar="NAME", help="print one run's timelines")
    parser.add_argument(
        "--max-nodes",
        type=int,
        default=MAX_OPTIMAL_NODES,
        help="partial plans the optimal search may simulate per run (default %(default)s)",
    )
    parser.add_argument("--per-profile", type=int, default=PER_PROFILE, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.timeline:
        timeline(args.timeline)
        return
    instances = suite(per_profile=args.per_profile)
    rows = [(instance, run(instance, max_nodes=args.max_nodes)) for instance in instances]
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
    head = ("profile", "moa/one", "moa/reactive", "max", "max moa/opt", "known", "waves/opt_w")
    print(
        f"{head[0]:12} {head[1]:>8} {head[2]:>13} {head[3]:>6} {head[4]:>12} {head[5]:>6}"
        f" {head[6]:>12}"
    )
    for profile in PROFILES.values():
        mine = [(i, r) for i, r in rows if i.profile is profile]
        vs_one = statistics.median(_known(mine, "localmoa", "one_at_a_time"))
        vs_reactive = _known(mine, "localmoa", "reactive")
        vs_opt = _known(mine, "localmoa", "optimal")
        waves = _known(mine, "localmoa_waves", "optimal_waves")
        worst = f"{max(vs_opt):12.3f}" if vs_opt else f"{'—':>12}"
        worst_waves = f"{max(waves):12.3f}" if waves else f"{'—':>12}"
        print(
            f"{profile.name:12} {vs_one:8.3f} {statistics.median(vs_reactive):13.3f}"
            f" {max(vs_reactive):6.3f} {worst} {len(vs_opt):>3}/{len(mine):<2} {worst_waves}"
        )
    print("\nworst runs against reactive and against optimal:")
    for a, b in (("localmoa", "reactive"), ("localmoa", "optimal")):
        ranked = sorted(
            ((_ratio(r[a], r[b]), i.name) for i, r in rows if r[b] is not None), reverse=True
        )
        print(f"  {a}/{b}: " + ", ".join(f"{name} {x:.3f}" for x, name in ranked[:4]))
    if args.rules:
        _print_rules(rows)


def _print_rules(rows: list[tuple[Instance, dict[str, PolicyResult | None]]]) -> None:
    results = [(i, {**r, **rule_results(i)}) for i, r in rows]
    names = [*RULES, *TIES]
    print("\nrules (dataflow): median and max of rule/reactive, max rule/optimal, runs where the")
    print("rule beats / loses to localmoa's plan by more than 0.1 %, and loads changed")
    print(
        f"{'rule':24} {'profile':12} {'med/react':>9} {'max/react':>9} {'max/opt':>8}"
        f" {'better':>6} {'worse':>6} {'loads+':>6} {'known':>6}"
    )
    for name in names:
        for profile in [*PROFILES.values(), None]:
            mine = [(i, r) for i, r in results if profile is None or i.profile is profile]
            have = [(i, r) for i, r in mine if r[name] is not None]
            if not have:
                continue
            vs_reactive = _known(have, name, "reactive")
            vs_opt = _known(have, name, "optimal")
            gain = [_ratio(r[name], r["localmoa"]) for _, r in have]
            more = sum(_loads(r[name]) > _loads(r["localmoa"]) for _, r in have)
            print(
                f"{name:24} {profile.name if profile else 'all':12}"
                f" {statistics.median(vs_reactive):9.3f} {max(vs_reactive):9.3f}"
                f" {max(vs_opt) if vs_opt else float('nan'):8.3f}"
                f" {sum(g < 0.999 for g in gain):6} {sum(g > 1.001 for g in gain):6}"
                f" {more:6} {len(have):>3}/{len(mine):<2}"
            )


if __name__ == "__main__":
    main()
