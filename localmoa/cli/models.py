"""``localmoa models``: every model localmoa knows (config and Ollama) and what each costs.

Configured models come first, each with the figure the planner would use and the estimate and
measurement behind it; then the models a local Ollama has that no config names, with Ollama's
defaults. A model that cannot be used is listed with why, not dropped: this is where a user
looks when a plan refuses it.
"""

from __future__ import annotations

from pathlib import Path

import click

from localmoa.backends import OllamaBackend, make_backends
from localmoa.backends.registry import backend_for
from localmoa.cli.options import config_option, json_option
from localmoa.cli.render import print_json, print_models, stdout
from localmoa.cli.reports import SOURCE_LABELS, ModelRow, ModelsReport
from localmoa.cli.session import find_config
from localmoa.cli.signals import arun, close_backends
from localmoa.config import OllamaModel, Settings
from localmoa.errors import UserError
from localmoa.footprint.estimate import Footprint

__all__ = ["list_models", "models_command"]


@click.command(name="models")
@config_option
@json_option
def models_command(config_path: Path | None, as_json: bool) -> None:
    """List every model localmoa knows (config and Ollama) and what each costs in memory."""
    report = arun(lambda: list_models(config_path))
    if as_json:
        print_json(report)
    else:
        print_models(stdout(), report)


async def list_models(config_path: Path | None) -> ModelsReport:
    """The configured models, then Ollama's others; reads headers and asks Ollama, loads none."""
    config, _ = find_config(config_path)
    backends = make_backends(config.settings if config else Settings())
    rows: list[ModelRow] = []
    notes: list[str] = []
    try:
        listed: set[str] = set()
        for name, model in (config.models if config else {}).items():
            try:
                backend = backend_for(backends, config.models if config else {}, name)
                row = _row(name, model.backend, await backend.footprint(name, model))
            except UserError as exc:
                row = ModelRow(
                    name=name,
                    backend=model.backend,
                    bytes=None,
                    source=None,
                    estimate_bytes=None,
                    measured_bytes=None,
                    error=str(exc),
                )
            if isinstance(model, OllamaModel):
                listed.add(model.model)
            rows.append(row)
        ollama = backends["ollama"]
        assert isinstance(ollama, OllamaBackend)
        try:
            installed = await ollama.installed()
        except UserError as exc:
            notes.append(f"Ollama: {exc}")
            installed = {}
        for tag, found in sorted(installed.items()):
            if tag in listed:
                continue
            default = OllamaModel(backend="ollama", model=tag)
            estimate = ollama.estimate(found, default)
            rows.append(
                _row(tag, "ollama (installed)", estimate, ollama.measurement(found, default))
            )
    finally:
        await close_backends(backends)
    return ModelsReport(models=rows, notes=notes)


def _row(name: str, backend: str, used: Footprint, measured: Footprint | None = None) -> ModelRow:
    """The planner's figure, and the estimate and measurement behind it where known."""
    source = SOURCE_LABELS[used.source] + (f" ({used.note})" if used.note else "")
    estimate = used.total if used.source in ("gguf", "ollama") else None
    measured_bytes = used.total if used.source == "measured" else None
    planned = used.total
    if measured is not None:  # a measurement overrides the estimate it was made for
        measured_bytes = planned = measured.total
        source = SOURCE_LABELS["measured"]
    return ModelRow(
        name=name,
        backend=backend,
        bytes=planned,
        source=source,
        estimate_bytes=estimate,
        measured_bytes=measured_bytes,
        error=None,
    )
