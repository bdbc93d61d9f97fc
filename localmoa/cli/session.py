"""What every command starts from: a config (from models.toml, or built from Ollama's models when
there is none) and the backends that serve it, closed on every exit; and the one place the CLI
asks the planner for a run.

With no models.toml anywhere, ``run``, ``plan`` and ``serve`` build an ensemble from the models a
local Ollama has (localmoa.zeroconfig); ``models`` lists what Ollama has instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from localmoa.backends import OllamaBackend, make_backends
from localmoa.backends.base import Backend
from localmoa.cli.signals import close_backends
from localmoa.config import Config, Settings, load_config
from localmoa.errors import ConfigNotFoundError
from localmoa.hardware import resolve_budget
from localmoa.runtime.prepare import Prepared, prepare

__all__ = ["Session", "find_config", "open_session", "plan_run"]


@dataclass
class Session:
    """A config (from a file, or built from Ollama) and the backends that serve it."""

    config: Config
    backends: dict[str, Backend]
    reasons: list[str]
    """With no models.toml: how the ensemble was built from Ollama, one line per choice."""


def find_config(config_path: Path | None) -> tuple[Config | None, ConfigNotFoundError | None]:
    """The config, or (None, why) when none was named and none exists; a named file that is
    missing stays an error."""
    try:
        return load_config(config_path), None
    except ConfigNotFoundError as exc:
        if config_path is not None:
            raise
        return None, exc


@asynccontextmanager
async def open_session(
    config_path: Path | None, memory_budget: str | None
) -> AsyncIterator[Session]:
    """Open the backends for the config (or zero-config) and close them on every exit."""
    config, missing = find_config(config_path)
    backends = make_backends(config.settings if config else Settings())
    try:
        reasons: list[str] = []
        if config is None:
            from localmoa.zeroconfig import from_ollama

            assert missing is not None
            ollama = backends["ollama"]
            assert isinstance(ollama, OllamaBackend)
            budget = resolve_budget(memory_budget, "auto")
            built = await from_ollama(ollama, budget, Settings(), missing)
            config, reasons = built.config, built.reasons
        yield Session(config, backends, reasons)
    finally:
        await close_backends(backends)


async def plan_run(
    session: Session, ensemble: str, memory_budget: str | None, prompt: str | None = None
) -> Prepared:
    """The ensemble's calls, footprints, budget and plan: ``run`` and ``plan`` both ask here, so
    they cannot plan differently. ``prompt``, when known, is checked against every stage's
    context before anything loads."""
    return await prepare(
        session.config, ensemble, session.backends, memory_budget=memory_budget, prompt=prompt
    )
