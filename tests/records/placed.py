"""A recorded run whose calls and loads say where they ran, as on several devices and nodes.

The engine fills ``CallRecord.device``/``node`` and ``ModelLoaded.device``/``node`` from the
plan's placement; here the fake backend's run has them filled the same way on their way to the
recorder, so the records and ``logs`` are tested without a second GPU or a Ray cluster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from localmoa.backends import FakeBackend
from localmoa.backends.base import ChatMessage
from localmoa.config import Agent, Ensemble, FakeModel, Settings
from localmoa.planning.fewest_loads import make_plan
from localmoa.records.recorder import Recorder
from localmoa.runtime.engine import Executor
from localmoa.runtime.events import CallFinished, Event, ModelLoaded
from localmoa.runtime.moa import calls_for, stages_of

GiB = 1 << 30

PLACES: dict[str, tuple[str | None, str | None]] = {
    "a": ("gpu0", None),  # a GPU of this machine
    "b": ("gpu1", "nodeB"),  # a GPU of a cluster node, its name not saying the node's
    "c": (None, None),  # placed by its backend (an Ollama model): nowhere in the plan
    "d": ("nodeC/gpu0", "nodeC"),  # a cluster node's GPU, named with its node
}
"""Each model's (device, node)."""


def placing(on_event: Callable[[Event], None]) -> Callable[[Event], None]:
    """``on_event`` with every load and call given its model's place from :data:`PLACES`."""

    def placed(event: Event) -> None:
        if isinstance(event, ModelLoaded):
            device, node = PLACES[event.model]
            event = dataclasses.replace(event, device=device, node=node)
        elif isinstance(event, CallFinished):
            device, node = PLACES[event.record.model]
            record = event.record.model_copy(update={"device": device, "node": node})
            event = dataclasses.replace(event, record=record)
        on_event(event)

    return placed


async def record_placed_run() -> str:
    """Run a fake ensemble of a, b, c and d (two layers, ``a`` aggregating) into the run log, each
    call and load placed as :data:`PLACES` says; the recorded run's id."""
    models = {name: FakeModel(backend="fake", memory=GiB) for name in PLACES}
    layer = [Agent(model=name) for name in PLACES]
    ensemble = Ensemble(layers=[layer, layer], aggregator=Agent(model="a"))
    plan = make_plan(stages_of(ensemble), {name: GiB for name in models}, 4 * GiB)
    question = [ChatMessage(role="user", content="where did you run?")]
    recorder = Recorder.open(Settings())
    recording = recorder.start(
        source="run",
        ensemble="placed",
        ensemble_config=ensemble,
        plan=plan,
        conversation=question,
        models=models,
    )
    assert recording.id is not None
    executor = Executor(models, {"fake": FakeBackend()}, on_event=placing(recording.on_event))
    result = await executor.run(calls_for(ensemble), plan, question)
    recording.finish("ok", answer=result.answer, seconds=result.seconds)
    recorder.close()
    return recording.id
