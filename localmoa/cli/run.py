"""``localmoa run``: answer a prompt with an ensemble, the answer streamed to stdout.

stdout carries only the answer (or the :class:`~localmoa.cli.reports.RunReport` with ``--json``),
so it can be piped; progress, layer outputs and the closing summary go to stderr. Every run is
written to the run log as it goes (localmoa.records.recorder; ``localmoa logs`` shows it), ok,
failed or interrupted; a log that cannot be written is one warning, never a lost answer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import click

from localmoa.backends.base import ChatMessage
from localmoa.cli.options import budget_option, config_option, ensemble_option, json_option
from localmoa.cli.render import print_json, run_summary, stderr, warning
from localmoa.cli.reports import RunReport
from localmoa.cli.session import Session, open_session, plan_run
from localmoa.cli.signals import arun, unloads
from localmoa.errors import UserError
from localmoa.planning.fewest_loads import Plan
from localmoa.records.recorder import Recorder, RunRecording, recorded
from localmoa.runtime.admission import Admission
from localmoa.runtime.engine import (
    CallFinished,
    CallPiece,
    Event,
    Executor,
    ModelUnloaded,
    RunResult,
)
from localmoa.runtime.moa import Call, stage_label
from localmoa.runtime.prepare import Prepared

__all__ = ["execute", "executor_for", "run_command", "run_report", "stream_answer"]


@click.command(name="run")
@click.argument("prompt", required=False)
@config_option
@ensemble_option
@budget_option
@click.option("--show-layers", is_flag=True, help="Print every agent's response (on stderr).")
@json_option
def run_command(
    prompt: str | None,
    config_path: Path | None,
    ensemble: str,
    memory_budget: str | None,
    show_layers: bool,
    as_json: bool,
) -> None:
    """Answer PROMPT with the ensemble (PROMPT or stdin); the answer streams to stdout."""
    if prompt is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, or pipe one on stdin")
        prompt = _utf8(sys.stdin.buffer.read(), "stdin")
    else:  # an argument with bytes that are not UTF-8 arrives with surrogate escapes
        prompt = _utf8(os.fsencode(prompt), "the PROMPT argument")
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    question = prompt

    async def go() -> RunReport:
        async with open_session(config_path, memory_budget) as session:
            # A bad LOCALMOA_RECORD stops the command here, before anything loads.
            recorder = Recorder.open(session.config.settings, warn=warning)
            for reason in session.reasons:
                stderr().print(f"zero-config: {reason}", markup=False)
            prepared = await plan_run(session, ensemble, memory_budget, question)
            for note in prepared.notes:
                warning(note)
            recording = recorder.start(
                source="run",
                ensemble=prepared.ensemble,
                ensemble_config=session.config.ensembles[prepared.ensemble],
                plan=prepared.plan,
                budget=prepared.budget,
                conversation=[ChatMessage(role="user", content=question)],
                models=prepared.models or session.config.models,
                stages=[stage_label(stage) for stage in prepared.stages],
            )
            with recorded(recording, interrupted="interrupted (Ctrl-C or a stop signal)"):
                result = await execute(
                    session, prepared, question, show_layers, quiet=as_json, record=recording
                )
            recording.finish("ok", answer=result.answer, seconds=result.seconds)
            report = run_report(result)
            # before the closing unloads
            stderr().print(run_summary(report), markup=False, soft_wrap=True)
        return report

    report = arun(go)
    if as_json:
        print_json(report)


def _utf8(raw: bytes, where: str) -> str:
    """The prompt as text, refused before anything loads when it is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{where} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
            "convert it first, e.g. iconv -f latin1 -t utf-8"
        ) from None


def run_report(result: RunResult) -> RunReport:
    """What ``run --json`` prints for ``result``."""
    return RunReport(
        answer=result.answer,
        calls=result.calls,
        loads=result.loads,
        load_seconds=round(result.load_seconds, 4),
        replans=result.replans,
        seconds=round(result.seconds, 4),
        skipped_layers=result.skipped_layers,
        plan=result.plan,
    )


async def execute(
    session: Session,
    prepared: Prepared,
    prompt: str,
    show_layers: bool,
    *,
    quiet: bool,
    record: RunRecording | None = None,
) -> RunResult:
    """Run the plan, progress on stderr and (unless ``quiet``) the answer streamed to stdout;
    every event also goes to ``record`` (the run log), first."""
    return await stream_answer(
        executor_for(session, prepared, lambda event: None),
        prepared.stages,
        prepared.plan,
        [ChatMessage(role="user", content=prompt)],
        show_layers=show_layers,
        quiet=quiet,
        record=record,
    )


async def stream_answer(
    executor: Executor,
    stages: list[list[Call]],
    plan: Plan,
    conversation: list[ChatMessage],
    *,
    show_layers: bool,
    quiet: bool = False,
    record: RunRecording | None = None,
    admission: Admission | None = None,
) -> RunResult:
    """Run ``plan`` on ``executor`` as the CLI shows a run: progress on stderr, the answer
    streamed to stdout (printed whole when ``final = "select"`` chose it), every event to
    ``record`` first, every unload to the closing account. ``run`` and each ``chat`` turn
    (``admission``: its pool's) both answer through here."""
    from localmoa.cli.progress import Progress

    progress = Progress(
        stderr(),
        show_layers=show_layers,
        n_waves=len(plan.waves),
        labels=[stage_label(stage) for stage in stages],
    )
    selecting = not any(c.is_aggregator for stage in stages for c in stage)
    streaming = False

    def on_event(event: Event) -> None:
        nonlocal streaming
        if record is not None:
            record.on_event(event)
        if isinstance(event, ModelUnloaded):
            unloads.add([event.model])
        if isinstance(event, CallPiece) and event.call.is_aggregator and not quiet:
            if not streaming:
                progress.pause()
                streaming = True
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, CallFinished) and event.call.is_aggregator and streaming:
            sys.stdout.write("\n")  # end the answer's line before stderr speaks again
            sys.stdout.flush()
            streaming = False
        progress(event)

    try:
        result = await executor.run(
            stages, plan, conversation, admission=admission, on_event=on_event
        )
        if selecting and not quiet:  # final = "select": the answer is chosen, not written
            progress.pause()
            sys.stdout.write(result.answer + "\n")
            sys.stdout.flush()
        return result
    finally:
        progress.close()
        if streaming:
            sys.stdout.write("\n")
            sys.stdout.flush()


def executor_for(
    session: Session, prepared: Prepared, on_event: Callable[[Event], None]
) -> Executor:
    """The engine for this run: the CLI's one place that builds an Executor. A re-plan mid-run
    follows the policy the first plan was made with (plan_for, min_gain, the profile)."""
    settings = session.config.settings
    return Executor(
        prepared.models or session.config.models,
        session.backends,
        max_parallel_calls=settings.max_parallel_calls,
        max_calls_per_second=settings.max_calls_per_second,
        on_event=on_event,
        sizes={name: fp.total for name, fp in prepared.footprints.items()},
        policy=prepared.policy,
        devices=prepared.devices,
    )
