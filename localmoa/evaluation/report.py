"""What ``localmoa eval --json`` prints: one :class:`EvalReport`, the table's source too.

The keys ``systems`` (each with ``name``, ``score``, ``n``, ``ci_low``, ``ci_high``,
``seconds``, ``tokens``, ``loads``), ``best_member``, ``judge``, ``questions``, ``loads`` and
``seconds`` are a contract scripts may rely on; the other fields add detail. Scores are on one
scale for both kinds of question, 0 to 1 (see :mod:`localmoa.evaluation.runner`), and every
per-question figure of a system is a mean over the set's questions.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["EvalReport", "JudgeReport", "QuestionResult", "SystemScore"]


class SystemScore(BaseModel):
    """One system's row: its score with the 95 % interval, its record against the best
    member, and what an answer cost it."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description='"moa/NAME" (an ensemble) or "model/NAME" (one model alone)')
    score: float | None = Field(
        description="mean score, 0 to 1, over the n questions scored; null when none was"
    )
    n: int = Field(
        description="questions scored: all of them, less judged ones whose rating was unreadable"
    )
    ci_low: float | None = Field(description="low end of the bootstrap 95 % interval of score")
    ci_high: float | None = Field(description="high end of the bootstrap 95 % interval of score")
    exact_score: float | None = Field(
        description="mean score on the exact questions (the share right); null when none"
    )
    judged_score: float | None = Field(
        description="mean score on the judged questions rated; null when none"
    )
    unrated: int = Field(description="judged questions whose rating could not be read")
    failed: int = Field(description="questions it gave no answer to (each scores 0)")
    wins: int | None = Field(
        description="questions it did better on than the best member; null for the best member "
        "itself, or when no member was scored"
    )
    ties: int | None = Field(description="questions level with the best member")
    losses: int | None = Field(description="questions the best member did better on")
    seconds: float = Field(
        description="device seconds per question: its calls' time, each stretch that several "
        "calls shared split evenly among them; loads not included"
    )
    tokens: float = Field(description="output tokens per question, of all its calls")
    loads: float = Field(
        description="model loads per question: each load of the answer phase shared by the "
        "questions and systems of its chunk that call the model, by their calls to it"
    )
    load_seconds: float = Field(description="seconds of those loads per question, shared alike")


class QuestionResult(BaseModel):
    """One question through one system."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="the question's id")
    kind: Literal["exact", "judged"] = Field(description="how it was scored")
    system: str = Field(description="the system's name")
    score: float | None = Field(description="0 to 1; null when its rating was unreadable")
    extracted: str | None = Field(
        description="exact: the final value read from the answer (null: none found)"
    )
    rating: int | None = Field(description="judged: the judge's rating, 1 to 10")
    verdict: Literal["win", "tie", "loss"] | None = Field(
        description="against the best member on this question; null for the best member itself"
    )
    error: str | None = Field(description="why there is no answer; null when answered")
    run_id: str | None = Field(description="its run in the run log; null when not recorded")


class JudgeReport(BaseModel):
    """What grading cost, and how often the judge's reply could not be read."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="the judge model")
    ratings: int = Field(description="rating calls made")
    unreadable_ratings: int = Field(
        description="replies with no rating that could be read (the answer is left unscored)"
    )
    comparisons: int = Field(description="pairwise calls made (two per answer compared)")
    unreadable_verdicts: int = Field(description="pairwise verdicts that could not be read")
    failed: int = Field(
        description="judge calls that gave no reply (e.g. the answers do not fit its context): "
        "a rating missing, a comparison a tie"
    )
    loads: int = Field(description="loads the grading made")
    seconds: float = Field(description="wall-clock seconds of the grading")


class EvalReport(BaseModel):
    """``localmoa eval --json``: every system's score on the set, against the best member."""

    model_config = ConfigDict(extra="forbid")

    set: str = Field(description="the question set: its path, or the shipped starter set")
    ensemble: str = Field(description="the ensemble evaluated (-e)")
    questions: int = Field(description="questions in the set")
    exact: int = Field(description="of them, scored by their final value")
    judged: int = Field(description="of them, rated by the judge")
    systems: list[SystemScore] = Field(description="one row per system, the ensemble first")
    best_member: str | None = Field(
        description="the member model scoring highest alone (model/NAME), which the others are "
        "compared with; null when no member could be scored"
    )
    judge: str | None = Field(description="the judge model; null when the set needs none")
    grading: JudgeReport | None = Field(description="the judge's account; null when not used")
    chunk: int = Field(description="questions planned together in the answer phase")
    planned_loads: int = Field(description="loads the answer phase's plan expected")
    answer_loads: int = Field(description="loads the answer phase made")
    loads: int = Field(description="loads the whole evaluation made, grading included")
    seconds: float = Field(description="wall-clock seconds of the whole evaluation")
    notes: list[str] = Field(description="caveats about this evaluation, one sentence each")
    results: list[QuestionResult] = Field(
        description="every question through every system, question by question"
    )
