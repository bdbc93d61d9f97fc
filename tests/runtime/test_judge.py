"""The Sparse MoA judge: its prompt, its JSON format, and reading whatever a model answers."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localmoa.backends.base import ResponseFormat
from localmoa.runtime.judge import (
    JUDGE_FORMAT,
    JUDGE_SCHEMA,
    Verdict,
    judge_format,
    judge_system_prompt,
    parse_verdict,
)

# -- the prompt and the format ---------------------------------------------------------------


def test_prompt_numbers_the_answers_from_one_after_the_instruction() -> None:
    prompt = judge_system_prompt(["Paris.", "  Lyon, I think.\n"], top_k=1, early_stop=True)
    instruction, answers = prompt.split("Answers:\n\n")
    assert answers == "1. Paris.\n\n2. Lyon, I think."
    assert "single best" in instruction and "JSON" in instruction
    for criterion in ("correctness", "relevance", "completeness", "clarity"):
        assert criterion in instruction


def test_prompt_asks_for_top_k_best_first() -> None:
    prompt = judge_system_prompt(["a", "b", "c", "d"], top_k=2, early_stop=False)
    assert "best 2, best first" in prompt and "at most 2" in prompt


def test_prompt_allows_stop_only_with_early_stop() -> None:
    allowed = judge_system_prompt(["a", "b"], top_k=1, early_stop=True)
    refused = judge_system_prompt(["a", "b"], top_k=1, early_stop=False)
    assert "agree in substance" in allowed and "Always set" not in allowed
    assert 'Always set "stop" to false' in refused and "agree in substance" not in refused


def test_answers_with_braces_and_quotes_go_in_verbatim() -> None:
    tricky = 'Use {"key": {0}} and "{responses}" — or {}'
    prompt = judge_system_prompt([tricky, "{"], top_k=1, early_stop=False)
    assert prompt.endswith(f"1. {tricky}\n\n2. {{")


def test_format_is_the_judgement_schema() -> None:
    assert JUDGE_FORMAT.type == "json_schema" and JUDGE_FORMAT.json_schema is not None
    assert JUDGE_FORMAT.json_schema.name == "judgement"
    assert JUDGE_FORMAT.json_schema.schema_ == JUDGE_SCHEMA
    assert JUDGE_SCHEMA["required"] == ["selected", "stop", "reason"]
    assert list(JUDGE_SCHEMA["properties"]) == ["selected", "stop", "reason"]
    wire = JUDGE_FORMAT.openai()
    assert wire["json_schema"]["schema"]["properties"]["selected"]["items"]["minimum"] == 1
    assert ResponseFormat.model_validate(wire) == JUDGE_FORMAT


def test_narrowed_format_bounds_numbers_and_count_and_leaves_the_constant_alone() -> None:
    narrowed = judge_format(shown=4, top_k=2)
    assert narrowed.json_schema is not None
    selected = narrowed.json_schema.schema_["properties"]["selected"]
    assert selected["items"] == {"type": "integer", "enum": [1, 2, 3, 4]}
    assert selected["maxItems"] == 2 and selected["minItems"] == 1
    assert "maxItems" not in JUDGE_SCHEMA["properties"]["selected"]
    assert JUDGE_SCHEMA["properties"]["selected"]["items"] == {"type": "integer", "minimum": 1}


def test_narrowed_format_compiles_to_a_llama_cpp_grammar() -> None:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    narrowed = judge_format(shown=3, top_k=2)
    assert narrowed.json_schema is not None
    grammar = json_schema_to_gbnf(json.dumps(narrowed.json_schema.schema_))
    assert '"3"' in grammar and '"4"' not in grammar


# -- what models really answer ----------------------------------------------------------------


def parse(text: str, shown: int = 4, top_k: int = 2, early_stop: bool = True) -> Verdict:
    return parse_verdict(text, shown, top_k=top_k, early_stop=early_stop)


def test_bare_json_as_a_grammar_produces_it() -> None:
    verdict = parse('{"selected": [3, 1], "stop": false, "reason": "3 is exact; 1 is close."}')
    assert verdict == Verdict((3, 1), False, "3 is exact; 1 is close.", parsed=True)


def test_json_in_a_fence_after_prose() -> None:
    text = (
        "Let me compare the answers. Answer 2 miscounts the apples, answers 1 and 4 agree.\n\n"
        "```json\n"
        '{\n  "selected": [4, 1],\n  "stop": true,\n  "reason": "Both give 12 apples."\n}\n'
        "```\n"
        "I hope this helps!"
    )
    assert parse(text) == Verdict((4, 1), True, "Both give 12 apples.", parsed=True)


def test_smoa_spellings() -> None:
    text = (
        "```\n"
        '{"reasoning": "Responses 2 and 3 are consistent and correct.", '
        '"chosen responses": [2, 3], "end debate": true}\n'
        "```"
    )
    verdict = parse(text)
    assert verdict.selected == (2, 3) and verdict.stop and verdict.parsed
    assert verdict.reason == "Responses 2 and 3 are consistent and correct."


def test_numbers_as_strings_and_labels() -> None:
    assert parse('{"selected": ["2", "1"], "stop": false, "reason": ""}').selected == (2, 1)
    labelled = '{"selected": ["Response 3", "answer #1"], "stop": "false", "reason": "x"}'
    assert parse(labelled).selected == (3, 1)
    assert parse('{"selected": ["#2", "4."], "stop": false, "reason": "x"}').selected == (2, 4)
    assert parse('{"selected": [2.0, 1.0], "stop": false, "reason": "x"}').selected == (2, 1)


def test_a_lone_number_or_a_string_list() -> None:
    assert parse('{"selected": 3, "stop": false, "reason": "x"}').selected == (3,)
    assert parse('{"selected": "2, 4", "stop": false, "reason": "x"}').selected == (2, 4)
    assert parse('{"selected": "Response 2", "stop": false, "reason": "x"}').selected == (2,)


def test_duplicates_are_dropped_keeping_order_then_top_k_kept() -> None:
    verdict = parse('{"selected": [2, 2, 4, 1], "stop": false, "reason": "x"}', top_k=2)
    assert verdict.selected == (2, 4) and verdict.parsed


def test_stop_is_forced_false_without_early_stop() -> None:
    text = '{"selected": [1], "stop": true, "reason": "They all say 4."}'
    assert parse(text, early_stop=True).stop
    assert not parse(text, early_stop=False).stop


def test_missing_or_unreadable_stop_does_not_stop() -> None:
    assert parse('{"selected": [1], "reason": "x"}') == Verdict((1,), False, "x", True)
    assert not parse('{"selected": [1], "stop": "maybe", "reason": "x"}').stop
    assert parse('{"selected": [1], "stop": "yes", "reason": "x"}').stop


def test_an_earlier_object_without_a_selection_is_skipped() -> None:
    text = (
        'The format is {"type": "object"}. My verdict: '
        '{"verdict": {"selected": [2], "stop": false, "reason": "clearest"}}'
    )
    assert parse(text).selected == (2,)


def test_verdict_cut_off_in_its_reason_is_read_by_regex() -> None:
    text = '{"selected": [2, 3], "stop": true, "reason": "Answers 2 and 3 both derive the sa'
    verdict = parse(text)
    assert verdict.parsed and verdict.selected == (2, 3) and verdict.stop
    assert verdict.reason == "Answers 2 and 3 both derive the sa"


def test_python_style_dict_is_read_by_regex() -> None:
    verdict = parse("{'selected': [1, '3'], 'stop': True, 'reason': 'fine'}")
    assert verdict.parsed and verdict.selected == (1, 3) and verdict.stop


# -- the fallback: every answer, no stop, never random ----------------------------------------


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "was empty"),
        ("I think the second answer is the best one.", "no JSON object"),
        ('{"best": 2, "stop": true}', "no JSON object"),
        ('{"selected": [], "stop": true, "reason": "none is good"}', "selected no answer"),
        ('{"selected": [2, 5], "stop": true, "reason": "x"}', "named answer 5"),
        ('{"selected": [0, 1], "stop": true, "reason": "0-based"}', "named answer 0"),
        ('{"selected": ["the second"], "stop": true, "reason": "x"}', "not a list of answer"),
        ('{"selected": [true], "stop": true, "reason": "x"}', "not a list of answer"),
        ('{"selected": [[1], [2]], "stop": true, "reason": "x"}', "not a list of answer"),
        ('{"selected": [1, 99999999999999999999], "stop": true}', "a number that large"),
    ],
)
def test_fallback_keeps_every_answer_and_does_not_stop(text: str, why: str) -> None:
    verdict = parse(text, shown=4, top_k=2, early_stop=True)
    assert verdict.selected == (1, 2, 3, 4)
    assert not verdict.stop and not verdict.parsed
    assert why in verdict.reason and "every answer goes on" in verdict.reason


def test_fallback_is_the_same_every_time() -> None:
    text = "no idea"
    assert len({parse(text, shown=6) for _ in range(20)}) == 1


def test_top_k_below_one_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="top_k"):
        parse_verdict("{}", 3, top_k=0, early_stop=False)


# -- properties: never raises, always in range -------------------------------------------------

_numberish = st.one_of(
    st.integers(min_value=-3, max_value=12),
    st.integers(min_value=1, max_value=9).map(str),
    st.integers(min_value=1, max_value=9).map(lambda n: f"Response {n}"),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.none(),
    st.text(max_size=8),
)
_json_verdicts = st.fixed_dictionaries(
    {"selected": st.one_of(st.lists(_numberish, max_size=6), _numberish)},
    optional={
        "stop": st.one_of(st.booleans(), st.text(max_size=5), st.integers()),
        "reason": st.one_of(st.text(max_size=30), st.integers()),
    },
).map(json.dumps)
_texts = st.one_of(
    st.text(max_size=200),
    st.text(alphabet='{}[]":,0123456789 selectdtruefalsop\n`', max_size=120),
    st.tuples(st.text(max_size=40), _json_verdicts, st.text(max_size=40)).map("".join),
    _json_verdicts.map(lambda s: s[: len(s) // 2]),
)


@settings(max_examples=400, deadline=None)
@given(
    text=_texts,
    shown=st.integers(min_value=1, max_value=8),
    top_k=st.integers(min_value=1, max_value=8),
    early_stop=st.booleans(),
)
def test_parse_never_raises_and_stays_in_range(
    text: str, shown: int, top_k: int, early_stop: bool
) -> None:
    verdict = parse_verdict(text, shown, top_k=top_k, early_stop=early_stop)
    assert verdict.selected and all(1 <= n <= shown for n in verdict.selected)
    assert len(set(verdict.selected)) == len(verdict.selected)
    if verdict.parsed:
        assert len(verdict.selected) <= top_k
    else:
        assert verdict.selected == tuple(range(1, shown + 1)) and not verdict.stop
    if not early_stop:
        assert not verdict.stop
