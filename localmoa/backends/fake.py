"""A backend with no runtime behind it, shipped so users and tests share one fake.

Like httpx's MockTransport: replies come from each model's ``reply`` template (or a ``script``
callable given in code), loads and tokens take the configured time, and everything that happens
is recorded in :attr:`FakeBackend.events`. It also keeps the books a real device would: resident
bytes, their peak, and an optional ``capacity`` beyond which a load fails as out of memory, so
tests can prove the executor never exceeds its plan.

Of a request's options it honours ``stop`` as a runtime does (the reply ends before the first
stop string) and records ``seed`` and ``response_format`` with the request
(:attr:`FakeBackend.requests`) without acting on them: a scripted reply is the same whatever the
seed, and it is JSON only if the script or template writes JSON.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from localmoa.backends.base import REQUEST_OPTIONS, Backend, ChatDelta, ChatRequest
from localmoa.backends.configs import FakeModel
from localmoa.errors import BackendError
from localmoa.footprint.estimate import Footprint

__all__ = ["FakeBackend"]

Script = Callable[[str, ChatRequest], str]


class FakeBackend(Backend):
    """Scripted replies, recorded events, real memory bookkeeping."""

    supports = frozenset(REQUEST_OPTIONS)

    def __init__(self, *, script: Script | None = None, capacity: int | None = None) -> None:
        self.script = script
        self.capacity = capacity
        self.events: list[tuple[str, str]] = []
        """("load" | "unload" | "chat", model) in the order they happened."""
        self.requests: list[tuple[str, ChatRequest]] = []
        self.resident: dict[str, int] = {}
        self.peak_bytes = 0
        self._configs: dict[str, FakeModel] = {}

    async def footprint(self, name: str, config: Any) -> Footprint:
        return Footprint.override(int(config.memory))

    async def load(self, name: str, config: Any) -> None:
        if not isinstance(config, FakeModel):
            raise TypeError(f"FakeBackend cannot load {type(config).__name__}")
        if name in self.resident:
            raise BackendError(name, "loaded twice: the plan should never do this")
        size = int(config.memory)
        if self.capacity is not None and sum(self.resident.values()) + size > self.capacity:
            raise BackendError(name, "out of memory: the device capacity would be exceeded")
        if config.load_seconds:
            await asyncio.sleep(config.load_seconds)
        self.resident[name] = size
        self._configs[name] = config
        self.peak_bytes = max(self.peak_bytes, sum(self.resident.values()))
        self.events.append(("load", name))

    async def unload(self, name: str) -> None:
        if self.resident.pop(name, None) is None:
            raise BackendError(name, "unloaded while not loaded")
        self._configs.pop(name)
        self.events.append(("unload", name))

    async def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        config = self._configs.get(name)
        if config is None:
            raise BackendError(name, "called while not loaded: the plan should never do this")
        self.refuse_unsupported(name, request)
        self.events.append(("chat", name))
        self.requests.append((name, request))
        if config.fail is not None:
            raise BackendError(name, config.fail)
        prompt = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        text = (
            self.script(name, request)
            if self.script
            else config.reply.format(model=name, prompt=prompt)
        )
        text = _before_stop(text, request.stop or [])
        words = text.split(" ")[: request.max_tokens]
        prompt_tokens = sum(len(m.content.split()) for m in request.messages)
        for i, word in enumerate(words):
            if config.seconds_per_token:
                await asyncio.sleep(config.seconds_per_token)
            last = i == len(words) - 1
            yield ChatDelta(word if last else word + " ", 1, prompt_tokens if last else 0)

    def resident_bytes(self, name: str) -> int | None:
        return self.resident.get(name)

    def loaded(self) -> list[str]:
        return list(self.resident)


def _before_stop(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string, which is left out."""
    cut = min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))
    return text[:cut]
