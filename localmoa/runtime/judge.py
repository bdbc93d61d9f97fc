"""Sparse MoA's judge: which answers of a layer go on, and may the proposer layers stop early.

Sparse MoA (Li et al. 2024, arXiv 2411.03284) puts one call after each proposer layer that
reads the layer's answers, picks the best ``top_k`` (only they become the next layer's
references) and, with early stop, says whether the answers already agree so the remaining
proposer layers can be skipped. The reference code (David-Li0406/SMoA) does both in one
"moderator" call, as here.

**The prompt** (:func:`judge_system_prompt`) is our own wording of the same mechanics: the
instruction, then the answers numbered from 1 as the aggregator sees references; the engine
merges it into the call's one system message and the user's conversation follows. The answers
are concatenated, never passed through ``str.format``: they hold braces and quotes.

**The answer** is JSON ``{"selected": [numbers, best first], "stop": bool, "reason": str}``,
asked for with the backend's structured output where it has one (:data:`JUDGE_FORMAT`, or
:func:`judge_format` which also bounds the numbers and their count for a grammar). "selected"
comes first in the schema so that an answer cut off by ``max_tokens`` inside its reason still
carries its selection (the regex below recovers it).

**Parsing is tolerant**, because a small local model without a grammar writes JSON in a
```json fence, among prose, with SMoA's own key spellings ("chosen responses", "end debate",
"reasoning"), or with numbers as strings. :func:`parse_verdict`

- takes the first JSON object in the text that decodes and has a selection key
  (:func:`localmoa.jsontext.json_objects`), else a regex for ``"selected": [...]``
  (and ``"stop": true``) when no object decodes, e.g. a verdict cut off mid-reason;
- reads a number given as an int (``2``), an integral float (``2.0``), a numeric string
  (``"2"``) or a labelled one (``"Response 2"``, ``"Answer 2"``, ``"#2"``, ``"2."``), and a
  lone number as a list of one; anything else (``"the second"``, booleans) is unreadable;
- de-duplicates keeping the order, and keeps the first ``top_k``.

**The fallback is deterministic.** When the answer does not parse, selects nothing, or names a
number outside 1..shown (a 0 hints at 0-based counting, so none of its numbers can be trusted),
every answer goes on and nothing stops: ``Verdict(selected=(1..shown), stop=False,
parsed=False)`` with the reason for the fallback. SMoA's own code samples at random there; a
run that cannot be repeated is worse than one that costs a little more. A verdict that parses
but whose "stop" is missing or unreadable does not stop (the safe side); "stop" is always false
when the ensemble does not allow early stop.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from localmoa.backends.base import JsonSchemaFormat, ResponseFormat
from localmoa.jsontext import json_objects

__all__ = [
    "JUDGE_FORMAT",
    "JUDGE_SCHEMA",
    "Verdict",
    "judge_format",
    "judge_system_prompt",
    "parse_verdict",
]

JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "selected": {
            "type": "array",
            "items": {"type": "integer", "minimum": 1},
            "minItems": 1,
        },
        "stop": {"type": "boolean"},
        "reason": {"type": "string"},
    },
    "required": ["selected", "stop", "reason"],
    "additionalProperties": False,
}
"""The verdict's shape; "selected" first so that a verdict cut short still has it."""

JUDGE_FORMAT = ResponseFormat(
    type="json_schema",
    json_schema=JsonSchemaFormat(name="judgement", schema=JUDGE_SCHEMA),
)
"""The verdict as a structured-output request, for any number of answers."""


def judge_format(shown: int, top_k: int) -> ResponseFormat:
    """:data:`JUDGE_FORMAT` narrowed to this call: numbers 1..``shown`` (an ``enum``, which
    llama.cpp's grammar enforces where it ignores ``minimum``/``maximum``) and at most
    ``top_k`` of them, so a constrained model cannot name an answer that does not exist."""
    schema = json.loads(json.dumps(JUDGE_SCHEMA))  # a deep copy of the constant
    selected = schema["properties"]["selected"]
    selected["items"] = {"type": "integer", "enum": list(range(1, max(shown, 1) + 1))}
    selected["maxItems"] = max(1, min(top_k, shown))
    return ResponseFormat(
        type="json_schema", json_schema=JsonSchemaFormat(name="judgement", schema=schema)
    )


def judge_system_prompt(answers: Sequence[str], *, top_k: int, early_stop: bool) -> str:
    """The judge's instruction followed by ``answers`` numbered from 1; the user's
    conversation is read after it."""
    shown = len(answers)
    if top_k >= shown:
        choose = "rank all of them, best first"
    elif top_k == 1:
        choose = "choose the single best one"
    else:
        choose = f"choose the best {top_k}, best first"
    if early_stop:
        stop = (
            'Set "stop" to true only when the answers agree in substance (the same conclusion, '
            "no contradiction that matters), so that another round of answers would not "
            "change the result; otherwise set it to false."
        )
    else:
        stop = 'Always set "stop" to false.'
    at_most = "1" if top_k == 1 else f"at most {min(top_k, shown)}"
    instruction = (
        "You are the judge of a panel of assistants. Each numbered answer below was written "
        "independently in reply to the user's latest message, which follows these "
        f"instructions. Compare the answers and {choose}, judging correctness first, then "
        "relevance, completeness and clarity.\n\n"
        f"{stop}\n\n"
        "Reply with one JSON object and nothing else, with these keys:\n"
        f'- "selected": a list of the numbers of the answers you choose ({at_most}), best '
        "first\n"
        '- "stop": true or false, as said above\n'
        '- "reason": one short sentence saying why\n\n'
        "Answers:"
    )
    numbered = "\n\n".join(f"{i}. {text.strip()}" for i, text in enumerate(answers, 1))
    return instruction + "\n\n" + numbered if numbered else instruction


@dataclass(frozen=True)
class Verdict:
    """What the judge decided, as the engine uses it."""

    selected: tuple[int, ...]
    """1-based numbers of the answers that go on, best first (every answer on a fallback)."""
    stop: bool
    """Skip the remaining proposer layers (never with early stop off, never on a fallback)."""
    reason: str
    """The judge's reason; on a fallback, why the fallback was used."""
    parsed: bool
    """False when the judge's answer could not be used and the fallback was."""


_SELECTED_KEYS = frozenset({"selected", "selection", "chosen", "chosen_responses"})
_STOP_KEYS = frozenset({"stop", "end_debate", "early_stop", "end"})
_REASON_KEYS = frozenset({"reason", "reasoning", "rationale", "explanation"})

_LABELLED = re.compile(
    r"^\s*(?:(?:response|answer|candidate|option)\s*)?(?:no\.?\s*)?#?\s*(\d{1,9})\s*[.:)]?\s*$",
    re.IGNORECASE,
)
_KEY = r"""["']?(?:selected|selection|chosen(?:[ _]responses)?)["']?"""
_SELECTED_RE = re.compile(_KEY + r"\s*:\s*\[([^\[\]]*)\]", re.IGNORECASE)
_STOP_RE = re.compile(
    r"""["']?(?:stop|end[ _]debate|early_stop)["']?\s*:\s*(true|false)""", re.IGNORECASE
)
_REASON_RE = re.compile(
    r"""["'](?:reason|reasoning)["']\s*:\s*"((?:[^"\\]|\\.)*)""", re.IGNORECASE | re.DOTALL
)


class _Unreadable(ValueError):
    """A selection that names something other than answer numbers."""


def parse_verdict(text: str, shown: int, *, top_k: int, early_stop: bool) -> Verdict:
    """The judge's answer ``text`` read as a :class:`Verdict` about ``shown`` answers; never
    raises on any text (see the module docstring for what is accepted and the fallback)."""
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, not {top_k}")
    found = _find_verdict(text)
    if found is None:
        why = "was empty" if not text.strip() else "had no JSON object with a selection"
        return _fallback(shown, f"the judge's answer {why}")
    raw_selected, raw_stop, reason = found
    try:
        numbers = _numbers(raw_selected)
    except _Unreadable as exc:
        return _fallback(shown, f"the judge's selection {exc}")
    numbers = list(dict.fromkeys(numbers))
    if not numbers:
        return _fallback(shown, "the judge selected no answer")
    outside = next((n for n in numbers if not 1 <= n <= shown), None)
    if outside is not None:
        named = str(outside) if abs(outside) < 10**9 else "a number that large"
        return _fallback(
            shown, f"the judge named answer {named}, but the answers shown were 1 to {shown}"
        )
    return Verdict(
        selected=tuple(numbers[:top_k]),
        stop=early_stop and _truth(raw_stop),
        reason=reason.strip(),
        parsed=True,
    )


def _fallback(shown: int, why: str) -> Verdict:
    return Verdict(
        selected=tuple(range(1, max(shown, 0) + 1)),
        stop=False,
        reason=why + "; every answer goes on",
        parsed=False,
    )


def _normal(key: str) -> str:
    return re.sub(r"[\s-]+", "_", key.strip().lower())


def _find_verdict(text: str) -> tuple[Any, Any, str] | None:
    """(selection, stop, reason) as found in ``text``: from the first JSON object with a
    selection key, else from the regexes; None when there is no selection at all."""
    for obj in json_objects(text):
        keys = {_normal(k): v for k, v in obj.items()}
        selected_key = next((k for k in keys if k in _SELECTED_KEYS), None)
        if selected_key is None:
            continue
        stop = next((keys[k] for k in keys if k in _STOP_KEYS), None)
        reason = next((keys[k] for k in keys if k in _REASON_KEYS), "")
        return keys[selected_key], stop, (reason if isinstance(reason, str) else str(reason))
    match = _SELECTED_RE.search(text)
    if match is None:
        return None
    items = [item.strip().strip("\"'") for item in match.group(1).split(",")]
    stop_match = _STOP_RE.search(text)
    reason_match = _REASON_RE.search(text)
    reason = ""
    if reason_match is not None:
        try:
            reason = json.loads('"' + reason_match.group(1) + '"')
        except ValueError:  # cut off inside an escape: keep it as written
            reason = reason_match.group(1)
    return (
        [item for item in items if item],
        None if stop_match is None else stop_match.group(1).lower() == "true",
        reason,
    )


def _numbers(raw: Any) -> list[int]:
    """Answer numbers from a selection as written; raises _Unreadable with what is wrong."""
    if isinstance(raw, str):
        single = _LABELLED.match(raw)
        if single is not None:
            return [int(single.group(1))]
        items: list[Any] = [p for p in re.split(r"\s*(?:,|;|\band\b)\s*", raw.strip()) if p]
    elif isinstance(raw, list):
        items = raw
    else:
        items = [raw]
    return [_number(item) for item in items]


def _number(item: Any) -> int:
    if isinstance(item, bool):
        raise _Unreadable(f"was not a list of answer numbers: {item!r}")
    if isinstance(item, int):
        return item
    if isinstance(item, float) and math.isfinite(item) and item.is_integer():
        return int(item)
    if isinstance(item, str):
        match = _LABELLED.match(item)
        if match is not None:
            return int(match.group(1))
    shown = repr(item) if len(repr(item)) <= 40 else repr(item)[:37] + "..."
    raise _Unreadable(f"was not a list of answer numbers: {shown}")


def _truth(value: Any) -> bool:
    """A "stop" as written: a boolean, or a string/number that plainly says yes."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return value.strip().lower() in {"true", "yes", "1"}
    return False
