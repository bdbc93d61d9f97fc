"""``localmoa batch IN.jsonl -o OUT.jsonl``: many prompts, planned together, answered into a
resumable file.

The prompts are cut into chunks; each chunk is one plan, so each model loads once per stage for
the whole chunk and its calls for the chunk's prompts are made together
(:mod:`localmoa.batch.runner`). OUT gets one JSON line per prompt as each chunk finishes; running
the same command again skips the ids already there (:class:`localmoa.batch.jobs.Results`: a
chunk's lines are written at once, so Ctrl-C or a crash loses at most the chunk in flight and
never leaves a partial or duplicate line). Progress (prompts answered, ETA) goes to stderr; with
``--json`` stdout carries one :class:`~localmoa.batch.jobs.BatchSummary` at the end. The command
exits 1 when some prompt failed (its line in OUT says why), after writing every line.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from localmoa.batch.jobs import BatchResult, BatchSummary, Job, Results, pending, read_jobs
from localmoa.batch.runner import (
    BatchPlan,
    Outcome,
    System,
    ensemble_system,
    plan_batch,
    run_batch,
)
from localmoa.cli.options import budget_option, config_option, ensemble_option, json_option
from localmoa.cli.plan import plan_report
from localmoa.cli.render import print_json, print_plan, stderr, stdout, warning
from localmoa.cli.reports import BatchPlanReport
from localmoa.cli.session import Session, open_session
from localmoa.cli.signals import arun, unloads
from localmoa.records.recorder import Recorder
from localmoa.runtime.engine import CallFinished, Event, ModelUnloaded
from localmoa.runtime.prepare import Prepared

__all__ = ["batch_command"]


@click.command(name="batch")
@click.argument("input_path", metavar="IN.jsonl", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "-o",
    "--output",
    "output_path",
    metavar="OUT.jsonl",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where the answers go, one JSON line per prompt; ids already there are skipped.",
)
@config_option
@ensemble_option
@budget_option
@click.option(
    "--chunk",
    type=click.IntRange(min=1),
    metavar="N",
    help="Prompts planned together (default: the size, up to 16, with the fewest loads).",
)
@click.option("--plan", "plan_only", is_flag=True, help="Show the batch's plan; run nothing.")
@json_option
def batch_command(
    input_path: Path,
    output_path: Path | None,
    config_path: Path | None,
    ensemble: str,
    memory_budget: str | None,
    chunk: int | None,
    plan_only: bool,
    as_json: bool,
) -> None:
    """Answer every prompt of IN.jsonl into OUT.jsonl, planned together.

    IN has one JSON object per line: {"id": ..., "prompt": "..."} or
    {"id": ..., "messages": [{"role": ..., "content": ...}, ...]}. OUT gets
    {"id", "answer", "ok", "error", "seconds", "run_id"} per prompt.
    """
    if output_path is None and not plan_only:
        raise click.UsageError("give -o OUT.jsonl, where the answers go (or --plan)")
    jobs = read_jobs(input_path)  # every bad line, before anything loads
    if plan_only:
        report = arun(lambda: _plan(jobs, config_path, ensemble, memory_budget, chunk))
        if as_json:
            print_json(report)
        else:
            _print_batch_plan(report)
        return
    assert output_path is not None
    summary = arun(
        lambda: _run(jobs, output_path, config_path, ensemble, memory_budget, chunk, as_json)
    )
    if as_json:
        print_json(summary)
    if summary.failed:
        stderr().print(
            f"localmoa: {summary.failed} of {summary.prompts} prompts failed; their lines in "
            f"{output_path} say why (run the command again to retry them after removing those "
            "lines)",
            markup=False,
            soft_wrap=True,
        )
        raise SystemExit(1)


async def _plan(
    jobs: list[Job],
    config_path: Path | None,
    ensemble: str,
    memory_budget: str | None,
    chunk: int | None,
) -> BatchPlanReport:
    async with open_session(config_path, memory_budget) as session:
        system = ensemble_system(session.config, ensemble)
        planned = await _planned(session, system, len(jobs), memory_budget, chunk)
        return _plan_report(planned, ensemble, len(jobs), session.reasons)


async def _planned(
    session: Session, system: System, prompts: int, memory_budget: str | None, chunk: int | None
) -> BatchPlan:
    """The one place ``batch`` plans, with or without ``--plan``."""
    planned = await plan_batch(
        session.config,
        [system],
        prompts,
        session.backends,
        memory_budget=memory_budget,
        chunk=chunk,
    )
    for note in planned.notes:
        warning(note)
    return planned


def _plan_report(
    planned: BatchPlan, ensemble: str, prompts: int, reasons: list[str]
) -> BatchPlanReport:
    prepared = Prepared(
        ensemble,
        planned.stages,
        planned.footprints,
        planned.budget,
        planned.plan,
        planned.policy.profile if planned.policy.plan_for == "time" else None,
        planned.policy,
        planned.models,
    )
    return BatchPlanReport(
        prompts=prompts,
        chunk=planned.chunk,
        chunks=planned.chunks,
        loads=planned.loads,
        loads_by_chunk={str(size): loads for size, loads in planned.tried.items()},
        chunk_plan=plan_report(prepared, reasons),
    )


def _print_batch_plan(report: BatchPlanReport) -> None:
    console = stdout()
    console.print(
        f"{report.prompts} prompts in {report.chunks} chunk(s) of up to {report.chunk}: "
        f"{report.loads} loads expected in all. One chunk's plan:",
        markup=False,
    )
    print_plan(console, report.chunk_plan)
    tried = ", ".join(
        f"{size}: {'does not fit' if loads is None else f'{loads} loads'}"
        for size, loads in report.loads_by_chunk.items()
    )
    console.print(f"chunk sizes compared (prompts: loads in all): {tried}", markup=False)


async def _run(
    jobs: list[Job],
    output_path: Path,
    config_path: Path | None,
    ensemble: str,
    memory_budget: str | None,
    chunk: int | None,
    quiet: bool,
) -> BatchSummary:
    started = time.perf_counter()
    async with open_session(config_path, memory_budget) as session:
        recorder = Recorder.open(session.config.settings, warn=warning)
        for reason in session.reasons:
            stderr().print(f"zero-config: {reason}", markup=False)
        system = ensemble_system(session.config, ensemble)
        with Results(output_path) as results:
            todo = pending(jobs, results.done_ids())
            skipped = len(jobs) - len(todo)
            counts = {"answered": 0, "failed": 0}
            loads = 0
            if todo:
                planned = await _planned(session, system, len(todo), memory_budget, chunk)
                calls = sum(len(stage) for stage in system.stages)
                if skipped:
                    stderr().print(
                        f"{skipped} of {len(jobs)} prompts are in {output_path} already; "
                        f"answering the other {len(todo)}",
                        markup=False,
                    )
                with _Bar(len(todo) * calls, quiet) as bar:

                    def on_event(event: Event) -> None:
                        if isinstance(event, ModelUnloaded):
                            unloads.add([event.model])
                        elif isinstance(event, CallFinished):
                            bar.call_made()

                    def on_chunk(outcomes: list[Outcome]) -> None:
                        results.write_chunk([_line(o) for o in outcomes])
                        for outcome in outcomes:
                            counts["answered" if outcome.ok else "failed"] += 1
                        bar.done(len(outcomes) * calls)

                    loads = await run_batch(
                        session.config,
                        planned,
                        todo,
                        session.backends,
                        on_chunk=on_chunk,
                        on_event=on_event,
                        recorder=recorder,
                    )
    summary = BatchSummary(
        prompts=len(jobs),
        answered=counts["answered"],
        skipped=skipped,
        failed=counts["failed"],
        loads=loads,
        seconds=round(time.perf_counter() - started, 3),
    )
    stderr().print(
        f"answered {summary.answered} of {summary.prompts} prompts ({summary.failed} failed, "
        f"{summary.skipped} already in {output_path}) with {summary.loads} loads in "
        f"{summary.seconds:.1f} s",
        markup=False,
        soft_wrap=True,
    )
    return summary


def _line(outcome: Outcome) -> BatchResult:
    return BatchResult(
        id=outcome.job.id,
        answer=outcome.answer,
        ok=outcome.ok,
        error=None if outcome.ok else outcome.error or "not answered",
        seconds=round(outcome.seconds, 3),
        run_id=outcome.run_id,
    )


class _Bar:
    """The progress bar on stderr: calls made, with the ETA; a chunk's calls count as made
    when the chunk is written (a call made but lost with an interrupted chunk does not count)."""

    def __init__(self, total: int, quiet: bool) -> None:
        self.progress = Progress(
            TextColumn("answering"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("calls"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=stderr(),
            disable=quiet,
            transient=True,
        )
        self.task = self.progress.add_task("batch", total=total)
        self.made = 0
        self.written = 0

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def call_made(self) -> None:
        self.made += 1
        self.progress.update(self.task, completed=self.made)

    def done(self, calls: int) -> None:
        self.written += calls
        self.made = self.written
        self.progress.update(self.task, completed=self.made)
