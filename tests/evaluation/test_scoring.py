"""Scoring: the final value of an answer by the documented rules, exact match, the bootstrap
interval and wins/ties/losses."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from localmoa.evaluation.scoring import (
    WinsTiesLosses,
    answer_kind,
    bootstrap_ci,
    exact_match,
    extract_final,
    normalise_reference,
    wins_ties_losses,
)

# -- numbers -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # markers
        ("17 × 24 = 408.\nAnswer: 408", "408"),
        ("Let me compare: 9.9 = 9.90 and 9.90 > 9.11.\n\nAnswer: 9.9", "9.9"),
        ("**Final Answer:** 54", "54"),
        ("**Answer**: $54.00", "54"),
        ("The answer is 12 apples.", "12"),
        ("The final answer is: 5050", "5050"),
        ("Answer:\n\n42", "42"),
        ("She has 288 - 150 = 138 left, gives away 46.\n#### 92", "92"),
        ("#### 92 cookies", "92"),
        ("So the result is $\\boxed{4.5}$ cups.", "4.5"),
        ("$$\\boxed{\\frac{5}{6}}$$", "5/6"),
        ("\\boxed{\\dfrac{3}{4}}", "0.75"),
        ("\\boxed{10{,}000}", "10000"),
        ("\\boxed{\\text{12600 seconds}}", "12600"),
        ("The answer is \\boxed{75^\\circ}.", "75"),
        ("Answer: 2 + 3 × 4 = 14", "14"),
        ("Answer: x = 36", "36"),
        ("Answer: 36 (= 3 × 12)", "36"),
        ("Answer: -13", "-13"),
        ("Answer: −13", "-13"),
        ("Final answer: 25%", "25"),
        # a model that corrects itself: the last marker wins
        ("Answer: 9.11\n\nWait, 0.9 > 0.11, so that is wrong.\nAnswer: 9.9", "9.9"),
        ("Answer: 3\nActually the boxed value is \\boxed{5}", "5"),
        # a marker without a number gives way to an earlier one, then to the last number
        ("Answer: 47\nThe answer is left as an exercise.", "47"),
        ("The answer is below. It takes 47 days.", "47"),
        # no marker: the last number
        ("The ball costs $0.05 and the bat $1.05, so the ball costs 0.05.", "0.05"),
        ("It takes 5 minutes.", "5"),
        ("That is 12,600 seconds.", "12600"),
        ("1,250 × 8 = 10,000 boxes", "10000"),
        ("3.0", "3"),
        ("2.50 dollars", "2.5"),
        ("-7 + 3 × (-2) = -7 - 6 = -13", "-13"),
        ("5-3", "3"),
        ("It is 1/2 + 1/3 = 5/6", "5/6"),
        ("2/6", "1/3"),
        ("6/4", "1.5"),
        ("Version 1.2.3 says 7", "7"),
        # a markdown heading is not a GSM8K marker
        ("#### 1. Setup\nWe have 5 apples and eat 2, leaving 3.", "3"),
        ("#### Step 2: compute\nThe total is 20.", "20"),
    ],
)
def test_numbers_are_read_by_the_documented_rules(answer: str, expected: str) -> None:
    assert extract_final(answer, expect="number") == expected


def test_the_rule_that_makes_a_marker_necessary() -> None:
    """Without a marker the last number wins, which names the smaller number here: why every
    exact prompt of the starter set asks for a final "Answer:" line."""
    assert extract_final("9.9 is larger than 9.11.", expect="number") == "9.11"
    assert extract_final("9.9 is larger than 9.11.\nAnswer: 9.9", expect="number") == "9.9"


@pytest.mark.parametrize(
    ("written", "canonical"),
    [
        ("10,000", "10000"),
        ("1,234,567.50", "1234567.5"),
        ("3.0", "3"),
        ("0.750", "0.75"),
        ("3/4", "0.75"),
        ("1/3", "1/3"),
        ("-2/4", "-0.5"),
        ("$5", "5"),
        ("€12", "12"),
        ("25%", "25"),
        ("-0", "0"),
        ("007", "7"),
        ("0.05", "0.05"),
    ],
)
def test_numbers_are_written_back_in_one_canonical_form(written: str, canonical: str) -> None:
    assert answer_kind(written) == "number"
    assert normalise_reference(written) == canonical
    assert extract_final(written) == canonical


def test_a_comma_is_a_thousands_separator_only_before_three_digits() -> None:
    assert extract_final("3,5", expect="number") == "5"
    assert extract_final("1,2345", expect="number") == "2345"
    assert extract_final("1, 2, 3", expect="number") == "3"


def test_over_long_digit_strings_are_not_numbers() -> None:
    assert extract_final("9" * 5000, expect="number") is None
    assert extract_final("9" * 5000 + " then 4", expect="number") == "4"


# -- choices -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("Answer: C", "C"),
        ("Answer: (c)", "C"),
        ("Answer: **B**", "B"),
        ("The answer is B) 9.9", "B"),
        ("The answer is A because Raj finished after Tom.", "A"),
        ("Answer: the correct option is (D).", "D"),
        ("The largest is 0.705, which is option D.", "D"),
        ("29 is prime, so (C).", "C"),
        ("Penguins are birds.\n\nC", "C"),
        ("A is correct.", "A"),
        ("A bat is a mammal and a whale is too. I pick C", "C"),
        ("A penguin lays eggs.", None),
        ("Both are wrong.", None),
        ("Answer: C\nOn reflection, the answer is B.", "B"),
        ("\\boxed{D}", "D"),
        ("#### B", "B"),
    ],
)
def test_choices_are_read_by_the_documented_rules(answer: str, expected: str | None) -> None:
    assert extract_final(answer, expect="choice") == expected


# -- yes / no ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("No, 91 = 7 × 13.", "no"),
        ("**Yes.** 2027 has no divisor up to its square root.", "yes"),
        ("91 = 7 × 13, so no.", "no"),
        ("It does not follow; the street may be wet for other reasons. Answer: no", "no"),
        ("Answer: Yes, all bloops are lazzies.", "yes"),
        ("Since every bloop is a razzie and every razzie a lazzie: yes.", "yes"),
        ("There is no way to tell.", None),
        ("Nobody knows.", None),
        ("Answer: yes\nHmm, let me check again. Answer: no", "no"),
    ],
)
def test_yes_and_no_are_read_by_the_documented_rules(answer: str, expected: str | None) -> None:
    assert extract_final(answer, expect="yes_no") == expected


# -- without an expected kind ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("B", "B"),
        ("(b)", "B"),
        ("Yes.", "yes"),
        ("**no**", "no"),
        ("Answer: B) 9.9", "B"),
        ("Answer: yes, it is", "yes"),
        ("Answer: 9.9", "9.9"),
        ("A bat costs 1.05.", "1.05"),
        ("Nothing to see here.", None),
        ("", None),
    ],
)
def test_the_kind_is_guessed_from_the_text_without_an_expectation(
    answer: str, expected: str | None
) -> None:
    assert extract_final(answer) == expected


# -- references and exact match ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "kind", "normalised"),
    [
        ("408", "number", "408"),
        ("-13", "number", "-13"),
        ("5/6", "number", "5/6"),
        ("B", "choice", "B"),
        ("(e)", "choice", "E"),
        ("Yes", "yes_no", "yes"),
        (" no ", "yes_no", "no"),
    ],
)
def test_references_have_a_kind_and_extract_from_themselves(
    reference: str, kind: str, normalised: str
) -> None:
    assert answer_kind(reference) == kind
    assert normalise_reference(reference) == normalised
    assert extract_final(reference) == normalised
    assert exact_match(reference, reference)


@pytest.mark.parametrize("reference", ["Paris", "F", "maybe", "", "12 apples", "3:45", "1e6"])
def test_a_reference_no_answer_could_match_is_refused(reference: str) -> None:
    assert answer_kind(reference) is None
    with pytest.raises(ValueError, match="cannot be matched exactly"):
        normalise_reference(reference)
    with pytest.raises(ValueError):
        exact_match("anything", reference)


@pytest.mark.parametrize(
    ("answer", "reference", "matches"),
    [
        ("Answer: 9.9", "9.9", True),
        ("Answer: 9.90", "9.9", True),
        ("Answer: 9.11", "9.9", False),
        ("There are 12,600 seconds.", "12600", True),
        ("Answer: 0.75", "3/4", True),
        ("Answer: 0.33", "1/3", False),
        ("Answer: 10000", "10,000", True),
        ("So it is C.", "C", True),
        ("Answer: (c)", "C", True),
        ("Answer: B", "C", False),
        ("No, because 91 = 7 × 13.", "no", True),
        ("Yes", "no", False),
        ("I cannot tell.", "yes", False),
        ("", "5", False),
    ],
)
def test_exact_match(answer: str, reference: str, matches: bool) -> None:
    assert exact_match(answer, reference) is matches


def test_the_reference_kind_steers_the_reading() -> None:
    """The same answer reads as a choice for a letter reference and as a number for a number
    one: option C of a list, or the number that option holds."""
    answer = "C) 29 is the only prime here."
    assert exact_match(answer, "C")
    assert exact_match(answer, "29")


@settings(max_examples=300, deadline=None)
@given(
    st.text()
    | st.lists(
        st.sampled_from(
            [
                "Answer:",
                "answer is",
                "####",
                "\\boxed{",
                "}",
                "{",
                "\n",
                " ",
                "-",
                "−",
                "/",
                ",",
                "9",
                "0",
                "123",
                ".",
                "%",
                "$",
                "(",
                ")",
                "A",
                "B",
                "yes",
                "no",
                "=",
                "+",
                "*",
                "\\frac{1}{0}",
                "1/0",
                "**",
            ]
        ),
        max_size=40,
    ).map("".join)
)
def test_extraction_never_raises(text: str) -> None:
    for expect in (None, "number", "choice", "yes_no"):
        value = extract_final(text, expect=expect)
        assert value is None or (isinstance(value, str) and value)
        if value is not None and expect is not None:
            assert answer_kind(value) == expect


# -- bootstrap ---------------------------------------------------------------------------------


def test_bootstrap_is_deterministic_with_its_seed() -> None:
    scores = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 1]
    assert bootstrap_ci(scores) == bootstrap_ci(scores)
    assert bootstrap_ci(scores, seed=3) == bootstrap_ci(scores, seed=3)
    assert bootstrap_ci(scores, seed=3) != bootstrap_ci(scores, seed=4)


@pytest.mark.parametrize(
    "scores",
    [
        [1, 0, 1, 1, 0, 1, 0, 1, 1, 1],
        [0.1 * i for i in range(30)],
        [7, 8, 3, 9, 10, 6, 5, 8, 7, 2, 9],
    ],
)
def test_bootstrap_interval_covers_the_mean_within_the_range(scores: list[float]) -> None:
    low, high = bootstrap_ci(scores)
    assert min(scores) <= low < statistics.fmean(scores) < high <= max(scores)


def test_bootstrap_interval_narrows_with_more_questions() -> None:
    widths = []
    for n in (20, 80, 320):
        scores = [1.0 if i % 4 else 0.0 for i in range(n)]  # 75 % right at every size
        low, high = bootstrap_ci(scores)
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # the width falls as 1/sqrt(n): four times the questions, about half the width
    assert widths[1] / widths[0] == pytest.approx(0.5, abs=0.1)


def test_bootstrap_interval_agrees_with_the_normal_approximation() -> None:
    """For 100 scores half right the standard error is 0.05, so a 95 % interval is about
    0.5 ± 1.96 × 0.05."""
    low, high = bootstrap_ci([i % 2 for i in range(100)], resamples=4000)
    assert low == pytest.approx(0.5 - 1.96 * 0.05, abs=0.02)
    assert high == pytest.approx(0.5 + 1.96 * 0.05, abs=0.02)


def test_bootstrap_narrows_with_lower_confidence() -> None:
    scores = [1, 0, 1, 1, 0, 1, 0, 1, 1, 1, 0, 1]
    wide, narrow = bootstrap_ci(scores, confidence=0.99), bootstrap_ci(scores, confidence=0.5)
    assert wide[0] <= narrow[0] < narrow[1] <= wide[1]


@pytest.mark.parametrize("scores", [[0.7], [1, 1, 1], [0, 0], [4.0] * 50])
def test_bootstrap_of_one_value_is_that_value(scores: list[float]) -> None:
    assert bootstrap_ci(scores) == (scores[0], scores[0])


def test_bootstrap_refuses_what_it_cannot_compute() -> None:
    with pytest.raises(ValueError, match="at least one score"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1, 0], confidence=1.0)
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_ci([1, 0], resamples=0)


# -- wins, ties, losses ------------------------------------------------------------------------


def test_wins_ties_losses_compare_question_by_question() -> None:
    result = wins_ties_losses([1, 0, 1, 7, 3], [0, 0, 1, 9, 2])
    assert result == WinsTiesLosses(wins=2, ties=2, losses=1)
    assert result == (2, 2, 1)
    assert wins_ties_losses([0, 1], [1, 0]) == wins_ties_losses([1, 0], [0, 1])
    assert wins_ties_losses([], []) == (0, 0, 0)


def test_wins_ties_losses_need_the_same_questions() -> None:
    with pytest.raises(ValueError, match="same questions"):
        wins_ties_losses([1, 0], [1])
