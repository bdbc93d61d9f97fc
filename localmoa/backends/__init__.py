"""Backends: the runtimes localmoa drives through one seam (see :mod:`localmoa.backends.base`)."""

from __future__ import annotations

from localmoa.backends.base import Backend, ChatDelta, ChatMessage, ChatRequest
from localmoa.backends.fake import FakeBackend
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.backends.ollama import OllamaBackend
from localmoa.backends.openai import OpenAIBackend
from localmoa.config import Settings

__all__ = [
    "Backend",
    "ChatDelta",
    "ChatMessage",
    "ChatRequest",
    "FakeBackend",
    "LlamaCppBackend",
    "OllamaBackend",
    "OpenAIBackend",
    "make_backends",
]


def make_backends(settings: Settings) -> dict[str, Backend]:
    """One instance of every backend, keyed by the ``backend`` value of models.toml.

    Constructing them opens nothing: network backends connect on first use, after the egress
    check (localmoa.egress).
    """
    return {
        "llamacpp": LlamaCppBackend(),
        "ollama": OllamaBackend.from_settings(settings),
        "openai": OpenAIBackend(allowed_hosts=settings.allowed_hosts),
        "fake": FakeBackend(),
    }
