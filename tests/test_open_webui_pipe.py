"""The Open WebUI Pipe function in examples/, against a real `localmoa serve` on loopback.

The example is a single file pasted into Open WebUI, not a package, so it is loaded from its
path. Open WebUI awaits the async ``pipes``/``pipe`` on its event loop; here ``asyncio.run``
plays that part. Fake models answer, so every expected text is known exactly.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest
from serve.test_app import fake_config
from servers import free_port, serving

from localmoa.backends import FakeBackend
from localmoa.config import parse_config

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "open_webui_pipe.py"
KEY = "s3cret-key"
ANSWER = "word word word word word word word word"  # fake_config's reply
GiB3 = 3 << 30


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("open_webui_pipe", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[httpx.Request]:
    """Every request the pipe sends, as it went over the wire."""
    seen: list[httpx.Request] = []
    original = httpx.AsyncClient.send

    async def send(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> Any:
        seen.append(request)
        return await original(self, request, **kwargs)

    monkeypatch.setattr(httpx.AsyncClient, "send", send)
    return seen


def make_pipe(example: ModuleType, url: str, key: str = KEY, **valves: Any) -> Any:
    pipe = example.Pipe()
    pipe.valves = example.Pipe.Valves(LOCALMOA_URL=url, LOCALMOA_API_KEY=key, **valves)
    return pipe


def body(model: str = "localmoa.default", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
    } | extra


def answer(pipe: Any, request: dict[str, Any]) -> str:
    result = asyncio.run(pipe.pipe(request))
    assert isinstance(result, str)
    return result


def pieces(pipe: Any, request: dict[str, Any]) -> list[str]:
    async def collect() -> list[str]:
        stream = await pipe.pipe(request)
        assert isinstance(stream, AsyncIterator)
        return [piece async for piece in stream]

    return asyncio.run(collect())


def test_frontmatter_is_what_open_webui_reads(example: ModuleType) -> None:
    # Open WebUI reads `key: value` lines of a docstring that opens the file; a `requirements`
    # key would make it pip-install on import.
    lines = EXAMPLE.read_text(encoding="utf-8").splitlines()
    assert lines[0] == '"""'
    block = lines[1 : lines.index('"""', 1)]
    keys = [m.group(1) for line in block if (m := re.match(r"^\s*([a-z_]+):", line, re.I))]
    assert keys == ["title", "author", "description", "version", "license"]


def test_pipes_lists_every_ensemble(example: ModuleType) -> None:
    with serving(fake_config(), GiB3, api_key=KEY) as served:
        models = asyncio.run(make_pipe(example, served.url).pipes())
    assert models == [
        {"id": "default", "name": "localmoa default"},
        {"id": "solo", "name": "localmoa solo"},
    ]


def test_ensembles_valve_lists_only_those_without_asking(example: ModuleType) -> None:
    down = f"http://127.0.0.1:{free_port()}/v1"
    models = asyncio.run(make_pipe(example, down, ENSEMBLES=" solo, default ,").pipes())
    assert models == [
        {"id": "solo", "name": "localmoa solo"},
        {"id": "default", "name": "localmoa default"},
    ]


def test_answer_and_stream_forward_the_chat_to_the_ensemble(
    example: ModuleType, sent: list[httpx.Request]
) -> None:
    with serving(fake_config(), GiB3, api_key=KEY) as served:
        pipe = make_pipe(example, served.url)
        assert answer(pipe, body(temperature=0.1, max_tokens=50)) == ANSWER
        fake = served.server.backends["fake"]
        assert isinstance(fake, FakeBackend)
        assert len(fake.requests) == 7  # the whole default ensemble: 2 layers of 3, aggregator
        aggregator = fake.requests[-1][1]
        assert (aggregator.temperature, aggregator.max_tokens) == (0.1, 50)

        streamed = pieces(pipe, body(model="localmoa.solo", stream=True))
        assert len(streamed) > 1 and "".join(streamed) == ANSWER
        assert len(fake.requests) == 7 + 2  # solo: one proposer, the aggregator
        assert (fake.requests[-1][1].temperature, fake.requests[-1][1].max_tokens) == (0.7, 512)

    chats = [r for r in sent if r.url.path == "/v1/chat/completions"]
    assert [json.loads(r.content) for r in chats] == [
        {
            "model": "moa/default",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
            "temperature": 0.1,
            "max_tokens": 50,
        },
        {"model": "moa/solo", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ]
    assert all(r.headers["authorization"] == f"Bearer {KEY}" for r in sent)


def test_a_wrong_key_names_the_valve_to_fix(example: ModuleType) -> None:
    with serving(fake_config(), GiB3, api_key=KEY) as served:
        pipe = make_pipe(example, served.url, key="wrong-key")
        told = [answer(pipe, body()), "".join(pieces(pipe, body(stream=True)))]
        listed = asyncio.run(pipe.pipes())
    for message in told:
        assert "LOCALMOA_API_KEY" in message and "refused the API key" in message
        assert "wrong-key" not in message and KEY not in message
    assert listed == [{"id": "default", "name": "localmoa default (check LOCALMOA_API_KEY)"}]


def test_a_server_that_is_down_names_the_url(example: ModuleType) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    pipe = make_pipe(example, url)
    for message in (answer(pipe, body()), "".join(pieces(pipe, body(stream=True)))):
        assert message.startswith(f"Could not reach localmoa at {url}")
        assert "LOCALMOA_URL" in message and "Traceback" not in message
    assert asyncio.run(pipe.pipes()) == [
        {"id": "default", "name": "localmoa default (not reachable: LOCALMOA_URL?)"}
    ]


def test_server_errors_come_back_as_chat_text(example: ModuleType) -> None:
    config = parse_config(
        {
            "models": {
                "ok": {"backend": "fake", "memory": "1GiB", "reply": "fine"},
                "broken": {"backend": "fake", "memory": "1GiB", "fail": "the GPU caught fire"},
            },
            "ensembles": {"default": {"layers": [["ok"]], "aggregator": "broken"}},
        }
    )
    with serving(config, GiB3) as served:
        pipe = make_pipe(example, served.url, key="")
        streamed = "".join(pieces(pipe, body(stream=True)))  # the error arrives as an event
        whole = answer(pipe, body())  # the error arrives as a 500
        missing = answer(pipe, body(model="localmoa.nope"))
    assert "the GPU caught fire" in streamed
    assert whole.startswith("localmoa (500): ") and "the GPU caught fire" in whole
    assert missing.startswith("localmoa (404): ") and "moa/nope" in missing
    assert "ENSEMBLES valve" in missing
