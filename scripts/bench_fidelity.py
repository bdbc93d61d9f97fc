"""Fidelity: the cost model's predicted makespans against real llama.cpp runs of many plans.

    python scripts/bench_fidelity.py [--repeat 3] [--max-tokens 24] [--threads N] [--json]
                                     [--workdir DIR]

Why. The planner trades a load for time on the cost model's word alone
(:mod:`localmoa.planning.timing`): a plan with more loads than the fewest is taken when it is
estimated at least ``settings.min_gain`` faster than the fastest plan with the fewest
(:func:`localmoa.planning.plan_run`). That margin must exceed the model's error on what the
decision rests on: the *ratio* of two plans' times for the same calls. This measures it.

What runs. Four random-weight GGUF models (:mod:`localmoa.tinymodels`, F32, about 100-310 MB,
the three of ``scripts/bench_real_swap.py`` and ``large-100m``; ``use_mmap=false``, so a load
copies the weights and an unload frees them) in five cases, each an ensemble and a budget. For
each case, the plans a planner weighs, drawn from every candidate the search chooses from
(``scripts/policies.py``'s ``candidate_plans``), timed on the calibrated profile: the
fewest-loads plan (``make_plan``), the fastest other plan with as many loads, the fastest plan
with extra loads, and one model at a time. Every plan runs through localmoa's own engine
(:class:`~localmoa.runtime.engine.Executor`) ``--repeat`` times, the plans of a case
alternating, after one untimed run of the case; the median is the measured makespan.
``temperature`` 0 and a fixed seed make every run of a plan the same calls with the same
tokens.

The profile. The cost model is given a profile *calibrated* on this machine, from runs where
one model works alone: two small ensembles run one model at a time, in a budget that never
holds two, before the cases and after them, each load and call taken at its fastest. Load
seconds against bytes (least squares: ``bytes / disk + load_init_s``), call seconds against
prefill FLOP and decoded bytes (least squares: ``1 / compute`` and ``1 / bandwidth``);
``stream_cap`` unbounded, as the shipped CPU profile has. (The second calibration ensemble is
also the last case's one-at-a-time plan; every other plan is out of sample.) Predictions take
each call's real token counts (from the runs), so the error is the model's own: how it times
loads, their overlap with calls, and calls sharing the cores; not the guess of answer lengths,
which the planner makes alike for every plan of a run. Beside it, the shipped profile this
machine gets (``profile_for`` of the device: ``cpu-16g``) with the planner's own call
estimates (every call writing ``max_tokens``, 4 characters a token), which is what
``localmoa plan`` says here.

Figures. Per plan: predicted and measured seconds and ``pred/measured - 1``. Over plans: the
median and largest ``|pred/measured - 1|``. Over every pair of plans of one case: the error of
the predicted ratio, ``|(pred_a / pred_b) / (measured_a / measured_b) - 1|``, median and largest:
the figure ``min_gain`` must exceed. And each plan's run-to-run spread: on a shared machine,
noise sets a floor under all of these (the load average before and after is reported).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the repository's package wins over an installed one;
# the other benchmarks' helpers sit beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_real_swap import (
    N_BATCH,
    N_CTX,
    SPECS,
    build_config,
    model_file,
    one_at_a_time_plan,
    real_run_options,
)
from policies import candidate_plans

from localmoa.backends import make_backends
from localmoa.backends.base import ChatMessage
from localmoa.footprint.estimate import estimate, read_gguf
from localmoa.hardware import detect_budget
from localmoa.planning.fewest_loads import Plan, Wave, make_plan
from localmoa.planning.profiles import PROFILES, Profile, profile_for
from localmoa.planning.refine import calls_as_planned
from localmoa.planning.timing import (
    BYTES_PER_PARAM,
    CallSpec,
    WaveSpec,
    simulate_plan,
    wave_specs,
)
from localmoa.runtime.engine import Executor
from localmoa.runtime.events import Event, ModelLoaded, RunResult
from localmoa.runtime.moa import Call
from localmoa.tinymodels import PRESETS, TinySpec

MB = 10**6
QUESTION = "Explain in two sentences why the sky is blue."
MAX_CANDIDATES = 20_000

MODELS: dict[str, TinySpec] = {**SPECS, "tiny": PRESETS["large-100m"]}

CALIBRATION: list[list[list[str]]] = [
    [["big", "mid", "small"], ["big"]],
    [["tiny", "small", "mid"], ["tiny"]],
]
"""Ensembles run one model at a time to calibrate the profile: every model alone, in short and
long prompts (a later layer reads the references)."""

CALIBRATION_RUNS = 3

CASES: list[tuple[str, list[list[str]], str]] = [
    # name, models per stage (the last is the aggregator), budget: "two" = the two largest of
    # the case's models, "all" = every one of them, "one" = the largest alone
    ("3x2+agg/two", [["big", "mid", "small"], ["big", "mid", "small"], ["big"]], "two"),
    ("3x2+agg/all", [["big", "mid", "small"], ["big", "mid", "small"], ["big"]], "all"),
    ("4+agg/two", [["mid", "small", "tiny", "big"], ["mid"]], "two"),
    ("2x3+agg/two", [["small", "tiny"], ["small", "tiny"], ["small", "tiny"], ["big"]], "two"),
    ("3+agg/one", [["tiny", "small", "mid"], ["tiny"]], "one"),
]


@dataclass
class Measured:
    """One plan of one case, its predictions and its runs."""

    case: str
    kind: str
    plan: Plan
    predicted_s: float = 0.0
    """The calibrated profile, the calls' real token counts."""
    shipped_s: float = 0.0
    """The shipped profile of this machine, the planner's own call estimates."""
    runs: list[float] = dataclasses.field(default_factory=list)

    @property
    def measured_s(self) -> float:
        return statistics.median(self.runs)


def case_models(name: str) -> list[list[str]]:
    return next(models for case, models, _ in CASES if case == name)


def stages_of(models: list[list[str]], max_tokens: int) -> list[list[Call]]:
    last = len(models) - 1
    return [
        [Call(k + 1, i, m, None, 0.0, max_tokens, k == last) for i, m in enumerate(stage)]
        for k, stage in enumerate(models)
    ]


def budget_for(rule: str, models: list[list[str]], sizes: dict[str, int]) -> int:
    used = sorted({sizes[m] for stage in models for m in stage}, reverse=True)
    return {"one": used[0], "two": sum(used[:2]), "all": sum(used)}[rule]


def as_plan(
    waves: Sequence[WaveSpec], stages: list[list[Call]], sizes: dict[str, int], budget: int
) -> Plan:
    """A candidate of the search as a plan the engine runs."""
    order = list(dict.fromkeys(c.model for stage in stages for c in stage))
    out = [
        Wave(
            layer=w.stage + 1,
            resident=sorted(w.resident, key=order.index),
            runs=[c.model for c in stages[w.stage] if c.model in w.runs],
            load=list(w.load),
            unload=sorted(w.unload, key=order.index),
            bytes=sum(sizes[m] for m in w.resident),
        )
        for w in waves
    ]
    loads = sum(len(w.load) for w in out)
    return Plan(
        budget_bytes=budget,
        loads=loads,
        lower_bound=len(order),
        optimal=False,
        bytes_loaded=sum(sizes[m] for w in out for m in w.load),
        waves=out,
    )


def plans_for(
    name: str,
    models: list[list[str]],
    rule: str,
    sizes: dict[str, int],
    profile: Profile,
    max_tokens: int,
) -> list[Measured]:
    """The plans a planner weighs for one case (see the module docstring), distinct."""
    stages = stages_of(models, max_tokens)
    budget = budget_for(rule, models, sizes)
    room = dataclasses.replace(profile, memory_bytes=budget)
    calls = calls_as_planned(stages, QUESTION)
    fewest = make_plan(models, sizes, budget)
    timed: list[tuple[float, int, list[WaveSpec]]] = []
    for waves in itertools.islice(candidate_plans(calls, sizes, room), MAX_CANDIDATES):
        plan = as_plan(waves, stages, sizes, budget)
        timed.append((simulate_plan(plan, calls, sizes, room).makespan_s, plan.loads, waves))
    timed.sort(key=lambda t: (t[0], t[1]))
    chosen: list[tuple[str, Plan]] = [("fewest loads", fewest)]
    seed = wave_specs(fewest)
    same = [w for _, loads, w in timed if loads == fewest.loads and w != seed]
    extra = [w for _, loads, w in timed if loads > fewest.loads]
    if same:
        chosen.append(("fastest reordering", as_plan(same[0], stages, sizes, budget)))
    if extra:
        chosen.append(("fastest, extra loads", as_plan(extra[0], stages, sizes, budget)))
    used = {m: sizes[m] for stage in models for m in stage}
    chosen.append(("one at a time", one_at_a_time_plan(stages, used)))
    out: list[Measured] = []
    for kind, plan in chosen:
        if all(plan.waves != m.plan.waves for m in out):
            out.append(Measured(name, kind, plan))
    return out


async def run_plan(
    executor: Executor,
    stages: list[list[Call]],
    plan: Plan,
    on_event: Callable[[Event], None] | None = None,
) -> tuple[float, RunResult]:
    began = time.perf_counter()
    conversation = [ChatMessage(role="user", content=QUESTION)]
    result = await executor.run(stages, plan, conversation, on_event=on_event)
    seconds = time.perf_counter() - began
    failed = [c for c in result.calls if not c.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} calls failed: {failed[0].error}")
    return seconds, result


@dataclass
class Calibration:
    """What the calibration runs saw, run after run (see :func:`calibrate`)."""

    loads: dict[int, list[list[float]]] = dataclasses.field(default_factory=dict)
    """Per :data:`CALIBRATION` ensemble, per run: each load's seconds, in plan order."""
    calls: dict[int, list[list[float]]] = dataclasses.field(default_factory=dict)
    """Per ensemble, per run: each call's seconds, in the result's order."""
    facts: dict[int, tuple[list[str], RunResult]] = dataclasses.field(default_factory=dict)
    """Per ensemble: the models loaded in order, and a result (the calls and their tokens)."""


async def calibration_runs(
    executor: Executor, sizes: dict[str, int], max_tokens: int, into: Calibration
) -> None:
    """Run each :data:`CALIBRATION` ensemble ``CALIBRATION_RUNS`` times one model at a time, in
    a budget that never holds two of its models, adding what was seen to ``into``."""
    for n, models in enumerate(CALIBRATION):
        stages = stages_of(models, max_tokens)
        used = {m: sizes[m] for stage in models for m in stage}
        plan = one_at_a_time_plan(stages, used)
        pairs = itertools.combinations(used.values(), 2)
        assert all(a + b > plan.budget_bytes for a, b in pairs), "two models would fit"
        for _ in range(CALIBRATION_RUNS):
            events: list[Event] = []
            _, result = await run_plan(executor, stages, plan, on_event=events.append)
            seconds = [e.seconds for e in events if isinstance(e, ModelLoaded)]
            into.loads.setdefault(n, []).append(seconds)
            into.calls.setdefault(n, []).append([c.seconds for c in result.calls])
            into.facts[n] = ([m for w in plan.waves for m in w.load], result)


def calibrate(seen: Calibration, sizes: dict[str, int]) -> tuple[Profile, dict[str, Any]]:
    """This machine's profile from the calibration runs (see the module docstring), each load
    and call at its fastest over the runs: another process taking the cores for a while
    (llama.cpp's threads then wait on each other) only ever slows one down. Loads: least
    squares of seconds on bytes. Calls: least squares of seconds on prefill FLOP and decoded
    bytes (no constant: the cost model has none), whose two slopes are ``1 / compute`` and
    ``1 / bandwidth``. A first call after a load is slower (llama.cpp warms up); that time
    falls to the calls here, as it does in the runs predicted."""
    loads: list[tuple[float, float]] = []
    calls: list[tuple[float, float, float]] = []
    for n, (loaded, result) in seen.facts.items():
        loads += [
            (float(sizes[m]), min(runs)) for m, *runs in zip(loaded, *seen.loads[n], strict=True)
        ]
        calls += [
            (
                2 * sizes[c.model] / BYTES_PER_PARAM * c.prompt_tokens,
                float(c.tokens * sizes[c.model]),
                min(runs),
            )
            for c, *runs in zip(result.calls, *seen.calls[n], strict=True)
        ]
    per_byte, init = _line(loads)
    per_flop, per_decoded = _plane(calls)
    profile = dataclasses.replace(
        PROFILES["cpu-16g"],
        name="calibrated",
        bandwidth=1 / per_decoded,
        compute=1 / per_flop,
        disk=1 / per_byte,
        load_init_s=init,
    )
    facts = {
        "disk_mb_s": round(profile.disk / MB, 1),
        "load_init_s": round(init, 3),
        "bandwidth_mb_s": round(profile.bandwidth / MB, 1),
        "compute_gflops": round(profile.compute / 1e9, 1),
        "loads": len(loads),
        "calls": len(calls),
        "runs": len(next(iter(seen.calls.values()))),
    }
    return profile, facts


def _line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares ``y = slope·x + intercept``, both kept ≥ 0 (a noisy fit must not make a
    load take negative time)."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    slope = max(slope, 1e-15)
    return slope, max(0.0, my - slope * mx)


def _plane(points: list[tuple[float, float, float]]) -> tuple[float, float]:
    """Least squares ``z = a·x + b·y`` (normal equations), both kept > 0."""
    xx = sum(x * x for x, _, _ in points)
    yy = sum(y * y for _, y, _ in points)
    xy = sum(x * y for x, y, _ in points)
    xz = sum(x * z for x, _, z in points)
    yz = sum(y * z for _, y, z in points)
    det = xx * yy - xy * xy
    a, b = (xz * yy - yz * xy) / det, (yz * xx - xz * xy) / det
    return max(a, 1e-30), max(b, 1e-30)


def real_calls(result: RunResult, stages: list[list[Call]]) -> list[list[CallSpec]]:
    """The calls as they were: each one's prompt and answer tokens."""
    by_key = {(c.layer, c.index): c for c in result.calls}
    return [
        [
            CallSpec(
                c.model, by_key[c.layer, c.index].prompt_tokens, by_key[c.layer, c.index].tokens
            )
            for c in stage
        ]
        for stage in stages
    ]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()
    began = time.perf_counter()
    paths = {name: model_file(args.workdir, name, spec) for name, spec in MODELS.items()}
    config = build_config(paths, args.max_tokens, args.threads)
    sizes = {
        name: estimate(read_gguf(path), n_ctx=N_CTX, n_batch=N_BATCH).total
        for name, path in paths.items()
    }
    backends = make_backends(config.settings)
    executor = Executor(config.models, backends, sizes=sizes)
    shipped = profile_for(detect_budget())
    rows: list[Measured] = []
    seen = Calibration()
    real: dict[str, list[list[CallSpec]]] = {}
    try:
        # Calibrated before the cases (their plans are chosen on that profile) and after them
        # (the fit takes both): a burst of load from elsewhere rarely spans the two.
        await calibration_runs(executor, sizes, args.max_tokens, seen)
        chooser, _ = calibrate(seen, sizes)
        for name, models, rule in CASES:
            plans = plans_for(name, models, rule, sizes, chooser, args.max_tokens)
            stages = stages_of(models, args.max_tokens)
            _, first = await run_plan(executor, stages, plans[0].plan)  # untimed
            real[name] = real_calls(first, stages)
            for i in range(args.repeat):
                for m in plans if i % 2 == 0 else plans[::-1]:
                    seconds, _ = await run_plan(executor, stages, m.plan)
                    m.runs.append(seconds)
            rows.extend(plans)
        await calibration_runs(executor, sizes, args.max_tokens, seen)
    finally:
        for backend in backends.values():
            await backend.aclose()
    profile, facts = calibrate(seen, sizes)
    for m in rows:
        room = dataclasses.replace(profile, memory_bytes=m.plan.budget_bytes)
        m.predicted_s = simulate_plan(m.plan, real[m.case], sizes, room).makespan_s
        planned = calls_as_planned(stages_of(case_models(m.case), args.max_tokens), QUESTION)
        guess = dataclasses.replace(shipped, memory_bytes=m.plan.budget_bytes)
        m.shipped_s = simulate_plan(m.plan, planned, sizes, guess).makespan_s
        print(
            f"  {m.case:14} {m.kind:24} loads {m.plan.loads:2}  measured "
            f"{m.measured_s:6.2f} s  predicted {m.predicted_s:6.2f} s",
            file=sys.stderr,
        )
    return report(args, rows, facts, shipped.name, load_before, time.perf_counter() - began, sizes)


def errors(rows: list[Measured], key: str) -> tuple[list[float], list[float], list[float]]:
    """Absolute errors of every plan; ratio errors of every pair of plans of one case, and of
    those pairs whose loads differ (the trade ``min_gain`` rules on)."""
    absolute = [abs(getattr(m, key) / m.measured_s - 1) for m in rows]
    ratio, loads = [], []
    for a, b in itertools.combinations(rows, 2):
        if a.case == b.case:
            predicted = getattr(a, key) / getattr(b, key)
            ratio.append(abs(predicted / (a.measured_s / b.measured_s) - 1))
            if a.plan.loads != b.plan.loads:
                loads.append(ratio[-1])
    return absolute, ratio, loads


def decisions(rows: list[Measured]) -> list[dict[str, Any]]:
    """Per case, the trade ``min_gain`` rules on: the fastest plan with extra loads against the
    fewest-loads plan, its gain as predicted and as measured (positive: faster)."""
    out = []
    for case in dict.fromkeys(m.case for m in rows):
        mine = {m.kind: m for m in rows if m.case == case}
        fewest, extra = mine.get("fewest loads"), mine.get("fastest, extra loads")
        if fewest is None or extra is None:
            continue
        predicted = 1 - extra.predicted_s / fewest.predicted_s
        measured = 1 - extra.measured_s / fewest.measured_s
        ratio = (extra.predicted_s / fewest.predicted_s) / (extra.measured_s / fewest.measured_s)
        out.append(
            {
                "case": case,
                "extra_loads": extra.plan.loads - fewest.plan.loads,
                "predicted_gain": round(predicted, 4),
                "measured_gain": round(measured, 4),
                "ratio_error": round(abs(ratio - 1), 4),
            }
        )
    return out


def summary(values: list[float]) -> dict[str, float]:
    return {"median": round(statistics.median(values), 4), "max": round(max(values), 4)}


def report(
    args: argparse.Namespace,
    rows: list[Measured],
    facts: dict[str, Any],
    shipped: str,
    load_before: tuple[float, float, float],
    seconds: float,
    sizes: dict[str, int],
) -> dict[str, Any]:
    calibrated_abs, calibrated_ratio, calibrated_loads = errors(rows, "predicted_s")
    shipped_abs, shipped_ratio, shipped_loads = errors(rows, "shipped_s")
    spread = [(max(m.runs) - min(m.runs)) / m.measured_s for m in rows]
    return {
        "command": args.command,
        "models_mb": {name: round(size / MB, 1) for name, size in sizes.items()},
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(seconds, 1),
        "calibration": facts,
        "shipped_profile": shipped,
        "plans": [
            {
                "case": m.case,
                "plan": m.kind,
                "loads": m.plan.loads,
                "measured_s": round(m.measured_s, 3),
                "runs_s": [round(r, 3) for r in m.runs],
                "predicted_s": round(m.predicted_s, 3),
                "error": round(m.predicted_s / m.measured_s - 1, 4),
                "shipped_s": round(m.shipped_s, 3),
                "shipped_error": round(m.shipped_s / m.measured_s - 1, 4),
            }
            for m in rows
        ],
        "calibrated": {
            "absolute": summary(calibrated_abs),
            "ratio": summary(calibrated_ratio),
            "ratio_other_loads": summary(calibrated_loads),
        },
        "shipped": {
            "absolute": summary(shipped_abs),
            "ratio": summary(shipped_ratio),
            "ratio_other_loads": summary(shipped_loads),
        },
        "pairs": len(calibrated_ratio),
        "pairs_other_loads": len(calibrated_loads),
        "decisions": decisions(rows),
        "spread": summary(spread),
    }


def markdown(doc: dict[str, Any]) -> str:
    c = doc["calibration"]
    lines = [
        f"`{doc['command']}` ({doc['seconds']:.0f} s; {doc['cpus']} CPUs, {doc['threads']} "
        f"threads per model; load average {doc['load_average_before'][0]} before, "
        f"{doc['load_average_after'][0]} after)",
        "",
        "models (MB, footprint): "
        + ", ".join(f"{n} {mb}" for n, mb in doc["models_mb"].items())
        + f"; calibrated: load {c['disk_mb_s']} MB/s + {c['load_init_s']} s, decode "
        f"{c['bandwidth_mb_s']} MB/s, prefill {c['compute_gflops']} GFLOP/s",
        "",
        "| case | plan | loads | measured s (median) | predicted s | error |"
        f" {doc['shipped_profile']} s | error |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for p in doc["plans"]:
        lines.append(
            f"| {p['case']} | {p['plan']} | {p['loads']} | {p['measured_s']:.2f} |"
            f" {p['predicted_s']:.2f} | {p['error']:+.1%} | {p['shipped_s']:.2f} |"
            f" {p['shipped_error']:+.1%} |"
        )
    cal, shp = doc["calibrated"], doc["shipped"]
    lines += [
        "",
        f"|pred/measured - 1| over {len(doc['plans'])} plans: calibrated median "
        f"{cal['absolute']['median']:.1%}, max {cal['absolute']['max']:.1%}; "
        f"{doc['shipped_profile']} median {shp['absolute']['median']:.1%}, "
        f"max {shp['absolute']['max']:.1%}",
        "",
        f"error of the predicted ratio of two plans of one case ({doc['pairs']} pairs): "
        f"calibrated median {cal['ratio']['median']:.1%}, max {cal['ratio']['max']:.1%}; "
        f"{doc['shipped_profile']} median {shp['ratio']['median']:.1%}, "
        f"max {shp['ratio']['max']:.1%}",
        "",
        f"the same for the {doc['pairs_other_loads']} pairs whose loads differ (what min_gain "
        f"rules on): calibrated median **{cal['ratio_other_loads']['median']:.1%}**, max "
        f"**{cal['ratio_other_loads']['max']:.1%}**; {doc['shipped_profile']} median "
        f"{shp['ratio_other_loads']['median']:.1%}, max {shp['ratio_other_loads']['max']:.1%}",
        "",
        f"run-to-run spread of a plan ((max - min) / median): median "
        f"{doc['spread']['median']:.1%}, max {doc['spread']['max']:.1%}",
        "",
        "the trade min_gain rules on (fastest plan with extra loads against the fewest loads, "
        "calibrated):",
        "",
        "| case | extra loads | predicted gain | measured gain | ratio error |",
        "|---|--:|--:|--:|--:|",
    ]
    for d in doc["decisions"]:
        lines.append(
            f"| {d['case']} | {d['extra_loads']} | {d['predicted_gain']:+.1%} |"
            f" {d['measured_gain']:+.1%} | {d['ratio_error']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = real_run_options(__doc__, repeat=3, per="plan", max_tokens=24)
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "scripts/bench_fidelity.py", *(argv or sys.argv[1:])])
    args.workdir.mkdir(parents=True, exist_ok=True)
    doc = asyncio.run(bench(args))
    print(json.dumps(doc, indent=2) if args.json else markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
