"""The ``localmoa`` command: ``run`` a prompt, show its ``plan``, list the ``models``, ``serve``,
``init`` a models.toml, ``chat``, read the ``logs``, answer a file of prompts (``batch``) and
``eval`` the ensemble against its members.

One module per command; what they share is named for what it is:
session (the config and backends a command opens, the one call into the planner), signals
(stop, unload, say what was unloaded), reports (the pydantic models every ``--json`` dumps),
render (tables from those reports), options, progress.

stdout carries only the answer (or JSON with ``--json``), so it can be piped; progress, layer
outputs, warnings and errors go to stderr. A user's mistake exits 2 with one line naming the
culprit and no traceback; a failed run exits 1; a signal exits as localmoa.cli.signals says.
"""

from __future__ import annotations

import logging
from typing import Any

import click
from rich.logging import RichHandler
from rich.markup import escape

from localmoa.cli.batch import batch_command
from localmoa.cli.chat import chat_command
from localmoa.cli.eval import eval_command
from localmoa.cli.init import init_command
from localmoa.cli.logs import logs_command
from localmoa.cli.models import models_command
from localmoa.cli.plan import plan_command
from localmoa.cli.render import stderr
from localmoa.cli.run import run_command
from localmoa.cli.serve import serve_command
from localmoa.cli.signals import Stopped
from localmoa.errors import LocalMoaError, UserError
from localmoa.hardware import pin_cuda_order

__all__ = ["cli", "main"]


class _Group(click.Group):
    """Turns localmoa's errors into one line on stderr and the right exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LocalMoaError as exc:
            kind = "error" if isinstance(exc, UserError) else "run failed"
            stderr().print(f"[bold red]localmoa: {kind}:[/] {escape(str(exc))}", soft_wrap=True)
            ctx.exit(exc.exit_code)
        except Stopped as stopped:
            stderr().print(f"localmoa: {stopped}", markup=False)
            ctx.exit(stopped.exit_code)
        except KeyboardInterrupt:  # before or after the event loop: nothing was loaded
            stderr().print("localmoa: interrupted", markup=False)
            ctx.exit(130)


@click.group(cls=_Group)
@click.version_option(package_name="localmoa")
def cli() -> None:
    """Run a Mixture-of-Agents ensemble of local models, planned against your memory."""
    # GPUs numbered as NVML and nvidia-smi number them, before llama.cpp first asks CUDA: the
    # devices a plan names are the ones llama.cpp's main_gpu picks (localmoa.hardware).
    pin_cuda_order()
    handler = RichHandler(console=stderr(), show_time=False, show_path=False)
    logging.getLogger("localmoa").addHandler(handler)
    logging.getLogger("localmoa").setLevel(logging.WARNING)


cli.add_command(run_command)
cli.add_command(plan_command)
cli.add_command(models_command)
cli.add_command(serve_command)
cli.add_command(init_command)
cli.add_command(logs_command)
cli.add_command(chat_command)
cli.add_command(batch_command)
cli.add_command(eval_command)


def main() -> None:
    """Console-script entry point."""
    cli()
