"""Who sees what: the messages each kind of agent sends."""

from __future__ import annotations

import itertools

from localmoa.backends.base import ChatMessage, ResponseFormat
from localmoa.config import Agent, Ensemble
from localmoa.runtime.moa import AGGREGATE_PROMPT, build_request, calls_for, stages_of

ENSEMBLE = Ensemble(
    layers=[["a", "b"], ["a", Agent(model="b", system_prompt="Be brief.", temperature=0.1)]],
    aggregator=Agent(model="c", max_tokens=99),
    temperature=0.5,
    max_tokens=10,
)


def test_calls_number_layers_and_put_the_aggregator_last() -> None:
    stages = calls_for(ENSEMBLE)
    assert [[(c.layer, c.index, c.model) for c in s] for s in stages] == [
        [(1, 0, "a"), (1, 1, "b")],
        [(2, 0, "a"), (2, 1, "b")],
        [(3, 0, "c")],
    ]
    assert stages[1][1].temperature == 0.1 and stages[1][1].max_tokens == 10
    assert stages[2][0].is_aggregator and stages[2][0].max_tokens == 99
    assert stages_of(ENSEMBLE) == [["a", "b"], ["a", "b"], ["c"]]


def test_first_layer_sees_the_conversation_alone() -> None:
    conversation = [ChatMessage(role="user", content="hi")]
    request = build_request(calls_for(ENSEMBLE)[0][0], conversation, None)
    assert request.messages == conversation
    assert request.temperature == 0.5 and request.max_tokens == 10


def test_references_follow_the_agents_own_system_prompt_in_one_system_message() -> None:
    conversation = [
        ChatMessage(role="system", content="You are a tutor."),
        ChatMessage(role="user", content="What is 2+2?"),
        ChatMessage(role="assistant", content="4"),
        ChatMessage(role="user", content="And 3+3?"),
    ]
    call = calls_for(ENSEMBLE)[1][1]
    request = build_request(call, conversation, ["six", "  6  "])
    system, *turns = request.messages
    assert system.role == "system"
    assert (
        system.content == f"Be brief.\n\nYou are a tutor.\n\n{AGGREGATE_PROMPT}\n\n1. six\n\n2. 6"
    )
    assert turns == conversation[1:]
    assert [m.role for m in request.messages].count("system") == 1


def test_an_agents_stop_seed_and_response_format_reach_its_request() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    )
    ensemble = Ensemble(
        layers=[[Agent(model="a", stop="END", seed=3)]],
        aggregator=Agent(model="b", stop=["x", "y"], seed=-1, response_format=fmt),
    )
    (proposer,), (aggregator,) = calls_for(ensemble)
    assert (proposer.stop, proposer.seed, proposer.response_format) == (("END",), 3, None)
    assert (aggregator.stop, aggregator.seed, aggregator.response_format) == (("x", "y"), -1, fmt)
    hash(aggregator)  # calls stay hashable, a schema and all
    conversation = [ChatMessage(role="user", content="hi")]
    request = build_request(aggregator, conversation, ["one"])
    assert (request.stop, request.seed, request.response_format) == (["x", "y"], -1, fmt)
    assert request.options() == ["stop", "seed", "response_format"]
    plain = build_request(calls_for(ENSEMBLE)[0][0], conversation, None)
    assert (plain.stop, plain.seed, plain.response_format, plain.options()) == (
        None,
        None,
        None,
        [],
    )


def test_cycles_repeat_the_layer_list_numbering_layers_through() -> None:
    ensemble = Ensemble(layers=[["a", "b"], ["c"]], aggregator="a", cycles=3)
    stages = calls_for(ensemble)
    assert stages_of(ensemble) == [["a", "b"], ["c"]] * 3 + [["a"]]
    assert [s[0].layer for s in stages] == [1, 2, 3, 4, 5, 6, 7]
    assert stages[-1][0].is_aggregator and not any(c.is_aggregator for c in stages[-2])


def test_an_aggregate_prompt_replaces_the_instruction_where_it_says() -> None:
    ensemble = Ensemble(
        layers=[["a"], [Agent(model="b", aggregate_prompt="B reads: {responses} (end)")]],
        aggregator="c",
        aggregate_prompt="Pick the best of {} these:\n{responses}",
    )
    stages = calls_for(ensemble)
    conversation = [ChatMessage(role="user", content="q")]
    own = build_request(stages[1][0], conversation, ["x {responses} y"]).messages[0].content
    assert own == "B reads: 1. x {responses} y (end)"  # an answer's braces stay as they are
    shared = build_request(stages[2][0], conversation, ["one", "two"]).messages[0].content
    assert shared == "Pick the best of {} these:\n1. one\n\n2. two"
    assert AGGREGATE_PROMPT not in shared


def test_a_judge_follows_every_proposer_layer_and_only_earlier_ones_may_stop() -> None:
    from localmoa.config import Judge
    from localmoa.runtime.moa import conditional_stages, stage_label

    ensemble = Ensemble(
        layers=[["a", "b", "c"]],
        cycles=2,
        aggregator=Agent(model="c"),
        judge=Judge(top_k=2, early_stop=True),
    )
    stages = calls_for(ensemble)
    assert [stage_label(s) for s in stages] == [
        "layer 1",
        "judge 1",
        "layer 2",
        "judge 2",
        "aggregator",
    ]
    judges = [s[0] for s in stages if s[0].role == "judge"]
    assert [(j.model, j.top_k, j.early_stop, j.temperature) for j in judges] == [
        ("c", 2, True, 0.0),
        ("c", 2, False, 0.0),  # nothing is left to skip after the last layer
    ]
    assert [j.stage for j in judges] == [1, 3]
    assert conditional_stages(stages) == {2, 3}


def test_select_ends_with_the_judge_and_writes_nothing_new() -> None:
    stages = calls_for(Ensemble(layers=[["a", "b"]], aggregator=Agent(model="c"), final="select"))
    assert [(s[0].role, s[0].model) for s in stages] == [("proposer", "a"), ("judge", "c")]
    assert stages[-1][0].top_k == 1 and not any(c.is_aggregator for s in stages for c in s)


def test_samples_are_calls_of_one_layer_that_share_a_group_and_count_seeds() -> None:
    ensemble = Ensemble(
        layers=[["a", Agent(model="b", samples=3, seed=(1 << 63) - 2)]],
        aggregator=Agent(model="a"),
    )
    layer = calls_for(ensemble)[0]
    assert [(c.model, c.index, c.agent, c.group) for c in layer] == [
        ("a", 0, 0, None),
        ("b", 1, 1, 1),
        ("b", 2, 1, 1),
        ("b", 3, 1, 1),
    ]
    assert [c.seed for c in layer[1:]] == [(1 << 63) - 2, (1 << 63) - 1, 0]  # wraps, stays valid


def test_a_sliding_window_reads_every_answer_once() -> None:
    from localmoa.runtime.moa import window_steps

    assert window_steps(4, 6) == [(0, 4)]
    assert window_steps(6, 3) == [(0, 3), (3, 5), (5, 6)]
    for answers in range(1, 20):
        for window in range(2, 8):
            steps = window_steps(answers, window)
            assert steps[0][0] == 0 and steps[-1][1] == answers
            assert all(a == b for (_, b), (a, _) in itertools.pairwise(steps))
            assert steps[0][1] - steps[0][0] <= window
            assert all(end - start <= window - 1 for start, end in steps[1:])


def test_roles_come_first_unless_cached_and_then_travel_on_the_proposers() -> None:
    ensemble = Ensemble(
        layers=[["a", "b"], ["a"]], aggregator=Agent(model="c"), roles="auto", task="t"
    )
    stages = calls_for(ensemble)
    assert stages[0][0].role == "roles" and stages[0][0].roles == 2 and stages[0][0].model == "c"
    cached = calls_for(ensemble, roles=["r1", "r2"])
    assert [[c.persona for c in s] for s in cached] == [["r1", "r2"], ["r1"], [None]]
    request = build_request(cached[0][1], [ChatMessage(role="user", content="q")], None)
    assert request.messages[0].content.startswith("r2")
