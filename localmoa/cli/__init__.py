"""The ``localmoa`` command: ``run``, ``plan``, ``models`` and ``serve``."""

from localmoa.cli.commands import cli, main

__all__ = ["cli", "main"]
