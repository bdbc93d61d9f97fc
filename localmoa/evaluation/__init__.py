"""``localmoa eval``'s pure half: question sets, scoring rules and the local judge's prompts.

- :mod:`~localmoa.evaluation.questions`: the JSONL question shape, reading a user's set with
  errors that name the line, and the shipped starter set;
- :mod:`~localmoa.evaluation.scoring`: the final value of an answer (documented rules), exact
  match, the bootstrap interval and wins/ties/losses;
- :mod:`~localmoa.evaluation.grading`: the judge's rating and pairwise prompts (after MT-Bench
  and Prometheus) and tolerant parsing of its verdicts.

Nothing here loads a model or touches the disk beyond reading a question file: the engine
runs the calls, and these functions say what to ask and how to read the replies.
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

__all__ = [
    "PAIRWISE_FORMAT",
    "RATING_FORMAT",
    "AnswerKind",
    "Preference",
    "Question",
    "Verdict",
    "WinsTiesLosses",
    "answer_kind",
    "bootstrap_ci",
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
