"""``localmoa eval``: does the ensemble beat its best member, on this machine?

The pure half says what to ask and how to read the replies:

- :mod:`~localmoa.evaluation.questions`: the JSONL question shape, reading a user's set with
  errors that name the line, and the shipped starter set;
- :mod:`~localmoa.evaluation.scoring`: the final value of an answer (documented rules), exact
  match, the bootstrap interval and wins/ties/losses;
- :mod:`~localmoa.evaluation.grading`: the judge's rating and pairwise prompts (after MT-Bench
  and Prometheus) and tolerant parsing of its verdicts;
- :mod:`~localmoa.evaluation.systems`: what is compared (the ensemble, each member alone, the
  systems named) and the judge, as systems of the batch engine;
- :mod:`~localmoa.evaluation.accounting`: how the seconds and loads of one batch are shared
  out to the answers made in it.

:mod:`~localmoa.evaluation.runner` runs it: every system answers every question in one batch
plan (:mod:`localmoa.batch.runner`), the judge grades in batches too, and the result is one
:class:`~localmoa.evaluation.report.EvalReport` (what ``localmoa eval --json`` prints).
"""

from __future__ import annotations

from localmoa.evaluation.grading import (
    PAIRWISE_FORMAT,
    RATING_FORMAT,
    Preference,
    Verdict,
    pairwise_messages,
    pairwise_verdict,
    parse_pairwise,
    parse_rating,
    rating_messages,
)
from localmoa.evaluation.questions import Question, read_questions, starter_set
from localmoa.evaluation.report import EvalReport, SystemScore
from localmoa.evaluation.runner import evaluate
from localmoa.evaluation.scoring import (
    AnswerKind,
    WinsTiesLosses,
    answer_kind,
    bootstrap_ci,
    exact_match,
    extract_final,
    normalise_reference,
    wins_ties_losses,
)
from localmoa.evaluation.systems import check_judge, eval_systems

__all__ = [
    "PAIRWISE_FORMAT",
    "RATING_FORMAT",
    "AnswerKind",
    "EvalReport",
    "Preference",
    "Question",
    "SystemScore",
    "Verdict",
    "WinsTiesLosses",
    "answer_kind",
    "bootstrap_ci",
    "check_judge",
    "eval_systems",
    "evaluate",
    "exact_match",
    "extract_final",
    "normalise_reference",
    "pairwise_messages",
    "pairwise_verdict",
    "parse_pairwise",
    "parse_rating",
    "rating_messages",
    "read_questions",
    "starter_set",
    "wins_ties_losses",
]
