"""``localmoa logs``: the run log (being built: see issue 12)."""

from __future__ import annotations

import click

__all__ = ["logs_command"]


@click.group(name="logs", invoke_without_command=True)
def logs_command() -> None:
    """List recorded runs (being built)."""
