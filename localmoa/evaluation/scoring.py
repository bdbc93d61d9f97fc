"""Scoring an evaluation: the final value of an answer, exact match, and the statistics.

**Exact questions** have a reference that is a number, a single letter choice A–E, or yes/no
(:func:`answer_kind`). An answer matches when the value :func:`extract_final` reads from it,
expecting the reference's kind, equals the reference normalised the same way. The rules are
deliberately few and written down, so a user can see why an answer scored 0:

1. **A marker wins.** The answer's markers are ``\\boxed{X}`` (LaTeX, braces nested),
   ``#### X`` (GSM8K's convention, on a line of its own: the value and at most a short unit,
   so a markdown heading such as ``#### 1. Setup`` is not one) and ``answer: X`` /
   ``answer is X`` / ``final answer = X`` (any case, markdown emphasis allowed around it; when
   the rest of the line is empty the next line is read). The last marker in the text whose
   content holds a value of the expected kind wins: a model that corrects itself ends with the
   correction.
2. **Else the text as a whole**: for a number, the last number in the text; for a choice, the
   text itself when it is only a letter (``b``, ``(C).``), else the last letter written as a
   choice (``(C)``, ``option C``, a line holding only the letter), else the last capital A–E
   standing as a word of its own (an "A" that opens a sentence followed by a lowercase word
   is the article, unless that word is a verb such as "is");
   for yes/no, the first word when it is yes or no, else the last yes or no that stands as a
   clause of its own ("..., so no."), never one inside a sentence ("there is no way").
3. **Inside a marker**: for a number, the first number of the content, or the number after its
   last "=" when the content is a calculation (``2 + 3 = 5``, ``x = 5``); for a choice, a
   letter opening the content (``B``, ``(b)``, ``**B**``) or written as a choice in it; for
   yes/no, its first yes or no.

**Numbers** are read as exact rationals and written back in one canonical form, so equal
values compare equal however written: thousands separators are dropped (a comma counts as one
only before exactly three digits: ``1,234`` is 1234, ``3,5`` is two numbers), as are a leading
currency sign ($ € £) and a trailing ``%``; ``−`` (U+2212) is a minus; ``2.50`` and ``2.5``,
``3.0`` and ``3`` are equal; a fraction ``a/b`` (or LaTeX ``\\frac{a}{b}``) is its value, so
``3/4`` equals ``0.75``. The canonical form is the plain decimal when the value has one
(``0.75``, ``-13``, ``10000``), else the reduced fraction (``1/3``). Not read: scientific
notation, a decimal comma, spaces inside a number, mixed numbers (``1 1/2`` reads as its last
number, ``1/2``), times (``3:45``); ``a/0`` reads as ``a``. Matching is exact: ``0.33`` does
not match ``1/3``.

**Choices** are written back as the capital letter, **yes/no** as ``"yes"`` / ``"no"``.

Without an expected kind (``extract_final(text)``), a marker's content is read as a choice
when a lone capital letter opens it, as yes/no when that opens it, else as a number; the whole
text as a lone letter or yes/no when that is all it says, else its last number.

**The statistics** are for small sets on one machine: :func:`bootstrap_ci` is the percentile
bootstrap of the mean (Efron & Tibshirani 1993, ch. 13) with a seeded generator, so the same
scores always give the same interval; :func:`wins_ties_losses` compares two systems question by
question.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import Literal, NamedTuple

__all__ = [
    "AnswerKind",
    "WinsTiesLosses",
    "answer_kind",
    "bootstrap_ci",
    "exact_match",
    "extract_final",
    "normalise_reference",
    "wins_ties_losses",
]

AnswerKind = Literal["number", "choice", "yes_no"]
"""What an exact question's reference is: a number, a letter A–E, or yes/no."""

_MAX_DIGITS = 1000
"""Longer digit strings are not read as numbers (Python refuses ints over 4300 digits)."""

# A number: thousands groups only before exactly three digits, an optional decimal part, an
# optional "/denominator". Not after a letter, digit or point ("x2", "1.2.3"), and its minus
# only where it is not a subtraction ("5-3" is 5 and 3).
_INT = r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)"
_NUMBER_RE = re.compile(
    rf"(?<![\w.])(?P<neg>[-−])?[$€£]?(?P<num>{_INT}(?:\.[0-9]+)?)"
    r"(?:\s*/\s*(?P<den>[0-9]+)(?![.,]?[0-9]))?"
)
_BARE_NUMBER_RE = re.compile(rf"\s*[-−]?[$€£]?{_INT}(?:\.[0-9]+)?(?:\s*/\s*[0-9]+)?\s*%?\s*")
_CALCULATION_RE = re.compile(r"[+×*÷^]|[0-9]\s*[-−/]\s*[0-9]")

_ANSWER_MARK_RE = re.compile(r"\b(?:final\s+)?answer\b[*_\s]*(?:is\b[*_\s]*:?|:|=)", re.IGNORECASE)
_HASH_MARK_RE = re.compile(
    rf"^[ \t]*####[ \t]*(?P<content>(?:[-−]?[$€£]?{_INT}(?:\.[0-9]+)?(?:\s*/\s*[0-9]+)?[ \t]*%?"
    r"[ \t]*[A-Za-z]{0,12}(?:[ \t]+[A-Za-z]{1,12})?"
    r"|\**\(?[A-Ea-e]\)?\**|yes|no)[ \t]*\.?)[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOXED_CHARS = 200
"""How far a boxed value is looked for: boxes hold short values, and an unclosed one in a long
answer must not make reading it quadratic."""
_NEXT_LINE_RE = re.compile(r"\s*([^\n]*)")

_NOT_WORD = r"(?![\w'’-])"
_LEADING_CHOICE_RE = re.compile(rf"^\(([A-Ea-e])\)|^([A-E]){_NOT_WORD}")
_STRICT_LEADING_CHOICE_RE = re.compile(r"^\(?([A-E])\)?(?:\s*$|[).:,])")
_CHOICE_WORD_RE = re.compile(
    rf"\b(?:[Oo]ption|[Cc]hoice|[Ll]etter|OPTION|CHOICE)\s*(?:\(([A-Ea-e])\)|([A-E]){_NOT_WORD})"
    r"|\(([A-E])\)"
)
_CHOICE_LINE_RE = re.compile(r"^[ \t>*_#-]*\(?([A-E])\)?[ \t*_.)]*$", re.MULTILINE)
_CAPITAL_RE = re.compile(rf"(?<![\w'’-])([A-E]){_NOT_WORD}")
_VERBS_AFTER_CHOICE = frozenset(
    [
        "is",
        "was",
        "are",
        "would",
        "should",
        "seems",
        "seem",
        "looks",
        "fits",
        "matches",
        "works",
        "holds",
        "gives",
        "has",
        "and",
        "or",
    ]
)
_YES_NO_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_CLAUSE_YES_NO_RE = re.compile(
    r"(?:^|[.,;:!?()\n*_\"“]|\b(?:so|thus|therefore|hence)\b)[ \t]*(yes|no)[ \t]*"
    r"(?=[.,;:!?)*_\n]|$)",
    re.IGNORECASE,
)
_BARE_VALUE_RE = re.compile(r"\(?([A-Ea-e])\)?|(yes|no)", re.IGNORECASE)

_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")


def answer_kind(reference: str) -> AnswerKind | None:
    """The kind of an exact question's reference, or None when it is none of a number, a
    letter A–E or yes/no (such a question must be "judged")."""
    text = reference.strip()
    if _BARE_NUMBER_RE.fullmatch(text) and _first_number(text) is not None:
        return "number"
    bare = _BARE_VALUE_RE.fullmatch(text)
    if bare is None:
        return None
    return "choice" if bare.group(1) else "yes_no"


def normalise_reference(reference: str) -> str:
    """A reference in the canonical form :func:`extract_final` returns (``"10,000"`` →
    ``"10000"``, ``"b"`` → ``"B"``, ``"No"`` → ``"no"``); ValueError when it is not one of
    the kinds an exact question may have."""
    kind = answer_kind(reference)
    if kind is None:
        raise ValueError(
            f"{reference!r} is not a number, a letter A-E or yes/no, so it cannot be "
            "matched exactly"
        )
    text = reference.strip()
    if kind == "number":
        value = _first_number(text)
        assert value is not None  # answer_kind read it
        return value
    if kind == "choice":
        return text.strip("()").upper()
    return text.lower()


def exact_match(answer_text: str, reference: str) -> bool:
    """Whether ``answer_text``'s final value (read expecting the reference's kind) equals
    ``reference``; ValueError for a reference no answer could match (see
    :func:`normalise_reference`)."""
    expected = normalise_reference(reference)
    return extract_final(answer_text, expect=answer_kind(reference)) == expected


def extract_final(text: str, *, expect: AnswerKind | None = None) -> str | None:
    """The final number, choice or yes/no of ``text`` in canonical form, by the rules in the
    module docstring; None when it has none. ``expect`` says what to look for (the
    reference's kind); without it the kind is guessed from the text. Never raises."""
    clean = _clean_latex(text)
    for content in _marker_contents(clean):
        value = _read_content(content, expect)
        if value is not None:
            return value
    return _read_whole(clean, expect)


def _clean_latex(text: str) -> str:
    text = _LATEX_TEXT_RE.sub(r"\1", text)
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    return (
        text.replace("{,}", ",")
        .replace("\\,", "")
        .replace("\\!", "")
        .replace("\\%", "%")
        .replace("\\$", "$")
        .replace("\\left", "")
        .replace("\\right", "")
    )


def _marker_contents(text: str) -> Iterator[str]:
    """The contents of every marker in ``text``, last first."""
    found: list[tuple[int, str]] = []
    for match in _ANSWER_MARK_RE.finditer(text):
        line_end = text.find("\n", match.end())
        line = text[match.end() : line_end if line_end != -1 else len(text)]
        if not line.strip(" \t*_:") and line_end != -1:
            next_line = _NEXT_LINE_RE.match(text, line_end)
            line = next_line.group(1) if next_line else ""
        found.append((match.start(), line))
    for match in _HASH_MARK_RE.finditer(text):
        found.append((match.start(), match.group("content")))
    for match in _BOXED_RE.finditer(text):
        found.append((match.start(), _braced(text, match.end())))
    for _, content in sorted(found, key=lambda item: item[0], reverse=True):
        yield content


def _braced(text: str, start: int) -> str:
    """The text from ``start`` to the brace that closes the one just before it (at most
    :data:`_BOXED_CHARS` of it when none closes it)."""
    depth = 1
    end = min(len(text), start + _BOXED_CHARS)
    for i in range(start, end):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].replace("{", "").replace("}", "")
    return text[start:end]


def _read_content(content: str, expect: AnswerKind | None) -> str | None:
    content = content.strip().strip("*_`$ \t").strip()
    if expect == "number":
        return _content_number(content)
    if expect == "choice":
        return _content_choice(content)
    if expect == "yes_no":
        match = _YES_NO_RE.search(content)
        return match.group(1).lower() if match else None
    strict = _STRICT_LEADING_CHOICE_RE.match(content)
    if strict is not None:
        return strict.group(1)
    opening = re.match(r"(yes|no)\b", content, re.IGNORECASE)
    if opening is not None:
        return opening.group(1).lower()
    return _content_number(content)


def _content_number(content: str) -> str | None:
    before, equals, _ = content.partition("=")
    if equals and (_first_number(before) is None or _CALCULATION_RE.search(before)):
        return _first_number(content.rpartition("=")[2])
    return _first_number(content)


def _content_choice(content: str) -> str | None:
    leading = _LEADING_CHOICE_RE.match(content)
    if leading is not None:
        return _letter(leading)
    word = _CHOICE_WORD_RE.search(content)
    return None if word is None else _letter(word)


def _letter(match: re.Match[str]) -> str:
    """The letter of a choice pattern, whichever of its groups caught it, as a capital."""
    return next(group for group in match.groups() if group).upper()


def _read_whole(text: str, expect: AnswerKind | None) -> str | None:
    if expect == "number":
        return _last_number(text)
    if expect == "choice":
        return _whole_choice(text)
    if expect == "yes_no":
        return _whole_yes_no(text)
    bare = _BARE_VALUE_RE.fullmatch(_bare(text))
    if bare is not None:
        return bare.group(1).upper() if bare.group(1) else bare.group(2).lower()
    return _last_number(text)


def _bare(text: str) -> str:
    """``text`` without the markup and punctuation around a lone value ("**B.**" → "B")."""
    return text.strip().strip("*_`.!:; \t\n")


def _whole_choice(text: str) -> str | None:
    bare = _BARE_VALUE_RE.fullmatch(_bare(text))
    if bare is not None and bare.group(1):
        return bare.group(1).upper()
    strong = [(m.start(), _letter(m)) for m in _CHOICE_WORD_RE.finditer(text)]
    strong += [(m.start(), m.group(1)) for m in _CHOICE_LINE_RE.finditer(text)]
    if strong:
        return max(strong)[1]
    for match in reversed(list(_CAPITAL_RE.finditer(text))):
        if match.group(1) == "A" and _is_article(text, match.start(), match.end()):
            continue
        return match.group(1)
    return None


def _is_article(text: str, start: int, end: int) -> bool:
    """Whether the capital "A" at ``start`` is the article opening a sentence ("A bat costs")
    rather than a choice ("A is right")."""
    before = text[max(0, start - 40) : start].rstrip(" \t*_\"'“(")
    opens_sentence = not before or before[-1] in ".!?:\n"
    following = re.match(r"[ \t]+([a-z][\w'’-]*)", text[end:])
    return (
        opens_sentence and following is not None and following.group(1) not in _VERBS_AFTER_CHOICE
    )


def _whole_yes_no(text: str) -> str | None:
    opening = re.match(r"[\s*_\"'“>#-]*(yes|no)\b", text, re.IGNORECASE)
    if opening is not None:
        return opening.group(1).lower()
    clauses = list(_CLAUSE_YES_NO_RE.finditer(text))
    return clauses[-1].group(1).lower() if clauses else None


def _numbers(text: str) -> Iterator[str]:
    for match in _NUMBER_RE.finditer(text):
        value = _to_canonical(match)
        if value is not None:
            yield value


def _first_number(text: str) -> str | None:
    return next(_numbers(text), None)


def _last_number(text: str) -> str | None:
    numbers = list(_numbers(text))
    return numbers[-1] if numbers else None


def _to_canonical(match: re.Match[str]) -> str | None:
    digits = match.group("num").replace(",", "")
    denominator = match.group("den")
    if len(digits) > _MAX_DIGITS or (denominator and len(denominator) > _MAX_DIGITS):
        return None
    value = Fraction(digits)
    if denominator and int(denominator) != 0:
        value /= int(denominator)
    if match.group("neg"):
        value = -value
    return _canonical(value)


def _canonical(value: Fraction) -> str:
    """The plain decimal of ``value`` when it has one (its denominator has no prime factor
    but 2 and 5), else the reduced fraction ``p/q``."""
    rest, twos, fives = value.denominator, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = value.numerator * 10**places // value.denominator
    sign = "-" if scaled < 0 else ""
    digits = str(abs(scaled)).rjust(places + 1, "0")
    if places == 0:
        return sign + digits
    return f"{sign}{digits[:-places]}.{digits[-places:]}"


def bootstrap_ci(
    scores: Sequence[float], *, resamples: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """The percentile-bootstrap ``confidence`` interval of the mean of ``scores``.

    ``resamples`` samples of ``len(scores)`` scores are drawn with replacement by a
    ``random.Random(seed)``, so the interval is the same on every run; its ends are the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of the resampled means
    (linear interpolation between order statistics, numpy's default). One score, or scores all
    equal, give the point interval at that value: no resample can differ. ValueError for no
    scores, a confidence outside (0, 1) or fewer than one resample.
    """
    if not scores:
        raise ValueError("the bootstrap needs at least one score")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence}")
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, not {resamples}")
    values = [float(s) for s in scores]
    if min(values) == max(values):
        return values[0], values[0]
    rng = random.Random(seed)
    n = len(values)
    means = sorted(math.fsum(rng.choices(values, k=n)) / n for _ in range(resamples))
    alpha = (1.0 - confidence) / 2.0
    return _quantile(means, alpha), _quantile(means, 1.0 - alpha)


def _quantile(ordered: Sequence[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class WinsTiesLosses(NamedTuple):
    """How often one system scored above, level with, and below another, question by
    question."""

    wins: int
    ties: int
    losses: int


def wins_ties_losses(a_scores: Sequence[float], b_scores: Sequence[float]) -> WinsTiesLosses:
    """Per question, whether ``a`` scored above (a win), level with (a tie) or below (a loss)
    ``b``; the two lists hold the same questions in the same order (ValueError otherwise)."""
    if len(a_scores) != len(b_scores):
        raise ValueError(
            f"the two systems have scores for {len(a_scores)} and {len(b_scores)} questions; "
            "compare the same questions"
        )
    wins = sum(1 for a, b in zip(a_scores, b_scores, strict=True) if a > b)
    losses = sum(1 for a, b in zip(a_scores, b_scores, strict=True) if a < b)
    return WinsTiesLosses(wins, len(a_scores) - wins - losses, losses)
