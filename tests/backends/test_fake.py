"""The shipped fake backend's request options, and how any backend refuses one it cannot honour."""

from __future__ import annotations

from typing import Any

import pytest

from localmoa.backends.base import ChatDelta, ChatRequest, ResponseFormat
from localmoa.backends.fake import FakeBackend
from localmoa.config import FakeModel
from localmoa.errors import BackendError

MODEL = FakeModel(backend="fake", memory=1, reply="one two three. four five")


def request(**options: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {
            "messages": [{"role": "user", "content": "count"}],
            "temperature": 0.5,
            "max_tokens": 10,
            **options,
        }
    )


async def chat(backend: FakeBackend, req: ChatRequest) -> list[ChatDelta]:
    await backend.load("m", MODEL)
    try:
        return [d async for d in backend.chat("m", req)]
    finally:
        await backend.unload("m")


async def test_stop_ends_the_reply_before_the_first_stop_string() -> None:
    deltas = await chat(FakeBackend(), request(stop=["five", ". "]))
    assert "".join(d.text for d in deltas) == "one two three"
    assert sum(d.tokens for d in deltas) == 3
    whole = await chat(FakeBackend(), request(stop="absent"))
    assert "".join(d.text for d in whole) == "one two three. four five"


async def test_seed_and_response_format_are_recorded() -> None:
    backend = FakeBackend()
    fmt = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}}
    await chat(backend, request(seed=3, response_format=fmt))
    ((name, sent),) = backend.requests
    assert (name, sent.seed) == ("m", 3)
    assert sent.response_format == ResponseFormat.model_validate(fmt)
    assert sent.options() == ["seed", "response_format"]


class Plain(FakeBackend):
    """A backend written without request options (the base class's default)."""

    supports = frozenset()


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"stop": "x"}, "stop"),
        ({"seed": 1}, "seed"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
    ],
)
async def test_a_backend_refuses_an_option_it_cannot_honour_before_answering(
    options: dict[str, Any], field: str
) -> None:
    backend = Plain()
    with pytest.raises(BackendError) as refused:
        await chat(backend, request(**options))
    assert str(refused.value) == (
        f'model "m": the Plain backend cannot honour {field}; leave {field} out of the '
        "agent's settings or the request, or use a model whose backend supports it"
    )
    assert backend.requests == []  # nothing was answered
    # A text response format asks for nothing.
    assert await chat(backend, request(response_format={"type": "text"}))


def test_request_options_are_checked() -> None:
    assert request(stop="x").stop == ["x"]
    for bad in (
        {"stop": []},
        {"stop": [""]},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"seed": 1 << 63},
        {"response_format": {"type": "json_schema"}},
        {"response_format": {"type": "json_object", "json_schema": {"name": "n"}}},
        {"response_format": {"type": "yaml"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a b"}}},
    ):
        with pytest.raises(ValueError):
            request(**bad)


def test_response_formats_hash_by_value() -> None:
    one = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "n", "schema": {"a": 1, "b": 2}}}
    )
    two = ResponseFormat.model_validate(
        {"type": "json_schema", "json_schema": {"name": "n", "schema": {"b": 2, "a": 1}}}
    )
    assert one == two and hash(one) == hash(two)
    assert one.openai() == {
        "type": "json_schema",
        "json_schema": {"name": "n", "schema": {"a": 1, "b": 2}},
    }
