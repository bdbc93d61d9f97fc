"""An evaluation's questions: the JSONL shape, reading a user's set, and the shipped starter set.

A set is a JSONL file, one question a line (blank lines are skipped)::

    {"id": "arith-01", "prompt": "What is 17 × 24? ...", "answer": "408", "kind": "exact"}
    {"id": "fact-03", "prompt": "What is the capital of Australia?", "answer": "Canberra",
     "kind": "judged"}
    {"id": "open-02", "prompt": "Explain recursion to a ten-year-old.", "kind": "judged"}

``kind`` says how an answer is scored. ``"exact"`` reads the answer's final value by the
documented rules of :mod:`localmoa.evaluation.scoring` and compares it with ``answer``, which
must therefore be a number, a letter A–E or yes/no; a prompt of an exact question should ask
for a final line such as ``Answer: <number>``, which the rules read first. ``"judged"`` asks
a local judge model for a rating, with ``answer`` as its reference when given.

The whole file is checked before anything loads, and every mistake is a
:class:`~localmoa.errors.UserError` naming the file and the line: a line that is not a JSON
object, a missing or empty prompt or id, an unknown key or kind, an exact question whose
answer is missing or cannot be matched exactly, an id used twice, or a file with no question.
Ids may be JSON numbers (``{"id": 7}``); they are compared as strings.

The starter set (:func:`starter_set`) ships inside the package as ``starter.jsonl`` and is read
with the same checks, so it never needs the network.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from localmoa.errors import UserError
from localmoa.evaluation.scoring import answer_kind

__all__ = ["STARTER_SET", "Question", "parse_questions", "read_questions", "starter_set"]

STARTER_SET = "starter.jsonl"
"""The starter set's file name inside the ``localmoa.evaluation`` package."""


def _id_as_text(value: Any) -> Any:
    # A JSON number is a natural id; a boolean is not one (True is an int in Python).
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


class Question(BaseModel):
    """One question of an evaluation set: one JSON line of the set's file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: Annotated[str, BeforeValidator(_id_as_text), Field(min_length=1)]
    """Unique within the set; names the question in the results."""
    prompt: Annotated[str, Field(min_length=1)]
    """What every system is asked, as the user's one message."""
    answer: Annotated[str, Field(min_length=1)] | None = None
    """The correct final value ("exact"), or a reference answer for the judge ("judged")."""
    kind: Literal["exact", "judged"]
    """How an answer is scored: its final value compared ("exact"), or rated by the judge."""

    @model_validator(mode="after")
    def _exact_needs_an_exact_answer(self) -> Question:
        if not self.prompt.strip():
            raise ValueError('"prompt" is blank; write the question to ask')
        if self.answer is not None and not self.answer.strip():
            raise ValueError('"answer" is blank; leave it out for no reference')
        if self.kind == "exact":
            if self.answer is None:
                raise ValueError(
                    'an "exact" question needs an "answer" (a number, a letter A-E or yes/no); '
                    'add one, or make it "judged"'
                )
            if answer_kind(self.answer) is None:
                raise ValueError(
                    f'the answer {self.answer!r} of an "exact" question is not a number, a '
                    "letter A-E or yes/no, so no answer could match it; make the question "
                    '"judged" (the answer becomes the judge\'s reference)'
                )
        return self


def read_questions(path: str | Path) -> list[Question]:
    """The questions of the JSONL file at ``path``, checked (UserError naming the file and
    line for any mistake, see the module docstring)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(
            f"question set {path}: no such file; give the path of a JSONL file"
        ) from None
    except IsADirectoryError:
        raise UserError(
            f"question set {path}: is a folder; give the path of a JSONL file"
        ) from None
    except OSError as exc:
        raise UserError(f"question set {path}: cannot be read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(
            f"question set {path}, line {line}: not UTF-8 text; save the file as UTF-8"
        ) from None
    return parse_questions(text.splitlines(), source=str(path))


def starter_set() -> list[Question]:
    """The starter set shipped with localmoa: arithmetic and logic with exact answers, short
    factual questions with references, and open questions for the judge."""
    text = (resources.files("localmoa.evaluation") / STARTER_SET).read_text(encoding="utf-8")
    return parse_questions(text.splitlines(), source=f"localmoa's {STARTER_SET}")


def parse_questions(lines: Iterable[str], *, source: str) -> list[Question]:
    """The questions of JSONL ``lines`` (blank ones skipped); ``source`` names them in errors
    (a path, or what the lines are)."""
    questions: list[Question] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"question set {source}, line {number}"
        try:
            data = json.loads(line)
        except ValueError as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            raise UserError(
                f"{where}: not valid JSON ({reason}); write one JSON object per line"
            ) from None
        except RecursionError:
            raise UserError(f"{where}: nested too deeply to read as a question") from None
        if not isinstance(data, dict):
            raise UserError(
                f'{where}: a question is a JSON object such as {{"id": "q1", "prompt": "...", '
                f'"kind": "judged"}}, not {_json_type(data)}'
            )
        try:
            question = Question.model_validate(data)
        except ValidationError as exc:
            raise UserError(f"{where}: {_first_problem(exc)}") from None
        if question.id in first_line:
            raise UserError(
                f'{where}: the id "{question.id}" is already used on line '
                f"{first_line[question.id]}; give every question its own id"
            )
        first_line[question.id] = number
        questions.append(question)
    if not questions:
        raise UserError(
            f"question set {source}: has no questions; write one JSON object per line, such "
            'as {"id": "q1", "prompt": "What is 2 + 2? End with \'Answer: <number>\'.", '
            '"answer": "4", "kind": "exact"}'
        )
    return questions


_KEYS = ", ".join(f'"{key}"' for key in Question.model_fields)


def _first_problem(error: ValidationError) -> str:
    """The first thing wrong with a question, in the user's terms."""
    problem = error.errors()[0]
    key = ".".join(str(part) for part in problem["loc"])
    kind = problem["type"]
    if kind == "missing":
        what = {
            "id": "an id",
            "prompt": "a prompt",
            "kind": 'a kind ("exact" or "judged")',
        }.get(key, f'"{key}"')
        return f'no "{key}"; every question needs {what}'
    if kind == "extra_forbidden":
        return f'unknown key "{key}"; a question has the keys {_KEYS}'
    if key == "kind":
        return f'"kind" is {json.dumps(problem["input"])}; use "exact" or "judged"'
    if kind in {"string_too_short", "too_short"}:
        return f'"{key}" is empty; {"leave it out" if key == "answer" else "fill it in"}'
    if kind in {"string_type", "model_type"}:
        return f'"{key}" is {_json_type(problem["input"])}; write it as a string'
    if not key:  # a model validator's own message
        return str(problem["msg"]).removeprefix("Value error, ")
    return f'"{key}": {problem["msg"]}'


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "a string"
