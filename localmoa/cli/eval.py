"""``localmoa eval [SET.jsonl]``: does the ensemble beat its best member, on this machine?

The ensemble, each of its models alone and any ``--system`` named answer every question of the
set in one batch plan; exact questions are scored by their final value, judged ones by a local
judge (``--judge``), and every system is compared with the best member
(:mod:`localmoa.evaluation.runner` has the rules). stdout gets the table, or one
:class:`~localmoa.evaluation.report.EvalReport` with ``--json``; progress goes to stderr. Every
answer and judgement is a recorded run (``localmoa logs``).

Mistakes exit 2 before anything loads: a bad line of the set (named by its number), an unknown
``--system``, a judge that is not a model of the config, or judged questions with no judge.
"""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from localmoa.cli.options import budget_option, config_option, ensemble_option, json_option
from localmoa.cli.render import print_json, stderr, stdout, warning
from localmoa.cli.session import open_session
from localmoa.cli.signals import arun, unloads
from localmoa.evaluation.questions import STARTER_SET, Question, read_questions, starter_set
from localmoa.evaluation.report import EvalReport, SystemScore
from localmoa.evaluation.runner import evaluate
from localmoa.evaluation.systems import check_judge, eval_systems
from localmoa.records.recorder import Recorder
from localmoa.runtime.engine import CallFinished, Event, ModelLoaded, ModelUnloaded

__all__ = ["eval_command"]

STARTER = f"the starter set ({STARTER_SET}, shipped with localmoa)"


@click.command(name="eval")
@click.argument(
    "set_path",
    metavar="[SET.jsonl]",
    required=False,
    type=click.Path(path_type=Path),
)
@config_option
@ensemble_option
@budget_option
@click.option(
    "--judge",
    metavar="MODEL",
    help="The model of the config that rates judged questions (needed only when the set has "
    "some); best a strong one outside the ensemble.",
)
@click.option(
    "--system",
    "extra",
    metavar="NAME",
    multiple=True,
    help="Also compare this system: another ensemble of the config as moa/NAME (a Self-MoA, a "
    'final = "select" one) or a model alone as model/NAME. Repeatable.',
)
@json_option
def eval_command(
    set_path: Path | None,
    config_path: Path | None,
    ensemble: str,
    memory_budget: str | None,
    judge: str | None,
    extra: tuple[str, ...],
    as_json: bool,
) -> None:
    """Score the ensemble, each of its models alone and any --system on a question set.

    SET.jsonl has one question per line: {"id": ..., "prompt": "...", "answer": "...",
    "kind": "exact" | "judged"} ("answer" optional for judged ones). Without SET, the
    starter set shipped with localmoa is used (51 questions: arithmetic and logic with exact
    answers, short facts and open questions for the judge). Exact questions score 1 when the
    answer's final value equals "answer", judged ones (rating - 1) / 9 from the judge's 1-10
    rating; each system is compared with the best single member.
    """
    questions = read_questions(set_path) if set_path is not None else starter_set()
    name = str(set_path) if set_path is not None else STARTER
    report = arun(
        lambda: _run(
            questions, name, config_path, ensemble, memory_budget, judge, extra, quiet=as_json
        )
    )
    if as_json:
        print_json(report)
    else:
        print_report(report)


async def _run(
    questions: list[Question],
    set_name: str,
    config_path: Path | None,
    ensemble: str,
    memory_budget: str | None,
    judge: str | None,
    extra: tuple[str, ...],
    *,
    quiet: bool,
) -> EvalReport:
    async with open_session(config_path, memory_budget) as session:
        config = session.config
        # Every mistake the user can fix is refused here, before anything loads.
        recorder = Recorder.open(config.settings, warn=warning)
        for reason in session.reasons:
            stderr().print(f"zero-config: {reason}", markup=False)
        systems = eval_systems(config, ensemble, extra)
        check_judge(config, questions, judge)
        stderr().print(
            f"evaluating {len(systems)} systems ({', '.join(s.name for s in systems)}) on "
            f"{len(questions)} questions of {set_name}",
            markup=False,
            soft_wrap=True,
        )
        with _Bar(quiet) as bar:
            report = await evaluate(
                config,
                questions,
                systems,
                session.backends,
                ensemble=ensemble,
                judge=judge,
                set_name=set_name,
                memory_budget=memory_budget,
                recorder=recorder,
                on_phase=bar.phase,
                on_event=bar.event,
            )
    stderr().print(
        f"evaluated in {report.seconds:.1f} s with {report.loads} loads "
        f"({report.answer_loads} answering, {report.loads - report.answer_loads} grading)",
        markup=False,
        soft_wrap=True,
    )
    return report


class _Bar:
    """Progress on stderr: one bar per phase (answering, rating, comparing), in calls made,
    and a line per phase and per load."""

    def __init__(self, quiet: bool) -> None:
        console = stderr()
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("calls"),
            TimeElapsedColumn(),
            console=console,
            disable=quiet or not console.is_terminal,  # a log gets the lines, not a bar
            transient=True,
        )
        self.task: TaskID | None = None
        self.quiet = quiet

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def phase(self, name: str, calls: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(name, total=calls)
        if not self.quiet:
            self.progress.console.print(f"{name}: {calls} calls", markup=False)

    def event(self, event: Event) -> None:
        if isinstance(event, ModelLoaded):
            if not self.quiet:
                self.progress.console.print(
                    f"  loaded {event.model} in {event.seconds:.2f} s", markup=False
                )
        elif isinstance(event, ModelUnloaded):
            unloads.add([event.model])
        elif isinstance(event, CallFinished) and self.task is not None:
            self.progress.advance(self.task)


def print_report(report: EvalReport) -> None:
    """The table of ``report``: one row per system, then the notes."""
    judged = f", judge {report.judge}" if report.judge else ""
    best = f"W/T/L: wins/ties/losses against the best member, {report.best_member}. " * bool(
        report.best_member
    )
    table = Table(
        title=f"{report.questions} questions ({report.exact} exact, {report.judged} judged) "
        f"of {report.set}, ensemble {report.ensemble}{judged}",
        title_justify="left",
        caption=f"{best}Score 0-1 (exact: right or not; judged: (rating - 1) / 9); per "
        "question: s/q device seconds, tok/q output tokens, loads/q loads.",
        caption_justify="left",
    )
    table.add_column("system", no_wrap=True)
    for column in ("score", "95 % CI", "n", "W/T/L", "s/q", "tok/q", "loads/q"):
        table.add_column(column, justify="right", no_wrap=True)
    for row in report.systems:
        table.add_row(
            row.name,
            _figure(row.score),
            "-"
            if row.ci_low is None or row.ci_high is None
            else f"{row.ci_low:.2f}-{row.ci_high:.2f}",
            str(row.n),
            _record(row, report.best_member),
            f"{row.seconds:.2f}",
            f"{row.tokens:.0f}",
            f"{row.loads:.2f}",
        )
    console = stdout()
    console.print(table)
    for note in report.notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _record(row: SystemScore, best: str | None) -> str:
    if row.name == best:
        return "best"
    if row.wins is None or row.ties is None or row.losses is None:
        return "-"
    return f"{row.wins}/{row.ties}/{row.losses}"
