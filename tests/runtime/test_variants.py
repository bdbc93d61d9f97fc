"""The variants end to end on the shipped fake backend: a scripted judge that selects and
stops, roles written and cached, Self-MoA samples, references cut to fit, a sliding window."""

from __future__ import annotations

import json
from typing import Any

from localmoa.backends.base import ChatMessage, ChatRequest, estimate_tokens
from localmoa.backends.fake import FakeBackend
from localmoa.config import Agent, Ensemble, FakeModel, Judge
from localmoa.planning.fewest_loads import make_plan
from localmoa.runtime.engine import Event, Executor, Judged, RunResult
from localmoa.runtime.moa import calls_for
from localmoa.runtime.roles import RolesCache

GiB = 1 << 30
QUESTION = [ChatMessage(role="user", content="Why is the sky blue?")]


def models(**tables: dict[str, Any]) -> dict[str, FakeModel]:
    return {n: FakeModel(backend="fake", memory=GiB, **t) for n, t in tables.items()}


def verdict(selected: list[int], stop: bool = False) -> dict[str, Any]:
    return {"reply": json.dumps({"selected": selected, "stop": stop, "reason": "r"})}


async def run(
    ensemble: Ensemble,
    tables: dict[str, FakeModel],
    *,
    budget: int = 8 * GiB,
    roles: list[str] | None = None,
    window: int | None = None,
    events: list[Event] | None = None,
) -> tuple[RunResult, FakeBackend]:
    backend = FakeBackend(capacity=budget)
    stages = calls_for(ensemble, roles=roles, window=window)
    sizes = {n: int(m.memory) for n, m in tables.items()}
    plan = make_plan([[c.model for c in s] for s in stages], sizes, budget)
    seen = events if events is not None else []
    executor = Executor(tables, {"fake": backend}, on_event=seen.append)
    return await executor.run(stages, plan, QUESTION), backend


def requests_to(backend: FakeBackend, model: str) -> list[ChatRequest]:
    return [r for name, r in backend.requests if name == model]


def system_of(request: ChatRequest) -> str:
    return request.messages[0].content if request.messages[0].role == "system" else ""


FOUR = ["p1", "p2", "p3", "p4"]
PROPOSERS = {n: {"reply": f"answer of {n}"} for n in FOUR}


async def test_the_judge_passes_on_only_its_choice_best_first() -> None:
    ensemble = Ensemble(
        layers=[FOUR], aggregator=Agent(model="agg"), judge=Judge(model="judge", top_k=2)
    )
    tables = models(**PROPOSERS, judge=verdict([3, 1]), agg={})
    result, backend = await run(ensemble, tables)
    (judged,) = requests_to(backend, "judge")
    assert all(f"answer of {n}" in system_of(judged) for n in FOUR)
    assert judged.response_format is not None and judged.response_format.type == "json_schema"
    (aggregated,) = requests_to(backend, "agg")
    system = system_of(aggregated)
    assert "1. answer of p3" in system and "2. answer of p1" in system
    assert "answer of p2" not in system and "answer of p4" not in system
    judge = next(c for c in result.calls if c.role == "judge")
    assert judge.references == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert (judge.selected, judge.stop, judge.parsed) == ([3, 1], False, True)
    final = result.calls[-1]
    assert final.role == "aggregator" and final.references == [(1, 2), (1, 0)]
    assert not final.truncated and final.reference_tokens > 0
    assert [c.role for c in result.calls] == ["proposer"] * 4 + ["judge", "aggregator"]


async def test_an_early_stop_skips_the_rest_and_never_loads_what_only_it_needed() -> None:
    ensemble = Ensemble(
        layers=[["p1", "p2", "p3"], ["p1", "late", "p3"]],
        aggregator=Agent(model="agg"),
        judge=Judge(model="judge", top_k=2, early_stop=True),
    )
    tables = models(**PROPOSERS, late={}, judge=verdict([2, 3], stop=True), agg={})
    events: list[Event] = []
    result, backend = await run(ensemble, tables, budget=2 * GiB, events=events)
    loaded = [m for kind, m in backend.events if kind == "load"]
    assert "late" not in loaded
    assert result.skipped_layers == [2]
    assert [(c.layer, c.role) for c in result.calls] == [
        (1, "proposer"),
        (1, "proposer"),
        (1, "proposer"),
        (1, "judge"),
        (3, "aggregator"),
    ]
    assert result.calls[-1].references == [(1, 1), (1, 2)]
    judged = [e for e in events if isinstance(e, Judged)]
    assert len(judged) == 1 and judged[0].skipped == (2,)
    assert result.replans >= 1


async def test_without_a_stop_every_layer_runs_and_reads_the_selection() -> None:
    ensemble = Ensemble(
        layers=[["p1", "p2", "p3"], ["p1", "late", "p3"]],
        aggregator=Agent(model="agg"),
        judge=Judge(model="judge", top_k=1, early_stop=True),
    )
    tables = models(**PROPOSERS, late={}, judge=verdict([2]), agg={})
    result, backend = await run(ensemble, tables, budget=2 * GiB)
    assert result.skipped_layers == []
    second = [c for c in result.calls if c.layer == 2 and c.role == "proposer"]
    assert len(second) == 3 and all(c.references == [(1, 1)] for c in second)
    assert "late" in [m for kind, m in backend.events if kind == "load"]
    assert result.calls[-1].references == [(2, 1)]


async def test_an_unreadable_or_out_of_range_verdict_keeps_everything_and_goes_on() -> None:
    for reply in ("I think the second one.", json.dumps({"selected": [9], "stop": True})):
        ensemble = Ensemble(
            layers=[["p1", "p2", "p3"], ["p1", "p2", "p3"]],
            aggregator=Agent(model="agg"),
            judge=Judge(model="judge", top_k=2, early_stop=True),
        )
        tables = models(**PROPOSERS, judge={"reply": reply}, agg={})
        result, _ = await run(ensemble, tables)
        judges = [c for c in result.calls if c.role == "judge"]
        assert [(j.selected, j.stop, j.parsed) for j in judges] == [([1, 2, 3], False, False)] * 2
        assert result.skipped_layers == []
        assert result.calls[-1].references == [(2, 0), (2, 1), (2, 2)]


async def test_select_mode_answers_with_the_judges_first_choice() -> None:
    ensemble = Ensemble(
        layers=[["p1", "p2", "p3"]],
        aggregator=Agent(model="agg"),
        final="select",
    )
    tables = models(**PROPOSERS, agg=verdict([3, 2]))
    result, backend = await run(ensemble, tables)
    assert result.answer == "answer of p3"
    assert [c.role for c in result.calls] == ["proposer"] * 3 + ["judge"]
    assert result.calls[-1].selected == [3]  # top_k 1: the first choice is kept
    assert len(requests_to(backend, "agg")) == 1  # the judge, on the aggregator's model


async def test_roles_are_written_once_cached_and_merged_into_one_system_message() -> None:
    ensemble = Ensemble(
        layers=[[Agent(model="p1", system_prompt="Be brief."), "p2"]],
        aggregator=Agent(model="agg"),
        roles="auto",
        task="Answer physics questions for students.",
        roles_model="writer",
    )
    written = ["A physics teacher who explains simply.", "A sceptical experimentalist."]
    tables = models(**PROPOSERS, writer={"reply": json.dumps({"roles": written})}, agg={})
    result, backend = await run(ensemble, tables)
    assert result.calls[0].role == "roles" and result.calls[0].parsed is True
    first, second = requests_to(backend, "p1")[0], requests_to(backend, "p2")[0]
    assert [m.role for m in first.messages].count("system") == 1
    assert system_of(first).startswith(written[0]) and "Be brief." in system_of(first)
    assert system_of(second).startswith(written[1])
    cached = RolesCache().get(ensemble.task or "", "writer", 2)
    assert cached == written
    # The next run finds them: no roles call, the same roles.
    result, backend = await run(ensemble, tables, roles=cached)
    assert [c.role for c in result.calls] == ["proposer", "proposer", "aggregator"]
    assert system_of(requests_to(backend, "p2")[0]).startswith(written[1])


async def test_unreadable_roles_are_not_cached_and_the_proposers_go_without() -> None:
    ensemble = Ensemble(
        layers=[["p1", "p2"]],
        aggregator=Agent(model="agg"),
        roles="auto",
        task="Anything.",
    )
    tables = models(**PROPOSERS, agg={"reply": "no roles today"})
    result, backend = await run(ensemble, tables)
    assert result.calls[0].role == "roles" and result.calls[0].parsed is False
    assert requests_to(backend, "p1")[0].messages == QUESTION
    assert RolesCache().get("Anything.", "agg", 2) is None


async def test_samples_are_calls_of_one_layer_with_their_own_seeds_within_the_slots() -> None:
    ensemble = Ensemble(
        layers=[[Agent(model="solo", samples=4, seed=10)]], aggregator=Agent(model="solo")
    )
    tables = models(solo={"reply": "sample {seed}", "parallel": 2})
    result, backend = await run(ensemble, tables)
    samples = [c for c in result.calls if c.role == "proposer"]
    assert [(c.layer, c.index) for c in samples] == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert sorted(c.text for c in samples) == ["sample 10", "sample 11", "sample 12", "sample 13"]
    assert backend.max_in_flight["solo"] == 2
    assert result.calls[-1].references == [(1, 0), (1, 1), (1, 2), (1, 3)]
    assert [m for kind, m in backend.events if kind == "load"] == ["solo"]


async def test_references_are_cut_to_fit_and_the_call_no_longer_overflows() -> None:
    long = " ".join(["word"] * 400)
    ensemble = Ensemble(layers=[["p1", "p2"]], aggregator=Agent(model="agg"), max_tokens=64)
    tables = models(p1={"reply": long}, p2={"reply": long}, agg={"n_ctx": 400})
    result, backend = await run(ensemble, tables)
    final = result.calls[-1]
    assert final.ok and final.truncated
    (request,) = requests_to(backend, "agg")
    assert estimate_tokens(request.messages) + request.max_tokens <= 400
    assert final.references == [(1, 0), (1, 1)]  # proportional: both kept, each shortened


async def test_a_ranked_selection_is_cut_from_the_lowest_ranked() -> None:
    ensemble = Ensemble(
        layers=[["p1", "p2", "p3"]],
        aggregator=Agent(model="agg", max_tokens=64),
        judge=Judge(model="judge", top_k=2),
        max_tokens=400,
    )
    best = " ".join(["best"] * 150)
    tables = models(
        p1={"reply": " ".join(["other"] * 300)},
        p2={"reply": best},
        p3={"reply": "short"},
        judge=verdict([2, 1]),
        agg={"n_ctx": 900},
    )
    result, backend = await run(ensemble, tables)
    final = result.calls[-1]
    assert final.ok and final.truncated
    (request,) = requests_to(backend, "agg")
    assert estimate_tokens(request.messages) + request.max_tokens <= 900
    system = system_of(request)
    assert f"1. {best}\n" in system  # the first choice whole; the cut fell on the second
    assert "2. other other" in system and system.count("other") < 300
    assert final.references == [(1, 1), (1, 0)]


async def test_samples_that_cannot_fit_are_aggregated_in_a_sliding_window() -> None:
    ensemble = Ensemble(
        layers=[[Agent(model="solo", samples=5, seed=1)]],
        aggregator=Agent(model="solo"),
    )
    tables = models(solo={"reply": "sample {seed}"})
    result, _ = await run(ensemble, tables, window=2)
    steps = [c for c in result.calls if c.role == "aggregator"]
    assert [c.references for c in steps] == [
        [(1, 0), (1, 1)],
        [(2, 0), (1, 2)],
        [(2, 1), (1, 3)],
        [(2, 2), (1, 4)],
    ]
    assert [(c.layer, c.index) for c in steps] == [(2, 0), (2, 1), (2, 2), (2, 3)]
    assert result.answer == steps[-1].text
