"""The local judge of ``localmoa eval``: its prompts, and reading its verdicts tolerantly.

Two ways of judging, both well studied for LLM judges:

**Single-answer rating** (:func:`rating_messages`, :func:`parse_rating`): the judge rates one
answer from 1 to 10, comparing it with a reference answer when the question has one. The
shape follows MT-Bench's single-answer grading (Zheng et al. 2023, "Judging LLM-as-a-Judge
with MT-Bench and Chatbot Arena", arXiv 2306.05685; prompts ``single-v1`` and
``single-math-v1`` in lm-sys/FastChat ``fastchat/llm_judge/data/judge_prompts.jsonl``): a short
explanation first, then the verdict as ``Rating: [[5]]``, so the judge reasons before it
commits and the verdict is easy to find. The score bands spelled out in the instruction follow
Prometheus's rubrics (Kim et al. 2024, "Prometheus 2", arXiv 2405.01535; ``ABSOLUTE_PROMPT``
in prometheus-eval's ``prompts.py``), which describe what each score means rather than leave
a small judge to guess where a 6 ends and a 7 begins; ours are five bands of two points on
the 1–10 scale, since the questions here carry no rubric of their own.

**Pairwise comparison** (:func:`pairwise_messages`, :func:`parse_pairwise`,
:func:`pairwise_verdict`): the judge reads two answers and says which is better, as
``[[A]]``, ``[[B]]`` or ``[[C]]`` for a tie (MT-Bench's ``pair-v2``). LLM judges favour one
position (MT-Bench §3.3), so each comparison is asked in both orders and only a verdict both
orders agree on counts: disagreeing orders are a tie, MT-Bench's conservative rule (§3.4).

The wording is the project's own; the answers and references are concatenated into the
user's message, never passed through ``str.format`` (they hold braces). The instruction is
the system message and the material the user message: a template without a system role
(Gemma's) merges them, which reads the same.

**Structured output.** :data:`RATING_FORMAT` and :data:`PAIRWISE_FORMAT` ask a backend that
has one for JSON instead (``{"explanation": ..., "rating": 7}``; ``structured=True`` words the
instruction to match). The explanation comes first, as in the text form, and is bounded
(:data:`EXPLANATION_CHARS`) so that ``max_tokens`` does not cut the answer off before its
verdict.

**Parsing is tolerant and never raises**, in the spirit of :mod:`localmoa.runtime.judge`: a
small judge without a grammar writes its verdict in many ways. The first of these forms found
decides (within a form, the last occurrence, since the verdict ends the answer):

- a JSON object with a rating key (``rating``, ``score``, ``grade``) or a verdict key
  (``verdict``, ``winner``, ``better``, ``choice``, ``result``);
- MT-Bench's double brackets: ``[[7]]``, ``[[7/10]]``, ``[[A]]``, ``[[tie]]``;
- a label: ``Rating: 7``, ``score of 8``, ``Rating: [7]``, ``[RESULT] 7`` (Prometheus),
  ``Verdict: A``, ``Winner: Assistant B``;
- for a rating, ``7/10`` or ``7 out of 10`` anywhere;
- the whole answer being only the verdict (``7``, ``B``, ``tie``).

A rating is a whole number from 1 to 10; ``7.5`` rounds half up to 8. A rating outside 1–10,
or given on another scale (``4/5``), is unreadable (None) rather than converted: the judge did
not follow the instruction, and a guess would pass for a measurement. In a pairwise verdict
``A``/``first`` means the first answer shown, ``B``/``second`` the second, ``C``/``tie`` a tie.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from typing import Any, Literal

from localmoa.backends.base import ChatMessage, JsonSchemaFormat, ResponseFormat
from localmoa.jsontext import json_objects

__all__ = [
    "EXPLANATION_CHARS",
    "PAIRWISE_FORMAT",
    "PAIRWISE_SCHEMA",
    "RATING_FORMAT",
    "RATING_SCHEMA",
    "Preference",
    "Verdict",
    "pairwise_messages",
    "pairwise_verdict",
    "parse_pairwise",
    "parse_rating",
    "rating_messages",
]

Preference = Literal["first", "second", "tie"]
"""One pairwise judgement: the answer shown first is better, the second is, or neither."""

Verdict = Literal["win", "tie", "loss"]
"""A candidate's result against a baseline once both orders are combined."""

EXPLANATION_CHARS = 800
"""The most characters a structured verdict's explanation may take: a few sentences, well
inside any judge call's ``max_tokens`` (about 270 tokens at 3 characters a token)."""

RATING_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "explanation": {"type": "string", "maxLength": EXPLANATION_CHARS},
        "rating": {"type": "integer", "enum": list(range(1, 11))},
    },
    "required": ["explanation", "rating"],
    "additionalProperties": False,
}
"""A rating as JSON: the reasons first (the judge reasons before it rates), then 1 to 10 (an
``enum``, which llama.cpp's grammar enforces where it ignores ``minimum``/``maximum``)."""

RATING_FORMAT = ResponseFormat(
    type="json_schema", json_schema=JsonSchemaFormat(name="rating", schema=RATING_SCHEMA)
)
""":data:`RATING_SCHEMA` as a structured-output request."""

PAIRWISE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "explanation": {"type": "string", "maxLength": EXPLANATION_CHARS},
        "verdict": {"type": "string", "enum": ["A", "B", "C"]},
    },
    "required": ["explanation", "verdict"],
    "additionalProperties": False,
}
"""A pairwise verdict as JSON: the reasons, then A, B or C (a tie), as in the text form."""

PAIRWISE_FORMAT = ResponseFormat(
    type="json_schema", json_schema=JsonSchemaFormat(name="pairwise", schema=PAIRWISE_SCHEMA)
)
""":data:`PAIRWISE_SCHEMA` as a structured-output request."""

_CRITERIA = (
    "Judge correctness first: an answer that is wrong in substance, or that reaches the right "
    "result by faulty reasoning, is poor however well it is written. Then judge how well it "
    "serves the user: whether it answers what was asked, completely, clearly and without "
    "padding. A short question deserves a short answer; length earns nothing by itself."
)

_WITH_REFERENCE = (
    "A reference answer written by a person is given. Treat it as correct: compare with it, "
    "and count any disagreement with it in substance as a mistake. An answer may say more "
    "than the reference, or say it differently, without losing anything."
)

_WITHOUT_REFERENCE = (
    "There is no reference answer: check the facts and the reasoning yourself, and do not "
    "take a confident tone for a correct answer."
)

_BANDS = (
    "Use the whole scale, with these meanings:\n"
    "1-2: wrong, off the topic, or a refusal without good reason\n"
    "3-4: mostly wrong, or missing the main point, though some parts are relevant\n"
    "5-6: partly right: the main point is there, with errors or important gaps\n"
    "7-8: right and useful, with small errors, omissions or unclear parts\n"
    "9-10: right, complete and clear; give 10 only when nothing would make it better"
)


def rating_messages(
    question: str, answer: str, reference: str | None = None, *, structured: bool = False
) -> list[ChatMessage]:
    """The judge's call rating ``answer`` to ``question`` from 1 to 10, against
    ``reference`` when given; ``structured`` words the reply for :data:`RATING_FORMAT`."""
    if structured:
        reply = (
            'Reply with one JSON object and nothing else: "explanation", a few sentences '
            'giving your reasons, then "rating", a whole number from 1 to 10.'
        )
    else:
        reply = (
            "First explain your judgement in a few sentences. Then, on the last line, write "
            "your rating exactly in this form: Rating: [[N]], where N is a whole number from "
            "1 to 10, for example Rating: [[6]]."
        )
    instruction = "\n\n".join(
        [
            "You are an impartial judge. Rate the quality of the assistant's answer to the "
            "user's question shown below, on a scale of 1 to 10.",
            _CRITERIA,
            _WITH_REFERENCE if reference is not None else _WITHOUT_REFERENCE,
            _BANDS,
            reply,
        ]
    )
    material = _block("The user's question", question)
    if reference is not None:
        material += "\n\n" + _block("The reference answer", reference)
    material += "\n\n" + _block("The assistant's answer", answer)
    return [
        ChatMessage(role="system", content=instruction),
        ChatMessage(role="user", content=material),
    ]


def pairwise_messages(
    question: str,
    first: str,
    second: str,
    reference: str | None = None,
    *,
    structured: bool = False,
) -> list[ChatMessage]:
    """The judge's call comparing ``first`` (assistant A) and ``second`` (assistant B) as
    answers to ``question``, against ``reference`` when given; ``structured`` words the reply
    for :data:`PAIRWISE_FORMAT`. Ask it twice, the answers swapped, and combine the two with
    :func:`pairwise_verdict`."""
    if structured:
        reply = (
            'Reply with one JSON object and nothing else: "explanation", a few sentences '
            'comparing the two answers, then "verdict": "A" if assistant A\'s answer is '
            'better, "B" if assistant B\'s answer is better, or "C" if they are equally good.'
        )
    else:
        reply = (
            "First compare the two answers in a few sentences. Then, on the last line, write "
            "your verdict exactly in one of these forms: [[A]] if assistant A's answer is "
            "better, [[B]] if assistant B's answer is better, [[C]] if they are equally good."
        )
    instruction = "\n\n".join(
        [
            "You are an impartial judge. Two assistants, A and B, answered the user's question "
            "shown below. Decide which answer serves the user better.",
            _CRITERIA,
            _WITH_REFERENCE if reference is not None else _WITHOUT_REFERENCE,
            "Do not let the order in which the answers are shown, their length or the "
            "assistants' names sway you. Call it a tie only when neither answer is better.",
            reply,
        ]
    )
    material = _block("The user's question", question)
    if reference is not None:
        material += "\n\n" + _block("The reference answer", reference)
    material += "\n\n" + _block("Assistant A's answer", first)
    material += "\n\n" + _block("Assistant B's answer", second)
    return [
        ChatMessage(role="system", content=instruction),
        ChatMessage(role="user", content=material),
    ]


def _block(title: str, text: str) -> str:
    return f"[{title}]\n{text.strip()}\n[End of {title[0].lower()}{title[1:]}]"


def pairwise_verdict(order1: Preference | None, order2: Preference | None) -> Verdict:
    """A candidate's result against a baseline from the judge's two verdicts: ``order1`` with
    the candidate shown first, ``order2`` with the baseline shown first.

    A win (or loss) needs both orders to agree; anything else is a tie: a judge that prefers
    whichever answer comes first has shown no preference between the answers. An unreadable
    verdict (None) counts as no preference, so it can turn a win into a tie, never into a
    loss.
    """
    first = {"first": "win", "second": "loss"}.get(order1 or "tie", "tie")
    second = {"second": "win", "first": "loss"}.get(order2 or "tie", "tie")
    return "win" if first == second == "win" else "loss" if first == second == "loss" else "tie"


_RATING_KEYS = ("rating", "score", "grade")
_VERDICT_KEYS = ("verdict", "winner", "better", "choice", "result")

_NUMBER = r"(\d{1,12}(?:\.\d{1,12})?)"
_OUT_OF = r"(?:\s*(?:/|out\s+of)\s*(\d{1,12}))?"
_RATING_BRACKETS_RE = re.compile(r"\[\[\s*" + _NUMBER + _OUT_OF + r"\s*\]\]", re.IGNORECASE)
_RATING_LABEL_RE = re.compile(
    r"(?:\b(?:rating|score|grade)\b[*_\s]*(?:is\b|of\b|:|=)?|\[RESULT\])[*_\s]*\[?\s*"
    + _NUMBER
    + _OUT_OF,
    re.IGNORECASE,
)
_RATING_OUT_OF_TEN_RE = re.compile(
    r"(?<![\w.])" + _NUMBER + r"\s*(?:/|out\s+of)\s*(10)\b", re.IGNORECASE
)

_PAIR_BRACKETS_RE = re.compile(
    r"\[\[\s*(?:assistant\s+)?(A|B|C|tie|first|second)\s*\]\]", re.IGNORECASE
)
_PAIR_LABEL_RE = re.compile(
    r"(?:\b(?:final\s+)?(?:verdict|winner|better(?:\s+answer)?)\b[*_\s]*(?:is\b|:|=)?|\[RESULT\])"
    r"[*_\s]*\[?\s*(?:assistant\s+)?(?:answer\s+)?((?-i:A|B|C)|tie|first|second)\b",
    re.IGNORECASE,
)
_PREFERENCES: dict[str, Preference] = {
    "a": "first",
    "first": "first",
    "b": "second",
    "second": "second",
    "c": "tie",
    "tie": "tie",
}


def parse_rating(text: str) -> int | None:
    """The judge's rating in ``text``, 1 to 10, or None when it has none that can be read;
    never raises on any text (the forms accepted are in the module docstring)."""
    found = _first_found(
        text,
        [
            _rating_from_json,
            lambda t: _last_rating(_RATING_BRACKETS_RE, t),
            lambda t: _last_rating(_RATING_LABEL_RE, t),
            lambda t: _last_rating(_RATING_OUT_OF_TEN_RE, t),
            lambda t: _rating_value(_bare(t)),
        ],
    )
    return found if isinstance(found, int) else None


def parse_pairwise(text: str) -> Preference | None:
    """The judge's pairwise verdict in ``text`` ("first" for A, "second" for B, "tie" for C),
    or None when it has none that can be read; never raises on any text."""
    found = _first_found(
        text,
        [
            _preference_from_json,
            lambda t: _last_preference(_PAIR_BRACKETS_RE, t),
            lambda t: _last_preference(_PAIR_LABEL_RE, t),
            lambda t: _preference(re.sub(r"(?i)^assistant\s+", "", _bare(t))),
        ],
    )
    return found if found in ("first", "second", "tie") else None


_Unread = object()
"""What a reader returns when its form is absent (None means present but unreadable)."""


def _first_found(text: str, readers: list[Callable[[str], Any]]) -> Any:
    """The value of the first reader whose form ``text`` has (which may be None: a form
    found but unreadable decides too, rather than let a weaker form guess)."""
    for reader in readers:
        value = reader(text)
        if value is not _Unread:
            return value
    return None


def _bare(text: str) -> str:
    return text.strip().strip("*_`\"'.!:;()[] \t\n")


def _rating_value(raw: Any, scale: str | None = None) -> Any:
    """``raw`` as a rating 1–10 (None when out of range or on another scale); _Unread when it
    is not a number at all."""
    if isinstance(raw, str):
        match = re.fullmatch(r"\s*\[*\s*" + _NUMBER + _OUT_OF + r"\s*\]*\s*", raw, re.IGNORECASE)
        if match is None:
            return _Unread
        raw, scale = float(match.group(1)), match.group(2) or scale
    if scale is not None and int(scale) != 10:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return _Unread
    if isinstance(raw, float):
        if not math.isfinite(raw):
            return None
        raw = math.floor(raw + 0.5)
    return raw if 1 <= raw <= 10 else None


def _last_rating(pattern: re.Pattern[str], text: str) -> Any:
    matches = list(pattern.finditer(text))
    if not matches:
        return _Unread
    last = matches[-1]
    return _rating_value(last.group(1), last.group(2))


def _preference(raw: Any) -> Any:
    if not isinstance(raw, str):
        return _Unread
    return _PREFERENCES.get(raw.strip().strip("[]() ").lower(), _Unread)


def _last_preference(pattern: re.Pattern[str], text: str) -> Any:
    matches = list(pattern.finditer(text))
    return _preference(matches[-1].group(1)) if matches else _Unread


def _rating_from_json(text: str) -> Any:
    for value in _keyed_values(text, _RATING_KEYS):
        found = _rating_value(value)
        return None if found is _Unread else found
    return _Unread


def _preference_from_json(text: str) -> Any:
    for value in _keyed_values(text, _VERDICT_KEYS):
        if isinstance(value, str):
            value = re.sub(r"(?i)^\s*assistant\s+", "", value)
        found = _preference(value)
        return None if found is _Unread else found
    return _Unread


def _keyed_values(text: str, keys: tuple[str, ...]) -> Iterator[Any]:
    """The value of the first of ``keys`` in each JSON object of ``text`` that has one."""
    for obj in json_objects(text):
        lowered = {str(k).strip().lower(): v for k, v in obj.items()}
        for key in keys:
            if key in lowered:
                yield lowered[key]
                break
