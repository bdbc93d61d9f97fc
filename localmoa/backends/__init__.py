"""Backends: the runtimes localmoa drives through one seam (see :mod:`localmoa.backends.base`),
listed once in :mod:`localmoa.backends.registry`."""

from __future__ import annotations

from localmoa.backends.base import (
    REQUEST_OPTIONS,
    Backend,
    ChatDelta,
    ChatMessage,
    ChatRequest,
    ResponseFormat,
)
from localmoa.backends.fake import FakeBackend
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.backends.ollama import OllamaBackend
from localmoa.backends.openai import OpenAIBackend
from localmoa.backends.registry import (
    REGISTRY,
    TIMED_BACKENDS,
    BackendKind,
    Backends,
    backend_for,
    make_backends,
)

__all__ = [
    "REGISTRY",
    "REQUEST_OPTIONS",
    "TIMED_BACKENDS",
    "Backend",
    "BackendKind",
    "Backends",
    "ChatDelta",
    "ChatMessage",
    "ChatRequest",
    "FakeBackend",
    "LlamaCppBackend",
    "OllamaBackend",
    "OpenAIBackend",
    "ResponseFormat",
    "backend_for",
    "make_backends",
]
