"""Every error localmoa raises, as one tree.

    LocalMoaError
    ├── UserError                 exit 2: the user can fix it; shown as one line, no traceback
    │   ├── ConfigError           models.toml malformed or inconsistent
    │   │   └── ConfigNotFoundError   no models.toml anywhere (and no Ollama to build one from)
    │   ├── ModelFileError        a GGUF file is missing, unreadable or corrupt
    │   ├── BudgetError           a bad memory budget, or a model that cannot fit in it
    │   ├── EgressError           a URL off this machine that settings.allowed_hosts does not list
    │   ├── ServerUnavailableError  Ollama or an OpenAI-compatible server does not answer
    │   ├── ModelNotInstalledError  Ollama does not have the model (localmoa never pulls)
    │   ├── PromptTooLongError    the prompt cannot fit the context (n_ctx) of the models
    │   ├── AddressInUseError     ``serve``'s host:port is taken by another program
    │   ├── MissingExtraError     an optional extra (e.g. ``plot``) this command needs is missing
    │   ├── StoreError            the run log cannot be opened, read or written
    │   └── UsageRefused          a request localmoa will not carry out as asked (unsafe)
    └── RunError                  exit 1: something failed while the ensemble ran
        ├── BackendError          a backend could not load a model or answer a call
        │   └── DeviceLost        the device or cluster node a model was on is gone
        └── LayerFailedError      every agent of a layer failed, so nothing can be passed on

Messages name the thing (file, key path, model), say what is wrong, and say what to do next.
Foreign exceptions (llama.cpp, gguf, tomllib, pydantic) are translated at the boundary where they
occur, with ``raise ... from exc`` so ``--debug`` users still see the cause.
"""

from __future__ import annotations

__all__ = [
    "AddressInUseError",
    "BackendError",
    "BudgetError",
    "ConfigError",
    "ConfigNotFoundError",
    "DeviceLost",
    "EgressError",
    "LayerFailedError",
    "LocalMoaError",
    "MissingExtraError",
    "ModelFileError",
    "ModelNotInstalledError",
    "PromptTooLongError",
    "RunError",
    "ServerUnavailableError",
    "StoreError",
    "UsageRefused",
    "UserError",
]


class LocalMoaError(Exception):
    """Base of every error localmoa raises on purpose."""

    exit_code = 1


class UserError(LocalMoaError):
    """A mistake in what the user gave us: config, files, flags."""

    exit_code = 2


class ConfigError(UserError):
    """models.toml is missing, is not valid TOML, or does not match the schema."""


class ConfigNotFoundError(ConfigError):
    """No models.toml where localmoa looks; ``run`` and ``plan`` then try Ollama."""


class ModelFileError(UserError):
    """A model file is missing, unreadable, or not a usable GGUF file."""


class BudgetError(UserError):
    """The memory budget is malformed, or a model alone does not fit in it."""


class EgressError(UserError):
    """A network backend would reach a host that is neither loopback nor allowed."""


class ServerUnavailableError(UserError):
    """A model server (Ollama, an OpenAI-compatible server) cannot be reached."""


class ModelNotInstalledError(UserError):
    """Ollama does not have the model; the message gives the ``ollama pull`` to run."""


class PromptTooLongError(UserError):
    """The prompt is longer than the context of the models that must read it: found before
    anything loads (or before a server request runs), with the n_ctx to raise."""


class AddressInUseError(UserError):
    """``localmoa serve`` cannot listen: another program holds the host and port."""


class MissingExtraError(UserError):
    """An optional extra a command needs is not installed (the message names the pip line)."""


class StoreError(UserError):
    """The run log cannot be opened, read or written (corrupt, read-only, locked)."""


class UsageRefused(UserError):
    """Something unsafe was asked, e.g. serving beyond loopback without an API key."""


class RunError(LocalMoaError):
    """The run could not complete."""


class BackendError(RunError):
    """A backend failed to load a model or to answer a call."""

    def __init__(self, model: str, message: str) -> None:
        super().__init__(f'model "{model}": {message}')
        self.model = model


class DeviceLost(BackendError):
    """The device (or cluster node) a model was placed on is gone: its calls fail, and the rest
    of the run is planned again on the devices that remain."""

    def __init__(self, model: str, devices: list[str], message: str) -> None:
        super().__init__(model, message)
        self.devices = devices


class LayerFailedError(RunError):
    """No agent of a layer produced a usable answer, so the next layer has nothing to read."""
