"""``localmoa eval``: does the ensemble beat its best member on this machine? (being built)"""

from __future__ import annotations

import click

__all__ = ["eval_command"]


@click.command(name="eval")
def eval_command() -> None:
    """Score the ensemble and each of its models on a question set."""
    raise click.UsageError("not built yet")
