"""The executor with the shipped fake backend: residency, references, failures, cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from localmoa.backends.base import ChatDelta, ChatMessage, ChatRequest
from localmoa.backends.fake import FakeBackend
from localmoa.config import Agent, Ensemble, FakeModel
from localmoa.errors import LayerFailedError
from localmoa.planning.fewest_loads import Plan, make_plan
from localmoa.runtime.engine import CallPiece, CallStarted, Event, Executor, RunResult, WaveStarted
from localmoa.runtime.moa import AGGREGATE_PROMPT, calls_for, stages_of

GiB = 1 << 30
QUESTION = [ChatMessage(role="user", content="Why is the sky blue?")]


class CountingFake(FakeBackend):
    """Records the most streams open at once, overall and per model."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.active: dict[str, int] = {}
        self.most_at_once = 0
        self.most_per_model = 0

    async def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        self.active[name] = self.active.get(name, 0) + 1
        self.most_at_once = max(self.most_at_once, sum(self.active.values()))
        self.most_per_model = max(self.most_per_model, self.active[name])
        try:
            async for piece in super().chat(name, request):
                yield piece
        finally:
            self.active[name] -= 1


def fake_models(*names: str, **overrides: dict[str, Any]) -> dict[str, FakeModel]:
    return {n: FakeModel(backend="fake", memory=GiB, **overrides.get(n, {})) for n in names}


async def run(
    ensemble: Ensemble,
    models: dict[str, FakeModel],
    budget: int,
    backend: FakeBackend | None = None,
    **kwargs: Any,
) -> tuple[RunResult, FakeBackend]:
    backend = backend or FakeBackend(capacity=budget)
    sizes = {n: int(m.memory) for n, m in models.items()}
    plan = make_plan(stages_of(ensemble), sizes, budget)
    executor = Executor(models, {"fake": backend}, **kwargs)
    return await executor.run(calls_for(ensemble), plan, QUESTION), backend


THREE = Ensemble(layers=[["a", "b", "c"], ["a", "b", "c"]], aggregator=Agent(model="a"))


async def test_follows_the_plan_within_capacity_and_unloads_at_the_end() -> None:
    result, backend = await run(THREE, fake_models("a", "b", "c"), int(2.5 * GiB))
    loads = [m for kind, m in backend.events if kind == "load"]
    planned = [m for wave in result.plan.waves for m in wave.load]
    assert loads == planned and result.loads == len(loads) == 4
    assert backend.peak_bytes <= int(2.5 * GiB)
    assert backend.resident == {}
    assert len(result.calls) == 7 and all(c.ok for c in result.calls)
    assert result.answer == "a has considered: Why is the sky blue?"


async def test_later_layers_see_numbered_references_once() -> None:
    _, backend = await run(THREE, fake_models("a", "b", "c"), 3 * GiB)
    first = [r for n, r in backend.requests[:3]]
    later = [r for n, r in backend.requests[3:]]
    assert all(r.messages == QUESTION for r in first)
    for request in later:
        system, user = request.messages
        assert system.role == "system" and system.content.count(AGGREGATE_PROMPT) == 1
        for i, model in enumerate("abc", start=1):
            assert f"{i}. {model} has considered: Why is the sky blue?" in system.content
        assert user == QUESTION[0]


async def test_cycles_run_the_layer_list_again_each_layer_reading_the_one_before() -> None:
    ensemble = Ensemble(
        layers=[["a", "b"]],
        aggregator=Agent(model="c"),
        cycles=3,
        aggregate_prompt="Round answers:\n{responses}",
    )
    result, backend = await run(ensemble, fake_models("a", "b", "c"), 3 * GiB)
    layers = sorted((r.layer, r.model) for r in result.calls)
    assert layers == [(1, "a"), (1, "b"), (2, "a"), (2, "b"), (3, "a"), (3, "b"), (4, "c")]
    first, later = backend.requests[:2], backend.requests[2:]
    assert all(request.messages == QUESTION for _, request in first)
    for _, request in later:  # layers 2, 3 and the aggregator read the layer before, once
        system = request.messages[0].content
        assert system.startswith("Round answers:\n1. ") and system.count("Round answers:") == 1
        assert "2. " in system and AGGREGATE_PROMPT not in system
    assert result.answer


async def test_failed_proposer_is_left_out_and_never_quoted() -> None:
    models = fake_models("a", "b", "c", b={"fail": "CUDA error: out of memory"})
    result, backend = await run(THREE, models, 3 * GiB)
    failed = [c for c in result.calls if not c.ok]
    assert [(c.layer, c.model) for c in failed] == [(1, "b"), (2, "b")]
    assert failed[0].error == 'model "b": CUDA error: out of memory'
    for _, request in backend.requests:
        assert all("CUDA error" not in m.content for m in request.messages)
    aggregator_request = backend.requests[-1][1]
    assert "2. c has considered" in aggregator_request.messages[0].content
    assert "3." not in aggregator_request.messages[0].content
    assert result.answer


async def test_a_layer_with_no_usable_answer_stops_the_run_and_unloads() -> None:
    models = fake_models("a", "b", "c", a={"fail": "boom"}, b={"fail": "bang"}, c={"reply": " "})
    backend = FakeBackend(capacity=3 * GiB)
    with pytest.raises(LayerFailedError, match=r"every agent of layer 1 failed .*a.*boom.*b.*bang"):
        await run(THREE, models, 3 * GiB, backend)
    assert backend.resident == {}


async def test_calls_to_one_model_keep_to_its_slots_and_different_models_overlap() -> None:
    models = fake_models("a", "b", a={"seconds_per_token": 0.001}, b={"seconds_per_token": 0.001})
    ensemble = Ensemble(layers=[["a", "a", "b", "b"]], aggregator=Agent(model="a"))
    backend = CountingFake(capacity=2 * GiB)
    await run(ensemble, models, 2 * GiB, backend)
    assert backend.most_per_model == 1
    assert backend.most_at_once == 2


async def test_max_parallel_calls_bounds_concurrency() -> None:
    models = fake_models("a", "b", a={"seconds_per_token": 0.001}, b={"seconds_per_token": 0.001})
    ensemble = Ensemble(layers=[["a", "b"]], aggregator=Agent(model="a"))
    backend = CountingFake(capacity=2 * GiB)
    await run(ensemble, models, 2 * GiB, backend, max_parallel_calls=1)
    assert backend.most_at_once == 1


async def test_agent_settings_override_the_ensemble_defaults() -> None:
    ensemble = Ensemble(
        layers=[["a", Agent(model="b", temperature=0.1, max_tokens=3, system_prompt="Be brief.")]],
        aggregator=Agent(model="a", max_tokens=50),
        temperature=0.9,
        max_tokens=7,
    )
    _, backend = await run(ensemble, fake_models("a", "b"), 2 * GiB)
    by_model = [(n, r.temperature, r.max_tokens) for n, r in backend.requests]
    assert by_model == [("a", 0.9, 7), ("b", 0.1, 3), ("a", 0.9, 50)]
    b_request = backend.requests[1][1]
    assert b_request.messages[0] == ChatMessage(role="system", content="Be brief.")


async def test_cancelling_a_run_unloads_everything() -> None:
    models = fake_models("a", "b", a={"seconds_per_token": 0.01}, b={"seconds_per_token": 0.01})
    ensemble = Ensemble(layers=[["a", "b"]], aggregator=Agent(model="a"))
    backend = FakeBackend(capacity=2 * GiB)
    streaming = asyncio.Event()

    def on_event(event: Event) -> None:
        if isinstance(event, CallPiece):
            streaming.set()

    plan = make_plan(stages_of(ensemble), {"a": GiB, "b": GiB}, 2 * GiB)
    executor = Executor(models, {"fake": backend}, on_event=on_event)
    task = asyncio.create_task(executor.run(calls_for(ensemble), plan, QUESTION))
    await streaming.wait()
    assert backend.resident  # models are loaded mid-run
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.resident == {}
    assert backend.events[-2:] in (
        [("unload", "b"), ("unload", "a")],
        [("unload", "a"), ("unload", "b")],
    )


class MeasuringFake(FakeBackend):
    """A fake whose loaded models really hold ``true`` bytes, and says so, as Ollama does."""

    measures_footprint = True

    def __init__(self, true: dict[str, int], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.true = true

    def resident_bytes(self, name: str) -> int | None:
        return self.true[name] if name in self.resident else None


async def test_a_smaller_measurement_replans_the_rest_of_the_run() -> None:
    models = fake_models("a", "b")
    ensemble = Ensemble(layers=[["a"], ["b"], ["a"], ["b"]], aggregator=Agent(model="a"))
    planned = {"a": 3 * GiB, "b": 3 * GiB}  # the estimate: one at a time in 4 GiB
    plan = make_plan(stages_of(ensemble), planned, 4 * GiB)
    backend = MeasuringFake({"a": GiB, "b": GiB})  # really 1 GiB each: both fit
    executor = Executor(models, {"fake": backend}, sizes=planned)
    result = await executor.run(calls_for(ensemble), plan, QUESTION)
    assert (plan.loads, result.loads, result.replans) == (5, 2, 2)
    assert [c.layer for c in result.calls] == [1, 2, 3, 4, 5] and all(c.ok for c in result.calls)
    assert backend.resident == {}


async def test_a_replan_starts_no_wave_of_the_plan_it_abandons() -> None:
    models = fake_models("a", "b")
    ensemble = Ensemble(layers=[["a"], ["b"], ["a"], ["b"]], aggregator=Agent(model="a"))
    planned = {"a": 3 * GiB, "b": 3 * GiB}
    plan = make_plan(stages_of(ensemble), planned, 4 * GiB)
    started: list[WaveStarted] = []
    executor = Executor(
        models,
        {"fake": MeasuringFake({"a": GiB, "b": GiB})},
        sizes=planned,
        on_event=lambda e: started.append(e) if isinstance(e, WaveStarted) else None,
    )
    result = await executor.run(calls_for(ensemble), plan, QUESTION)
    # every wave shown as started with loads had them done: none of an abandoned plan
    assert sum(len(e.wave.load) for e in started) == result.loads == 2


async def test_a_replan_is_refined_for_time_from_what_is_resident(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import localmoa.runtime.engine
    from localmoa.planning import PlanPolicy, plan_run
    from localmoa.planning.profiles import PROFILES

    made: list[Plan] = []
    seen: list[list[str]] = []
    policies: list[PlanPolicy] = []

    def spy(*args: Any, **kwargs: Any) -> Plan:
        seen.append(list(kwargs["resident"]))
        policies.append(args[3])
        made.append(plan_run(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(localmoa.runtime.engine, "plan_run", spy)
    models = fake_models("a", "b")
    ensemble = Ensemble(layers=[["a"], ["b"], ["a"], ["b"]], aggregator=Agent(model="a"))
    planned = {"a": 3 * GiB, "b": 3 * GiB}
    plan = make_plan(stages_of(ensemble), planned, 4 * GiB)
    backend = MeasuringFake({"a": GiB, "b": GiB}, capacity=4 * GiB)
    policy = PlanPolicy(PROFILES["desktop-24g"], "time", 0.05)
    executor = Executor(models, {"fake": backend}, sizes=planned, policy=policy)
    result = await executor.run(calls_for(ensemble), plan, QUESTION)
    assert result.replans == 2 and all(c.ok for c in result.calls)
    assert seen == [["a"], ["a", "b"]]  # each re-plan starts from what is loaded
    assert policies == [policy, policy]  # the one planner entry, with the run's policy
    assert all(p.timed_for == "desktop-24g" and p.estimated_seconds for p in made)
    assert backend.peak_bytes <= 4 * GiB and backend.resident == {}


async def test_without_measurements_nothing_is_replanned() -> None:
    planned = {n: 2 * GiB for n in "abc"}
    plan = make_plan(stages_of(THREE), planned, 4 * GiB)
    executor = Executor(fake_models("a", "b", "c"), {"fake": FakeBackend()}, sizes=planned)
    result = await executor.run(calls_for(THREE), plan, QUESTION)
    assert result.replans == 0 and result.loads == plan.loads


class TimelineFake(FakeBackend):
    """Records when each call ends too, so a test can read the order of loads and calls."""

    async def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        async for piece in super().chat(name, request):
            yield piece
        self.events.append(("done", name))


def dataflow_run(
    ensemble: Ensemble, models: dict[str, FakeModel], budget: int, backend: FakeBackend
) -> RunResult:
    sizes = {n: int(m.memory) for n, m in models.items()}
    plan = make_plan(stages_of(ensemble), sizes, budget)
    executor = Executor(models, {"fake": backend}, sizes=sizes)  # sizes: the dataflow path
    return asyncio.run(executor.run(calls_for(ensemble), plan, QUESTION))


def test_dataflow_starts_a_model_s_calls_while_the_next_model_loads() -> None:
    models = fake_models("a", "b", b={"load_seconds": 0.05})
    ensemble = Ensemble(layers=[["a", "b"]], aggregator=Agent(model="a"))
    backend = TimelineFake(capacity=2 * GiB)
    result = dataflow_run(ensemble, models, 2 * GiB, backend)
    events = backend.events
    assert events.index(("chat", "a")) < events.index(("load", "b"))  # a answered during b's load
    assert result.loads == 2 and all(c.ok for c in result.calls)


def test_dataflow_frees_a_finished_model_for_the_next_load_while_others_compute() -> None:
    slow = {"seconds_per_token": 0.01, "reply": " ".join(["w"] * 20)}
    models = fake_models("a", "b", "c", b=slow)
    ensemble = Ensemble(layers=[["a", "b", "c"]], aggregator=Agent(model="b"))
    backend = TimelineFake(capacity=2 * GiB)  # two at a time: a + b, then c replaces a
    result = dataflow_run(ensemble, models, 2 * GiB, backend)
    events = backend.events
    assert events.index(("unload", "a")) < events.index(("done", "b"))
    assert events.index(("load", "c")) < events.index(("done", "b"))  # c loaded while b works
    assert backend.peak_bytes <= 2 * GiB  # and the capacity check never fired
    assert result.loads == 3 and [c.model for c in result.calls] == ["a", "b", "c", "b"]


def test_dataflow_reports_a_failed_layer_as_such_and_unloads() -> None:
    models = fake_models("a", "b", a={"fail": "boom"}, b={"fail": "bang"})
    ensemble = Ensemble(layers=[["a", "b"]], aggregator=Agent(model="a"))
    backend = FakeBackend(capacity=2 * GiB)
    with pytest.raises(LayerFailedError, match="every agent of layer 1 failed"):
        dataflow_run(ensemble, models, 2 * GiB, backend)
    assert backend.resident == {}


async def test_cancelling_a_dataflow_run_unloads_everything() -> None:
    models = fake_models("a", "b", a={"seconds_per_token": 0.01}, b={"seconds_per_token": 0.01})
    ensemble = Ensemble(layers=[["a", "b"]], aggregator=Agent(model="a"))
    backend = FakeBackend(capacity=2 * GiB)
    streaming = asyncio.Event()
    sizes = {"a": GiB, "b": GiB}
    plan = make_plan(stages_of(ensemble), sizes, 2 * GiB)
    executor = Executor(
        models,
        {"fake": backend},
        sizes=sizes,
        on_event=lambda e: streaming.set() if isinstance(e, CallPiece) else None,
    )
    task = asyncio.create_task(executor.run(calls_for(ensemble), plan, QUESTION))
    await streaming.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.resident == {}


def test_a_load_ahead_never_holds_up_the_calls_before_it() -> None:
    """A model loaded early for a later layer loads while the earlier layers' calls run."""
    models = {
        "a": FakeModel(backend="fake", memory=GiB),
        "b": FakeModel(backend="fake", memory=GiB, load_seconds=0.3),
    }
    ensemble = Ensemble(
        layers=[[Agent(model="a")], [Agent(model="a")]], aggregator=Agent(model="b")
    )
    sizes = {"a": GiB, "b": GiB}
    plan = Plan.model_validate(
        {
            "budget_bytes": 2 * GiB,
            "loads": 2,
            "lower_bound": 2,
            "optimal": True,
            "bytes_loaded": 2 * GiB,
            "waves": [
                {"layer": 1, "resident": ["a", "b"], "runs": ["a"], "load": ["a", "b"],
                 "unload": [], "bytes": 2 * GiB},
                {"layer": 2, "resident": ["a", "b"], "runs": ["a"], "load": [], "unload": [],
                 "bytes": 2 * GiB},
                {"layer": 3, "resident": ["b"], "runs": ["b"], "load": [], "unload": ["a"],
                 "bytes": GiB},
            ],
        }
    )  # fmt: skip
    backend = FakeBackend(capacity=2 * GiB)
    executor = Executor(models, {"fake": backend}, sizes=sizes)
    result = asyncio.run(executor.run(calls_for(ensemble), plan, QUESTION))
    assert all(c.ok for c in result.calls)
    events = backend.events
    b_loaded = events.index(("load", "b"))
    assert [i for i, e in enumerate(events) if e == ("chat", "a")][-1] < b_loaded  # layer 2 too
    assert events.index(("chat", "b")) > b_loaded and backend.resident == {}


async def test_calls_waiting_for_one_model_are_made_together_within_its_slots() -> None:
    slow = {"seconds_per_token": 0.001, "parallel": 2}
    models = fake_models("a", "b", a=slow, b=slow)
    ensemble = Ensemble(layers=[["a", "a", "a", "b"]], aggregator=Agent(model="a"))
    backend = CountingFake(capacity=2 * GiB)
    result, _ = await run(ensemble, models, 2 * GiB, backend)
    assert backend.most_per_model == 2  # together, never beyond the model's slots
    assert all(call.ok for call in result.calls)


def one_call(model: str, index: int) -> Any:
    (stage, *_) = calls_for(Ensemble(layers=[[model]], aggregator=Agent(model=model)))
    from dataclasses import replace

    return replace(stage[0], index=index)


async def test_concurrent_callers_of_one_model_share_a_turn_and_leave_it_alone() -> None:
    """Two requests' calls (as two serve requests make them) go together; one caller that is
    cancelled leaves, the other gets its whole answer."""
    models = fake_models("a", a={"seconds_per_token": 0.002, "parallel": 4})
    backend = FakeBackend(capacity=GiB)
    await backend.load("a", models["a"])
    executor = Executor(models, {"fake": backend})
    request = ChatRequest(messages=QUESTION, temperature=0.0, max_tokens=40)
    seen: list[list[Event]] = [[], []]
    first = asyncio.create_task(executor.calls([one_call("a", 0)], [request], seen[0].append))
    second = asyncio.create_task(executor.calls([one_call("a", 1)], [request], seen[1].append))
    while not any(isinstance(e, CallPiece) for e in seen[0]):
        await asyncio.sleep(0)  # until the shared turn streams
    assert any(isinstance(e, CallStarted) for e in seen[1])  # the same turn: both started
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    (record,) = await second
    assert record.ok and record.tokens == len(record.text.split(" "))
    assert backend.max_in_flight["a"] == 2


async def test_a_turn_nobody_waits_for_is_stopped() -> None:
    models = fake_models("a", a={"seconds_per_token": 0.01})
    backend = CountingFake(capacity=GiB)
    await backend.load("a", models["a"])
    executor = Executor(models, {"fake": backend})
    request = ChatRequest(messages=QUESTION, temperature=0.0, max_tokens=400)
    pieces: list[Event] = []
    task = asyncio.create_task(executor.calls([one_call("a", 0)], [request], pieces.append))
    while not pieces:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backend.active["a"] == 0  # the stream was closed, not left decoding


async def test_one_call_per_turn_when_asked_not_to_make_them_together() -> None:
    slow = {"seconds_per_token": 0.001, "parallel": 2}
    models = fake_models("a", "b", a=slow, b=slow)
    ensemble = Ensemble(layers=[["a", "a", "a", "b"]], aggregator=Agent(model="a"))
    backend = CountingFake(capacity=2 * GiB)
    await run(ensemble, models, 2 * GiB, backend, together=False)
    assert backend.most_per_model == 1
