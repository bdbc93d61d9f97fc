"""OpenAI's chat-completions wire shapes, as ``localmoa serve`` reads and writes them.

Every request and answer is a pydantic model, so what the server accepts and what it sends is
written once, here. Requests keep OpenAI's leniency for fields nobody asked about (unknown keys
are ignored, as OpenAI-compatible servers do), but a field whose meaning an ensemble cannot give
is refused by name rather than silently ignored: ``n`` > 1 (an ensemble writes one answer),
``tools``/``functions`` (no agent calls tools), ``logprobs``/``top_logprobs`` (the answer is a
synthesis; its tokens' probabilities would describe only the aggregator's last pass). ``stop``,
``seed`` and ``response_format`` are honoured by the aggregator, whose backend must support them
(:attr:`localmoa.backends.base.Backend.supports`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from localmoa.backends.base import ChatMessage, ChatRequest, ResponseFormat, Seed, StopList
from localmoa.serve.guard import Refused

__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "Choice",
    "ChunkChoice",
    "Delta",
    "Message",
    "ModelCard",
    "ModelList",
    "RunFacts",
    "Usage",
    "invalid_request",
    "json_path",
    "to_chat",
]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class Part(_Lenient):
    type: str
    text: str | None = None


class RequestMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    """The part of OpenAI's chat-completions request an ensemble reads (see the module doc)."""

    model: str
    messages: list[RequestMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    stop: StopList | None = None
    seed: Seed | None = None
    response_format: ResponseFormat | None = None
    n: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    def refused_field(self) -> tuple[str, str] | None:
        """(field, why) for the first field an ensemble cannot honour, else None."""
        if self.n is not None and self.n > 1:
            return "n", "an ensemble writes one answer: n must be 1 (or left out)"
        for name in ("tools", "functions"):
            if getattr(self, name):
                return name, (
                    f"{name} are not supported: the agents of an ensemble do not call tools; "
                    f"send the request without {name}"
                )
        if self.logprobs or self.top_logprobs:
            field = "logprobs" if self.logprobs else "top_logprobs"
            return field, (
                "log probabilities are not available: the answer is a synthesis of several "
                f"models' answers; send the request without {field}"
            )
        return None

    def aggregator_settings(self) -> dict[str, Any]:
        """What this request sets for the aggregator, as :class:`~localmoa.config.Agent` keys."""
        asked = {
            "temperature": self.temperature,
            "max_tokens": self.max_completion_tokens or self.max_tokens,
            "stop": self.stop,
            "seed": self.seed,
            "response_format": self.response_format,
        }
        return {key: value for key, value in asked.items() if value is not None}

    def options(self) -> list[str]:
        """The request options (``REQUEST_OPTIONS``) the aggregator's backend must honour."""
        return ChatRequest(
            messages=[],
            temperature=0.0,
            max_tokens=1,
            stop=self.stop,
            seed=self.seed,
            response_format=self.response_format,
        ).options()


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RunFacts(BaseModel):
    """localmoa's own addition to a completion: how many calls and loads the answer took."""

    calls: int
    loads: int


class Message(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: Message
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    localmoa: RunFacts


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None

    def dump(self) -> dict[str, Any]:
        """As OpenAI streams it: a delta carries only what it sets; ``usage`` only on the
        last chunk (``stream_options.include_usage``); ``finish_reason`` null until the end."""
        out = self.model_dump(exclude={"usage"} if self.usage is None else set())
        for choice, model in zip(out["choices"], self.choices, strict=True):
            choice["delta"] = model.delta.model_dump(exclude_none=True)
        return out


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "localmoa"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def to_chat(index: int, message: RequestMessage) -> ChatMessage:
    """A request message as every agent reads it: text only, valid Unicode, ``developer`` as
    ``system``; 400 (naming ``messages[i].content``) for what an ensemble cannot read."""
    role = "system" if message.role == "developer" else message.role
    content = message.content
    param = f"messages[{index}].content"
    if isinstance(content, list):
        unsupported = sorted({p.type for p in content if p.type != "text"})
        if unsupported:
            raise Refused(
                400,
                f"message parts of type {', '.join(unsupported)} are not supported: "
                "ensembles read text only",
                "invalid_request_error",
                "unsupported_content",
                param=param,
            )
        content = "\n".join(p.text or "" for p in content)
    text = content or ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON may spell a lone surrogate: "\ud800"
        raise Refused(
            400,
            f"{param} is not valid Unicode text (a lone surrogate at character {exc.start}); "
            "send UTF-8 text",
            "invalid_request_error",
            "invalid_text",
            param=param,
        ) from None
    return ChatMessage(role=role, content=text)


def json_path(loc: Sequence[int | str]) -> str:
    """A pydantic error location as a JSON path: ("messages", 0, "role") -> messages[0].role."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def invalid_request(exc: ValidationError) -> Refused:
    """A body that does not validate, as OpenAI's 400: every problem with its JSON path, the
    first one's path as ``param``."""
    errors = exc.errors()
    problems = "; ".join(f"{json_path(e['loc']) or 'body'}: {e['msg']}" for e in errors)
    return Refused(
        400,
        problems,
        "invalid_request_error",
        "invalid_request",
        param=json_path(errors[0]["loc"]) or None,
    )
