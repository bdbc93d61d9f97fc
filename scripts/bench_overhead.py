"""Orchestration overhead per call: the executor around a backend that answers instantly.

    python scripts/bench_overhead.py [--runs 50]

A 6-model x 3-layer ensemble (6 agents per layer, 19 calls) runs on the shipped fake backend
with zero load time and zero token time, under a budget that forces swaps, so what is measured is
localmoa's own work per call: request building, locks, events, swaps, records. Each answer is 20
pieces long, streamed piece by piece as a real model would. Reported: median and p95 wall time per
call over the runs, without and with the run log (``record = "full"``: every call's messages and
answer written to SQLite as it ends, in a temporary LOCALMOA_HOME), the two modes interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from localmoa.backends.base import ChatMessage
from localmoa.backends.fake import FakeBackend
from localmoa.config import Agent, Ensemble, FakeModel, Settings
from localmoa.planning.fewest_loads import make_plan
from localmoa.runtime.engine import Event, Executor
from localmoa.runtime.moa import calls_for, stages_of

GiB = 1 << 30
NAMES = [f"model{i}" for i in range(6)]
REPLY = " ".join(["word"] * 20)


async def one_run(record: bool) -> tuple[float, int]:
    from localmoa.records.recorder import Recorder

    models = {n: FakeModel(backend="fake", memory=GiB, reply=REPLY) for n in NAMES}
    ensemble = Ensemble(layers=[NAMES, NAMES, NAMES], aggregator=Agent(model=NAMES[0]))
    plan = make_plan(stages_of(ensemble), {n: GiB for n in NAMES}, 4 * GiB)
    events: list[Event] = []
    question = [ChatMessage(role="user", content="Why is the sky blue?")]
    began = time.perf_counter()
    on_event = events.append
    recording = None
    if record:
        recorder = Recorder.open(Settings(record="full"))
        recording = recorder.start(
            source="run",
            ensemble="bench",
            ensemble_config=ensemble,
            plan=plan,
            conversation=question,
            models=models,
        )
        on_event = recording.on_event
    executor = Executor(models, {"fake": FakeBackend()}, on_event=on_event)
    result = await executor.run(calls_for(ensemble), plan, question)
    if recording is not None:
        recording.finish("ok", answer=result.answer, seconds=result.seconds)
        recorder.close()
    return time.perf_counter() - began, len(result.calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    os.environ["LOCALMOA_HOME"] = tempfile.mkdtemp(prefix="bench-overhead-")
    os.environ.pop("LOCALMOA_RECORD", None)
    per_call: dict[bool, list[float]] = {False: [], True: []}
    calls = 0
    for _ in range(args.runs):
        for record in (False, True):
            seconds, calls = asyncio.run(one_run(record))
            per_call[record].append(seconds / calls * 1000)
    print(f"calls per run: {calls}; runs: {args.runs} each way, interleaved")
    for record, label in ((False, "without the run log"), (True, "with the run log (full)")):
        times = per_call[record]
        p95 = statistics.quantiles(times, n=20)[-1]
        print(
            f"overhead per call {label}: median {statistics.median(times):.3f} ms, p95 {p95:.3f} ms"
        )


if __name__ == "__main__":
    main()
