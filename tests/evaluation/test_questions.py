"""Question sets: the JSONL shape, errors that name the file and the line, and the shipped
starter set, whose exact answers are recomputed here rather than trusted."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import pytest

from localmoa.errors import UserError
from localmoa.evaluation.questions import Question, parse_questions, read_questions, starter_set
from localmoa.evaluation.scoring import (
    answer_kind,
    exact_match,
    extract_final,
    normalise_reference,
)


def write(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def line(**fields: object) -> str:
    return json.dumps(fields)


# -- reading a set -----------------------------------------------------------------------------


def test_a_set_reads_in_order_with_blank_lines_skipped(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        line(id="q1", prompt="What is 2 + 2?", answer="4", kind="exact"),
        "",
        "   ",
        line(id="q2", prompt="Capital of France?", answer="Paris", kind="judged"),
        line(id=3, prompt="Write a poem.", kind="judged"),
    )
    questions = read_questions(path)
    assert questions == [
        Question(id="q1", prompt="What is 2 + 2?", answer="4", kind="exact"),
        Question(id="q2", prompt="Capital of France?", answer="Paris", kind="judged"),
        Question(id="3", prompt="Write a poem.", answer=None, kind="judged"),
    ]


def test_a_byte_order_mark_is_read_past(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_text(line(id="q1", prompt="Hi?", kind="judged") + "\n", encoding="utf-8-sig")
    assert read_questions(str(path))[0].id == "q1"


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"id": "q2", "prompt": "x", "kind": "judged"', r"not valid JSON \(Expecting"),
        ("not json at all", "not valid JSON"),
        ('["q2", "a prompt"]', "a question is a JSON object .* not a list"),
        ('"a prompt"', "a question is a JSON object .* not a string"),
        (line(id="q2", kind="judged"), 'no "prompt"; every question needs a prompt'),
        (line(prompt="x", kind="judged"), 'no "id"; every question needs an id'),
        (line(id="q2", prompt="x"), r'no "kind"; every question needs a kind \("exact"'),
        (line(id="q2", prompt="x", kind="fuzzy"), '"kind" is "fuzzy"; use "exact" or "judged"'),
        (line(id="q2", prompt="", kind="judged"), '"prompt" is empty; fill it in'),
        (line(id="q2", prompt="  \n ", kind="judged"), '"prompt" is blank'),
        (line(id="", prompt="x", kind="judged"), '"id" is empty'),
        (line(id=True, prompt="x", kind="judged"), '"id" is a boolean; write it as a string'),
        (line(id="q2", prompt=["x"], kind="judged"), '"prompt" is a list; write it as a string'),
        (line(id="q2", prompt="x", answer="", kind="judged"), '"answer" is empty; leave it out'),
        (line(id="q2", prompt="x", answer=" ", kind="judged"), '"answer" is blank; leave it out'),
        (line(id="q2", prompt="x", answer=4, kind="exact"), '"answer" is a number; write it as a'),
        (
            line(id="q2", prompt="x", kind="exact"),
            'an "exact" question needs an "answer" .* or make it "judged"',
        ),
        (
            line(id="q2", prompt="x", answer="Paris", kind="exact"),
            "the answer 'Paris' of an \"exact\" question is not a number, a letter A-E or yes/no",
        ),
        (
            line(id="q2", prompt="x", kind="judged", category="math"),
            'unknown key "category"; a question has the keys "id", "prompt", "answer", "kind"',
        ),
    ],
)
def test_a_bad_line_is_named_by_file_and_number(tmp_path: Path, bad: str, message: str) -> None:
    path = write(tmp_path, line(id="q1", prompt="Fine?", kind="judged"), "", bad)
    with pytest.raises(UserError, match=f"^question set {re.escape(str(path))}, line 3: {message}"):
        read_questions(path)


def test_a_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        line(id="q1", prompt="a", kind="judged"),
        line(id="q2", prompt="b", kind="judged"),
        line(id="q1", prompt="c", kind="judged"),
    )
    with pytest.raises(UserError, match=r'line 3: the id "q1" is already used on line 1'):
        read_questions(path)


def test_a_number_id_and_the_same_string_id_are_the_same_id(tmp_path: Path) -> None:
    path = write(
        tmp_path, line(id=7, prompt="a", kind="judged"), line(id="7", prompt="b", kind="judged")
    )
    with pytest.raises(UserError, match='line 2: the id "7" is already used on line 1'):
        read_questions(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_a_set_without_questions_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=f"^question set {re.escape(str(path))}: has no questions"):
        read_questions(path)


def test_files_that_cannot_be_read_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"missing\.jsonl: no such file"):
        read_questions(tmp_path / "missing.jsonl")
    with pytest.raises(UserError, match="is a folder"):
        read_questions(tmp_path)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"id": "q1", "prompt": "tea", "kind": "judged"}\n{"id": "caf\xe9"}\n')
    with pytest.raises(UserError, match=r"latin\.jsonl, line 2: not UTF-8 text; save the file as"):
        read_questions(latin)


def test_reading_errors_exit_2() -> None:
    with pytest.raises(UserError) as caught:
        parse_questions(["{"], source="stdin")
    assert caught.value.exit_code == 2
    assert str(caught.value).startswith("question set stdin, line 1: not valid JSON")


def test_questions_are_frozen_and_forbid_extra_keys() -> None:
    question = Question(id="q", prompt="p", kind="judged")
    with pytest.raises(ValueError):
        question.id = "other"
    with pytest.raises(ValueError):
        Question.model_validate({"id": "q", "prompt": "p", "kind": "judged", "tags": []})


# -- the starter set ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def starter() -> list[Question]:
    return starter_set()


def test_the_starter_set_has_every_kind_of_question(starter: list[Question]) -> None:
    assert len(starter) >= 40
    exact = [q for q in starter if q.kind == "exact"]
    with_reference = [q for q in starter if q.kind == "judged" and q.answer is not None]
    open_ = [q for q in starter if q.kind == "judged" and q.answer is None]
    assert len(exact) >= 20 and len(with_reference) >= 8 and len(open_) >= 8
    assert len({q.id for q in starter}) == len(starter)
    assert {answer_kind(q.answer or "") for q in exact} == {"number", "choice", "yes_no"}


def test_every_exact_answer_extracts_from_itself(starter: list[Question]) -> None:
    for q in starter:
        if q.kind == "exact":
            assert q.answer is not None
            assert extract_final(q.answer) == normalise_reference(q.answer), q.id


def test_every_exact_prompt_asks_for_the_marker_the_rules_read_first(
    starter: list[Question],
) -> None:
    """And a model that follows it is scored right, after reasoning that holds other numbers
    (the last-number rule alone would misread some of these)."""
    for q in starter:
        if q.kind == "exact":
            assert q.answer is not None
            assert "End your reply with a line of the form 'Answer: " in q.prompt, q.id
            reply = f"Working: 1, 2, 3 and 9.11 are beside the point.\nAnswer: {q.answer}"
            assert exact_match(reply, q.answer), q.id
            assert not exact_match("Working, no answer.\nAnswer: 123456789", q.answer), q.id


def _options(prompt: str) -> dict[str, str]:
    """The "A) text" lines of a choice question, as {text: letter}."""
    return {
        text: letter for letter, text in re.findall(r"^([A-E])\) (.+?)(?: End|$)", prompt, re.M)
    }


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _follows(
    premises: Callable[..., bool], conclusion: Callable[..., bool], variables: int
) -> bool:
    """Whether ``conclusion`` holds in every truth assignment where ``premises`` hold."""
    for world in itertools.product([False, True], repeat=variables):
        if premises(*world) and not conclusion(*world):
            return False
    return True


def _recomputed(starter: list[Question]) -> dict[str, str]:
    """Each exact answer worked out here, independently of the file."""
    prompt = {q.id: q.prompt for q in starter}
    seq = [n * (n + 1) for n in range(1, 7)]
    assert seq[:5] == [2, 6, 12, 20, 30]  # the sequence as the prompt gives it
    left_after_sales = 12 * 24 - 150
    ball = (Fraction("1.10") - Fraction("1.00")) / 2
    widget_rate = Fraction(5, 5 * 5)  # widgets per machine-minute
    hour_hand, minute_hand = 3 * 30 + 30 * Fraction(1, 2), 30 * 6
    months = "January February March April May June July August September October November December"
    month_names = months.split()
    race_orders = [
        order
        for order in itertools.permutations(["Ann", "Raj", "Tom"])
        if order.index("Ann") < order.index("Tom") < order.index("Raj")
    ]
    assert len({order[-1] for order in race_orders}) == 1  # the puzzle has one answer
    primes = [t for t in _options(prompt["choice-prime"]) if _is_prime(int(t))]
    assert len(primes) == 1
    ages = [3 * s for s in range(1, 60) if 3 * s + 12 == 2 * (s + 12)]
    assert len(ages) == 1
    lily_day = next(d for d in range(49) if Fraction(2) ** (d - 48) == Fraction(1, 2))
    values: dict[str, object] = {
        "arith-decimals": max(Fraction("9.11"), Fraction("9.9")),
        "arith-multiply": 17 * 24,
        "arith-negative": -7 + 3 * (-2),
        "arith-fractions": Fraction(1, 2) + Fraction(1, 3),
        "arith-sum": sum(range(1, 101)),
        "arith-thousands": 1250 * 8,
        "word-cookies": left_after_sales - Fraction(left_after_sales, 3),
        "word-discounts": 80 * (1 - Fraction(25, 100)) * (1 - Fraction(10, 100)),
        "word-train": (17 * 60 + 20) - (14 * 60 + 45),
        "word-bat-and-ball": ball,
        "word-widgets": 100 / (100 * widget_rate),
        "word-lily-pads": lily_day,
        "word-ages": ages[0],
        "word-paint": 6 * Fraction("2.5") * 2 / 8,
        "unit-seconds": Fraction("3.5") * 60 * 60,
        "unit-fahrenheit": 25 * Fraction(9, 5) + 32,
        "unit-recipe": Fraction(3, 4) * 6,
        "unit-clock-angle": min(abs(minute_hand - hour_hand), 360 - abs(minute_hand - hour_hand)),
        "logic-sequence": seq[5],
        "logic-strawberry": "strawberry".count("r"),
        "logic-prime-91": _yes_no(_is_prime(91)),
        "logic-prime-2027": _yes_no(_is_prime(2027)),
        # ages as ranks: Alice > Bob > Carol forces Carol < Alice in every ordering
        "logic-older": _yes_no(
            any(c > a for a, b, c in itertools.permutations(range(3)) if a > b > c)
        ),
        # x is a bloop, a razzie, a lazzie: B → R and R → L give B → L
        "logic-syllogism": _yes_no(
            _follows(
                lambda bloop, razzie, lazzie: (not bloop or razzie) and (not razzie or lazzie),
                lambda bloop, razzie, lazzie: not bloop or lazzie,
                3,
            )
        ),
        # rain → wet and wet do not give rain (affirming the consequent)
        "logic-converse": _yes_no(
            _follows(lambda rain, wet: (not rain or wet) and wet, lambda rain, wet: rain, 2)
        ),
        "choice-race": _options(prompt["choice-race"])[race_orders[0][-1]],
        "choice-prime": _options(prompt["choice-prime"])[primes[0]],
        "choice-largest": _options(prompt["choice-largest"])[
            max(_options(prompt["choice-largest"]), key=Fraction)
        ],
        "choice-months": _options(prompt["choice-months"])[
            month_names[(month_names.index("October") + 5) % 12]
        ],
    }
    return {key: normalise_reference(str(value)) for key, value in values.items()}


NOT_RECOMPUTED = {"choice-mammal"}
"""Exact answers that are facts, not computations (a penguin is a bird)."""


def test_every_computable_exact_answer_is_recomputed(starter: list[Question]) -> None:
    recomputed = _recomputed(starter)
    exact = {q.id: q.answer for q in starter if q.kind == "exact"}
    assert set(recomputed) | NOT_RECOMPUTED == set(exact)
    for question_id, value in recomputed.items():
        answer = exact[question_id]
        assert answer is not None
        assert normalise_reference(answer) == value, question_id


def test_choice_questions_list_their_options_and_the_answer_is_one(
    starter: list[Question],
) -> None:
    for q in starter:
        if q.kind == "exact" and q.answer is not None and q.id.startswith("choice-"):
            letters = sorted(_options(q.prompt).values())
            assert letters == [chr(ord("A") + i) for i in range(len(letters))], q.id
            assert q.answer in letters, q.id


def test_the_starter_set_ships_with_the_package() -> None:
    """An installed localmoa (not only this checkout) carries the starter set and the console."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["localmoa"]
    assert "evaluation/*.jsonl" in shipped and "serve/static/*" in shipped
