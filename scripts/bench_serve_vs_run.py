"""A `localmoa serve` request against `localmoa run`: the same ensemble on the same budget.

    python scripts/bench_serve_vs_run.py [--repeat 4] [--max-tokens 32] [--threads N] [--json]
                                         [--workdir DIR]

The promise (issue #10): a request to the server takes as long as ``localmoa run`` of the same
ensemble, where loads can overlap calls, since both are planned by the one planner entry and run
by the one engine; only the memory seam differs (the run's own budget, the server's shared pool).

The ensemble is ``scripts/bench_real_swap.py``'s: three random-weight F32 GGUF models of about
310, 235 and 150 MB (``use_mmap = false``, so a load copies the weights and an unload frees
them), two layers of all three and the largest aggregating: 7 calls of ``--max-tokens`` tokens.
The budget holds the two largest by localmoa's estimate, never all three, so every run swaps.

Three modes, in one process, alternating (run, serve, serve-warm; then serve, serve-warm, run;
...) ``--repeat`` times each after one untimed round, so drift on a noisy machine falls on all:

- ``run``: what ``localmoa run`` does once its process is up: ``prepare`` (footprints, budget,
  ``plan_run`` with the settings' policy) and the engine on the run's own budget, which unloads
  everything at the end; timed from ``prepare`` to the answer. The server's pool is emptied
  first, so that, as for ``serve``, nothing is loaded and what was has just been freed;
- ``serve``: one request to a ``MoaServer`` (real uvicorn on loopback in a thread, the official
  ``openai`` client), its pool emptied first so that it starts cold, as a run does; timed from
  sending the request to the whole answer (planning, HTTP and JSON included);
- ``serve-warm``: the same request right after, the pool holding what the previous request left
  (a server's steady state). Not part of the comparison: it shows what keeping models buys.

Reported per mode: median wall-clock, min–max, loads; the ratio serve / run of the medians, the
median of each round's own serve / run (the two ran back to back, so load from other processes
falls on both: the steadier figure on a shared machine), and whether every mode gave the same
answer (temperature 0, fixed seed).

On a CPU build of llama.cpp with OpenMP, a model that has computed and stays loaded keeps its
OpenMP threads; once a process has more OpenMP threads than cores, libgomp stops spinning
between parallel regions and every call decodes slower (measured here: the aggregator's call
0.40 s alone, 0.65 s beside an idle model that had answered; unloading it restores 0.40 s). A
server keeps idle models loaded for the next request, a run unloads them: with ``--threads``
at the number of cores the serve figures carry that cost. ``--threads 1`` (no OpenMP team per
model) compares the engines alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai

# Run from a checkout without installing: the repository's package wins over an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_real_swap import (
    N_BATCH,
    N_CTX,
    QUESTION,
    SPECS,
    build_config,
    model_file,
    real_run_options,
)
from bench_serve import Serving

from localmoa.backends import make_backends
from localmoa.backends.base import Backend, ChatMessage
from localmoa.config import Config
from localmoa.footprint.estimate import estimate, read_gguf
from localmoa.hardware import Budget
from localmoa.runtime.engine import Executor
from localmoa.runtime.prepare import prepare

MB = 10**6
MODES = ("run", "serve", "serve-warm")


@dataclass
class Sample:
    mode: str
    seconds: float
    loads: int
    answer: str


async def run_once(config: Config, backends: dict[str, Backend], budget: Budget) -> Sample:
    """``localmoa run``, in process: prepare, then the engine on the run's own budget."""
    began = time.perf_counter()
    prepared = await prepare(
        config, "default", backends, memory_budget=str(budget.bytes), prompt=QUESTION
    )
    settings = config.settings
    executor = Executor(
        config.models,
        backends,
        max_parallel_calls=settings.max_parallel_calls,
        max_calls_per_second=settings.max_calls_per_second,
        sizes={name: fp.total for name, fp in prepared.footprints.items()},
        policy=prepared.policy,
    )
    result = await executor.run(
        prepared.stages, prepared.plan, [ChatMessage(role="user", content=QUESTION)]
    )
    failed = [c for c in result.calls if not c.ok]
    if failed:
        raise RuntimeError(f"run: {len(failed)} calls failed: {failed[0].error}")
    return Sample("run", time.perf_counter() - began, result.loads, result.answer)


async def serve_once(
    client: openai.AsyncOpenAI, serving: Serving, mode: str, max_tokens: int
) -> Sample:
    """One request; ``serve`` empties the pool first, ``serve-warm`` keeps what it holds."""
    if mode == "serve":
        await serving.empty_pool()
    loads = serving.pool_loads
    began = time.perf_counter()
    reply = await client.chat.completions.create(
        model="moa/default",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=max_tokens,
        temperature=0.0,
    )
    seconds = time.perf_counter() - began
    return Sample(mode, seconds, serving.pool_loads - loads, reply.choices[0].message.content or "")


async def measure(
    args: argparse.Namespace, config: Config, budget: Budget, serving: Serving
) -> list[Sample]:
    backends = make_backends(config.settings)
    samples: list[Sample] = []
    async with (
        openai.DefaultAsyncHttpxClient(trust_env=False, timeout=600) as http,  # loopback: no proxy
        openai.AsyncOpenAI(
            base_url=serving.url, api_key="unused", http_client=http, max_retries=0
        ) as client,
    ):
        try:
            await run_once(config, backends, budget)  # untimed: page cache, first loads
            await serve_once(client, serving, "serve", args.max_tokens)
            for i in range(args.repeat):
                order = MODES if i % 2 == 0 else ("serve", "serve-warm", "run")
                for mode in order:
                    if mode == "run":
                        await serving.empty_pool()  # both start with nothing loaded anywhere
                        sample = await run_once(config, backends, budget)
                    else:
                        sample = await serve_once(client, serving, mode, args.max_tokens)
                    samples.append(sample)
                    print(
                        f"  {mode:10} {sample.seconds:6.2f} s, {sample.loads} loads",
                        file=sys.stderr,
                    )
        finally:
            for backend in backends.values():
                await backend.aclose()
    return samples


def report(args: argparse.Namespace, budget: Budget, samples: list[Sample]) -> dict[str, Any]:
    modes: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        mine = [s for s in samples if s.mode == mode]
        seconds = [s.seconds for s in mine]
        modes[mode] = {
            "runs": len(mine),
            "median_s": statistics.median(seconds),
            "min_s": min(seconds),
            "max_s": max(seconds),
            "loads": sorted({s.loads for s in mine}),
            "samples": seconds,
        }
    runs = [s.seconds for s in samples if s.mode == "run"]
    serves = [s.seconds for s in samples if s.mode == "serve"]
    paired = [serve / run for serve, run in zip(serves, runs, strict=True)]
    return {
        "command": args.command,
        "budget_mb": round(budget.bytes / MB, 1),
        "threads": args.threads,
        "max_tokens": args.max_tokens,
        "modes": modes,
        "ratio_serve_run": modes["serve"]["median_s"] / modes["run"]["median_s"],
        "paired_ratio_median": statistics.median(paired),
        "paired_ratios": paired,
        "same_answers": len({s.answer for s in samples}) == 1,
        "raw": [asdict(s) for s in samples],
    }


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"`{doc['command']}`",
        "",
        f"budget {doc['budget_mb']} MB (two of three models); {doc['threads']} threads per "
        f"model; 7 calls of {doc['max_tokens']} tokens",
        "",
        "| mode | runs | wall s (median) | min–max | loads |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, m in doc["modes"].items():
        lines.append(
            f"| {mode} | {m['runs']} | {m['median_s']:.2f} | {m['min_s']:.2f}–{m['max_s']:.2f} "
            f"| {', '.join(map(str, m['loads']))} |"
        )
    lines += [
        "",
        f"serve / run (median wall): **{doc['ratio_serve_run']:.3f}**; median of each round's "
        f"serve / run (the two ran back to back): **{doc['paired_ratio_median']:.3f}**; "
        f"same answers in every mode: {'yes' if doc['same_answers'] else 'NO'}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = real_run_options(__doc__, repeat=4, per="mode", max_tokens=32)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.max_tokens < 1:
        parser.error("--repeat and --max-tokens must be positive")
    args.command = shlex.join(["python", "scripts/bench_serve_vs_run.py", *(argv or sys.argv[1:])])
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = {name: model_file(args.workdir, name, spec) for name, spec in SPECS.items()}
    config = build_config(paths, args.max_tokens, args.threads)
    sizes = [estimate(read_gguf(p), n_ctx=N_CTX, n_batch=N_BATCH).total for p in paths.values()]
    room = sum(sorted(sizes)[-2:])  # the two largest, never all three
    budget = Budget(bytes=room, source="flag", detail="bench_serve_vs_run: two of three")
    with Serving(config, budget, max_queue=4) as serving:
        samples = asyncio.run(measure(args, config, budget, serving))
    doc = report(args, budget, samples)
    print(json.dumps(doc, indent=2) if args.json else markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
