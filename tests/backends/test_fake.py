"""The shipped fake backend: request options (and how any backend refuses one it cannot honour),
reply templates, and its context limit."""

from __future__ import annotations

import json
from typing import Any

import pytest

from localmoa.backends.base import ChatDelta, ChatRequest, ResponseFormat, estimate_tokens
from localmoa.backends.fake import FakeBackend, fill_reply
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


# --- reply templates, the context limit -------------------------------------------------------


async def reply_of(config: FakeModel, req: ChatRequest) -> str:
    backend = FakeBackend()
    await backend.load("m", config)
    return "".join([d.text async for d in backend.chat("m", req)])


async def test_a_json_reply_template_is_answered_as_written() -> None:
    judge = '{"selected": [2, 1], "stop": true, "reason": "they agree"}'
    text = await reply_of(FakeModel(backend="fake", memory=1, reply=judge), request())
    assert json.loads(text) == {"selected": [2, 1], "stop": True, "reason": "they agree"}


async def test_placeholders_are_filled_once_and_seed_tells_samples_apart() -> None:
    config = FakeModel(backend="fake", memory=1, reply="{model} heard {prompt} (seed {seed})")
    said = request(messages=[{"role": "user", "content": "{seed} {model}"}])
    assert await reply_of(config, said.model_copy(update={"seed": 5})) == (
        "m heard {seed} {model} (seed 5)"  # what the prompt says stays as it is
    )
    assert await reply_of(config, said) == "m heard {seed} {model} (seed none)"


@pytest.mark.parametrize("prompt", ["count", "a {brace} and {{two}}", "{model}"])
def test_templates_without_seed_read_as_str_format_made_them(prompt: str) -> None:
    for template in ("{model} has considered: {prompt}", "plain", "{prompt}{prompt}"):
        assert fill_reply(template, model="m", prompt=prompt, seed=None) == template.format(
            model="m", prompt=prompt
        )


async def test_a_call_beyond_n_ctx_fails_like_llama_cpp_before_answering() -> None:
    # 30 characters: 10 tokens by the estimate, plus 8 for the message.
    said = request(messages=[{"role": "user", "content": "x" * 30}], max_tokens=10)
    assert estimate_tokens(said.messages) == 18
    fits = FakeModel(backend="fake", memory=1, reply="a b", n_ctx=28)
    assert await reply_of(fits, said) == "a b"
    backend = FakeBackend()
    await backend.load("m", fits.model_copy(update={"n_ctx": 27}))
    answered: list[ChatDelta] = []
    with pytest.raises(BackendError) as full:
        async for delta in backend.chat("m", said):
            answered.append(delta)
    assert answered == []
    assert str(full.value) == (
        'model "m": the context is full (n_ctx 27: 18 prompt tokens + 10 max_tokens); raise '
        "n_ctx of [models.m] to at least 28, or lower max_tokens / shorten the prompt"
    )
    assert backend.requests == [("m", said)]  # recorded all the same
    unlimited = FakeModel(backend="fake", memory=1, reply="ok")
    assert await reply_of(unlimited, said.model_copy(update={"max_tokens": 100_000})) == "ok"
