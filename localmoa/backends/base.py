"""The one seam between the executor and a model runtime.

A backend does four things: load a model, unload it, stream a chat answer from a loaded model,
and say how many bytes a loaded model really holds. Residency is the executor's decision, taken
from the plan; a backend never loads or evicts on its own. Each backend translates its library's
exceptions into :class:`~localmoa.errors.BackendError` at this boundary.

Calls to one model are serialized by the executor, so a backend may assume one call per model at
a time (a llama.cpp context is not thread-safe).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = ["Backend", "ChatMessage", "ChatRequest"]


class ChatMessage(BaseModel):
    """One turn of a conversation, in the OpenAI chat shape every runtime accepts."""

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """What an agent sends to its model."""

    messages: list[ChatMessage]
    temperature: float = Field(ge=0.0, le=2.0)
    max_tokens: int = Field(gt=0)


class Backend(ABC):
    """Load, unload, chat (streamed), resident memory: everything localmoa needs of a runtime."""

    @abstractmethod
    async def load(self, name: str, config: Any) -> None:
        """Make model ``name`` (its models.toml entry ``config``) resident."""

    @abstractmethod
    async def unload(self, name: str) -> None:
        """Free model ``name``; when this returns its memory is released."""

    @abstractmethod
    def chat(self, name: str, request: ChatRequest) -> AsyncIterator[str]:
        """Stream the answer of loaded model ``name`` as text pieces, one per token.

        Closing the iterator early (a cancelled run) must stop generation promptly.
        """

    @abstractmethod
    def resident_bytes(self, name: str) -> int | None:
        """Measured bytes model ``name`` holds while loaded; None when not measurable."""

    async def aclose(self) -> None:
        """Unload everything still loaded. The executor calls it on every exit path."""
        for name in list(self.loaded()):
            await self.unload(name)

    @abstractmethod
    def loaded(self) -> list[str]:
        """Names of the models this backend holds now."""
