"""The one list of backends: each ``backend = "..."`` tag, its table, how to make it, what it costs.

Everything else that depends on which backends exist is derived from :data:`REGISTRY`: the
tagged union of ``[models.NAME]`` tables and the backends named in its error messages
(:mod:`localmoa.config`), the backends whose loads the cost model times (:data:`TIMED_BACKENDS`),
and the backend instances of a session (:func:`make_backends`). Adding a backend is one entry
here, its table in :mod:`localmoa.backends.configs`, and its module.

Why the tables are not in :mod:`localmoa.config`: config derives its union from this registry,
so this module must import without it. The tables live in ``backends.configs``, which needs only
pydantic; ``Settings`` is read here only in annotations, and nothing under ``localmoa.backends``
imports ``localmoa.config`` at run time, so the import graph has no cycle.

Optional runtimes: a backend may need a library that ``pip install localmoa`` does not install
(llama.cpp, the ``llamacpp`` extra, because compiling it takes minutes and an Ollama-only user
never needs it). Such a backend is made only when a model uses it, and making it imports the
library; when it is missing, the user gets one line (exit 2) naming the ``pip install`` that adds
it, never an ImportError.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from localmoa.backends.base import Backend
from localmoa.backends.configs import (
    FakeModel,
    LlamaCppModel,
    ModelTable,
    OllamaModel,
    OpenAIModel,
)
from localmoa.backends.fake import FakeBackend
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.backends.ollama import OllamaBackend
from localmoa.backends.openai import OpenAIBackend
from localmoa.errors import ConfigError

if TYPE_CHECKING:
    from localmoa.config import Settings

__all__ = [
    "NAMES",
    "REGISTRY",
    "TIMED_BACKENDS",
    "BackendKind",
    "Backends",
    "backend_for",
    "kind",
    "make_backends",
]


@dataclass(frozen=True)
class BackendKind:
    """One backend as models.toml names it."""

    name: str
    """The ``backend = "..."`` tag of its ``[models.NAME]`` tables."""
    table: type[ModelTable]
    """The schema of those tables."""
    make: Callable[[Settings], Backend]
    """Its instance for a session; called only when a model of this kind is used."""
    timed: bool
    """True when the cost model knows its load and token times (localmoa.planning.timing), so a
    plan of such models can be refined for time; servers that load their own models are not."""
    runtime: str | None = None
    """The module of an optional runtime library it needs (imported when it is made)."""
    package: str | None = None
    """That library's name on PyPI, for messages."""
    extra: str | None = None
    """The localmoa extra that installs that library: ``pip install 'localmoa[EXTRA]'``."""

    def install_line(self) -> str | None:
        return f"pip install 'localmoa[{self.extra}]'" if self.extra else None

    def check_runtime(self, model: str | None = None) -> None:
        """Import the optional runtime; ConfigError (exit 2) naming the extra when it is
        missing or broken. ``model`` names the models.toml table that asked for it."""
        if self.runtime is None:
            return
        who = f'backend "{self.name}"'
        if model:
            who = f"models.{model} uses {who}, which"
        try:
            importlib.import_module(self.runtime)
        except ModuleNotFoundError as exc:
            if exc.name != self.runtime:
                raise self._broken(who, exc) from None
            raise ConfigError(
                f"{who} needs {self.package}, which is not installed; install it with: "
                f"{self.install_line()}"
            ) from None
        except (ImportError, OSError, RuntimeError) as exc:  # a library that will not load
            raise self._broken(who, exc) from None

    def _broken(self, who: str, exc: BaseException) -> ConfigError:
        return ConfigError(
            f"{who} needs {self.package}, which is installed but cannot be imported ({exc}); "
            f"reinstall it with: {self.install_line()} --force-reinstall"
        )


def _llamacpp(settings: Settings) -> Backend:
    if settings.cluster.engine == "ray":
        # Checked before Ray is imported: a missing Ray, an address not allowed or no token
        # authentication is one line naming the key (localmoa.cluster.checks).
        from localmoa.cluster.checks import check_cluster

        check_cluster(settings)
        from localmoa.cluster.backend import RayLlamaCppBackend

        return RayLlamaCppBackend(settings)
    return LlamaCppBackend()


def _ollama(settings: Settings) -> Backend:
    return OllamaBackend.from_settings(settings)


def _openai(settings: Settings) -> Backend:
    return OpenAIBackend(allowed_hosts=settings.allowed_hosts)


def _fake(settings: Settings) -> Backend:
    return FakeBackend()


REGISTRY: tuple[BackendKind, ...] = (
    BackendKind(
        "llamacpp",
        LlamaCppModel,
        _llamacpp,
        timed=True,
        runtime="llama_cpp",
        package="llama-cpp-python",
        extra="llamacpp",
    ),
    BackendKind("ollama", OllamaModel, _ollama, timed=True),
    BackendKind("openai", OpenAIModel, _openai, timed=False),
    BackendKind("fake", FakeModel, _fake, timed=False),
)
"""Every backend, in the order messages list them."""

NAMES: tuple[str, ...] = tuple(k.name for k in REGISTRY)
"""The ``backend`` values models.toml accepts."""

TIMED_BACKENDS: frozenset[str] = frozenset(k.name for k in REGISTRY if k.timed)
"""Backends whose loads and calls the cost model can time (see :attr:`BackendKind.timed`)."""

_BY_NAME = {k.name: k for k in REGISTRY}


def kind(name: str) -> BackendKind:
    """The registry entry of backend ``name``; KeyError naming the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f'no backend "{name}" (known: {", ".join(NAMES)})') from None


class Backends(dict[str, Backend]):
    """A session's backends, one instance per kind, each made the first time it is asked for.

    A dict that fills itself, like ``collections.defaultdict``: ``backends["ollama"]`` makes the
    Ollama backend if it is not there yet, while iterating (to close them all, say) sees only the
    ones made, so an Ollama-only session never imports llama.cpp nor builds a client it does not
    use. Constructing a backend opens nothing: network backends connect on first use, after the
    egress check (localmoa.egress).
    """

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings

    def __missing__(self, name: str) -> Backend:
        entry = kind(name)
        entry.check_runtime()
        backend = entry.make(self.settings)
        self[name] = backend
        return backend


def make_backends(settings: Settings) -> Backends:
    """The backends of a session with ``settings``, made as models use them."""
    return Backends(settings)


def backend_for(
    backends: Mapping[str, Backend], models: Mapping[str, ModelTable], name: str
) -> Backend:
    """The backend that serves model ``name`` (its ``backend`` tag looked up in ``backends``).

    The one way to go from a model to its backend. When the backend needs an optional runtime
    that is missing, the ConfigError names this model's table and the extra to install.
    """
    tag = models[name].backend
    if tag not in backends and tag in _BY_NAME:
        _BY_NAME[tag].check_runtime(name)
    return backends[tag]
