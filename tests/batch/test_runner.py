"""The batch engine: prompts planned together load each model once per stage per chunk, one
model's calls for many prompts are made together, one prompt's failure stays its own, models
stay loaded between chunks, and every prompt is a recorded run."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from localmoa.backends import make_backends
from localmoa.backends.base import ChatMessage
from localmoa.backends.fake import FakeBackend
from localmoa.batch.jobs import Job
from localmoa.batch.runner import (
    CHUNK_MAX,
    BatchPlan,
    Outcome,
    choose_chunk,
    choose_chunk_sizes,
    ensemble_system,
    model_system,
    plan_batch,
    run_batch,
)
from localmoa.config import Config, LlamaCppModel, load_config
from localmoa.errors import BudgetError
from localmoa.records.recorder import Recorder
from localmoa.runtime.engine import CallStarted, Event, ModelLoaded
from tests.cli.invoke import TWO_OF_THREE
from tests.conftest import write_config

THREE = TWO_OF_THREE


def config_of(tmp_path: Path, text: str = THREE) -> Config:
    return load_config(write_config(tmp_path, text))


def jobs(n: int, text: str = "question {i}") -> list[Job]:
    return [
        Job(id=str(i), messages=[ChatMessage(role="user", content=text.format(i=i))])
        for i in range(n)
    ]


def run(
    config: Config,
    planned: BatchPlan,
    todo: list[Job],
    *,
    events: list[Event] | None = None,
    recorder: Recorder | None = None,
) -> tuple[list[list[Outcome]], int, FakeBackend]:
    backends = make_backends(config.settings)
    chunks: list[list[Outcome]] = []

    async def go() -> int:
        return await run_batch(
            config,
            planned,
            todo,
            backends,
            on_chunk=chunks.append,
            on_event=None if events is None else events.append,
            recorder=recorder,
        )

    loads = asyncio.run(go())
    fake = backends["fake"]
    assert isinstance(fake, FakeBackend)
    return chunks, loads, fake


def plan(config: Config, prompts: int, **options: object) -> BatchPlan:
    systems = [ensemble_system(config, "default")]
    return asyncio.run(
        plan_batch(config, systems, prompts, make_backends(config.settings), **options)  # type: ignore[arg-type]
    )


def test_sixteen_prompts_need_no_more_loads_than_one(tmp_path: Path) -> None:
    config = config_of(tmp_path)
    one = plan(config, 1)
    sixteen = plan(config, 16)
    assert one.loads == 4
    assert sixteen.chunk == 16 and sixteen.chunks == 1
    assert sixteen.loads <= one.loads + 1
    chunks, loads, fake = run(config, sixteen, jobs(16))
    assert loads == sixteen.loads
    assert len([e for e in fake.events if e[0] == "load"]) == loads
    (outcomes,) = chunks
    assert [o.job.id for o in outcomes] == [str(i) for i in range(16)]
    assert all(o.ok for o in outcomes)
    # each prompt's own answer: the aggregator of prompt i answered prompt i
    assert [o.answer for o in outcomes] == [f"a has considered: question {i}" for i in range(16)]


def test_one_models_calls_for_all_prompts_are_made_together(tmp_path: Path) -> None:
    config = config_of(tmp_path)
    planned = plan(config, 4)
    events: list[Event] = []
    run(config, planned, jobs(4), events=events)
    started = [e.call for e in events if isinstance(e, CallStarted)]
    # calls start grouped: all four prompts' layer-1 calls to one model in a row
    first = [(c.stage, c.model) for c in started[:4]]
    assert len(set(first)) == 1
    assert sorted(c.job for c in started[:4]) == [0, 1, 2, 3]


def test_the_chunk_is_the_size_with_fewest_loads_for_the_batch(tmp_path: Path) -> None:
    config = config_of(tmp_path)
    planned = plan(config, 40)
    assert planned.chunk == CHUNK_MAX
    assert planned.chunks == 3
    assert planned.tried[1] is not None and planned.tried[16] is not None
    assert planned.tried[16] < planned.tried[1]
    assert choose_chunk(planned.tried) == planned.chunk
    assert choose_chunk_sizes(5) == [1, 2, 4, 5]
    assert choose_chunk({1: 8, 2: 8, 4: None}) == 2  # a tie goes to the larger chunk
    assert choose_chunk({1: None}) is None


def test_models_stay_loaded_from_one_chunk_to_the_next(tmp_path: Path) -> None:
    config = config_of(tmp_path)
    planned = plan(config, 6, chunk=2)
    assert planned.chunk == 2 and planned.chunks == 3
    chunks, loads, fake = run(config, planned, jobs(6))
    assert [len(c) for c in chunks] == [2, 2, 2]
    # each chunk planned knowing the next keeps what both need: 4, then 2 a chunk (one alone: 4)
    assert loads == planned.loads == 8
    assert fake.peak_bytes <= planned.budget.bytes


def test_a_prompt_that_cannot_fit_fails_alone(tmp_path: Path) -> None:
    text = THREE.replace('memory = "1GiB"', 'memory = "1GiB"\nn_ctx = 400')
    config = config_of(tmp_path, text + "max_tokens = 16\n")
    todo = jobs(3)
    todo[1] = Job(id="1", messages=[ChatMessage(role="user", content="x" * 5000)])
    chunks, _, _ = run(config, plan(config, 3), todo)
    outcomes = [o for chunk in chunks for o in chunk]
    assert [o.ok for o in outcomes] == [True, False, True]
    assert outcomes[1].error is not None and "shorten the prompt" in outcomes[1].error
    assert outcomes[1].result is None


def test_a_prompt_whose_stage_fails_does_not_end_the_others(tmp_path: Path) -> None:
    text = THREE + '\n[models.d]\nbackend = "fake"\nmemory = "1GiB"\nfail = "broken"\n'
    text += '[ensembles.weak]\nlayers = [["d"]]\naggregator = "a"\n'
    config = config_of(tmp_path, text)
    systems = [ensemble_system(config, "default"), ensemble_system(config, "weak")]
    backends = make_backends(config.settings)
    planned = asyncio.run(plan_batch(config, systems, 2, backends))
    chunks, _, _ = run(config, planned, jobs(2))
    outcomes = [o for chunk in chunks for o in chunk]
    assert [(o.job.id, o.system.name, o.ok) for o in outcomes] == [
        ("0", "default", True),
        ("0", "weak", False),
        ("1", "default", True),
        ("1", "weak", False),
    ]
    assert "broken" in (outcomes[1].error or "")


def test_systems_and_prompts_are_one_plan(tmp_path: Path) -> None:
    config = config_of(tmp_path)
    systems = [ensemble_system(config, "default", label="moa/default")] + [
        model_system(config, "default", m) for m in "abc"
    ]
    backends = make_backends(config.settings)
    planned = asyncio.run(plan_batch(config, systems, 4, backends))
    assert planned.chunk == 4
    chunks, loads, _ = run(config, planned, jobs(4))
    outcomes = [o for chunk in chunks for o in chunk]
    assert len(outcomes) == 16
    alone = [o for o in outcomes if o.system.name == "model/b"]
    assert [o.answer for o in alone] == [f"b has considered: question {i}" for i in range(4)]
    assert all(len(o.result.calls) == 1 for o in alone if o.result)
    assert loads <= 5  # the single-model calls ride on the ensemble's loads


def test_self_moa_samples_of_every_prompt_are_one_group(tmp_path: Path) -> None:
    config = config_of(tmp_path)
    text = """
    [models.m]
    backend = "llamacpp"
    path = "m.gguf"
    [ensembles.default]
    layers = [[{ model = "m", samples = 3 }]]
    aggregator = "m"
    """
    path = write_config(tmp_path, text)
    (tmp_path / "m.gguf").write_bytes(b"")
    config = load_config(path)
    system = ensemble_system(config, "default")
    from localmoa.batch.runner import _merged, _stages
    from localmoa.runtime.prepare import run_models

    models = run_models(config.models, _merged(_stages([system], 4)))
    table = models["m"]
    assert isinstance(table, LlamaCppModel)
    assert table.parallel == 12  # 4 prompts x 3 samples decode as one context's sequences


def test_a_budget_too_small_for_one_prompt_is_refused(tmp_path: Path) -> None:
    config = config_of(
        tmp_path, THREE.replace('memory_budget = "2GiB"', 'memory_budget = "512MiB"')
    )
    with pytest.raises(BudgetError, match="budget from"):
        plan(config, 4)


def test_every_prompt_is_a_recorded_batch_run(tmp_path: Path) -> None:
    config = config_of(tmp_path)
    recorder = Recorder.open(config.settings)
    events: list[Event] = []
    chunks, _, _ = run(config, plan(config, 3), jobs(3), events=events, recorder=recorder)
    outcomes = [o for chunk in chunks for o in chunk]
    assert recorder.store is not None
    ids = [o.run_id for o in outcomes]
    assert all(ids) and len(set(ids)) == 3
    for outcome in outcomes:
        assert outcome.run_id is not None
        detail = recorder.store.run(outcome.run_id)
        assert detail.source == "batch" and detail.status == "ok"
        assert detail.answer == outcome.answer
        assert len(detail.calls) == 7  # its own calls only
        assert detail.conversation is not None
        assert detail.conversation[-1].content == outcome.job.messages[-1].content
    assert any(isinstance(e, ModelLoaded) for e in events)


SPARSE = """
[settings]
memory_budget = "2GiB"
[models.a]
backend = "fake"
memory = "1GiB"
[models.b]
backend = "fake"
memory = "1GiB"
[models.c]
backend = "fake"
memory = "1GiB"
[models.j]
backend = "fake"
memory = "1GiB"
reply = "{prompt}"
[ensembles.default]
layers = [["a", "b"], ["c", "b"]]
aggregator = "a"
judge = { model = "j", top_k = 1, early_stop = true }
"""
"""A judge that answers with the prompt: each prompt carries its own verdict."""


def test_each_prompts_judge_decides_for_that_prompt_alone(tmp_path: Path) -> None:
    config = config_of(tmp_path, SPARSE)
    stop = '{"selected": [2], "stop": true, "reason": "enough"}'
    go_on = '{"selected": [1], "stop": false, "reason": "more"}'
    todo = [
        Job(id="stops", messages=[ChatMessage(role="user", content=stop)]),
        Job(id="goes on", messages=[ChatMessage(role="user", content=go_on)]),
    ]
    chunks, _, _ = run(config, plan(config, 2), todo)
    stopped, went_on = (o for chunk in chunks for o in chunk)
    assert stopped.ok and went_on.ok
    assert stopped.result is not None and went_on.result is not None
    assert stopped.result.skipped_layers == [2]
    assert went_on.result.skipped_layers == []
    assert {c.model for c in stopped.result.calls} == {"a", "b", "j"}
    assert "c" in {c.model for c in went_on.result.calls}


def test_when_every_prompt_stops_early_a_model_only_later_layers_need_never_loads(
    tmp_path: Path,
) -> None:
    config = config_of(tmp_path, SPARSE)
    stop = '{"selected": [1], "stop": true, "reason": "enough"}'
    todo = [Job(id=str(i), messages=[ChatMessage(role="user", content=stop)]) for i in range(3)]
    chunks, _, fake = run(config, plan(config, 3), todo)
    assert all(o.ok for chunk in chunks for o in chunk)
    assert "c" not in [m for kind, m in fake.events if kind == "load"]


def test_a_batch_places_its_models_on_several_devices(tmp_path: Path) -> None:
    """Two 6 GiB models on a declared 2 x 8 GiB machine: every chunk keeps both side by side,
    one per device (2 loads for 8 prompts in chunks of 2); one 8 GiB device reloads."""
    from tests.cli.test_placement_cli import TWO_DEVICES

    config = config_of(tmp_path, TWO_DEVICES)
    two = plan(config, 8, chunk=2)
    one = plan(config, 8, chunk=2, memory_budget="8GiB")
    assert two.loads == 2 and one.loads > two.loads
    assert [d.name for d in two.placing.devices] == ["gpu0", "gpu1"]
    chunks, loads, fake = run(config, two, jobs(8))
    assert loads == 2 and all(o.ok for chunk in chunks for o in chunk)
    where = {m: p.device.name for m, p in fake.placements.items() if p is not None}
    assert where == {"a": "gpu0", "b": "gpu1"}
