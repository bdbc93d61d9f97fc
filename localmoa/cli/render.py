"""How the CLI's results look: ``--json`` and the tables, both from the report models.

A command builds one report (localmoa.cli.reports) and hands it here: with ``--json`` it is
dumped as is, otherwise printed as rich tables read from the same fields, so the table and the
JSON of one run always agree. Progress during a run is localmoa.cli.progress's; this module draws
what is left when it is done.
"""

from __future__ import annotations

import json
from collections import Counter
from statistics import median

import click
from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

from localmoa.cli.reports import SOURCE_LABELS, ModelsReport, PlanReport, RunReport
from localmoa.planning.fewest_loads import Wave
from localmoa.sizes import format_bytes

__all__ = ["print_json", "print_models", "print_plan", "run_summary", "stderr", "stdout"]


def stderr() -> Console:
    """Where progress, warnings and errors go: stdout carries only the answer or the JSON."""
    return Console(stderr=True, highlight=False)


def stdout() -> Console:
    return Console(highlight=False)


def print_json(report: BaseModel) -> None:
    """The report as one line of JSON on stdout: exactly its ``model_dump(mode="json")``."""
    click.echo(json.dumps(report.model_dump(mode="json")))


def print_plan(console: Console, report: PlanReport) -> None:
    """The models table, the waves table and the plan's figures."""
    if report.zero_config is not None:
        console.print("No models.toml found: an ensemble was built from Ollama's models.")
        for reason in report.zero_config:
            console.print(f"  {reason}", markup=False)
    models = Table(title="Models", title_justify="left")
    for column in ("model", "weights", "KV cache", "compute", "total", "from"):
        models.add_column(column, justify="left" if column in ("model", "from") else "right")
    for name, cost in report.models.items():
        parts = report.footprints[name]
        figures = (
            (format_bytes(parts.weights), format_bytes(parts.kv_cache), format_bytes(parts.compute))
            if parts.kv_cache or parts.compute
            else ("-", "-", "-")
        )
        models.add_row(
            name, *figures, format_bytes(cost.bytes), SOURCE_LABELS.get(cost.source, cost.source)
        )
    console.print(models)
    waves = Table(title=f'Plan for ensemble "{report.ensemble}"', title_justify="left")
    for column in ("wave", "stage", "unload", "load", "resident", "runs", "bytes"):
        waves.add_column(column, justify="right" if column in ("wave", "bytes") else "left")
    labels = {row.stage: row.label + (" *" if row.conditional else "") for row in report.stages}
    for i, wave in enumerate(report.waves, start=1):
        waves.add_row(
            str(i),
            labels.get(wave.layer, str(wave.layer)),
            ", ".join(wave.unload) or "-",
            ", ".join(wave.load) or "-",
            _resident(wave, several=len(report.devices) > 1),
            _calls(wave.runs),
            format_bytes(wave.bytes),
        )
    console.print(waves)
    if report.roles is not None:
        console.print("Roles (cached), by proposer position:", markup=False)
        for slot, role in enumerate(report.roles, start=1):
            console.print(f"  {slot}. {role}", markup=False)
    elif any(row.role == "roles" for row in report.stages):
        console.print(
            "Roles: not cached yet; the roles call writes them first and caches them.",
            markup=False,
        )
    if any(row.conditional for row in report.stages):
        console.print(
            "* only when no judge before it stops early; a model only such stages need is "
            "loaded only then.",
            markup=False,
        )
    if report.fewest_loads is not None:
        proof = f"the planner's fewest is {report.fewest_loads}; more are estimated faster"
    else:
        proof = "optimal" if report.optimal else "heuristic: at most one load per call"
    timed = (
        f"\nestimated {report.estimated_seconds:.1f}s with {report.timed_for} speeds, every call "
        "writing max_tokens"
        if report.estimated_seconds is not None
        else ""
    )
    console.print(
        f"loads: {report.loads} (lower bound {report.lower_bound}; {proof}), "
        f"{format_bytes(report.bytes_loaded)} read\n"
        f"budget: {format_bytes(report.budget_bytes)} ({report.budget_source}){timed}",
        markup=False,
    )
    for note in report.notes:
        warning(note)


def _resident(wave: Wave, *, several: bool) -> str:
    """A wave's resident models; on several devices, by device ("gpu0: a, b · gpu1: c"), a
    split model with its share on each."""
    if not several:
        return ", ".join(wave.resident)

    def named(model: str, device: str) -> str:
        share = wave.shares.get(model, {}).get(device)
        return model if share is None else f"{model} ({format_bytes(share)})"

    return " · ".join(
        f"{device}: {', '.join(named(m, device) for m in models)}"
        for device, models in wave.devices.items()
    )


def _calls(runs: list[str]) -> str:
    """A wave's calls by model, repeats counted ("a ×16, b ×16": a batch's prompts, samples)."""
    counted = Counter(runs)
    return ", ".join(name if n == 1 else f"{name} ×{n}" for name, n in counted.items())


def print_models(console: Console, report: ModelsReport) -> None:
    """One row per model: its estimate, its measurement and the figure the planner uses."""
    table = Table(title="Models", title_justify="left")
    for column in ("model", "backend", "estimate", "measured", "planner uses", "source"):
        table.add_column(column, justify="right" if column in ("estimate", "measured") else "left")
    for row in report.models:
        if row.error is not None:
            table.add_row(row.name, row.backend, "-", "-", "-", f"unusable: {row.error}")
            continue
        table.add_row(
            row.name,
            row.backend,
            _size(row.estimate_bytes),
            _size(row.measured_bytes),
            _size(row.bytes),
            row.source or "-",
        )
    console.print(table)
    for note in report.notes:
        console.print(note, markup=False)


def warning(line: str) -> None:
    """A warning as one line on stderr, never wrapped (so a path in it can be copied)."""
    stderr().print(f"localmoa: warning: {line}", markup=False, soft_wrap=True)


def run_summary(report: RunReport) -> str:
    """The line ``run`` ends with on stderr: calls, failures, loads (with the seconds they
    took, when those round to something), re-plans, then where the time went, short: the median
    time to first token and decode rate of the calls that answered (each call's figures are in
    ``run --json``), and the run's seconds. E.g. ``7 calls (0 failed), 3 loads (2.1s), ttft
    0.12s median, decode 41 tok/s median, 3.40s``."""
    failed = sum(not call.ok for call in report.calls)
    loads = f"{report.loads} loads"
    if report.loads and report.load_seconds >= 0.05:
        loads += f" ({report.load_seconds:.1f}s)"
    parts = [f"{len(report.calls)} calls ({failed} failed)", loads]
    if report.replans:
        parts.append(f"re-planned {report.replans}x mid-run")
    ttfts = [c.ttft_s for c in report.calls if c.ok and c.ttft_s is not None]
    if ttfts:
        parts.append(f"ttft {median(ttfts):.2f}s median")
    rates = [c.decode_tok_s for c in report.calls if c.ok and c.decode_tok_s is not None]
    if rates:
        rate = median(rates)
        shown = f"{rate:.0f}" if rate >= 10 else f"{rate:.1f}"
        parts.append(f"decode {shown} tok/s median")
    parts.append(f"{report.seconds:.2f}s")
    return ", ".join(parts)


def _size(value: int | None) -> str:
    return "-" if value is None else format_bytes(value)
