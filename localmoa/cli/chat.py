"""``localmoa chat``: an interactive multi-turn session (being built: see issue 12)."""

from __future__ import annotations

import click

__all__ = ["chat_command"]


@click.command(name="chat")
def chat_command() -> None:
    """Chat with an ensemble, turn by turn (being built)."""
