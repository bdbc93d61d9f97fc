"""``localmoa eval``'s engine with scripted fake models: a model that always answers right, one
that never does, ensembles of them, and a judge that can tell them apart (or one that cannot).

The questions are written so a fake's reply template answers them: the right model echoes the
prompt, which ends with its answer ("... Answer: 42"), and the wrong model echoes it and adds
"Answer: 999 (E) no", wrong whether a number, a choice or yes is expected (the last marker
wins). The judge is a script that rates an answer low when it
says 999, and prefers the answer that does not."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path

import pytest

from localmoa.backends.base import ChatRequest
from localmoa.backends.configs import FakeModel
from localmoa.backends.fake import FakeBackend, fill_reply
from localmoa.config import Config, load_config
from localmoa.errors import UserError
from localmoa.evaluation.accounting import LoadLedger, shared_seconds
from localmoa.evaluation.grading import PAIRWISE_FORMAT, RATING_FORMAT
from localmoa.evaluation.questions import Question, parse_questions
from localmoa.evaluation.report import EvalReport, SystemScore
from localmoa.evaluation.runner import evaluate, exact_score, rating_score
from localmoa.evaluation.scoring import bootstrap_ci
from localmoa.evaluation.systems import check_judge, eval_systems, judge_system, members
from localmoa.runtime.events import CallRecord

CONFIG = """
[models.wrong]
backend = "fake"
memory = "1GiB"
reply = "{prompt} Answer: 999 (E) no"
[models.right]
backend = "fake"
memory = "1GiB"
reply = "{prompt}"
[models.judge]
backend = "fake"
memory = "1GiB"
reply = "unused: the judge is scripted"
[ensembles.default]
layers = [["wrong", "right"], ["wrong", "right"]]
aggregator = "right"
[ensembles.bad]
layers = [["wrong", "right"]]
aggregator = "wrong"
"""
"""``default`` aggregates with the right model, so it is always right; ``bad`` never is."""

EXACT = [
    {"id": "n1", "prompt": "Repeat this. Answer: 42", "answer": "42", "kind": "exact"},
    {"id": "n2", "prompt": "Repeat this. Answer: 3/4", "answer": "0.75", "kind": "exact"},
    {"id": "c1", "prompt": "Repeat this. Answer: (B)", "answer": "B", "kind": "exact"},
    {"id": "y1", "prompt": "Repeat this. Answer: yes", "answer": "yes", "kind": "exact"},
]
JUDGED = [
    {"id": "j1", "prompt": "Name a colour.", "answer": "Red.", "kind": "judged"},
    {"id": "j2", "prompt": "Write a haiku.", "kind": "judged"},
]


def setup(tmp_path: Path, text: str = CONFIG) -> Config:
    path = tmp_path / "models.toml"
    path.write_text(textwrap.dedent(text))
    return load_config(path)


def questions(*sets: list[dict[str, str]]) -> list[Question]:
    return parse_questions([json.dumps(q) for qs in sets for q in qs], source="the test")


def scripted(config: Config, judge_says: str | None = None) -> FakeBackend:
    """Every fake answers from its template, except the judge: it reads the answers shown."""

    def script(model: str, request: ChatRequest) -> str:
        prompt = request.messages[-1].content
        if model != "judge":
            table = config.models[model]
            assert isinstance(table, FakeModel)
            return fill_reply(table.reply, model=model, prompt=prompt, seed=request.seed)
        if judge_says is not None:
            return judge_says
        if "[Assistant A's answer]" in prompt:
            assert request.response_format == PAIRWISE_FORMAT
            a = prompt.split("[Assistant A's answer]")[1].split("[Assistant B's answer]")[0]
            b = prompt.split("[Assistant B's answer]")[1]
            verdict = "C" if ("999" in a) == ("999" in b) else "B" if "999" in a else "A"
            return f'{{"explanation": "the one without 999", "verdict": "{verdict}"}}'
        assert request.response_format == RATING_FORMAT
        answer = prompt.split("[The assistant's answer]")[1]
        return "Poor. Rating: [[2]]" if "999" in answer else "Good. Rating: [[9]]"

    return FakeBackend(script=script)


def run(
    config: Config,
    qs: list[Question],
    *,
    extra: tuple[str, ...] = (),
    judge: str | None = None,
    backend: FakeBackend | None = None,
    ensemble: str = "default",
) -> tuple[EvalReport, FakeBackend]:
    fake = backend or scripted(config)
    systems = eval_systems(config, ensemble, extra)
    report = asyncio.run(
        evaluate(
            config,
            qs,
            systems,
            {"fake": fake},
            ensemble=ensemble,
            judge=judge,
            set_name="the test",
        )
    )
    return report, fake


def row(report: EvalReport, name: str) -> SystemScore:
    return next(s for s in report.systems if s.name == name)


# -- systems and the judge's checks ------------------------------------------------------------


def test_systems_are_the_ensemble_then_each_member_alone_then_those_named(tmp_path: Path) -> None:
    config = setup(tmp_path)
    assert members(config, "default") == ["wrong", "right"]
    names = [s.name for s in eval_systems(config, "default", ["bad", "model/judge", "model/right"])]
    assert names == ["moa/default", "model/wrong", "model/right", "moa/bad", "model/judge"]
    alone = eval_systems(config, "default")[2]
    assert [[c.model for c in stage] for stage in alone.stages] == [["right"]]
    assert alone.stages[0][0].is_aggregator


def test_an_unknown_system_names_what_exists(tmp_path: Path) -> None:
    config = setup(tmp_path)
    with pytest.raises(UserError) as caught:
        eval_systems(config, "default", ["moa/nope"])
    message = str(caught.value)
    assert "--system moa/nope" in message
    assert "moa/bad, moa/default" in message and "model/judge, model/right" in message


def test_judged_questions_need_a_judge_that_is_a_model(tmp_path: Path) -> None:
    config = setup(tmp_path)
    qs = questions(EXACT, JUDGED)
    with pytest.raises(UserError) as caught:
        check_judge(config, qs, None)
    assert "2 of the 6 questions are judged (j1, j2)" in str(caught.value)
    assert "--judge MODEL" in str(caught.value)
    with pytest.raises(UserError, match='no model "gpt"'):
        check_judge(config, qs, "gpt")
    check_judge(config, qs, "judge")
    check_judge(config, questions(EXACT), None)  # an exact set needs none


def test_evaluate_itself_refuses_judged_questions_without_a_judge(tmp_path: Path) -> None:
    config = setup(tmp_path)
    fake = scripted(config)
    with pytest.raises(UserError, match="no judge was named"):
        run(config, questions(EXACT, JUDGED), backend=fake)
    assert fake.events == []  # nothing loaded


def test_the_judge_is_one_greedy_call_that_is_the_answer() -> None:
    system = judge_system("judge", RATING_FORMAT)
    ((call,),) = system.stages
    assert system.name == "judge/judge" and call.model == "judge"
    assert call.temperature == 0.0 and call.is_aggregator
    assert call.response_format == RATING_FORMAT


def test_scores_share_one_scale() -> None:
    (question,) = questions(EXACT[:1])
    assert exact_score(question, "so... Answer: 42") == (1.0, "42")
    assert exact_score(question, "41, no 43") == (0.0, "43")
    assert exact_score(question, "no idea") == (0.0, None)
    assert [rating_score(r) for r in (1, 10)] == [0.0, 1.0]
    assert rating_score(4) == pytest.approx(1 / 3)


# -- exact questions ---------------------------------------------------------------------------


def test_the_right_model_scores_1_the_wrong_0_and_the_right_one_is_the_best(
    tmp_path: Path,
) -> None:
    config = setup(tmp_path)
    report, _ = run(config, questions(EXACT), extra=("bad",))
    right, wrong = row(report, "model/right"), row(report, "model/wrong")
    moa, bad = row(report, "moa/default"), row(report, "moa/bad")
    assert (right.score, right.n, right.ci_low, right.ci_high) == (1.0, 4, 1.0, 1.0)
    assert (wrong.score, wrong.ci_low, wrong.ci_high) == (0.0, 0.0, 0.0)
    assert moa.score == 1.0 and bad.score == 0.0
    assert report.best_member == "model/right"
    assert (right.wins, right.ties, right.losses) == (None, None, None)
    assert (moa.wins, moa.ties, moa.losses) == (0, 4, 0)
    assert (wrong.wins, wrong.ties, wrong.losses) == (0, 0, 4)
    assert report.judge is None and report.grading is None
    extracted = {(r.id, r.system): r.extracted for r in report.results}
    assert extracted["n2", "model/right"] == "0.75" and extracted["n2", "model/wrong"] == "999"
    assert extracted["c1", "moa/default"] == "B"


def test_the_interval_is_the_seeded_bootstrap_of_the_scores(tmp_path: Path) -> None:
    config = setup(tmp_path)
    # The echo answers these wrong: its last number is not the answer.
    hard = [
        {"id": f"h{i}", "prompt": f"What is {i} plus 10?", "answer": str(i + 10), "kind": "exact"}
        for i in range(1, 4)
    ]
    report, _ = run(config, questions(EXACT, hard))
    right = row(report, "model/right")
    scores = [r.score for r in report.results if r.system == "model/right"]
    assert scores == [1.0] * 4 + [0.0] * 3
    low, high = bootstrap_ci([s for s in scores if s is not None], seed=0)
    assert (right.ci_low, right.ci_high) == (round(low, 4), round(high, 4))
    assert right.ci_low is not None and right.ci_high is not None and right.score is not None
    assert 0.0 < right.ci_low < right.score < right.ci_high < 1.0
    (overlap,) = [note for note in report.notes if "intervals" in note]
    assert "moa/default and the best member model/right overlap" in overlap
    apart, _ = run(config, questions(EXACT), ensemble="bad")  # 0 against 1: no overlap
    assert not any("intervals" in note for note in apart.notes)


def test_costs_per_question_add_up_to_the_batch(tmp_path: Path) -> None:
    budget = CONFIG.replace("[models.wrong]", '[settings]\nmemory_budget = "1GiB"\n[models.wrong]')
    config = setup(tmp_path, budget)  # one model at a time: every swap is a load
    report, fake = run(config, questions(EXACT))
    loads = sum(1 for event, _ in fake.events if event == "load")
    assert report.answer_loads == loads == report.loads
    shared = sum(s.loads for s in report.systems) * report.questions
    assert shared == pytest.approx(loads)
    alone = row(report, "model/right")
    assert alone.tokens == pytest.approx(
        sum(len(q["prompt"].split(" ")) for q in EXACT) / len(EXACT)
    )
    moa = row(report, "moa/default")
    assert moa.tokens > alone.tokens  # five calls against one
    assert moa.loads > alone.loads  # it calls both models


# -- judged questions --------------------------------------------------------------------------


def test_the_judge_rates_each_answer_and_compares_each_system_with_the_best_in_both_orders(
    tmp_path: Path,
) -> None:
    config = setup(tmp_path)
    report, fake = run(config, questions(EXACT, JUDGED), judge="judge", extra=("bad",))
    right, wrong = row(report, "model/right"), row(report, "model/wrong")
    assert report.best_member == "model/right"
    assert right.judged_score == pytest.approx(round(8 / 9, 4))
    assert wrong.judged_score == pytest.approx(round(1 / 9, 4))
    assert right.score == pytest.approx(round((4 + 2 * 8 / 9) / 6, 4))
    assert (wrong.wins, wrong.ties, wrong.losses) == (0, 0, 6)
    assert (row(report, "moa/bad").losses, row(report, "moa/default").ties) == (6, 6)
    judge_calls = [r for m, r in fake.requests if m == "judge"]
    pairwise = [r for r in judge_calls if r.response_format == PAIRWISE_FORMAT]
    # Two judged questions, four systems answered each: four ratings a question. The moa's
    # answers are the best member's own text, so only wrong and bad are compared, each twice.
    assert report.grading is not None
    assert report.grading.ratings == len(judge_calls) - len(pairwise) == 8
    assert report.grading.comparisons == len(pairwise) == 2 * 2 * 2
    assert report.grading.unreadable_ratings == report.grading.unreadable_verdicts == 0
    shown_first = [
        r.messages[-1].content.split("[Assistant A's answer]")[1].split("[Assistant B's")[0]
        for r in pairwise
    ]
    assert sum("999" in text for text in shown_first) == 4  # each order asked once
    assert report.loads == report.answer_loads + report.grading.loads
    assert report.grading.loads == 2  # the judge loads once per grading phase


def test_a_judge_that_always_prefers_the_first_answer_gives_ties(tmp_path: Path) -> None:
    config = setup(tmp_path)
    biased = scripted(config, judge_says="Both fine. Rating: [[7]]\n[[A]]")
    report, _ = run(config, questions(JUDGED), judge="judge", backend=biased)
    wrong = row(report, "model/wrong")
    assert report.best_member == "model/wrong"  # all rated 7: the first member listed
    right = row(report, "model/right")
    assert (right.wins, right.ties, right.losses) == (0, 2, 0)  # position bias cancels
    assert wrong.score == right.score == pytest.approx(round(6 / 9, 4))


def test_an_unreadable_rating_is_missing_not_zero(tmp_path: Path) -> None:
    config = setup(tmp_path)
    mute = scripted(config, judge_says="I would rather not say.")
    report, _ = run(config, questions(EXACT, JUDGED), judge="judge", backend=mute)
    right = row(report, "model/right")
    assert (right.n, right.unrated, right.judged_score, right.score) == (4, 2, None, 1.0)
    assert report.grading is not None and report.grading.unreadable_ratings == 6
    assert any("could not be read" in note for note in report.notes)
    # unreadable verdicts count as no preference: ties, never losses
    wrong = row(report, "model/wrong")
    assert (wrong.wins, wrong.ties, wrong.losses) == (0, 2, 4)


def test_a_system_that_fails_scores_0_and_the_judge_is_not_asked(tmp_path: Path) -> None:
    broken = CONFIG.replace('reply = "{prompt} Answer: 999 (E) no"', 'fail = "out of order"')
    config = setup(tmp_path, broken)
    report, fake = run(config, questions(EXACT, JUDGED), judge="judge")
    wrong = row(report, "model/wrong")
    assert (wrong.score, wrong.n, wrong.failed) == (0.0, 6, 6)
    assert (wrong.wins, wrong.ties, wrong.losses) == (0, 0, 6)
    rated = [r for m, r in fake.requests if m == "judge" and r.response_format == RATING_FORMAT]
    assert len(rated) == 2 * 2  # moa/default and model/right on each judged question
    errors = {r.error for r in report.results if r.system == "model/wrong"}
    assert len(errors) == 1 and "out of order" in str(errors.pop())
    (note,) = [n for n in report.notes if "gave no answer" in n]
    assert note.startswith("model/wrong gave no answer to 6 of the 6 questions")
    assert "out of order" in note


def test_a_judge_call_that_cannot_fit_leaves_the_answer_unrated_and_says_why(
    tmp_path: Path,
) -> None:
    small = CONFIG.replace('reply = "unused: the judge is scripted"', "n_ctx = 600")
    config = setup(tmp_path, small)  # the judge's room for its reasons alone is more
    report, _ = run(config, questions(EXACT, JUDGED), judge="judge")
    assert report.grading is not None
    # six ratings (two questions, three systems), four comparisons (wrong against right)
    assert (report.grading.failed, report.grading.unreadable_ratings) == (6 + 4, 0)
    right, wrong = row(report, "model/right"), row(report, "model/wrong")
    assert (right.n, right.unrated) == (4, 2)
    assert (wrong.wins, wrong.ties, wrong.losses) == (0, 2, 4)  # no verdict: ties
    (note,) = [n for n in report.notes if "calls failed" in n]
    assert "10 of the judge's calls failed" in note and "n_ctx" in note


def test_a_judge_that_is_also_a_member_is_noted(tmp_path: Path) -> None:
    config = setup(tmp_path)
    report, _ = run(config, questions(JUDGED), judge="right")
    assert any("also answers here" in note for note in report.notes)


# -- the accounting ----------------------------------------------------------------------------


def record(start: float | None, end: float | None, seconds: float = 0.0) -> CallRecord:
    return CallRecord(
        layer=1,
        index=0,
        model="m",
        ok=True,
        error=None,
        seconds=seconds,
        tokens=1,
        text="",
        started_at=start,
        ended_at=end,
    )


def test_device_seconds_are_split_among_the_calls_in_flight() -> None:
    calls = [record(0.0, 4.0), record(2.0, 4.0), record(4.0, 5.0), record(None, None, 0.5)]
    # 0-2: the first alone; 2-4: the first two share; 4-5: the third alone
    assert shared_seconds(calls) == [3.0, 1.0, 1.0, 0.5]
    together = [record(10.0, 20.0) for _ in range(4)]
    assert shared_seconds(together) == [2.5] * 4
    assert shared_seconds([record(None, 8.0, 2.0), record(7.0, None, 1.0)]) == [1.5, 0.5]


def test_a_load_is_shared_by_the_calls_to_its_model_and_waits_for_one() -> None:
    ledger: LoadLedger[str] = LoadLedger()
    ledger.loaded("a", 3.0)
    ledger.loaded("b", 1.0)
    ledger.settle([("moa", "a"), ("moa", "a"), ("solo", "a")])  # nobody called b yet
    ledger.loaded("c", 2.0)  # nobody ever calls c
    ledger.settle([("solo", "b")])
    shares = ledger.close(["moa", "solo"])
    assert shares.loads == pytest.approx({"moa": 2 / 3 + 0.5, "solo": 1 / 3 + 1 + 0.5})
    assert shares.seconds == pytest.approx({"moa": 2.0 + 1.0, "solo": 1.0 + 1.0 + 1.0})
