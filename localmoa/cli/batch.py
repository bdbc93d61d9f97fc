"""``localmoa batch``: many prompts planned together (being built)."""

from __future__ import annotations

import click

__all__ = ["batch_command"]


@click.command(name="batch")
def batch_command() -> None:
    """Answer every prompt of a JSONL file into another, planned together."""
    raise click.UsageError("not built yet")
