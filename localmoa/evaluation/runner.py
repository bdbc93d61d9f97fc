"""``localmoa eval``: does the ensemble beat its best member, on this machine, on these questions?

**What is compared.** The ensemble (``moa/NAME``), each distinct model of it alone
(``model/NAME``: its proposers and its aggregator, one call each at the ensemble's settings,
:func:`localmoa.batch.runner.model_system`), and any system named with ``--system``: another
ensemble of the config (a Self-MoA, a ``final = "select"`` one) as ``moa/NAME``, or another
model as ``model/NAME`` (:mod:`localmoa.evaluation.systems`).

**One batch answers everything.** Every system answers every question in one batch plan
(:func:`localmoa.batch.runner.plan_batch`): each model loads as few times as the budget allows
for the whole evaluation, and one model's calls for many questions decode together. The judge's
calls are batches too, one per grading phase (ratings, then comparisons), so the judge loads
once per phase, not once per answer. Every answer and every judgement is a recorded run (source
"batch"; the judge's under ``judge/MODEL``), so ``localmoa logs`` shows what each system said
and why the judge scored it so.

**Scores, 0 to 1 for both kinds of question.**

- ``exact``: the answer's final value is read by the rules of
  :mod:`localmoa.evaluation.scoring` (a marker such as ``Answer: 408`` first, else the last
  number, choice or yes/no in the text) and compared with the reference: 1 when equal, else 0.
- ``judged``: the judge rates the answer from 1 to 10 (the prompt of
  :mod:`localmoa.evaluation.grading`, with the reference when the question has one); the score is
  ``(rating - 1) / 9``, so a 1 is 0, a 10 is 1 and both kinds share one scale. A rating the
  judge wrote in no readable form is *missing*: the question is left out of that system's ``n``
  (and counted as ``unrated``) rather than guessed.
- A system that gave no answer (its call failed, or the question cannot fit its context)
  scores 0: a failure must not pass for a question left out.

A system's ``score`` is the mean of its scores, with a percentile-bootstrap 95 % interval
(:func:`~localmoa.evaluation.scoring.bootstrap_ci`, seed 0: the same scores give the same
interval on every run).

**Against the best member.** The best member is the ensemble member (``model/NAME`` of one of
its models) with the highest mean score; ties go to the one listed first. Every other system is
compared with it question by question: on an exact question by the 0/1 scores; on a judged one
by the judge's pairwise verdict asked in both orders (a win or loss needs both orders to agree,
so a judge's preference for a position cancels out: MT-Bench's conservative rule). No judge is
asked where the answers decide it: one side gave none (the other wins), or the two are the
same text (a tie).

**Costs per question** (:mod:`localmoa.evaluation.accounting`): device seconds (each stretch of
time several calls shared split evenly among them; loads apart), output tokens of all its
calls, and loads with their seconds (each load shared by the answers of its chunk that call the
model, by their calls to it). They are shares of one batch, adding up to what the machine did:
they say what each system costs *in* the batch, not how long one lone run would take.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from localmoa.backends.base import Backend, ChatMessage, ResponseFormat
from localmoa.backends.registry import backend_for
from localmoa.batch.jobs import Job
from localmoa.batch.runner import Outcome, System, plan_batch, run_batch
from localmoa.config import Config
from localmoa.evaluation.accounting import LoadLedger, Shares, shared_seconds
from localmoa.evaluation.grading import (
    PAIRWISE_FORMAT,
    RATING_FORMAT,
    Verdict,
    pairwise_messages,
    pairwise_verdict,
    parse_pairwise,
    parse_rating,
    rating_messages,
)
from localmoa.evaluation.questions import Question
from localmoa.evaluation.report import EvalReport, JudgeReport, QuestionResult, SystemScore
from localmoa.evaluation.scoring import (
    answer_kind,
    bootstrap_ci,
    extract_final,
    normalise_reference,
)
from localmoa.evaluation.systems import check_judge, judge_system, members
from localmoa.records.recorder import Recorder
from localmoa.runtime.engine import Event, ModelLoaded

__all__ = ["Phase", "evaluate", "exact_score", "rating_score"]

BOOTSTRAP_SEED = 0
"""The bootstrap's seed: one set of scores always gives one interval."""

Phase = Callable[[str, int], None]
"""Told when a phase starts: its name ("answering", "rating", "comparing") and its calls."""


def exact_score(question: Question, answer: str) -> tuple[float, str | None]:
    """An exact question's score for ``answer`` (1.0 right, 0.0 wrong) and the final value
    read from it (None: none found)."""
    assert question.answer is not None  # an exact question has one (Question checks)
    found = extract_final(answer, expect=answer_kind(question.answer))
    return (1.0 if found == normalise_reference(question.answer) else 0.0), found


def rating_score(rating: int) -> float:
    """A judge's 1–10 rating on the exact questions' scale: 1 is 0.0, 10 is 1.0."""
    return (rating - 1) / 9


@dataclass
class _Cell:
    """One question through one system, as it is scored."""

    outcome: Outcome | None = None
    score: float | None = 0.0
    extracted: str | None = None
    rating: int | None = None
    verdict: Verdict | None = None

    @property
    def answer(self) -> str | None:
        return None if self.outcome is None else self.outcome.answer


async def evaluate(
    config: Config,
    questions: Sequence[Question],
    systems: Sequence[System],
    backends: Mapping[str, Backend],
    *,
    ensemble: str,
    judge: str | None,
    set_name: str,
    memory_budget: str | None = None,
    recorder: Recorder | None = None,
    on_phase: Phase | None = None,
    on_event: Callable[[Event], None] | None = None,
) -> EvalReport:
    """Answer every question with every system, score the answers, grade judged ones with
    ``judge`` and compare every system with the best member (module docstring). Sets with
    judged questions without a judge, or a judge not in ``config``, are refused before
    anything loads (:func:`check_judge`)."""
    check_judge(config, questions, judge)
    run = _Evaluation(
        config,
        list(questions),
        list(systems),
        backends,
        ensemble=ensemble,
        judge=judge,
        memory_budget=memory_budget,
        recorder=recorder,
        on_phase=on_phase or (lambda name, calls: None),
        on_event=on_event or (lambda event: None),
    )
    return await run.go(set_name)


class _Evaluation:
    """The state of one evaluation, phase by phase."""

    def __init__(
        self,
        config: Config,
        questions: list[Question],
        systems: list[System],
        backends: Mapping[str, Backend],
        *,
        ensemble: str,
        judge: str | None,
        memory_budget: str | None,
        recorder: Recorder | None,
        on_phase: Phase,
        on_event: Callable[[Event], None],
    ) -> None:
        self.config = config
        self.questions = questions
        self.systems = systems
        self.backends = backends
        self.ensemble = ensemble
        self.judge = judge
        self.memory_budget = memory_budget
        self.recorder = recorder
        self.on_phase = on_phase
        self.on_event = on_event
        self.cells = {(q, s): _Cell() for q in range(len(questions)) for s in range(len(systems))}
        self.seconds = [0.0] * len(systems)
        self.tokens = [0] * len(systems)
        self.ledger: LoadLedger[int] = LoadLedger()
        self.judge_loads = 0
        self.judge_seconds = 0.0
        self.judge_errors: list[str] = []
        self.judge_calls = {"rating": 0, "pairwise": 0}
        self.unreadable = {"rating": 0, "pairwise": 0}

    async def go(self, set_name: str) -> EvalReport:
        started = time.perf_counter()
        chunk, planned_loads, answer_loads = await self._answer()
        for q, question in enumerate(self.questions):
            if question.kind == "exact":
                for s in range(len(self.systems)):
                    self._score_exact(q, s)
        judged = any(q.kind == "judged" for q in self.questions)
        if self.judge is not None and judged:
            await self._rate()
        best = self._best_member()
        if best is not None:
            if self.judge is not None:
                await self._compare(best)
            self._verdicts(best)
        grading = None
        if self.judge is not None and judged:
            grading = JudgeReport(
                model=self.judge,
                ratings=self.judge_calls["rating"],
                unreadable_ratings=self.unreadable["rating"],
                comparisons=self.judge_calls["pairwise"],
                unreadable_verdicts=self.unreadable["pairwise"],
                failed=len(self.judge_errors),
                loads=self.judge_loads,
                seconds=round(self.judge_seconds, 3),
            )
        shares = self.ledger.close(list(range(len(self.systems))))
        rows = [self._row(s, best, shares) for s in range(len(self.systems))]
        return EvalReport(
            set=set_name,
            ensemble=self.ensemble,
            questions=len(self.questions),
            exact=sum(1 for q in self.questions if q.kind == "exact"),
            judged=sum(1 for q in self.questions if q.kind == "judged"),
            systems=rows,
            best_member=None if best is None else self.systems[best].name,
            judge=self.judge,
            grading=grading,
            chunk=chunk,
            planned_loads=planned_loads,
            answer_loads=answer_loads,
            loads=answer_loads + self.judge_loads,
            seconds=round(time.perf_counter() - started, 3),
            notes=self._notes(rows, best),
            results=self._results(),
        )

    # -- answers ---------------------------------------------------------------------------

    async def _answer(self) -> tuple[int, int, int]:
        """Every question through every system in one batch; returns the chunk, the planned
        loads and the loads made."""
        jobs = [
            Job(id=question.id, messages=[ChatMessage(role="user", content=question.prompt)])
            for question in self.questions
        ]
        planned = await plan_batch(
            self.config,
            self.systems,
            len(jobs),
            self.backends,
            memory_budget=self.memory_budget,
        )
        calls = sum(len(stage) for system in self.systems for stage in system.stages)
        self.on_phase("answering", calls * len(jobs))
        question_of = {q.id: n for n, q in enumerate(self.questions)}
        system_of = {system.name: n for n, system in enumerate(self.systems)}

        def on_event(event: Event) -> None:
            if isinstance(event, ModelLoaded):
                self.ledger.loaded(event.model, event.seconds)
            self.on_event(event)

        def on_chunk(outcomes: list[Outcome]) -> None:
            owned: list[tuple[int, str]] = []
            records = []
            for outcome in outcomes:
                s = system_of[outcome.system.name]
                self.cells[question_of[outcome.job.id], s].outcome = outcome
                for record in [] if outcome.result is None else outcome.result.calls:
                    owned.append((s, record.model))
                    records.append(record)
                    self.tokens[s] += record.tokens
            for (s, _), share in zip(owned, shared_seconds(records), strict=True):
                self.seconds[s] += share
            self.ledger.settle(owned)

        loads = await run_batch(
            self.config,
            planned,
            jobs,
            self.backends,
            on_chunk=on_chunk,
            on_event=on_event,
            recorder=self.recorder,
        )
        return planned.chunk, planned.loads, loads

    def _score_exact(self, q: int, s: int) -> None:
        cell = self.cells[q, s]
        if cell.answer is None:
            cell.score = 0.0
            return
        cell.score, cell.extracted = exact_score(self.questions[q], cell.answer)

    # -- grading ---------------------------------------------------------------------------

    async def _rate(self) -> None:
        """The judge's rating of every judged answer; no answer scores 0 unasked."""
        asked: list[tuple[int, int]] = []
        conversations: list[list[ChatMessage]] = []
        structured = self._structured()
        for q, question in enumerate(self.questions):
            if question.kind != "judged":
                continue
            for s in range(len(self.systems)):
                cell = self.cells[q, s]
                if cell.answer is None:
                    cell.score = 0.0
                    continue
                asked.append((q, s))
                conversations.append(
                    rating_messages(
                        question.prompt, cell.answer, question.answer, structured=structured
                    )
                )
        replies = await self._ask("rating", conversations, RATING_FORMAT if structured else None)
        for (q, s), reply in zip(asked, replies, strict=True):
            rating = None if reply is None else parse_rating(reply)
            cell = self.cells[q, s]
            cell.rating = rating
            cell.score = None if rating is None else rating_score(rating)
            if rating is None and reply is not None:
                self.unreadable["rating"] += 1

    async def _compare(self, best: int) -> None:
        """The judge's pairwise verdict, both orders, for every judged answer that needs one."""
        asked: list[tuple[int, int]] = []
        conversations: list[list[ChatMessage]] = []
        structured = self._structured()
        for q, question in enumerate(self.questions):
            if question.kind != "judged":
                continue
            baseline = self.cells[q, best].answer
            for s in range(len(self.systems)):
                candidate = self.cells[q, s].answer
                if s == best or baseline is None or candidate is None:
                    continue
                if candidate.strip() == baseline.strip():
                    continue
                asked.append((q, s))
                for first, second in ((candidate, baseline), (baseline, candidate)):
                    conversations.append(
                        pairwise_messages(
                            question.prompt, first, second, question.answer, structured=structured
                        )
                    )
        replies = await self._ask(
            "comparing", conversations, PAIRWISE_FORMAT if structured else None
        )
        for n, (q, s) in enumerate(asked):
            pair = replies[2 * n : 2 * n + 2]
            orders = [None if r is None else parse_pairwise(r) for r in pair]
            self.unreadable["pairwise"] += sum(
                1 for r, o in zip(pair, orders, strict=True) if r is not None and o is None
            )
            self.cells[q, s].verdict = pairwise_verdict(orders[0], orders[1])

    def _structured(self) -> bool:
        """Whether the judge's backend can be asked for JSON (it is, where it can)."""
        assert self.judge is not None
        backend = backend_for(self.backends, self.config.models, self.judge)
        return "response_format" in backend.supports

    async def _ask(
        self, phase: str, conversations: list[list[ChatMessage]], fmt: ResponseFormat | None
    ) -> list[str | None]:
        """The judge's reply to each conversation (None where its call failed), as one batch."""
        if not conversations:
            return []
        assert self.judge is not None
        self.judge_calls["rating" if phase == "rating" else "pairwise"] += len(conversations)
        system = judge_system(self.judge, fmt)
        jobs = [Job(id=str(n), messages=m) for n, m in enumerate(conversations)]
        planned = await plan_batch(
            self.config, [system], len(jobs), self.backends, memory_budget=self.memory_budget
        )
        self.on_phase(phase, len(jobs))
        replies: dict[str, str | None] = {}
        started = time.perf_counter()

        def on_chunk(outcomes: list[Outcome]) -> None:
            for outcome in outcomes:
                replies[outcome.job.id] = outcome.answer
                if outcome.answer is None:
                    self.judge_errors.append(outcome.error or "no answer")

        self.judge_loads += await run_batch(
            self.config,
            planned,
            jobs,
            self.backends,
            on_chunk=on_chunk,
            on_event=self.on_event,
            recorder=self.recorder,
        )
        self.judge_seconds += time.perf_counter() - started
        return [replies.get(job.id) for job in jobs]

    # -- against the best member -----------------------------------------------------------

    def _best_member(self) -> int | None:
        """The member system with the highest mean score (the first of equals); None when no
        member has a score."""
        names = {f"model/{m}" for m in members(self.config, self.ensemble)}
        best: tuple[float, int] | None = None
        for s, system in enumerate(self.systems):
            scores = self._scores(s)
            if system.name not in names or not scores:
                continue
            mean = sum(scores) / len(scores)
            if best is None or mean > best[0]:
                best = (mean, s)
        return None if best is None else best[1]

    def _verdicts(self, best: int) -> None:
        """Each cell's verdict against the best member's, where no judge was needed."""
        for (q, s), cell in self.cells.items():
            if s == best:
                continue
            baseline = self.cells[q, best]
            if self.questions[q].kind == "exact":
                mine, theirs = cell.score or 0.0, baseline.score or 0.0
                cell.verdict = "win" if mine > theirs else "loss" if mine < theirs else "tie"
            elif cell.verdict is None:  # the judge was not asked: the answers decide
                mine, theirs = cell.answer is not None, baseline.answer is not None
                cell.verdict = "win" if mine > theirs else "loss" if mine < theirs else "tie"

    # -- the report ------------------------------------------------------------------------

    def _scores(self, s: int, kind: str | None = None) -> list[float]:
        return [
            cell.score
            for (q, t), cell in self.cells.items()
            if t == s and cell.score is not None and kind in (None, self.questions[q].kind)
        ]

    def _row(self, s: int, best: int | None, shares: Shares[int]) -> SystemScore:
        scores = self._scores(s)
        exact, judged = self._scores(s, "exact"), self._scores(s, "judged")
        low, high = bootstrap_ci(scores, seed=BOOTSTRAP_SEED) if scores else (None, None)
        cells = [cell for (_, t), cell in self.cells.items() if t == s]
        verdicts = [cell.verdict for cell in cells]
        compared = best is not None and s != best
        per = max(len(self.questions), 1)
        return SystemScore(
            name=self.systems[s].name,
            score=_round(_mean(scores)),
            n=len(scores),
            ci_low=_round(low),
            ci_high=_round(high),
            exact_score=_round(_mean(exact)),
            judged_score=_round(_mean(judged)),
            unrated=sum(
                1
                for (q, t), cell in self.cells.items()
                if t == s and cell.score is None and self.questions[q].kind == "judged"
            ),
            failed=sum(1 for cell in cells if cell.answer is None),
            wins=verdicts.count("win") if compared else None,
            ties=verdicts.count("tie") if compared else None,
            losses=verdicts.count("loss") if compared else None,
            seconds=round(self.seconds[s] / per, 4),
            tokens=round(self.tokens[s] / per, 2),
            loads=round(shares.loads.get(s, 0.0) / per, 4),
            load_seconds=round(shares.seconds.get(s, 0.0) / per, 4),
        )

    def _results(self) -> list[QuestionResult]:
        out = []
        for q, question in enumerate(self.questions):
            for s, system in enumerate(self.systems):
                cell = self.cells[q, s]
                outcome = cell.outcome
                error = None
                if cell.answer is None:
                    error = "not answered" if outcome is None else outcome.error or "no answer"
                out.append(
                    QuestionResult(
                        id=question.id,
                        kind=question.kind,
                        system=system.name,
                        score=_round(cell.score),
                        extracted=cell.extracted,
                        rating=cell.rating,
                        verdict=cell.verdict,
                        error=error,
                        run_id=None if outcome is None else outcome.run_id,
                    )
                )
        return out

    def _notes(self, rows: list[SystemScore], best: int | None) -> list[str]:
        notes = []
        if self.judge is not None and any(
            call.model == self.judge
            for system in self.systems
            for stage in system.stages
            for call in stage
        ):
            notes.append(
                f"The judge {self.judge} also answers here; LLM judges tend to favour answers "
                "like their own (self-enhancement, MT-Bench arXiv 2306.05685 §3.3), so a judge "
                "outside the systems compared is fairer."
            )
        for s, row in enumerate(rows):
            errors = [
                cell.outcome.error if cell.outcome is not None else None
                for (_, t), cell in self.cells.items()
                if t == s and cell.answer is None
            ]
            if errors:
                first = next((e for e in errors if e), "not answered")
                notes.append(
                    f"{row.name} gave no answer to {len(errors)} of the {len(self.questions)} "
                    f"questions (the first: {first}); each scores 0."
                )
        if self.judge_errors:
            notes.append(
                f"{len(self.judge_errors)} of the judge's calls failed (the first: "
                f"{self.judge_errors[0]}); their ratings are unrated and their comparisons ties."
            )
        if self.unreadable["rating"]:
            notes.append(
                f"{self.unreadable['rating']} of the judge's ratings could not be read and are "
                "left out of n (unrated); a judge that follows the format better reads more."
            )
        ours, theirs = rows[0], None if best is None else rows[best]
        if (
            theirs is not None
            and ours.ci_low is not None
            and theirs.ci_low is not None
            and ours.ci_high is not None
            and theirs.ci_high is not None
            and ours.ci_low <= theirs.ci_high
            and theirs.ci_low <= ours.ci_high
        ):
            notes.append(
                f"The 95 % intervals of {ours.name} and the best member {theirs.name} overlap: "
                "this set does not show that either scores higher; more questions narrow them."
            )
        return notes


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
