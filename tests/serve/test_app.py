"""`localmoa serve` with the official openai client, real uvicorn on loopback, real models."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from servers import Serving, free_port, serving

from localmoa.backends import FakeBackend
from localmoa.backends.base import ChatDelta, ChatMessage, ChatRequest
from localmoa.config import Config, parse_config
from localmoa.hardware import Budget
from localmoa.planning import PlanPolicy, plan_run
from localmoa.runtime.engine import Executor
from localmoa.runtime.moa import calls_for
from localmoa.serve.app import MoaServer
from localmoa.tinymodels import ensemble_config

MiB = 1 << 20


def tiny_config(tiny_models: dict[str, Path]) -> Config:
    return parse_config(ensemble_config(tiny_models, max_tokens=12))


def fake_config(seconds_per_token: float = 0.0, words: int = 8) -> Config:
    reply = " ".join(["word"] * words)
    models = {
        name: {
            "backend": "fake",
            "memory": "1GiB",
            "reply": reply,
            "seconds_per_token": seconds_per_token,
        }
        for name in ("a", "b", "c")
    }
    return parse_config(
        {
            "models": models,
            "ensembles": {
                "default": {
                    "layers": [["a", "b", "c"], ["a", "b", "c"]],
                    "aggregator": "a",
                    "max_tokens": 64,
                    "temperature": 0.5,
                },
                "solo": {"layers": [["a"]], "aggregator": "a"},
            },
        }
    )


@pytest.fixture(scope="module")
def tiny_server(tiny_models: dict[str, Path]) -> Iterator[Serving]:
    sizes = sorted(
        json.loads(
            subprocess.run(
                [sys.executable, "-c", _SIZES, *map(str, tiny_models.values())],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    )
    budget = sizes[-1] + sizes[-2] + MiB  # two of the three tiny models fit, not all three
    with serving(tiny_config(tiny_models), budget) as served:
        yield served


_SIZES = """
import json, sys
from pathlib import Path
from localmoa.footprint.estimate import estimate, read_gguf
print(json.dumps([estimate(read_gguf(Path(p)), n_ctx=2048, n_batch=512).total for p in sys.argv[1:]]))
"""


def test_done_when_openai_client_lists_answers_and_streams(tiny_server: Serving) -> None:
    client = openai.OpenAI(base_url=tiny_server.url, api_key="unused")
    assert [m.id for m in client.models.list()] == ["moa/default"]
    question = [{"role": "user", "content": "Why is the sky blue?"}]
    reply = client.chat.completions.create(model="moa/default", messages=question)  # type: ignore[arg-type]
    assert reply.object == "chat.completion" and reply.model == "moa/default"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    chunks = list(
        client.chat.completions.create(
            model="moa/default",
            messages=question,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    reasons = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert len(reasons) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert tiny_server.server.pool is not None
    assert tiny_server.server.pool.peak_bytes <= tiny_server.server.budget.bytes

    async def async_whole() -> str | None:
        async with openai.AsyncOpenAI(base_url=tiny_server.url, api_key="unused") as aclient:
            answer = await aclient.chat.completions.create(model="moa/default", messages=question)  # type: ignore[arg-type]
            return answer.choices[0].message.content

    assert asyncio.run(async_whole()) is not None


def test_done_when_four_concurrent_streams_complete_within_budget(tiny_server: Serving) -> None:
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int]:
        stream = await client.chat.completions.create(
            model="moa/default",
            messages=[{"role": "user", "content": f"Question number {i}?"}],
            stream=True,
        )
        finishes = pieces = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finishes += 1
            pieces += bool(chunk.choices and chunk.choices[0].delta.content)
        return finishes, pieces

    async def four() -> list[tuple[int, int]]:
        async with openai.AsyncOpenAI(base_url=tiny_server.url, api_key="unused") as client:
            return await asyncio.gather(*(one(client, i) for i in range(4)))

    results = asyncio.run(four())
    assert [finishes for finishes, _ in results] == [1, 1, 1, 1]
    pool = tiny_server.server.pool
    assert pool is not None
    assert pool.peak_bytes <= tiny_server.server.budget.bytes
    tiny_server.wait_idle()
    assert not pool.pins  # nothing held once every request is done
    assert pool.resident()  # ...but models stay loaded for the next request


def test_api_key_is_required_when_set() -> None:
    with serving(fake_config(), 3 << 30, api_key="s3cret") as served:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = httpx.get(f"{served.url}/models", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
        ok = httpx.get(f"{served.url}/models", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert httpx.get(served.url.removesuffix("/v1") + "/health").json() == {"status": "ok"}
        client = openai.OpenAI(base_url=served.url, api_key="s3cret")
        reply = client.chat.completions.create(
            model="solo", messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == "word word word word word word word word"


def test_listening_beyond_loopback_needs_a_key() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "localmoa",
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "refusing to listen on 0.0.0.0 without --api-key" in out.stderr
    assert "Traceback" not in out.stderr


def test_request_settings_apply_to_the_aggregator_only() -> None:
    with serving(fake_config(), 3 << 30) as served:
        client = openai.OpenAI(base_url=served.url, api_key="unused")
        client.chat.completions.create(
            model="moa/default",
            messages=[
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "why?"},
            ],
            temperature=0.1,
            max_tokens=5,
        )
        fake = served.server.backends["fake"]
        assert isinstance(fake, FakeBackend)
        settings = [(r.temperature, r.max_tokens) for _, r in fake.requests]
        assert settings == [(0.5, 64)] * 6 + [(0.1, 5)]
        aggregator = fake.requests[-1][1]
        assert [m.role for m in aggregator.messages] == ["system", "user", "assistant", "user"]
        assert aggregator.messages[0].content.startswith("Be kind.")


def test_errors_come_in_openai_shape() -> None:
    with serving(fake_config(), 3 << 30) as served:
        cases = [
            (
                {"model": "moa/nope", "messages": [{"role": "user", "content": "x"}]},
                404,
                "model_not_found",
            ),
            ({"model": "moa/default"}, 400, "invalid_request"),
            (
                {
                    "model": "moa/default",
                    "messages": [{"role": "user", "content": [{"type": "image_url"}]}],
                },
                400,
                "unsupported_content",
            ),
        ]
        for body, status, code in cases:
            response = httpx.post(f"{served.url}/chat/completions", json=body)
            assert response.status_code == status
            assert response.json()["error"]["code"] == code
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        raw = httpx.post(
            f"{served.url}/chat/completions",
            content=b"{not json",
            headers={"Content-Type": "application/json"},
        )
        assert raw.status_code == 400 and raw.json()["error"]["code"] == "invalid_json"


def test_disconnect_mid_stream_cancels_the_run_and_frees_what_it_held() -> None:
    slow = fake_config(seconds_per_token=0.05, words=200)  # a full run would take ~70 s
    with serving(slow, 3 << 30) as served:
        with httpx.stream(
            "POST",
            f"{served.url}/chat/completions",
            json={
                "model": "moa/default",
                "messages": [{"role": "user", "content": "q"}],
                "stream": True,
            },
            timeout=30,
        ) as response:
            lines = response.iter_lines()
            first = next(lines)
            assert first.startswith("data: ") and '"role": "assistant"' in first
            assert served.server.admitted == 1  # still running while we hold the stream
        served.wait_idle()  # the run ended: cancelled, not finished
        pool = served.server.pool
        assert pool is not None and not pool.pins
        fake = served.server.backends["fake"]
        assert isinstance(fake, FakeBackend)
        assert len(fake.requests) < 7  # the aggregator never ran


def test_a_full_queue_answers_503_with_retry_after() -> None:
    slow = fake_config(seconds_per_token=0.05, words=200)
    with serving(slow, 3 << 30, max_queue=1) as served:
        body = {
            "model": "moa/default",
            "messages": [{"role": "user", "content": "q"}],
            "stream": True,
        }
        with httpx.stream("POST", f"{served.url}/chat/completions", json=body, timeout=30) as first:
            lines = first.iter_lines()  # kept: a dropped line iterator closes the response
            next(lines)  # admitted and running
            second = httpx.post(f"{served.url}/chat/completions", json=body)
            assert second.status_code == 503
            assert second.headers["Retry-After"] == "5"
            assert second.json()["error"]["code"] == "queue_full"
        served.wait_idle()


def test_models_stay_loaded_between_requests() -> None:
    with serving(fake_config(), 3 << 30) as served:
        client = openai.OpenAI(base_url=served.url, api_key="unused")
        question = [{"role": "user", "content": "hi"}]
        client.chat.completions.create(model="moa/default", messages=question)  # type: ignore[arg-type]
        pool = served.server.pool
        assert pool is not None
        loads = pool.loads
        assert sorted(pool.resident()) == ["a", "b", "c"] and loads == 3
        client.chat.completions.create(model="moa/default", messages=question)  # type: ignore[arg-type]
        assert pool.loads == loads  # the second request loaded nothing


class Timeline(FakeBackend):
    """Records when each load and each call ran: (kind, model, start, end)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spans: list[tuple[str, str, float, float]] = []

    async def load(self, name: str, config: Any, placement: Any = None) -> None:
        began = time.perf_counter()
        await super().load(name, config)
        self.spans.append(("load", name, began, time.perf_counter()))

    async def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        began = time.perf_counter()
        async for piece in super().chat(name, request):
            yield piece
        self.spans.append(("call", name, began, time.perf_counter()))


def loads_during_calls(spans: list[tuple[str, str, float, float]]) -> list[tuple[str, str]]:
    """(loaded, calling): each load that ran while a call to another model ran."""
    loads = [s for s in spans if s[0] == "load"]
    calls = [s for s in spans if s[0] == "call"]
    return [
        (load[1], call[1])
        for load in loads
        for call in calls
        if load[1] != call[1] and load[2] < call[3] and call[2] < load[3]
    ]


def swapping_config() -> Config:
    """Three 1 GiB models that load in 50 ms and write 20 tokens in 100 ms; in 2 GiB the run
    must swap."""
    model = {
        "backend": "fake",
        "memory": "1GiB",
        "load_seconds": 0.05,
        "seconds_per_token": 0.005,
        "reply": " ".join(["word"] * 20),
    }
    return parse_config(
        {
            "models": {name: model for name in ("a", "b", "c")},
            "ensembles": {"default": {"layers": [["a", "b", "c"]], "aggregator": "a"}},
        }
    )


async def test_a_serve_request_overlaps_a_load_with_a_running_call_as_run_does() -> None:
    """One request, alone, on a budget that forces swaps: while a model loads, another
    model's call runs, as in `localmoa run` (the same engine, the pool as its memory seam)."""
    config = swapping_config()
    budget = 2 << 30
    served = Timeline(capacity=budget)
    server = MoaServer(config, {"fake": served}, Budget(bytes=budget, source="flag", detail="t"))
    await server.start()
    try:
        transport = httpx.ASGITransport(app=server.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            response = await client.post(
                "/v1/chat/completions",
                json={"model": "moa/default", "messages": [{"role": "user", "content": "q"}]},
                timeout=30,
            )
        assert response.status_code == 200, response.text
        assert response.json()["localmoa"]["loads"] >= 3
    finally:
        await server.aclose()
    assert loads_during_calls(served.spans)
    assert served.peak_bytes <= budget

    ran = Timeline(capacity=budget)
    stages = calls_for(config.ensembles["default"])
    sizes = {name: 1 << 30 for name in ("a", "b", "c")}
    plan = plan_run(stages, sizes, budget, PlanPolicy(None))
    executor = Executor(config.models, {"fake": ran}, sizes=sizes)
    result = await executor.run(stages, plan, [ChatMessage(role="user", content="q")])
    assert all(c.ok for c in result.calls)
    assert loads_during_calls(ran.spans)
