"""The one seam between the executor and a model runtime.

A backend does four things: load a model, unload it, stream a chat answer from a loaded model,
and say how many bytes a loaded model really holds. Residency is the executor's decision, taken
from the plan; a backend never loads or evicts on its own. Each backend translates its library's
exceptions into :class:`~localmoa.errors.BackendError` at this boundary.

Calls to one model are serialized by the executor, so a backend may assume one call per model at
a time (a llama.cpp context is not thread-safe).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, Field

from localmoa.footprint.estimate import Footprint

__all__ = ["Backend", "ChatDelta", "ChatMessage", "ChatRequest"]

log = logging.getLogger(__name__)


class ChatMessage(BaseModel):
    """One turn of a conversation, in the OpenAI chat shape every runtime accepts."""

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """What an agent sends to its model."""

    messages: list[ChatMessage]
    temperature: float = Field(ge=0.0, le=2.0)
    max_tokens: int = Field(gt=0)


class ChatDelta(NamedTuple):
    """A piece of a streamed answer and the tokens it took.

    Text and tokens do not align one to one: a runtime may hold back a token that ends inside a
    UTF-8 character (``tokens`` > 1 on the next piece), or end on tokens with no text
    (``text`` = "").
    """

    text: str
    tokens: int = 1
    prompt_tokens: int = 0
    """Set on the last delta when the runtime counts the prompt (for usage reports)."""


class Backend(ABC):
    """Load, unload, chat (streamed), memory (predicted and resident): all localmoa needs."""

    measures_footprint: bool = False
    """True when ``resident_bytes`` is the model's whole footprint (Ollama's /api/ps size), so
    the executor may re-plan with it; llama.cpp's logged buffers miss ggml's work buffer."""

    @abstractmethod
    async def footprint(self, name: str, config: Any) -> Footprint:
        """What model ``name`` will hold once loaded, known before loading it: the config's
        ``memory`` override, else a measurement or an estimate. Raises UserError subclasses
        for what makes the model unusable (missing file, model not installed, server down)."""

    @abstractmethod
    async def load(self, name: str, config: Any) -> None:
        """Make model ``name`` (its models.toml entry ``config``) resident."""

    @abstractmethod
    async def unload(self, name: str) -> None:
        """Free model ``name``; when this returns its memory is released."""

    @abstractmethod
    def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """Stream the answer of loaded model ``name``.

        Closing the iterator early (a cancelled run) must stop generation within a token.
        """

    @abstractmethod
    def resident_bytes(self, name: str) -> int | None:
        """Measured bytes model ``name`` holds while loaded; None when not measurable."""

    async def aclose(self) -> list[str]:
        """Unload everything still loaded, and return the names of the models it unloaded.

        Called on every exit path, signals included, so every model is tried even when one
        fails: a failure is logged with its reason and the model left out of the list, which is
        what the CLI reports as unloaded (never more than was).
        """
        unloaded: list[str] = []
        for name in list(self.loaded()):
            try:
                await self.unload(name)
            except Exception as exc:  # any backend's failure; the next model is still tried
                reason = str(exc) if f'"{name}"' in str(exc) else f'model "{name}": {exc}'
                log.warning("could not unload %s", reason)
            else:
                unloaded.append(name)
        return unloaded

    @abstractmethod
    def loaded(self) -> list[str]:
        """Names of the models this backend holds now."""
