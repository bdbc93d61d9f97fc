"""Every OpenAI request field a client may send is honoured, or refused by name; none is
silently ignored where it changes the answer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from servers import Serving, serving

from localmoa.backends import FakeBackend
from localmoa.backends.base import ChatRequest
from serve.test_app import fake_config

QUESTION: dict[str, Any] = {"model": "moa/default", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def served() -> Iterator[Serving]:
    with serving(fake_config(), 3 << 30) as running:
        yield running


def fake(served: Serving) -> FakeBackend:
    backend = served.server.backends["fake"]
    assert isinstance(backend, FakeBackend)
    return backend


def aggregator_request(served: Serving) -> ChatRequest:
    name, request = fake(served).requests[-1]
    assert name == "a"
    return request


def proposer_requests(served: Serving) -> list[ChatRequest]:
    return [request for _, request in fake(served).requests[:-1]]


def post(served: Serving, **fields: Any) -> httpx.Response:
    return httpx.post(f"{served.url}/chat/completions", json={**QUESTION, **fields}, timeout=30)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
    ],
)
def test_fields_an_ensemble_cannot_honour_are_a_400_naming_them(
    served: Serving, fields: dict[str, Any], param: str
) -> None:
    response = post(served, **fields)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "unsupported_parameter"
    assert param in error["message"]
    assert fake(served).requests == []  # refused before anything ran


def test_n_1_and_empty_tools_are_fine(served: Serving) -> None:
    assert post(served, n=1, tools=[], logprobs=False).status_code == 200


def test_stop_ends_the_aggregators_answer(served: Serving) -> None:
    client = openai.OpenAI(base_url=served.url, api_key="unused")
    reply = client.chat.completions.create(
        model="moa/default",
        messages=[{"role": "user", "content": "hi"}],
        stop=[" word"],
    )
    assert reply.choices[0].message.content == "word"  # cut before the first " word"
    assert aggregator_request(served).stop == [" word"]
    assert all(r.stop is None for r in proposer_requests(served))


def test_seed_reaches_the_aggregator_only(served: Serving) -> None:
    assert post(served, seed=1234).status_code == 200
    assert aggregator_request(served).seed == 1234
    assert all(r.seed is None for r in proposer_requests(served))


@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object"},
        {
            "type": "json_schema",
            "json_schema": {
                "name": "answer",
                "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
            },
        },
    ],
)
def test_response_format_reaches_the_aggregator(
    served: Serving, response_format: dict[str, Any]
) -> None:
    assert post(served, response_format=response_format).status_code == 200
    sent = aggregator_request(served).response_format
    assert sent is not None and sent.type == response_format["type"]
    assert all(r.response_format is None for r in proposer_requests(served))


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"seed": 1 << 70}, "seed"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
    ],
)
def test_malformed_values_are_a_400_naming_the_field(
    served: Serving, fields: dict[str, Any], param: str
) -> None:
    response = post(served, **fields)
    assert response.status_code == 400
    assert response.json()["error"]["param"].startswith(param)


def test_an_aggregator_backend_that_cannot_honour_an_option_is_a_400(
    served: Serving, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FakeBackend, "supports", frozenset({"stop"}))
    response = post(served, seed=7)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "seed" and 'backend "fake"' in error["message"]
    assert post(served, stop="zzz").status_code == 200


def test_unknown_fields_are_ignored_as_openai_compatible_servers_do(served: Serving) -> None:
    response = post(served, user="someone", presence_penalty=0.5, metadata={"k": "v"})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"]
