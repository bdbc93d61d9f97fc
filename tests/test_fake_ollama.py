"""The fake Ollama server, checked through the real ``ollama.AsyncClient`` over loopback HTTP.

These pin the fake to Ollama's documented behaviour, so that tests of localmoa's Ollama backend
that run against it mean something: the shapes the client parses, and the scheduler's loads,
evictions, reloads and expiries.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import ollama
import pytest
from fake_ollama import (
    GRAPH_ALLOWANCE,
    FakeOllama,
    FakeOllamaModel,
    _parse_go_duration,
    loaded_bytes,
)

MiB = 1 << 20
LLAMA = FakeOllamaModel("llama3.1:8b")
QWEN = FakeOllamaModel(
    "qwen2.5:7b",
    family="qwen2",
    parameter_size="7.6B",
    size=4_700_000_000,
    reply="qwen says {prompt}",
)
EMBED = FakeOllamaModel(
    "nomic-embed-text",
    family="nomic-bert",
    parameter_size="137M",
    quantization_level="F16",
    size=274_000_000,
    capabilities=["embedding"],
)
ONE_8B = loaded_bytes(LLAMA, 4096)


class FakeClock:
    """A monotonic clock the test moves by hand, so keep_alive expiry needs no sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def model(name: str, **kwargs: Any) -> FakeOllamaModel:
    return FakeOllamaModel(name, **kwargs)


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama([LLAMA, QWEN, EMBED]) as server:
        yield server


@pytest.fixture
async def client(fake: FakeOllama) -> AsyncIterator[ollama.AsyncClient]:
    async with ollama.AsyncClient(host=fake.url) as c:
        yield c


# -- pure parts ----------------------------------------------------------------------------


def test_loaded_bytes_is_weights_plus_f16_kv_plus_graph() -> None:
    # Llama-3.1-8B: 32 layers · 8 KV heads · (128 + 128) · 4096 tokens · 2 bytes = 512 MiB.
    assert loaded_bytes(LLAMA, 4096) == LLAMA.size + 512 * MiB + GRAPH_ALLOWANCE
    assert loaded_bytes(LLAMA, 8192) - loaded_bytes(LLAMA, 4096) == 512 * MiB
    # A declared key_length wins over n_embd / n_head (gemma-like: 256-wide heads).
    gemma = model(
        "gemma2:9b",
        family="gemma2",
        size=0,
        model_info={
            "general.architecture": "gemma2",
            "gemma2.block_count": 2,
            "gemma2.context_length": 8192,
            "gemma2.embedding_length": 3584,
            "gemma2.attention.head_count": 16,
            "gemma2.attention.head_count_kv": 8,
            "gemma2.attention.key_length": 256,
            "gemma2.attention.value_length": 256,
        },
    )
    assert loaded_bytes(gemma, 1024) == 2 * 8 * 512 * 1024 * 2 + GRAPH_ALLOWANCE
    # The context is capped at the training context, as Ollama caps num_ctx.
    assert loaded_bytes(gemma, 65536) == loaded_bytes(gemma, 8192)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("0", 0.0), ("0s", 0.0), ("5m", 300.0), ("1h30m", 5400.0), ("300ms", 0.3), ("-1s", -1.0)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert _parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "m", "1x", "1h 2m"])
def test_bad_go_durations(text: str) -> None:
    with pytest.raises(ValueError, match="time: "):
        _parse_go_duration(text)


# -- model listing ---------------------------------------------------------------------------


async def test_version_and_root(fake: FakeOllama) -> None:
    async with httpx.AsyncClient(base_url=fake.url) as http:
        assert (await http.get("/api/version")).json() == {"version": "0.12.0"}
        assert (await http.get("/")).text == "Ollama is running"
        missing = await http.post("/api/nope", json={"x": 1})
        assert (missing.status_code, missing.text) == (404, "404 page not found")
    assert fake.requests == [
        ("GET", "/api/version", None),
        ("GET", "/", None),
        ("POST", "/api/nope", {"x": 1}),
    ]


async def test_list_and_show(client: ollama.AsyncClient, fake: FakeOllama) -> None:
    listed = await client.list()
    assert [m.model for m in listed.models] == [
        "llama3.1:8b",
        "qwen2.5:7b",
        "nomic-embed-text:latest",
    ]
    qwen = listed.models[1]
    assert qwen.size == 4_700_000_000
    assert qwen.details is not None
    assert (qwen.details.family, qwen.details.format) == ("qwen2", "gguf")
    assert (qwen.details.parameter_size, qwen.details.quantization_level) == ("7.6B", "Q4_K_M")
    assert qwen.digest is not None and len(qwen.digest) == 64

    shown = await client.show("llama3.1:8b")
    assert shown.modelinfo is not None
    assert shown.modelinfo["general.architecture"] == "llama"
    assert shown.modelinfo["llama.block_count"] == 32
    assert shown.modelinfo["llama.attention.head_count_kv"] == 8
    assert shown.modelinfo["llama.context_length"] == 131_072
    assert shown.modelinfo["tokenizer.ggml.tokens"] == []  # blanked unless verbose
    assert shown.capabilities == ["completion"]
    assert shown.details is not None and shown.details.quantization_level == "Q4_K_M"
    assert shown.modelfile is not None and "FROM" in shown.modelfile

    assert (await client.show("nomic-embed-text")).capabilities == ["embedding"]
    async with httpx.AsyncClient(base_url=fake.url) as http:
        verbose = await http.post("/api/show", json={"model": "llama3.1:8b", "verbose": True})
    assert len(verbose.json()["model_info"]["tokenizer.ggml.tokens"]) == 16

    with pytest.raises(ollama.ResponseError) as missing:
        await client.show("nope:1b")
    assert missing.value.status_code == 404
    assert fake.events == []  # listing and showing load nothing


# -- chat and generate ---------------------------------------------------------------------


async def test_chat_streams_word_by_word(client: ollama.AsyncClient, fake: FakeOllama) -> None:
    parts = [
        part
        async for part in await client.chat(
            "llama3.1:8b", messages=[{"role": "user", "content": "Hi there"}], stream=True
        )
    ]
    assert "".join(p.message.content or "" for p in parts) == "a fake answer from llama3.1:8b"
    assert [p.done for p in parts] == [False] * 5 + [True]
    last = parts[-1]
    assert (last.done_reason, last.eval_count, last.prompt_eval_count) == ("stop", 5, 2)
    assert last.total_duration is not None and last.load_duration is not None
    assert last.total_duration >= last.load_duration > 0
    assert all(p.message.role == "assistant" for p in parts)
    assert fake.events == [("load", "llama3.1:8b")]


async def test_chat_not_streamed_and_num_predict(client: ollama.AsyncClient) -> None:
    whole = await client.chat("qwen2.5:7b", messages=[{"role": "user", "content": "hello"}])
    assert whole.message.content == "qwen says hello"
    assert (whole.done, whole.done_reason, whole.eval_count) == (True, "stop", 3)

    capped = await client.chat(
        "qwen2.5:7b",
        messages=[{"role": "user", "content": "hello"}],
        options={"num_predict": 2},
    )
    assert (capped.message.content, capped.done_reason, capped.eval_count) == (
        "qwen says",
        "length",
        2,
    )


async def test_stop_strings_end_the_reply_before_them(client: ollama.AsyncClient) -> None:
    hello = [{"role": "user", "content": "hello"}]
    stopped = await client.chat("qwen2.5:7b", messages=hello, options={"stop": [" hel", "zz"]})
    assert (stopped.message.content, stopped.done_reason, stopped.eval_count) == (
        "qwen says",
        "stop",
        2,
    )
    with pytest.raises(ollama.ResponseError, match="must be of an array of strings"):
        await client.chat("qwen2.5:7b", messages=hello, options={"stop": "says"})


async def test_format_is_json_or_a_schema(client: ollama.AsyncClient, fake: FakeOllama) -> None:
    hello = [{"role": "user", "content": "hello"}]
    for fmt in ("json", {"type": "object"}, ""):
        assert (await client.chat("qwen2.5:7b", messages=hello, format=fmt)).done
    async with httpx.AsyncClient(base_url=fake.url) as http:
        body = {"model": "qwen2.5:7b", "messages": hello, "format": "yaml", "stream": False}
        bad = await http.post("/api/chat", json=body)
    assert bad.status_code == 500
    assert bad.json()["error"].startswith("invalid format: ")
    assert bad.json()["error"].endswith('expected "json" or a valid JSON Schema object')


async def test_wire_format_is_ndjson_and_streams_by_default(fake: FakeOllama) -> None:
    async with (
        httpx.AsyncClient(base_url=fake.url) as http,
        http.stream("POST", "/api/generate", json={"model": "llama3.1:8b", "prompt": "hi"}) as r,
    ):
        assert r.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) async for line in r.aiter_lines()]
    assert "".join(line["response"] for line in lines) == "a fake answer from llama3.1:8b"
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    assert isinstance(lines[-1]["context"], list)
    assert set(lines[0]) == {"model", "created_at", "response", "done"}
    created = datetime.strptime(lines[0]["created_at"], "%Y-%m-%dT%H:%M:%S.%fZ")
    assert abs(created.replace(tzinfo=UTC) - datetime.now(UTC)) < timedelta(minutes=1)


async def test_empty_generate_loads_and_keep_alive_zero_unloads(
    client: ollama.AsyncClient, fake: FakeOllama
) -> None:
    loaded = await client.generate("llama3.1:8b", prompt="", keep_alive=-1)
    assert (loaded.done, loaded.done_reason) == (True, "load")
    ps = await client.ps()
    assert [m.model for m in ps.models] == ["llama3.1:8b"]
    running = ps.models[0]
    assert running.size == running.size_vram == ONE_8B
    assert running.context_length == 4096
    assert running.expires_at is not None and running.expires_at.year > 2200  # forever
    assert fake.resident() == {"llama3.1:8b": ONE_8B}

    unloaded = await client.generate("llama3.1:8b", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert (await client.ps()).models == []
    assert fake.events == [("load", "llama3.1:8b"), ("unload", "llama3.1:8b")]

    # The same through /api/chat with no messages, and keep_alive as a Go duration string.
    assert (await client.chat("qwen2.5:7b", messages=[])).done_reason == "load"
    assert (await client.chat("qwen2.5:7b", messages=[], keep_alive="0s")).done_reason == "unload"
    assert fake.events[-2:] == [("load", "qwen2.5:7b"), ("unload", "qwen2.5:7b")]


async def test_errors(client: ollama.AsyncClient, fake: FakeOllama) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        await client.chat("nope:1b", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404
    assert missing.value.error == 'model "nope:1b" not found, try pulling it first'

    with pytest.raises(ollama.ResponseError) as streamed:
        async for _ in await client.generate("nope:1b", prompt="hi", stream=True):
            pass
    assert streamed.value.status_code == 404

    with pytest.raises(ollama.ResponseError) as embedding_only:
        await client.chat("nomic-embed-text", messages=[{"role": "user", "content": "hi"}])
    assert embedding_only.value.status_code == 400
    assert "does not support chat" in embedding_only.value.error

    async with httpx.AsyncClient(base_url=fake.url) as http:
        for body in (
            b"{not json",
            b"",
            b"[]",
            json.dumps({"model": "llama3.1:8b", "prompt": "x", "keep_alive": "5"}).encode(),
            json.dumps(
                {"model": "llama3.1:8b", "prompt": "x", "options": {"num_ctx": "big"}}
            ).encode(),
            json.dumps({"model": "llama3.1:8b", "prompt": 3}).encode(),
        ):
            bad = await http.post("/api/generate", content=body)
            assert bad.status_code == 400, body
            assert bad.json()["error"]
    assert fake.events == []


# -- scheduler -----------------------------------------------------------------------------


async def test_capacity_evicts_an_idle_model() -> None:
    with FakeOllama([LLAMA, QWEN], capacity_bytes=8_000_000_000) as fake:
        async with ollama.AsyncClient(host=fake.url) as client:
            await client.generate("llama3.1:8b", prompt="")
            await client.chat("qwen2.5:7b", messages=[{"role": "user", "content": "hi"}])
            assert [m.model for m in (await client.ps()).models] == ["qwen2.5:7b"]
    assert fake.events == [
        ("load", "llama3.1:8b"),
        ("evict", "llama3.1:8b"),
        ("load", "qwen2.5:7b"),
    ]
    assert fake.peak_bytes == ONE_8B <= 8_000_000_000


async def test_max_loaded_models_evicts_shortest_keep_alive_first() -> None:
    small = [model(f"m{i}:1b", size=100_000_000) for i in range(3)]
    with FakeOllama(small, max_loaded_models=2) as fake:
        async with ollama.AsyncClient(host=fake.url) as client:
            await client.generate("m0:1b", prompt="", keep_alive=-1)
            await client.generate("m1:1b", prompt="", keep_alive="10m")
            await client.generate("m2:1b", prompt="")
    assert fake.events[-2:] == [("evict", "m1:1b"), ("load", "m2:1b")]
    assert set(fake.resident()) == {"m0:1b", "m2:1b"}


async def test_a_busy_model_is_waited_for_not_evicted() -> None:
    with FakeOllama([LLAMA, QWEN], capacity_bytes=8_000_000_000, token_seconds=0.1) as fake:
        async with ollama.AsyncClient(host=fake.url) as client:
            stream = await client.chat(
                "llama3.1:8b", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            first = await anext(stream)
            assert first.message.content == "a"
            other = asyncio.create_task(client.generate("qwen2.5:7b", prompt=""))
            await asyncio.sleep(0.05)
            assert not other.done()
            assert fake.events == [("load", "llama3.1:8b")]
            rest = [part async for part in stream]
            assert rest[-1].done
            assert (await other).done_reason == "load"
    assert fake.events[1:] == [("evict", "llama3.1:8b"), ("load", "qwen2.5:7b")]
    assert fake.peak_bytes <= 8_000_000_000


async def test_an_abandoned_stream_gives_its_model_back() -> None:
    with FakeOllama([LLAMA, QWEN], capacity_bytes=8_000_000_000, token_seconds=0.02) as fake:
        async with httpx.AsyncClient(base_url=fake.url) as http:
            body = {"model": "llama3.1:8b", "messages": [{"role": "user", "content": "hi"}]}
            async with http.stream("POST", "/api/chat", json=body) as r:
                async for _ in r.aiter_lines():
                    break  # leave mid-stream: the connection closes under the server
        async with ollama.AsyncClient(host=fake.url) as client:
            # Only possible once llama3.1 is idle again: the GPU holds one of the two.
            await asyncio.wait_for(client.generate("qwen2.5:7b", prompt=""), timeout=2)
    assert fake.events == [
        ("load", "llama3.1:8b"),
        ("evict", "llama3.1:8b"),
        ("load", "qwen2.5:7b"),
    ]


async def test_changed_num_ctx_reloads_changed_temperature_does_not(
    client: ollama.AsyncClient, fake: FakeOllama
) -> None:
    ask = [{"role": "user", "content": "hi"}]
    await client.chat("llama3.1:8b", messages=ask, options={"num_ctx": 4096, "temperature": 0.7})
    await client.chat("llama3.1:8b", messages=ask, options={"num_ctx": 4096, "temperature": 0.1})
    await client.chat("llama3.1:8b", messages=ask, options={"num_ctx": 4096, "seed": 3})
    assert fake.events == [("load", "llama3.1:8b")]

    await client.chat("llama3.1:8b", messages=ask, options={"num_ctx": 8192})
    assert fake.events == [("load", "llama3.1:8b"), ("reload", "llama3.1:8b")]
    running = (await client.ps()).models[0]
    assert (running.context_length, running.size) == (8192, loaded_bytes(LLAMA, 8192))

    # Leaving num_ctx out means the default (4096), not "whatever is loaded": another reload.
    await client.chat("llama3.1:8b", messages=ask)
    assert fake.events[-1] == ("reload", "llama3.1:8b")
    assert fake.resident() == {"llama3.1:8b": ONE_8B}


async def test_keep_alive_expiry_follows_the_injected_clock() -> None:
    clock = FakeClock()
    with FakeOllama([LLAMA, QWEN], clock=clock) as fake:
        async with ollama.AsyncClient(host=fake.url) as client:
            ask = [{"role": "user", "content": "hi"}]
            await client.chat("llama3.1:8b", messages=ask, keep_alive="1s")
            await client.chat("qwen2.5:7b", messages=ask)  # default 5m
            clock.advance(0.9)
            assert {m.model for m in (await client.ps()).models} == {"llama3.1:8b", "qwen2.5:7b"}
            clock.advance(0.2)
            assert [m.model for m in (await client.ps()).models] == ["qwen2.5:7b"]
            assert fake.events[-1] == ("expire", "llama3.1:8b")

            # The request's keep_alive overwrites the runner's, and the timer restarts at idle.
            await client.chat("qwen2.5:7b", messages=ask, keep_alive=2)
            clock.advance(1.5)
            assert "qwen2.5:7b" in fake.resident()
            clock.advance(1.0)
            assert fake.resident() == {}
            assert fake.events[-1] == ("expire", "qwen2.5:7b")


async def test_loads_are_serialized() -> None:
    with FakeOllama([LLAMA, QWEN], load_seconds=0.05) as fake:
        async with ollama.AsyncClient(host=fake.url) as client:
            started = time.perf_counter()
            a, b = await asyncio.gather(
                client.generate("llama3.1:8b", prompt="hi"),
                client.generate("qwen2.5:7b", prompt="hi"),
            )
            assert time.perf_counter() - started >= 0.09  # 2 × 50 ms, give or take a tick
    # The later one waited for the first load, then did its own: about twice load_seconds.
    assert sorted(x.load_duration or 0 for x in (a, b))[1] >= 90_000_000
    assert [kind for kind, _ in fake.events] == ["load", "load"]


async def test_a_model_bigger_than_the_gpu_loads_alone_partly_offloaded() -> None:
    huge = model("llama3.1:70b", size=40_000_000_000, parameter_size="70.6B")
    with FakeOllama([LLAMA, huge], capacity_bytes=24_000_000_000) as fake:
        async with ollama.AsyncClient(host=fake.url) as client:
            await client.generate("llama3.1:8b", prompt="")
            await client.generate("llama3.1:70b", prompt="")
            (running,) = (await client.ps()).models
    assert running.size_vram == 24_000_000_000 < (running.size or 0)
    assert fake.events[1] == ("evict", "llama3.1:8b")
    assert fake.peak_bytes <= 24_000_000_000


async def test_bare_names_mean_latest(client: ollama.AsyncClient, fake: FakeOllama) -> None:
    await client.generate("nomic-embed-text", prompt="", keep_alive=0)  # unload of nothing: ok
    with pytest.raises(ollama.ResponseError, match="does not support generate"):
        await client.generate("nomic-embed-text:latest", prompt="hi")


async def test_requests_are_recorded_with_their_bodies(
    client: ollama.AsyncClient, fake: FakeOllama
) -> None:
    await client.chat(
        "llama3.1:8b",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        options={"num_ctx": 4096, "temperature": 0.2, "num_predict": 64},
        keep_alive=-1,
    )
    await client.ps()
    assert fake.requests == [
        (
            "POST",
            "/api/chat",
            {
                "model": "llama3.1:8b",
                "stream": False,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ],
                "options": {"num_ctx": 4096, "temperature": 0.2, "num_predict": 64},
                "keep_alive": -1.0,
                "tools": [],
            },
        ),
        ("GET", "/api/ps", None),
    ]


async def test_a_held_load_is_listed_and_waits_for_release() -> None:
    with FakeOllama([LLAMA, QWEN], hold_loads=True) as fake:
        async with ollama.AsyncClient(host=fake.url) as client:
            load = asyncio.create_task(client.generate("llama3.1:8b", prompt="", keep_alive=-1))
            assert await asyncio.to_thread(fake.load_started.wait, 10)
            # Listed while loading, as Ollama lists a runner that is starting; not answered yet.
            assert [m.model for m in (await client.ps()).models] == ["llama3.1:8b"]
            assert not load.done()
            fake.release_loads()
            assert (await load).done_reason == "load"
            # Released for good: a later load goes straight through.
            assert (await client.generate("qwen2.5:7b", prompt="")).done_reason == "load"
    assert [kind for kind, _ in fake.events] == ["load", "load"]


async def test_an_unload_during_a_held_load_takes_effect_when_it_ends() -> None:
    with FakeOllama([LLAMA], hold_loads=True) as fake:
        async with ollama.AsyncClient(host=fake.url) as client:
            load = asyncio.create_task(client.generate("llama3.1:8b", prompt="", keep_alive=-1))
            assert await asyncio.to_thread(fake.load_started.wait, 10)
            unloaded = await client.generate("llama3.1:8b", prompt="", keep_alive=0)
            assert unloaded.done_reason == "unload"
            assert "llama3.1:8b" in fake.resident()  # still starting: Ollama waits for it too
            fake.release_loads()
            await load
            assert fake.resident() == {}
    assert fake.events == [("load", "llama3.1:8b"), ("unload", "llama3.1:8b")]


def test_stopping_releases_a_held_load() -> None:
    fake = FakeOllama([LLAMA], hold_loads=True)
    with fake:
        answer: list[int] = []

        def preload() -> None:
            response = httpx.post(
                f"{fake.url}/api/generate", json={"model": "llama3.1:8b"}, timeout=10
            )
            answer.append(response.status_code)

        thread = threading.Thread(target=preload)
        thread.start()
        assert fake.load_started.wait(10)
    thread.join(10)
    assert answer == [200]


# -- parallel slots (OLLAMA_NUM_PARALLEL) --------------------------------------------------


def chats_to(fake: FakeOllama, name: str) -> int:
    return sum(
        1 for _, path, body in fake.requests if path == "/api/chat" and body["model"] == name
    )


def kinds(fake: FakeOllama) -> list[str]:
    return [kind for kind, _, _ in fake.generations]


def test_slots_hold_num_ctx_of_kv_cache_each() -> None:
    assert loaded_bytes(LLAMA, 4096, 2) - loaded_bytes(LLAMA, 4096) == 512 * MiB
    assert loaded_bytes(LLAMA, 4096, 4) == loaded_bytes(LLAMA, 16384)


async def test_requests_beyond_the_slots_wait_for_one() -> None:
    ask = [{"role": "user", "content": "hi"}]
    with FakeOllama([LLAMA], num_parallel=2, hold_chats=True) as fake:
        async with ollama.AsyncClient(host=fake.url) as client:
            chats = [
                asyncio.create_task(client.chat("llama3.1:8b", messages=ask, options={"seed": s}))
                for s in range(3)
            ]
            assert await asyncio.to_thread(
                fake.wait_until,
                lambda f: chats_to(f, "llama3.1:8b") == 3 and f.in_flight.get("llama3.1:8b") == 2,
            )
            assert kinds(fake) == ["start", "start"]  # the third has arrived and waits
            running = (await client.ps()).models[0]
            assert running.size == loaded_bytes(LLAMA, 4096, 2)
            assert running.context_length == 4096  # each request's, not the slots' sum

            fake.release_chats(1)  # one answer ends; the waiting one takes its slot
            assert await asyncio.to_thread(
                fake.wait_until, lambda f: kinds(f) == ["start", "start", "end", "start"]
            )
            fake.release_chats()
            answers = await asyncio.gather(*chats)
    assert [a.message.content for a in answers] == ["a fake answer from llama3.1:8b"] * 3
    assert kinds(fake) == ["start", "start", "end", "start", "end", "end"]
    assert fake.max_in_flight == {"llama3.1:8b": 2} and fake.in_flight == {"llama3.1:8b": 0}
    chat_indices = [i for i, (_, path, _) in enumerate(fake.requests) if path == "/api/chat"]
    assert sorted(i for _, _, i in fake.generations) == sorted(chat_indices * 2)
    assert fake.events == [("load", "llama3.1:8b")]  # the same options: one load


async def test_one_slot_by_default_and_loads_take_none() -> None:
    ask = [{"role": "user", "content": "hi"}]
    with FakeOllama([LLAMA], hold_chats=True) as fake:
        async with ollama.AsyncClient(host=fake.url) as client:
            chats = [
                asyncio.create_task(client.chat("llama3.1:8b", messages=ask)) for _ in range(2)
            ]
            assert await asyncio.to_thread(
                fake.wait_until,
                lambda f: chats_to(f, "llama3.1:8b") == 2 and f.in_flight.get("llama3.1:8b") == 1,
            )
            # The only slot is busy, yet a preload is answered at once: it needs no slot.
            assert (await client.generate("llama3.1:8b", prompt="")).done_reason == "load"
            fake.release_chats()
            await asyncio.gather(*chats)
    assert kinds(fake) == ["start", "end", "start", "end"]
    assert fake.max_in_flight == {"llama3.1:8b": 1}
