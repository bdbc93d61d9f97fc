"""Backends: the runtimes localmoa drives through one seam (see :mod:`localmoa.backends.base`)."""

from __future__ import annotations

from localmoa.backends.base import Backend, ChatMessage, ChatRequest
from localmoa.backends.fake import FakeBackend
from localmoa.backends.llamacpp import LlamaCppBackend

__all__ = [
    "Backend",
    "ChatMessage",
    "ChatRequest",
    "FakeBackend",
    "LlamaCppBackend",
    "default_backends",
]


def default_backends() -> dict[str, Backend]:
    """One instance of every backend, keyed by the ``backend`` value of models.toml."""
    return {"llamacpp": LlamaCppBackend(), "fake": FakeBackend()}
