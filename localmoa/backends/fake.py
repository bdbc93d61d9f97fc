"""A backend with no runtime behind it, shipped so users and tests share one fake.

Like httpx's MockTransport: replies come from each model's ``reply`` template (or a ``script``
callable given in code), loads and tokens take the configured time, and everything that happens
is recorded in :attr:`FakeBackend.events`. It also keeps the books a real device would: resident
bytes, their peak, and an optional ``capacity`` beyond which a load fails as out of memory, so
tests can prove the executor never exceeds its plan.

A ``reply`` template has three placeholders, each replaced in one pass (so a prompt that happens
to contain ``{seed}`` is left as it is): ``{model}`` (the model's name), ``{prompt}`` (the last
user message) and ``{seed}`` (the request's seed, or ``none``), so that an agent's samples, which
differ only in their seeds, give distinct answers. Nothing else in a template is special: braces
are literal, so a template may be JSON (``'{"selected": [2, 1], "stop": true}'``, a scripted
judge). Templates with only ``{model}`` and ``{prompt}`` read as they did when templates went
through ``str.format``, which failed on any other brace.

Two limits a real runtime has, each optional, so a plan can be tried against them:

- **the context** (``n_ctx``): a call whose prompt, counted by :meth:`Backend.count_tokens`
  (the documented estimate, :func:`~localmoa.backends.base.estimate_tokens`), plus its
  ``max_tokens`` exceeds it fails as llama.cpp's does, before answering anything;
- **the slots** (``parallel``): an agent's samples go through the base class's
  :meth:`~Backend.chat_samples`, at most ``parallel`` at a time. The fake itself does not refuse
  more; it records the most calls each model ever answered at once
  (:attr:`FakeBackend.max_in_flight`), so a test can assert the engine kept to the slots. Each
  call yields to the event loop once before answering, so calls started together do overlap.

**Timing** follows ``seconds_per_token``, as a runtime would: the first token comes after one
token's time (the prompt's evaluation), each next one a token's time later. Like Ollama, the
fake states its own rates on its last delta: decode ``1 / seconds_per_token`` and prefill the
prompt's tokens over that first token's time. So engine tests can assert the relations between
a record's times (started ≤ first token ≤ end, ``ttft_s`` ≥ one token's time) and its rates
exactly, with no sleep of their own. With ``seconds_per_token`` 0 the rates would be infinite:
none is stated and the engine times the stream. A load's peak is the model's ``memory``.

Of a request's options it honours ``stop`` as a runtime does (the reply ends before the first
stop string), puts ``seed`` into ``{seed}``, and records all of them with the request
(:attr:`FakeBackend.requests`); a reply is JSON only if the script or template writes JSON,
whatever ``response_format`` asks.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from localmoa.backends.base import REQUEST_OPTIONS, Backend, ChatDelta, ChatRequest
from localmoa.backends.configs import FakeModel
from localmoa.errors import BackendError
from localmoa.footprint.estimate import Footprint
from localmoa.hardware import Placement

__all__ = ["FakeBackend", "fill_reply"]

Script = Callable[[str, ChatRequest], str]

_PLACEHOLDER = re.compile(r"\{(model|prompt|seed)\}")


def fill_reply(template: str, *, model: str, prompt: str, seed: int | None) -> str:
    """``template`` with ``{model}``, ``{prompt}`` and ``{seed}`` filled in, in one pass; every
    other character, braces included, kept as written.

    >>> fill_reply('{"by": "{model}", "seed": "{seed}"}', model="m", prompt="", seed=None)
    '{"by": "m", "seed": "none"}'
    """
    values = {"model": model, "prompt": prompt, "seed": "none" if seed is None else str(seed)}
    return _PLACEHOLDER.sub(lambda match: values[match[1]], template)


class FakeBackend(Backend):
    """Scripted replies, recorded events, real memory bookkeeping."""

    places_models = True

    supports = frozenset(REQUEST_OPTIONS)

    def __init__(self, *, script: Script | None = None, capacity: int | None = None) -> None:
        self.script = script
        self.capacity = capacity
        self.events: list[tuple[str, str]] = []
        """("load" | "unload" | "chat", model) in the order they happened."""
        self.requests: list[tuple[str, ChatRequest]] = []
        """(model, request) of every call, in the order they were made: refused and failed
        calls included."""
        self.max_in_flight: dict[str, int] = {}
        """Most calls each model was answering at once (a model never called is absent)."""
        self.resident: dict[str, int] = {}
        self.placements: dict[str, Placement | None] = {}
        """Where each model was last loaded, as the plan placed it (None: not placed)."""
        self.peak_bytes = 0
        self._configs: dict[str, FakeModel] = {}
        self._in_flight: dict[str, int] = {}

    async def footprint(self, name: str, config: Any) -> Footprint:
        return Footprint.override(int(config.memory))

    async def load(self, name: str, config: Any, placement: Placement | None = None) -> None:
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
        self.placements[name] = placement
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
        prompt_tokens = await self.count_tokens(name, config, request.messages)
        if config.n_ctx is not None and prompt_tokens + request.max_tokens > config.n_ctx:
            raise BackendError(name, _context_full(name, config.n_ctx, prompt_tokens, request))
        prompt = next((m.content for m in reversed(request.messages) if m.role == "user"), "")
        text = (
            self.script(name, request)
            if self.script
            else fill_reply(config.reply, model=name, prompt=prompt, seed=request.seed)
        )
        text = _before_stop(text, request.stop or [])
        words = text.split(" ")[: request.max_tokens]
        self._in_flight[name] = self._in_flight.get(name, 0) + 1
        self.max_in_flight[name] = max(self.max_in_flight.get(name, 0), self._in_flight[name])
        try:
            # Answering begins after a turn of the event loop, so that calls started together
            # are in flight together, as on a server with several slots.
            await asyncio.sleep(0)
            per_token = config.seconds_per_token
            rate = 1 / per_token if per_token else None
            for i, word in enumerate(words):
                if per_token:
                    await asyncio.sleep(per_token)
                if i < len(words) - 1:
                    yield ChatDelta(word + " ", 1)
                else:
                    prefill = None if rate is None else prompt_tokens * rate
                    yield ChatDelta(word, 1, prompt_tokens, prefill, rate)
        finally:
            self._in_flight[name] -= 1

    def resident_bytes(self, name: str) -> int | None:
        return self.resident.get(name)

    def load_peak_bytes(self, name: str) -> int | None:
        """What the load took on the fake's books: the model's ``memory``."""
        return self.resident.get(name)

    def loaded(self) -> list[str]:
        return list(self.resident)


def _context_full(name: str, n_ctx: int, prompt_tokens: int, request: ChatRequest) -> str:
    """The overflow as the llama.cpp backend words it, with what the call asked for."""
    return (
        f"the context is full (n_ctx {n_ctx}: {prompt_tokens} prompt tokens + "
        f"{request.max_tokens} max_tokens); raise n_ctx of [models.{name}] to at least "
        f"{prompt_tokens + request.max_tokens}, or lower max_tokens / shorten the prompt"
    )


def _before_stop(text: str, stops: list[str]) -> str:
    """``text`` up to the first occurrence of any stop string, which is left out."""
    cut = min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))
    return text[:cut]
