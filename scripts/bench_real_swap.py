"""Real swaps: localmoa's plan against one model at a time, run by the real executor and llama.cpp.

    python scripts/bench_real_swap.py [--repeat 2] [--max-tokens 32] [--threads N] [--json]
                                      [--workdir DIR]

The cost model (scripts/bench_scheduler.py) says how a plan should fare; this runs one. Three
random-weight GGUF models of a few hundred MB (``localmoa.tinymodels``: F32, distinct shapes
and seeds, so the files differ) form a 2-layer ensemble of three agents with the first model
aggregating: 7 calls. The budget holds the two largest models, so never all three: every plan
must swap. Each model is loaded with ``use_mmap=false`` (the weights are copied into the
process, so a load costs what it costs and an unload really frees it), ``temperature`` 0 and a
fixed seed, so every policy computes the same answers (checked and reported).

Two plans of the same ensemble run through the same :class:`~localmoa.runtime.engine.Executor`, in
one process, with the footprints localmoa estimates (``memory.estimate`` of each file's header):

- ``localmoa``: the plan ``localmoa run`` makes under the two-model budget
  (``localmoa.planning.plan_run`` with the default settings: the fewest loads, refined for
  time on this machine's kind of hardware);
- ``localmoa_loads``: ``make_plan`` alone (``plan_for = "loads"``), run only when the
  refinement changed the plan;
- ``one_at_a_time``: one model resident at a time, calls in order, consecutive calls of the
  resident model sharing a wave (llama-swap's default group). Its plan's budget is the largest
  model alone, so an executor that loads ahead as memory allows still holds one model at a time.

The two alternate (localmoa, one, one, localmoa, ...) ``--repeat`` times each, after one untimed
run that pays the process's first load of each model, so slow drift on a noisy machine falls on
both alike. Reported per policy: median wall-clock of a run, its loads and the seconds they took,
and the ratio localmoa / one_at_a_time.

Page cache. The files are written (or reused) just before, so they are almost surely in the
page cache, and nothing here tries to drop it: a load copies the weights from memory and starts
llama.cpp, rather than reading a disk. That is the cheapest a load gets, so the saving of
fewer loads shown here is a lower bound; from a cold disk each load costs more and the plan
with fewer loads gains more. All models share the machine's cores (``--threads`` each, default
all of them), so calls that run together compete for them as they would for a GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the repository's package wins over an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localmoa.backends import make_backends
from localmoa.backends.base import ChatMessage
from localmoa.config import Config, parse_config
from localmoa.footprint.estimate import estimate, read_gguf
from localmoa.hardware import Budget, device_budget
from localmoa.planning import PlanPolicy, plan_run
from localmoa.planning.fewest_loads import Plan, Wave, make_plan
from localmoa.runtime.engine import Event, Executor, ModelLoaded, RunResult
from localmoa.runtime.moa import Call, calls_for
from localmoa.tinymodels import PRESETS, TinySpec, ensemble_config, write_tiny_model

MB = 10**6
N_CTX = 2048
N_BATCH = 512
SEED = 7
QUESTION = "Explain in two sentences why the sky is blue."

SPECS: dict[str, TinySpec] = {
    # ~310 MB: the benchmark preset.
    "big": PRESETS["large-300m"],
    # ~235 MB and ~150 MB: other shapes, other seeds.
    "mid": TinySpec(n_layer=8, n_embd=896, n_head=14, n_head_kv=2, n_ff=2048, seed=21),
    "small": TinySpec(n_layer=6, n_embd=768, n_head=12, n_head_kv=4, n_ff=2048, seed=22),
}
"""The three agents; ``big`` also aggregates."""


@dataclass
class Sample:
    """One timed run."""

    policy: str
    seconds: float
    loads: int
    load_seconds: float
    answer: str


@dataclass
class Summary:
    """One policy over its runs."""

    policy: str
    runs: int
    median_s: float
    min_s: float
    max_s: float
    loads: int
    median_load_s: float
    samples: list[float] = field(default_factory=list)


def model_file(workdir: Path, name: str, spec: TinySpec) -> Path:
    """The spec's file, written on first use; the name pins the spec, so edits rewrite it."""
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:12]
    path = workdir / f"swap-{name}-{digest}.gguf"
    if not path.exists():
        # Via a temporary name: an interrupted write must not be reused as a model.
        write_tiny_model(path.with_suffix(".part"), spec).rename(path)
    return path


def build_config(paths: dict[str, Path], max_tokens: int, threads: int) -> Config:
    raw = ensemble_config(paths, n_ctx=N_CTX, max_tokens=max_tokens, seed=SEED)
    for model in raw["models"].values():
        model.update(n_batch=N_BATCH, use_mmap=False)
        if threads:  # 0: unset, as a models.toml without n_threads (llama-cpp-python picks)
            model.update(n_threads=threads)
    return parse_config(raw)


def one_at_a_time_plan(stages: list[list[Call]], sizes: dict[str, int]) -> Plan:
    """One model resident, calls in order; a call to the resident model joins its wave (or, in
    a new stage, starts a wave that loads nothing)."""
    waves: list[Wave] = []
    resident: str | None = None
    for layer, stage in enumerate(stages, start=1):
        for call in stage:
            if call.model == resident and waves and waves[-1].layer == layer:
                waves[-1].runs.append(call.model)
                continue
            new = call.model != resident
            waves.append(
                Wave(
                    layer=layer,
                    resident=[call.model],
                    runs=[call.model],
                    load=[call.model] if new else [],
                    unload=[resident] if new and resident is not None else [],
                    bytes=sizes[call.model],
                )
            )
            resident = call.model
    loads = [m for w in waves for m in w.load]
    return Plan(
        budget_bytes=max(sizes.values()),
        loads=len(loads),
        lower_bound=len(set(loads)),
        optimal=False,
        bytes_loaded=sum(sizes[m] for m in loads),
        waves=waves,
    )


async def run_once(executor: Executor, stages: list[list[Call]], plan: Plan, policy: str) -> Sample:
    load_s = 0.0

    def on_event(event: Event) -> None:
        nonlocal load_s
        if isinstance(event, ModelLoaded):
            load_s += event.seconds

    began = time.perf_counter()
    result: RunResult = await executor.run(
        stages, plan, [ChatMessage(role="user", content=QUESTION)], on_event=on_event
    )
    seconds = time.perf_counter() - began
    failed = [c for c in result.calls if not c.ok]
    if failed:
        raise RuntimeError(f"{policy}: {len(failed)} calls failed: {failed[0].error}")
    return Sample(policy, seconds, result.loads, load_s, result.answer)


def summarize(policy: str, samples: list[Sample]) -> Summary:
    seconds = [s.seconds for s in samples]
    return Summary(
        policy=policy,
        runs=len(samples),
        median_s=statistics.median(seconds),
        min_s=min(seconds),
        max_s=max(seconds),
        loads=samples[0].loads,
        median_load_s=statistics.median(s.load_seconds for s in samples),
        samples=seconds,
    )


def describe(plan: Plan) -> str:
    return "; ".join(
        f"L{w.layer} {'+'.join(w.resident)}" + (f" (load {', '.join(w.load)})" if w.load else "")
        for w in plan.waves
    )


async def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    paths = {name: model_file(workdir, name, spec) for name, spec in SPECS.items()}
    config = build_config(paths, args.max_tokens, args.threads)
    sizes = {
        name: estimate(read_gguf(path), n_ctx=N_CTX, n_batch=N_BATCH).total
        for name, path in paths.items()
    }
    budget = sum(sorted(sizes.values())[-2:])  # the two largest, never all three
    stages = calls_for(config.ensemble("default"))
    fewest = make_plan([[c.model for c in s] for s in stages], sizes, budget)
    given = Budget(bytes=budget, source="flag", detail="two of three")
    how = PlanPolicy.from_settings(config.settings, device_budget(given), timed=True)
    shipped = plan_run(stages, sizes, budget, how, prompt=QUESTION)
    plans = {"localmoa": shipped, "one_at_a_time": one_at_a_time_plan(stages, sizes)}
    if shipped.waves != fewest.waves:
        plans["localmoa_loads"] = fewest
    backends = make_backends(config.settings)
    executor = Executor(config.models, backends, sizes=sizes)
    samples: dict[str, list[Sample]] = {policy: [] for policy in plans}
    try:
        await run_once(executor, stages, plans["localmoa"], "warm-up")
        order = list(plans)
        for i in range(args.repeat):
            for policy in order if i % 2 == 0 else order[::-1]:
                sample = await run_once(executor, stages, plans[policy], policy)
                samples[policy].append(sample)
                print(f"  {policy:14} {sample.seconds:6.2f} s, {sample.loads} loads", flush=True)
    finally:
        for backend in backends.values():
            await backend.aclose()
    summaries = {policy: summarize(policy, runs) for policy, runs in samples.items()}
    answers = {s.answer for runs in samples.values() for s in runs}
    return {
        "command": args.command,
        "models": {
            name: {
                "file_mb": round(paths[name].stat().st_size / MB, 1),
                "estimate_mb": round(sizes[name] / MB, 1),
            }
            for name in SPECS
        },
        "budget_mb": round(budget / MB, 1),
        "plans": {policy: describe(plan) for policy, plan in plans.items()},
        "policies": {policy: asdict(s) for policy, s in summaries.items()},
        "ratio": summaries["localmoa"].median_s / summaries["one_at_a_time"].median_s,
        "same_answers": len(answers) == 1,
        "threads": args.threads,
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"`{doc['command']}`",
        "",
        "models: "
        + ", ".join(
            f"{name} {m['file_mb']} MB (estimate {m['estimate_mb']} MB)"
            for name, m in doc["models"].items()
        )
        + f"; budget {doc['budget_mb']} MB (two of three); {doc['threads']} threads per model",
        "",
        "| policy | runs | wall s (median) | min–max | loads | load s (median) | plan |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for policy, s in doc["policies"].items():
        lines.append(
            f"| {policy} | {s['runs']} | {s['median_s']:.2f} | {s['min_s']:.2f}–{s['max_s']:.2f}"
            f" | {s['loads']} | {s['median_load_s']:.2f} | {doc['plans'][policy]} |"
        )
    lines += [
        "",
        f"localmoa / one_at_a_time (median wall): **{doc['ratio']:.3f}**; "
        f"same answers under both: {'yes' if doc['same_answers'] else 'NO'}",
    ]
    return "\n".join(lines)


def real_run_options(
    doc: str | None, *, repeat: int, per: str, max_tokens: int
) -> argparse.ArgumentParser:
    """The options every benchmark of real llama.cpp runs takes, spelled once."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=repeat, help=f"timed runs per {per}")
    parser.add_argument(
        "--max-tokens", type=int, default=max_tokens, help="tokens each call writes"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="llama.cpp threads per model; 0 leaves n_threads unset, as localmoa's default does",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "localmoa-bench",
        help="where the model files are written and reused (default: %(default)s)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = real_run_options(__doc__, repeat=2, per="policy", max_tokens=32)
    args = parser.parse_args(argv)
    args.command = shlex.join(["python", "scripts/bench_real_swap.py", *(argv or sys.argv[1:])])
    args.workdir.mkdir(parents=True, exist_ok=True)
    doc = asyncio.run(bench(args, args.workdir))
    print(json.dumps(doc, indent=2) if args.json else markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
