"""``localmoa logs``: the run log (localmoa.records.store), listed, shown, searched.

- ``localmoa logs`` lists the latest runs, newest first: ``-n``, ``--ensemble``, ``--model``,
  ``--status``, ``--since`` (``2h``, ``3d``, or an ISO date or time, local unless it says its
  zone) and ``-q TEXT`` (every word in the prompt or the answer). ``--json`` prints the list of
  :class:`~localmoa.records.models.LoggedRun`.
- ``localmoa logs show ID`` (ID or a unique prefix of it) prints every agent's answer by layer,
  the plan's waves, the loads and a telemetry table; where the plan placed models on devices
  (several GPUs, a cluster's nodes), each call and load also says where it ran, and a run
  without any placement reads as it always did; ``--json`` prints the
  :class:`~localmoa.records.models.RunDetail`; ``--timeline FILE`` draws it (.svg or .png).
- ``localmoa logs path`` prints where the log is.

Reading never creates the file: with nothing recorded yet the list is empty. Every bad input
is one line and exit 2, click's own complaints included (they are turned into UserErrors
here rather than click's usage block).
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, get_args

import click
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from localmoa.cli.options import json_option
from localmoa.cli.render import stderr, stdout
from localmoa.errors import UserError
from localmoa.records.models import LoggedCall, LoggedLoad, LoggedRun, RunDetail, RunStatus
from localmoa.records.store import Store, log_path
from localmoa.sizes import format_bytes

__all__ = ["logs_command", "parse_since"]

PIPE_WIDTH = 200
"""Columns of ``logs`` output into a pipe or a file."""
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")


def parse_since(value: str, now: float | None = None) -> float:
    """``--since``: a time ago (``90s``, ``30m``, ``2h``, ``3d``, ``1w``) or an ISO 8601 date or
    time (local time unless it gives its zone), as unix seconds.

    >>> parse_since("2h", now=10_000.0)
    2800.0
    >>> parse_since("1970-01-01T00:00:10Z")
    10.0
    """
    relative = _RELATIVE.match(value)
    if relative:
        return (time.time() if now is None else now) - float(relative[1]) * _UNITS[relative[2]]
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(
            f'"{value}" is neither a time ago like 30m, 2h, 3d, 1w nor an ISO date or time '
            "like 2025-01-31 or 2025-01-31T09:00"
        ) from None
    return moment.timestamp()  # naive: local time, as a person types it


class _Since(click.ParamType[float, str | float]):
    name = "WHEN"

    def convert(
        self, value: str | float, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_since(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _usage(exc: click.UsageError) -> UserError:
    """Click's usage error as a one-line UserError (exit 2, no usage block)."""
    where = exc.ctx.command_path if exc.ctx is not None else "localmoa logs"
    return UserError(f"{where}: {exc.format_message()} (see {where} --help)")


class _Command(click.Command):
    """A command whose usage errors are one line (see :func:`_usage`)."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise _usage(exc) from None


class _Group(_Command, click.Group):
    """The same for the group, and for its subcommands' arguments."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # an unknown subcommand, or a subcommand's arguments
            raise _usage(exc) from None


def _console() -> Console:
    """stdout; when it is not a terminal (a pipe, a file), wide enough that ids and rows are
    not cut (COLUMNS, when set, still decides)."""
    console = stdout()
    if console.is_terminal or "COLUMNS" in os.environ:
        return console
    return Console(highlight=False, width=PIPE_WIDTH)


def _open() -> Store | None:
    return Store.open(log_path(), create=False)


@click.group(name="logs", cls=_Group, invoke_without_command=True)
@click.option(
    "-n", "--count", type=click.IntRange(min=1), default=20, show_default=True, help="Runs shown."
)
@click.option("--ensemble", "-e", help="Only runs of this ensemble.")
@click.option("--model", "-m", help="Only runs that called or loaded this model.")
@click.option(
    "--status", "-s", type=click.Choice(get_args(RunStatus)), help="Only runs that ended so."
)
@click.option("--since", type=_Since(), help="Only runs started since: 2h, 3d, or an ISO date.")
@click.option("-q", "--query", help="Only runs whose prompt or answer has every word of TEXT.")
@json_option
@click.pass_context
def logs_command(
    ctx: click.Context,
    count: int,
    ensemble: str | None,
    model: str | None,
    status: str | None,
    since: float | None,
    query: str | None,
    as_json: bool,
) -> None:
    """List recorded runs, newest first (``logs show ID`` for one, ``logs path`` for the file)."""
    if ctx.invoked_subcommand is not None:
        return
    store = _open()
    runs = (
        []
        if store is None
        else store.list_runs(
            count, ensemble=ensemble, model=model, status=status, since=since, query=query
        )
    )
    if as_json:
        click.echo(json.dumps([run.model_dump(mode="json") for run in runs]))
        return
    if not runs:
        what = "no runs recorded yet" if store is None else "no recorded run matches"
        stderr().print(f"{what} (the log: {log_path()})", markup=False)
        return
    _console().print(_runs_table(runs))


_COLUMNS = ("id", "started", "status", "ensemble", "calls", "loads", "s")
_NUMBERS = ("calls", "loads", "s")
_PROMPT_MIN = 12
"""Narrower than this, the list leaves the prompt out rather than cut every column."""


def _runs_table(runs: list[LoggedRun]) -> Table:
    """One row per run; every column whole, the prompt cut to the room that is left."""
    rows = [
        (
            run.id,
            _local(run.started, seconds=False),
            run.status if run.source == "run" else f"{run.status} ({run.source})",
            run.ensemble,
            str(run.calls),
            str(run.loads),
            _seconds(run.seconds),
        )
        for run in runs
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(_COLUMNS)]
    room = _console().width - sum(widths) - len(widths)
    table = Table(box=None, pad_edge=False, collapse_padding=True, header_style="bold")
    for column, width in zip(_COLUMNS, widths, strict=True):
        right = column in _NUMBERS
        table.add_column(
            column, no_wrap=True, min_width=width, justify="right" if right else "left"
        )
    if room < _PROMPT_MIN:  # a narrow terminal: the columns whole, and no prompt
        for row in rows:
            table.add_row(*row)
        return table
    table.add_column("prompt", no_wrap=True, overflow="ellipsis", max_width=room)
    for run, row in zip(runs, rows, strict=True):
        table.add_row(*row, Text(_one_line(run.prompt)))
    return table


@logs_command.command(name="show", cls=_Command)
@click.argument("run_id", metavar="ID")
@json_option
@click.option(
    "--timeline",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the run's timeline to FILE (.svg or .png; the plot extra).",
)
def show_command(run_id: str, as_json: bool, timeline: Path | None) -> None:
    """Show one run: every agent's answer by layer, the plan, the loads, the telemetry."""
    store = _open()
    if store is None:
        raise UserError(f'no run "{run_id}": nothing is recorded yet ({log_path()} does not exist)')
    detail = store.run(run_id)
    if timeline is not None:
        from localmoa.records.timeline import draw_run

        draw_run(detail, timeline)
        stderr().print(f"timeline: {timeline}", markup=False)
    if as_json:
        click.echo(detail.model_dump_json())
        return
    _print_detail(_console(), detail)


@logs_command.command(name="path", cls=_Command)
def path_command() -> None:
    """Print where the run log is (it may not exist yet)."""
    click.echo(str(log_path()))


# --- rendering -----------------------------------------------------------------------------------


def _print_detail(console: Console, run: RunDetail) -> None:
    """The run's header, its conversation, each layer's calls with their text, the answer, then
    the plan, the loads and the telemetry tables."""
    head = f"run {run.id} · {run.status} · {run.source} · ensemble {run.ensemble}"
    head += f" · {_local(run.started)}"
    if run.seconds is not None:  # None: still running, or its process died mid-run
        head += f" · {run.seconds:.2f}s"
    console.print(head, markup=False)
    facts = []
    if run.budget_bytes is not None:
        facts.append(f"budget {format_bytes(run.budget_bytes)} ({run.budget_source})")
    if run.device is not None:
        memory = run.device.get("memory") or {}
        facts.append(f"device: {memory.get('detail', '?')}")
    facts.append(", ".join(f"{name} {version}" for name, version in run.versions.items()))
    console.print(" · ".join(facts), markup=False)
    if run.chat_id is not None:
        console.print(f"chat {run.chat_id}", markup=False)
    if run.error is not None:
        console.print(Text(f"error: {run.error}", style="red"))
    if run.conversation is None:
        console.print('(texts not recorded: record = "metadata")', markup=False)
    else:
        for message in run.conversation:
            console.print(Text(f"\n{message.role}: ", style="bold") + Text(message.content))
    layer = None
    for call in run.calls:
        if call.layer != layer:
            layer = call.layer
            console.rule(f"layer {layer}", align="left")
        console.print(Text(_call_line(call), style="bold" if call.ok else "red"))
        if call.error is not None:
            console.print(Text(f"  error: {call.error}", style="red"))
        if call.text:
            console.print(Text(call.text))
    if run.answer is not None:
        console.rule("answer", align="left")
        console.print(Text(run.answer))
    if run.plan is not None:
        console.print(_plan_table(run.plan))
    if run.loads:
        console.print(_loads_table(run))
    if run.calls:
        console.print(_telemetry_table(run.calls))


def _call_line(call: LoggedCall) -> str:
    ttft = "" if call.ttft_s is None else f" · ttft {call.ttft_s:.2f}s"
    seen = ""
    if call.references:
        seen = " · read " + ", ".join(f"{layer}.{index + 1}" for layer, index in call.references)
    who = _position(call) if call.role in ("judge", "roles") else f"{_position(call)} {call.role}"
    place = _place(call)
    served = call.backend if place is None else f"{call.backend} on {place}"
    return (
        f"{who} {call.model} ({served}) · "
        f"{call.tokens_in} → {call.tokens_out} tokens{ttft} · {call.seconds:.2f}s{seen}"
    )


def _place(row: LoggedCall | LoggedLoad) -> str | None:
    """Where a call or a load ran, compactly: its device, prefixed with its node when the
    device's name does not say it already ("nodeB/gpu0"); None when the plan placed nothing."""
    device, node = row.device, row.node
    if node is None:
        return device
    if device is None:
        return node
    return device if device.startswith(f"{node}/") else f"{node}/{device}"


def _position(call: LoggedCall) -> str:
    """Where a call stands, as references name answers: layer.agent (1-based); a judge and the
    roles call write no answer of their layer, so they are named by what they are."""
    if call.role == "judge":
        return f"judge {call.layer}"
    if call.role == "roles":
        return "roles"
    return f"{call.layer}.{call.index + 1}"


def _plan_table(plan: dict[str, Any]) -> Table:
    table = Table(title="Plan", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("wave", "stage", "unload", "load", "resident", "runs", "bytes"):
        table.add_column(column, justify="right" if column in ("wave", "bytes") else "left")
    labels = plan.get("stage_labels") or []
    for number, wave in enumerate(plan.get("waves", []), start=1):
        stage = wave.get("layer", 0)
        known = isinstance(stage, int) and 0 < stage <= len(labels)
        table.add_row(
            str(number),
            str(labels[stage - 1]) if known else str(stage),
            ", ".join(wave.get("unload", [])) or "-",
            ", ".join(wave.get("load", [])) or "-",
            ", ".join(wave.get("resident", [])),
            ", ".join(wave.get("runs", [])),
            format_bytes(int(wave.get("bytes", 0))),
        )
    return table


def _loads_table(run: RunDetail) -> Table:
    start = datetime.fromisoformat(run.started).timestamp()
    table = Table(
        title="Loads (times from the run's start)", title_justify="left", box=box.SIMPLE_HEAD
    )
    placed = any(_place(load) is not None for load in run.loads)
    columns = ("model", "device") if placed else ("model",)
    for column in (*columns, "at", "seconds", "estimated", "measured", "peak", "unloaded"):
        table.add_column(column, justify="left" if column in columns else "right")
    for load in run.loads:
        where = (_place(load) or "-",) if placed else ()
        table.add_row(
            load.model,
            *where,
            f"{load.started_at - start:+.2f}s",
            f"{load.seconds:.2f}",
            _size(load.bytes_estimated),
            _size(load.bytes_measured),
            _size(load.bytes_peak),
            "-" if load.unloaded_at is None else f"{load.unloaded_at - start:+.2f}s",
        )
    return table


def _telemetry_table(calls: list[LoggedCall]) -> Table:
    table = Table(title="Telemetry", title_justify="left", box=box.SIMPLE_HEAD)
    placed = any(_place(call) is not None for call in calls)
    named = ("role", "model", "device") if placed else ("role", "model")
    for column in ("call", *named, "ok", "in", "out", "ttft s", "prefill/s", "decode/s"):
        table.add_column(column, justify="left" if column in named else "right")
    table.add_column("s", justify="right")
    for call in calls:
        where = (_place(call) or "-",) if placed else ()
        table.add_row(
            _position(call),
            call.role,
            call.model,
            *where,
            "yes" if call.ok else "no",
            str(call.tokens_in),
            str(call.tokens_out),
            _figure(call.ttft_s, 2),
            _figure(call.prefill_tok_s, 0),
            _figure(call.decode_tok_s, 0),
            f"{call.seconds:.2f}",
        )
    return table


def _local(iso: str, *, seconds: bool = True) -> str:
    """An ISO UTC time as local time, as people read it."""
    moment = datetime.fromisoformat(iso).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _figure(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _size(value: int | None) -> str:
    return "-" if value is None else format_bytes(value)


def _one_line(text: str | None) -> str:
    return "-" if text is None else " ".join(text.split())
