"""The one seam between the executor and a model runtime.

A backend does four things: load a model, unload it, stream a chat answer from a loaded model,
and say how many bytes a loaded model really holds. Residency is the executor's decision, taken
from the plan; a backend never loads or evicts on its own. Each backend translates its library's
exceptions into :class:`~localmoa.errors.BackendError` at this boundary.

Calls to one model are serialized by the executor, so a backend may assume one call per model at
a time (a llama.cpp context is not thread-safe), except an agent's samples, which
:meth:`Backend.chat_samples` sends to one model up to ``parallel`` at once; a backend whose
runtime is not safe for that (llama.cpp) overrides ``chat_samples``.

A request may also ask for a few things beyond the messages, each OpenAI's own field with its
meaning (``REQUEST_OPTIONS``): ``stop`` strings that end the answer (not included in it), a
``seed`` for reproducible sampling, and a ``response_format`` that constrains the answer to JSON,
or to JSON matching a schema. A backend says which it honours in :attr:`Backend.supports`, so a
server can refuse a request up front (400) for an aggregator whose backend cannot; a backend
handed one it cannot honour refuses it before generating (:meth:`Backend.refuse_unsupported`)
rather than answer as if it had been honoured.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    model_validator,
)

from localmoa.errors import BackendError
from localmoa.footprint.estimate import Footprint

if TYPE_CHECKING:
    from localmoa.hardware import Placement

__all__ = [
    "CHARS_PER_TOKEN_ESTIMATE",
    "MESSAGE_TOKENS_ESTIMATE",
    "REQUEST_OPTIONS",
    "Backend",
    "ChatDelta",
    "ChatMessage",
    "ChatRequest",
    "JsonSchemaFormat",
    "ResponseFormat",
    "Seed",
    "StopList",
    "estimate_tokens",
]

log = logging.getLogger(__name__)

REQUEST_OPTIONS = ("stop", "seed", "response_format")
"""The optional fields of :class:`ChatRequest` a backend may or may not honour."""

MAX_STOPS = 4
"""OpenAI's limit on stop strings; OpenAI-compatible servers may refuse more."""


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _check_stops(stops: list[str]) -> list[str]:
    if not stops:
        raise ValueError("give at least one stop string, or leave stop out")
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop strings (OpenAI's limit), not {len(stops)}")
    if "" in stops:
        raise ValueError("a stop string cannot be empty: it would end the answer before it began")
    return stops


StopList = Annotated[list[str], BeforeValidator(_one_or_many), AfterValidator(_check_stops)]
"""Stop strings: one string or a list of 1 to 4, none empty."""

Seed = Annotated[int, Field(ge=-(1 << 63), lt=1 << 63)]
"""A sampling seed: any 64-bit integer (OpenAI's and Ollama's range)."""


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``json_schema`` object: the JSON schema the answer must match, and its name."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    """OpenAI's rule: letters, digits, ``_`` and ``-``, at most 64."""
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    """The JSON schema; empty means any JSON value."""
    strict: bool | None = None
    """OpenAI's strict mode. llama.cpp and Ollama always enforce the schema with a grammar."""


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type":
    "json_object"}`` (any JSON object) or ``{"type": "json_schema", "json_schema": {"name":
    ..., "schema": {...}}}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError(
                'type "json_schema" needs json_schema = {name = "...", schema = {...}}'
            )
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f'json_schema is read only with type "json_schema", not "{self.type}"')
        return self

    def __hash__(self) -> int:  # the schema is a dict: hash its canonical JSON instead
        return hash(json.dumps(self.model_dump(mode="json"), sort_keys=True))

    def openai(self) -> dict[str, Any]:
        """As OpenAI's API spells it (``schema``, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True)


class ChatMessage(BaseModel):
    """One turn of a conversation, in the OpenAI chat shape every runtime accepts."""

    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    """What an agent sends to its model."""

    messages: list[ChatMessage]
    temperature: float = Field(ge=0.0, le=2.0)
    max_tokens: int = Field(gt=0)
    stop: StopList | None = None
    """The answer ends before the first of these strings, which it does not include."""
    seed: Seed | None = None
    """Sampling seed: the same seed, prompt and settings give the same answer on one machine."""
    response_format: ResponseFormat | None = None
    """Constrain the answer to JSON (``json_object``) or to a JSON schema (``json_schema``)."""

    def options(self) -> list[str]:
        """The ``REQUEST_OPTIONS`` this request sets; a ``text`` response format constrains
        nothing, so it is not one."""
        asked = {
            "stop": self.stop is not None,
            "seed": self.seed is not None,
            "response_format": self.response_format is not None
            and self.response_format.type != "text",
        }
        return [option for option in REQUEST_OPTIONS if asked[option]]


CHARS_PER_TOKEN_ESTIMATE = 3
"""Where localmoa cannot reach a model's tokenizer (Ollama, OpenAI-compatible servers, the
fake), a text's tokens are estimated as its characters divided by this, rounded up: fewer
characters per token than ordinary English averages with today's vocabularies (about 4), so
the estimate errs long and a reference cut to fit it fits the real context."""

MESSAGE_TOKENS_ESTIMATE = 8
"""Tokens a chat template adds around each message in the estimate (role markers, separators);
real templates add 3 to 6."""


def estimate_tokens(messages: Sequence[ChatMessage]) -> int:
    """The documented estimate of the tokens ``messages`` take (see CHARS_PER_TOKEN_ESTIMATE)."""
    return sum(
        math.ceil(len(m.content) / CHARS_PER_TOKEN_ESTIMATE) + MESSAGE_TOKENS_ESTIMATE
        for m in messages
    )


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
    prefill_tok_s: float | None = None
    """Set on the last delta by a runtime that times its own prompt evaluation (Ollama's
    ``prompt_eval_*``, llama-server's ``timings``): prompt tokens evaluated per second. A rate,
    not seconds: llama-server times only the tokens its cache did not hold, so its seconds
    divided by the whole prompt's tokens would overstate the speed."""
    decode_tok_s: float | None = None
    """Set on the last delta by a runtime that times its own generation (Ollama's ``eval_*``,
    llama-server's ``timings``): tokens generated per second. Without either, the engine times
    the stream itself (:meth:`localmoa.runtime.engine.Executor.calls`)."""


class Backend(ABC):
    """Load, unload, chat (streamed), memory (predicted and resident): all localmoa needs."""

    measures_footprint: bool = False
    """True when ``resident_bytes`` is the model's whole footprint (Ollama's /api/ps size), so
    the executor may re-plan with it; llama.cpp's logged buffers miss ggml's work buffer."""

    places_models: ClassVar[bool] = False
    """True when ``load`` puts a model where its placement says (llama.cpp, in process or on a
    cluster node; the fake, which records it). Ollama and OpenAI-compatible servers place
    models themselves: with several devices they are planned per device only when pinned."""

    supports: ClassVar[frozenset[str]] = frozenset()
    """Which of ``REQUEST_OPTIONS`` this backend honours. None by default: a backend written
    without them refuses a request that asks for one instead of ignoring it."""

    def refuse_unsupported(self, name: str, request: ChatRequest) -> None:
        """BackendError naming the first option ``request`` asks for that this backend cannot
        honour; called by ``chat`` before anything is generated."""
        for option in request.options():
            if option not in self.supports:
                raise BackendError(
                    name,
                    f"the {type(self).__name__} backend cannot honour {option}; leave {option} "
                    "out of the agent's settings or the request, or use a model whose backend "
                    "supports it",
                )

    @abstractmethod
    async def footprint(self, name: str, config: Any) -> Footprint:
        """What model ``name`` will hold once loaded, known before loading it: the config's
        ``memory`` override, else a measurement or an estimate. Raises UserError subclasses
        for what makes the model unusable (missing file, model not installed, server down)."""

    @abstractmethod
    async def load(self, name: str, config: Any, placement: Placement | None = None) -> None:
        """Make model ``name`` (its models.toml entry ``config``) resident, where ``placement``
        says when the plan placed it (None: wherever the backend puts it). Only backends that
        can pin a model act on it (llama.cpp, the Ray cluster's); the others place models
        themselves."""

    @abstractmethod
    async def unload(self, name: str) -> None:
        """Free model ``name``; when this returns its memory is released."""

    @abstractmethod
    def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        """Stream the answer of loaded model ``name``.

        Closing the iterator early (a cancelled run) must stop generation within a token.
        """

    async def count_tokens(self, name: str, config: Any, messages: list[ChatMessage]) -> int:
        """The tokens ``messages`` take in model ``name``'s context: exact where the backend
        has the model's tokenizer (llama.cpp overrides this), else :func:`estimate_tokens`."""
        return estimate_tokens(messages)

    async def chat_samples(
        self, name: str, requests: Sequence[ChatRequest], parallel: int
    ) -> AsyncIterator[tuple[int, ChatDelta]]:
        """Stream the answers to several requests of loaded model ``name`` (one agent's
        ``samples``, one model's calls for several prompts, or a mix: each request has its own
        messages), each delta tagged with its request's position in ``requests``.

        By default at most ``parallel`` requests run at once through :meth:`chat` (a server's
        slots; 1 = one after another). A backend that decodes sequences together in one
        context (llama.cpp) overrides this. Any request's failure raises here and ends the
        others; closing the iterator early stops them all.
        """
        queue: asyncio.Queue[tuple[int, ChatDelta | BaseException | None]] = asyncio.Queue()
        slots = asyncio.Semaphore(max(1, parallel))

        async def one(i: int, request: ChatRequest) -> None:
            async with slots:
                try:
                    async for delta in self.chat(name, request):
                        queue.put_nowait((i, delta))
                except Exception as exc:
                    queue.put_nowait((i, exc))
                    return
            queue.put_nowait((i, None))

        tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(requests)]
        try:
            left = len(tasks)
            while left:
                i, item = await queue.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def load_peak_bytes(self, name: str) -> int | None:
        """Bytes the last load of loaded model ``name`` really took, beside what it holds
        (:meth:`resident_bytes`): llama.cpp measures this process's growth over the load,
        Ollama its ``/api/ps`` size, the fake its books. None when not measured (an
        OpenAI-compatible server's model is the server's memory)."""
        return None

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

    def lost(self) -> frozenset[str]:
        """Devices this backend found gone (a cluster node that died): the engine re-plans the
        rest of the run without them. A backend on this machine loses none."""
        return frozenset()

    @abstractmethod
    def loaded(self) -> list[str]:
        """Names of the models this backend holds now."""
