"""The README's timeline pictures: a real tiny-model run, and its plan as the cost model saw it.

    python scripts/readme_pictures.py [OUT.svg] [--plan PLAN.svg] [--max-tokens 48]

Defaults: ``scripts/pictures/timeline.svg`` and, beside it, ``plan-timeline.svg`` (.png works
too). Three random-weight GGUF models (``localmoa.tinymodels``: tiny-a, tiny-b, tiny-c, written
to a temporary folder; nothing is downloaded) form the demo's ensemble (scripts/demo.sh): two
layers of all three, tiny-c aggregating, under a budget that holds the two largest models and
never all three, so the plan must swap. The budget is computed from the footprints localmoa
estimates, so it keeps forcing a swap whatever those estimates become.

The run goes through the one engine as ``localmoa run`` does, real llama.cpp on the CPU, and is
recorded by the run log into a temporary ``LOCALMOA_HOME`` (the user's own log is never touched).
The picture is drawn from the recorded run, as ``localmoa logs show ID --timeline OUT.svg``
draws it; the plan's picture from the cost model's simulation of the same plan with the same
prompt, as ``localmoa plan --timeline`` draws it. Put side by side, they show where the
estimate and the machine agree.

The model weights are random, so the answers are noise; the loads, the swaps, the timings and
the memory are real. Measured times vary from run to run, so each run draws a different picture;
the same recorded run always draws the same bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the repository's package wins over an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localmoa.backends import make_backends
from localmoa.backends.base import Backend, ChatMessage
from localmoa.config import Config, parse_config
from localmoa.records.models import RunDetail
from localmoa.records.recorder import Recorder
from localmoa.records.timeline import draw, draw_run, from_plan
from localmoa.runtime.engine import Executor
from localmoa.runtime.moa import stage_label
from localmoa.runtime.prepare import Prepared, prepare
from localmoa.sizes import format_bytes
from localmoa.tinymodels import PRESETS, ensemble_config, write_tiny_model

HERE = Path(__file__).resolve().parent
MODELS = ("tiny-a", "tiny-b", "tiny-c")
PROMPT = "Why would anyone run language models locally?"
SLACK = 1 << 20
"""Over the two largest models' bytes, so rounding never makes them not fit together."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Draw the README's timeline pictures.")
    parser.add_argument(
        "output",
        nargs="?",
        type=Path,
        default=HERE / "pictures" / "timeline.svg",
        help="the run's picture, .svg or .png (default scripts/pictures/timeline.svg)",
    )
    parser.add_argument(
        "--plan", type=Path, help="the plan's picture (default: plan-OUTPUT beside it)"
    )
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens per call (48)")
    args = parser.parse_args(argv)
    output: Path = args.output
    plan_output: Path = args.plan or output.with_name(f"plan-{output.name}")
    output.parent.mkdir(parents=True, exist_ok=True)
    plan_output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="localmoa-pictures-") as scratch:
        home = Path(scratch) / "home"
        home.mkdir(mode=0o700)
        os.environ["LOCALMOA_HOME"] = str(home)  # the run log goes here, not to the user's
        paths = {
            name: write_tiny_model(Path(scratch) / f"{name}.gguf", PRESETS[name]) for name in MODELS
        }
        detail, prepared = asyncio.run(run(paths, args.max_tokens))
    draw_run(detail, output)
    draw(from_plan(prepared, prompt=PROMPT), plan_output)
    loads = len(detail.loads)
    print(f"run {detail.id}: {len(detail.calls)} calls, {loads} loads, {detail.seconds:.2f} s")
    print(f"plan: {prepared.plan.loads} loads, budget {format_bytes(prepared.plan.budget_bytes)}")
    print(f"wrote {output} and {plan_output}")
    return 0


async def run(paths: dict[str, Path], max_tokens: int) -> tuple[RunDetail, Prepared]:
    """Run the ensemble once, recorded; return the recorded run and what it was planned from."""
    document: dict[str, Any] = ensemble_config(paths, max_tokens=max_tokens, seed=7)
    document["ensembles"]["default"]["aggregator"] = "tiny-c"
    config = parse_config(document)
    backends = make_backends(config.settings)
    try:
        budget = await swap_budget(config, backends)
        prepared = await prepare(
            config, "default", backends, memory_budget=str(budget), prompt=PROMPT
        )
        detail = await recorded_run(config, backends, prepared)
    finally:
        for backend in backends.values():
            await backend.aclose()
    return detail, prepared


async def swap_budget(config: Config, backends: dict[str, Backend]) -> int:
    """Bytes that hold the two largest models together and never all three."""
    probe = await prepare(config, "default", backends, memory_budget="1TiB")
    sizes = sorted((fp.total for fp in probe.footprints.values()), reverse=True)
    budget = sizes[0] + sizes[1] + SLACK
    if budget >= sum(sizes):
        raise SystemExit(f"the tiny models ({sizes} bytes) cannot be made to swap")
    return budget


async def recorded_run(
    config: Config, backends: dict[str, Backend], prepared: Prepared
) -> RunDetail:
    """Run ``prepared`` through the engine with every event going to the run log's recorder,
    and read the run back from the log."""
    settings = config.settings.model_copy(update={"record": "full"})
    recorder = Recorder.open(settings)
    conversation = [ChatMessage(role="user", content=PROMPT)]
    models = prepared.models or config.models
    recording = recorder.start(
        source="run",
        ensemble="default",
        ensemble_config=config.ensemble("default"),
        plan=prepared.plan,
        budget=prepared.budget,
        conversation=conversation,
        models=models,
        stages=[stage_label(stage) for stage in prepared.stages],
    )
    executor = Executor(
        models,
        backends,
        max_parallel_calls=settings.max_parallel_calls,
        max_calls_per_second=settings.max_calls_per_second,
        on_event=recording.on_event,
        sizes={name: fp.total for name, fp in prepared.footprints.items()},
        policy=prepared.policy,
    )
    result = await executor.run(prepared.stages, prepared.plan, conversation)
    recording.finish(status="ok", answer=result.answer, seconds=result.seconds)
    if recording.id is None or recorder.store is None:
        raise SystemExit("the run log could not be written: see the warning above")
    found: RunDetail = recorder.store.run(recording.id)
    return found


if __name__ == "__main__":
    raise SystemExit(main())
