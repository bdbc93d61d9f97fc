"""The ``localmoa`` command: ``run`` a prompt through an ensemble, or show its ``plan``.

stdout carries only the answer (or JSON with ``--json``), so it can be piped; progress, layer
outputs and errors go to stderr. A user's mistake exits 2 with one line naming the culprit and
no traceback; a failed run exits 1; Ctrl-C exits 130 after every model is unloaded.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from localmoa.backends import default_backends
from localmoa.backends.base import ChatMessage
from localmoa.config import Config, load_config
from localmoa.ensemble import Prepared, prepare
from localmoa.errors import LocalMoaError, UserError
from localmoa.executor import CallFinished, CallPiece, Event, Executor, RunResult
from localmoa.sizes import format_bytes

__all__ = ["cli", "main"]


def _stderr() -> Console:
    return Console(stderr=True, highlight=False)


class _Group(click.Group):
    """Turns localmoa's errors into one line on stderr and the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LocalMoaError as exc:
            kind = "error" if isinstance(exc, UserError) else "run failed"
            _stderr().print(f"[bold red]localmoa: {kind}:[/] {escape(str(exc))}", soft_wrap=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            _stderr().print("localmoa: interrupted; every model was unloaded", markup=False)
            ctx.exit(130)


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="models.toml to use (default: ./models.toml, then the user config dir).",
)
_ensemble_option = click.option(
    "--ensemble", "-e", default="default", show_default=True, help="Which [ensembles.NAME]."
)
_budget_option = click.option(
    "--memory-budget",
    metavar="SIZE",
    help='Bytes models may hold at once, e.g. "12GiB"; "auto" detects (default: the config).',
)
_json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")


@click.group(cls=_Group)
@click.version_option(package_name="localmoa")
def cli() -> None:
    """Run a Mixture-of-Agents ensemble of local models, planned against your memory."""


@cli.command()
@click.argument("prompt", required=False)
@_config_option
@_ensemble_option
@_budget_option
@click.option("--show-layers", is_flag=True, help="Print every agent's response (on stderr).")
@_json_option
def run(
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
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    config = load_config(config_path)
    prepared = prepare(config, ensemble, memory_budget=memory_budget)
    result = asyncio.run(_run(config, prepared, prompt, show_layers=show_layers, quiet=as_json))
    if as_json:
        click.echo(json.dumps(_run_json(result)))


async def _run(
    config: Config, prepared: Prepared, prompt: str, *, show_layers: bool, quiet: bool
) -> RunResult:
    from localmoa.progress import Progress

    progress = Progress(
        _stderr(),
        show_layers=show_layers,
        n_waves=len(prepared.plan.waves),
        n_layers=len(prepared.stages) - 1,
    )
    streaming = False

    def on_event(event: Event) -> None:
        nonlocal streaming
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

    executor = Executor(
        config.models,
        default_backends(),
        max_parallel_calls=config.settings.max_parallel_calls,
        max_calls_per_second=config.settings.max_calls_per_second,
        on_event=on_event,
    )
    try:
        result = await executor.run(
            prepared.stages, prepared.plan, [ChatMessage(role="user", content=prompt)]
        )
    finally:
        progress.close()
        if streaming:
            sys.stdout.write("\n")
            sys.stdout.flush()
    failed = [c for c in result.calls if not c.ok]
    summary = (
        f"{len(result.calls)} calls ({len(failed)} failed), {result.loads} loads, "
        f"{result.seconds:.2f}s"
    )
    _stderr().print(summary, markup=False)
    return result


def _run_json(result: RunResult) -> dict[str, Any]:
    return {
        "answer": result.answer,
        "calls": [c.model_dump() for c in result.calls],
        "loads": result.loads,
        "seconds": round(result.seconds, 4),
        "plan": result.plan.model_dump(),
    }


@cli.command()
@_config_option
@_ensemble_option
@_budget_option
@_json_option
def plan(config_path: Path | None, ensemble: str, memory_budget: str | None, as_json: bool) -> None:
    """Show which models will be resident together, without loading anything."""
    config = load_config(config_path)
    prepared = prepare(config, ensemble, memory_budget=memory_budget)
    if as_json:
        out = prepared.plan.model_dump()
        out["models"] = {
            name: {"bytes": fp.total, "source": fp.source}
            for name, fp in prepared.footprints.items()
        }
        out["budget_source"] = prepared.budget.detail
        click.echo(json.dumps(out))
        return
    _print_plan(prepared)


def _print_plan(prepared: Prepared) -> None:
    console = Console(highlight=False)
    plan = prepared.plan
    models = Table(title="Models", title_justify="left")
    for column in ("model", "weights", "KV cache", "compute", "total", "from"):
        models.add_column(column, justify="left" if column in ("model", "from") else "right")
    for name, fp in prepared.footprints.items():
        parts = (
            ("-", "-", "-")
            if fp.source == "override"
            else (format_bytes(fp.weights), format_bytes(fp.kv_cache), format_bytes(fp.compute))
        )
        source = "memory override" if fp.source == "override" else "GGUF header"
        models.add_row(name, *parts, format_bytes(fp.total), source)
    console.print(models)
    waves = Table(title=f'Plan for ensemble "{prepared.ensemble}"', title_justify="left")
    for column in ("wave", "layer", "unload", "load", "resident", "runs", "bytes"):
        waves.add_column(column, justify="right" if column in ("wave", "bytes") else "left")
    n_layers = len(prepared.stages) - 1
    for i, wave in enumerate(plan.waves, start=1):
        layer = "aggregator" if wave.layer == n_layers + 1 else str(wave.layer)
        waves.add_row(
            str(i),
            layer,
            ", ".join(wave.unload) or "-",
            ", ".join(wave.load) or "-",
            ", ".join(wave.resident),
            ", ".join(wave.runs),
            format_bytes(wave.bytes),
        )
    console.print(waves)
    proof = "optimal" if plan.optimal else "heuristic: at most one load per call"
    console.print(
        f"loads: {plan.loads} (lower bound {plan.lower_bound}; {proof}), "
        f"{format_bytes(plan.bytes_loaded)} read\n"
        f"budget: {format_bytes(plan.budget_bytes)} ({prepared.budget.detail})",
        markup=False,
    )


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
