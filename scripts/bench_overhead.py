"""Orchestration overhead per call: the executor around a backend that answers instantly.

    python scripts/bench_overhead.py [--runs 50]

A 6-model x 3-layer ensemble (6 agents per layer, 19 calls) runs on the shipped fake backend
with zero load time and zero token time, under a budget that forces swaps, so what is measured is
localmoa's own work per call: request building, locks, events, swaps, records. Each answer is 20
pieces long, streamed piece by piece as a real model would. Reported: median and p95 wall time per
call over the runs.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from localmoa.backends.base import ChatMessage
from localmoa.backends.fake import FakeBackend
from localmoa.config import Agent, Ensemble, FakeModel
from localmoa.planning.fewest_loads import make_plan
from localmoa.runtime.engine import Event, Executor
from localmoa.runtime.moa import calls_for, stages_of

GiB = 1 << 30
NAMES = [f"model{i}" for i in range(6)]
REPLY = " ".join(["word"] * 20)


async def one_run() -> tuple[float, int]:
    models = {n: FakeModel(backend="fake", memory=GiB, reply=REPLY) for n in NAMES}
    ensemble = Ensemble(layers=[NAMES, NAMES, NAMES], aggregator=Agent(model=NAMES[0]))
    plan = make_plan(stages_of(ensemble), {n: GiB for n in NAMES}, 4 * GiB)
    events: list[Event] = []
    executor = Executor(models, {"fake": FakeBackend()}, on_event=events.append)
    stages = calls_for(ensemble)
    question = [ChatMessage(role="user", content="Why is the sky blue?")]
    began = time.perf_counter()
    result = await executor.run(stages, plan, question)
    return time.perf_counter() - began, len(result.calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    per_call = []
    for _ in range(args.runs):
        seconds, calls = asyncio.run(one_run())
        per_call.append(seconds / calls * 1000)
    p95 = statistics.quantiles(per_call, n=20)[-1]
    print(f"calls per run: {calls}; runs: {args.runs}")
    print(f"overhead per call: median {statistics.median(per_call):.3f} ms, p95 {p95:.3f} ms")


if __name__ == "__main__":
    main()
