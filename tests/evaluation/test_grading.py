"""The local judge: its rating and pairwise prompts, their JSON formats, reading whatever a
judge answers, and combining both orders of a pairwise comparison."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localmoa.backends.base import ChatMessage, ResponseFormat
from localmoa.evaluation.grading import (
    EXPLANATION_CHARS,
    PAIRWISE_FORMAT,
    PAIRWISE_SCHEMA,
    RATING_FORMAT,
    RATING_SCHEMA,
    Preference,
    pairwise_messages,
    pairwise_verdict,
    parse_pairwise,
    parse_rating,
    rating_messages,
)

# -- prompts -----------------------------------------------------------------------------------


def test_rating_prompt_is_an_instruction_then_the_material() -> None:
    messages = rating_messages("What is 2 + 2?", "It is 4.")
    assert [m.role for m in messages] == ["system", "user"]
    instruction, material = messages[0].content, messages[1].content
    assert "1 to 10" in instruction and "Rating: [[N]]" in instruction
    assert "There is no reference answer" in instruction
    for band in ("1-2:", "3-4:", "5-6:", "7-8:", "9-10:"):
        assert band in instruction
    assert material == (
        "[The user's question]\nWhat is 2 + 2?\n[End of the user's question]\n\n"
        "[The assistant's answer]\nIt is 4.\n[End of the assistant's answer]"
    )


def test_rating_prompt_compares_with_the_reference_when_given() -> None:
    system, user = rating_messages("Capital of Australia?", "Sydney.", "Canberra.")
    assert "reference answer" in system.content and "Treat it as correct" in system.content
    assert "There is no reference answer" not in system.content
    question, reference, answer = user.content.split("\n\n")
    assert "Capital of Australia?" in question
    assert reference == "[The reference answer]\nCanberra.\n[End of the reference answer]"
    assert "Sydney." in answer


def test_pairwise_prompt_shows_first_as_a_and_second_as_b() -> None:
    system, user = pairwise_messages("Q?", "the first answer", "the second answer")
    assert "[[A]]" in system.content and "[[B]]" in system.content and "[[C]]" in system.content
    assert "order" in system.content  # the judge is told not to favour a position
    assert user.content.index("[Assistant A's answer]\nthe first answer") < user.content.index(
        "[Assistant B's answer]\nthe second answer"
    )
    with_reference = pairwise_messages("Q?", "x", "y", "the reference")[1].content
    assert "[The reference answer]\nthe reference" in with_reference


def test_answers_with_braces_and_brackets_go_in_verbatim() -> None:
    tricky = 'Use {"key": {0}} and "{answer}" — or [[A]] {}'
    user = rating_messages("{question}", tricky, "{reference}")[1].content
    assert "{question}" in user and tricky in user and "{reference}" in user
    user = pairwise_messages("{q}", tricky, "{")[1].content
    assert tricky in user


def test_structured_prompts_ask_for_the_formats_keys() -> None:
    rating = rating_messages("Q?", "A.", structured=True)[0].content
    assert '"explanation"' in rating and '"rating"' in rating and "[[" not in rating
    pairwise = pairwise_messages("Q?", "a", "b", structured=True)[0].content
    assert '"explanation"' in pairwise and '"verdict"' in pairwise and "[[" not in pairwise


def test_formats_put_the_reasons_before_a_bounded_verdict() -> None:
    for fmt, schema, name, key in (
        (RATING_FORMAT, RATING_SCHEMA, "rating", "rating"),
        (PAIRWISE_FORMAT, PAIRWISE_SCHEMA, "pairwise", "verdict"),
    ):
        assert fmt.type == "json_schema" and fmt.json_schema is not None
        assert fmt.json_schema.name == name and fmt.json_schema.schema_ == schema
        assert list(schema["properties"]) == ["explanation", key] == schema["required"]
        assert schema["properties"]["explanation"]["maxLength"] == EXPLANATION_CHARS
        assert ResponseFormat.model_validate(fmt.openai()) == fmt
    assert RATING_SCHEMA["properties"]["rating"]["enum"] == list(range(1, 11))
    assert PAIRWISE_SCHEMA["properties"]["verdict"]["enum"] == ["A", "B", "C"]


def test_structured_verdicts_parse() -> None:
    assert parse_rating('{"explanation": "Right, but terse.", "rating": 8}') == 8
    assert parse_pairwise('{"explanation": "B is wrong.", "verdict": "A"}') == "first"


# -- reading a rating --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rating"),
    [
        ("The answer is correct and clear.\n\nRating: [[7]]", 7),
        ("[[7]]", 7),
        ("Rating: [[ 9 ]]", 9),
        ("[[8/10]]", 8),
        ("I would give this 7/10.", 7),
        ("Overall: 6 out of 10", 6),
        ("Rating: 5", 5),
        ("**Rating:** 4", 4),
        ("Score: 7.5", 8),
        ("a rating of 3", 3),
        ("Rating: [7]", 7),
        ("Feedback: good. [RESULT] 2", 2),
        ('{"rating": 7}', 7),
        ('```json\n{"explanation": "ok", "rating": "6"}\n```', 6),
        ('{"Score": 7.0}', 7),
        ('{"rating": "7/10"}', 7),
        ("10", 10),
        ("1.", 1),
        # the rating, not the example or other numbers, wins
        ("The answer lists 3 steps out of 4 and says 2 + 2 = 4. Rating: [[6]]", 6),
        ("Earlier I thought [[4]], but on reflection: Rating: [[5]]", 5),
        # unreadable: out of range, another scale, no rating at all
        ("Rating: [[11]]", None),
        ("Rating: [[0]]", None),
        ("Rating: 4/5", None),
        ('{"rating": 42}', None),
        ('{"rating": true}', None),
        ('{"rating": "excellent"}', None),
        ('{"rating": 1e999}', None),
        ("The answer is good.", None),
        ("", None),
    ],
)
def test_ratings_are_read_tolerantly(text: str, rating: int | None) -> None:
    assert parse_rating(text) == rating


def test_a_readable_but_invalid_rating_is_not_replaced_by_a_weaker_guess() -> None:
    """[[11]] is the judge's verdict, out of range: the "7/10" in its reasons is not read
    instead, because it may describe something else."""
    assert parse_rating("Accuracy 7/10, style 9/10. Rating: [[11]]") is None


# -- reading a pairwise verdict ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "preference"),
    [
        ("A is more accurate.\n\n[[A]]", "first"),
        ("Final verdict: [[B]]", "second"),
        ("They are equally good. [[C]]", "tie"),
        ("[[tie]]", "tie"),
        ("[[a]]", "first"),
        ("[[Assistant B]]", "second"),
        ("Verdict: A", "first"),
        ("**Winner:** Assistant B", "second"),
        ("The better answer is A.", "first"),
        ("[RESULT] B", "second"),
        ('{"verdict": "B"}', "second"),
        ('{"winner": "Assistant A"}', "first"),
        ('{"winner": "tie"}', "tie"),
        ('{"result": "C"}', "tie"),
        ("B", "second"),
        ("tie.", "tie"),
        ("Earlier I leaned to [[A]], but [[B]]", "second"),
        # unreadable
        ("The verdict is a close call.", None),
        ('{"verdict": "D"}', None),
        ('{"verdict": 1}', None),
        ("Both are fine.", None),
        ("", None),
    ],
)
def test_pairwise_verdicts_are_read_tolerantly(text: str, preference: str | None) -> None:
    assert parse_pairwise(text) == preference


_FRAGMENTS = [
    "Rating:",
    "[[",
    "]]",
    "[",
    "]",
    "/",
    "10",
    "7",
    "0",
    "11",
    "7.5",
    "out of",
    "{",
    "}",
    '"rating"',
    '"verdict"',
    ":",
    ",",
    '"A"',
    "A",
    "B",
    "C",
    "tie",
    "[RESULT]",
    "Verdict:",
    "Winner:",
    "Assistant",
    "\n",
    " ",
    "9" * 30,
    "1e999",
    "true",
    "null",
    '"',
    "score",
    "of",
]


@settings(max_examples=400, deadline=None)
@given(st.text() | st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map("".join))
def test_parsing_never_raises_on_any_text(text: str) -> None:
    rating = parse_rating(text)
    assert rating is None or (type(rating) is int and 1 <= rating <= 10)
    assert parse_pairwise(text) in ("first", "second", "tie", None)


# -- combining both orders ---------------------------------------------------------------------

_OPPOSITE = {"win": "loss", "loss": "win", "tie": "tie"}
_CHOICES: list[Preference | None] = ["first", "second", "tie", None]


def test_only_agreeing_orders_decide() -> None:
    # order 1 shows the candidate first, order 2 the baseline first
    assert pairwise_verdict("first", "second") == "win"
    assert pairwise_verdict("second", "first") == "loss"
    assert pairwise_verdict("tie", "tie") == "tie"
    assert pairwise_verdict("first", "tie") == "tie"
    assert pairwise_verdict("tie", "first") == "tie"
    assert pairwise_verdict("first", None) == "tie"
    assert pairwise_verdict(None, None) == "tie"


def test_a_judge_that_always_prefers_one_position_shows_no_preference() -> None:
    assert pairwise_verdict("first", "first") == "tie"
    assert pairwise_verdict("second", "second") == "tie"


@pytest.mark.parametrize(("order1", "order2"), list(itertools.product(_CHOICES, repeat=2)))
def test_the_baselines_view_is_the_opposite(
    order1: Preference | None, order2: Preference | None
) -> None:
    """From the baseline's side its order 1 is the candidate's order 2: its verdict must be
    the candidate's, reversed, for every pair of verdicts."""
    assert pairwise_verdict(order2, order1) == _OPPOSITE[pairwise_verdict(order1, order2)]


def test_a_scripted_judge_round_trip() -> None:
    """A judge that prefers the longer answer, asked in both orders: the candidate wins."""

    def judge(messages: list[ChatMessage]) -> str:
        user = messages[1].content
        a = user.split("[Assistant A's answer]\n")[1].split("\n[End")[0]
        b = user.split("[Assistant B's answer]\n")[1].split("\n[End")[0]
        return "A is more complete.\n[[A]]" if len(a) > len(b) else "B is better.\n[[B]]"

    candidate, baseline = "Canberra, since 1913.", "Canberra."
    first = parse_pairwise(judge(pairwise_messages("Capital?", candidate, baseline)))
    second = parse_pairwise(judge(pairwise_messages("Capital?", baseline, candidate)))
    assert (first, second) == ("first", "second")
    assert pairwise_verdict(first, second) == "win"
