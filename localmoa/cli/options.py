"""The options several commands share, spelled once so they read the same everywhere."""

from __future__ import annotations

from pathlib import Path

import click

__all__ = ["budget_option", "config_option", "ensemble_option", "json_option"]

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="models.toml to use (default: ./models.toml, then the user config dir).",
)
ensemble_option = click.option(
    "--ensemble", "-e", default="default", show_default=True, help="Which [ensembles.NAME]."
)
budget_option = click.option(
    "--memory-budget",
    metavar="SIZE",
    help='Bytes models may hold at once, e.g. "12GiB"; "auto" detects (default: the config).',
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
