"""The Ollama backend against a fake Ollama server on loopback, with the request bodies asserted."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_ollama import FakeOllama, FakeOllamaModel, loaded_bytes

from localmoa.backends.base import ChatMessage, ChatRequest
from localmoa.backends.ollama import OllamaBackend, ollama_host
from localmoa.config import Agent, Ensemble, OllamaModel, Settings
from localmoa.egress import client_options
from localmoa.errors import (
    BackendError,
    EgressError,
    ModelNotInstalledError,
    ServerUnavailableError,
)
from localmoa.footprint.measurements import MeasurementCache
from localmoa.planning.fewest_loads import make_plan
from localmoa.runtime.engine import Event, Executor, ModelLoaded
from localmoa.runtime.moa import calls_for, stages_of

GB = 1_000_000_000
QWEN = FakeOllamaModel(name="qwen2.5:7b", family="qwen2", size=4 * GB)
EMBED = FakeOllamaModel(
    name="nomic-embed-text:latest", family="nomic-bert", size=GB // 4, capabilities=["embedding"]
)
REQUEST = ChatRequest(
    messages=[ChatMessage(role="user", content="Why is the sky blue?")],
    temperature=0.3,
    max_tokens=3,
)


@pytest.fixture
def server() -> Iterator[FakeOllama]:
    with FakeOllama([QWEN, EMBED]) as fake:
        yield fake


def backend_for(server: FakeOllama, tmp_path: Path) -> OllamaBackend:
    return OllamaBackend(server.url, cache=MeasurementCache(tmp_path / "measured.json"))


def model(tag: str = "qwen2.5:7b", num_ctx: int = 8192, parallel: int = 1) -> OllamaModel:
    return OllamaModel(backend="ollama", model=tag, num_ctx=num_ctx, parallel=parallel)


def bodies(server: FakeOllama, path: str) -> list[dict[str, object]]:
    return [body for method, p, body in server.requests if p == path]


async def test_estimate_before_load_then_measurement_after(
    server: FakeOllama, tmp_path: Path
) -> None:
    backend = backend_for(server, tmp_path)
    before = await backend.footprint("qwen", model())
    assert before.source == "ollama" and before.weights == 4 * GB
    assert before.kv_cache == 2 * 32 * 8 * 128 * 8192 * 2  # the fake reports an 8B llama shape
    assert before.total >= loaded_bytes(QWEN, 8192)  # an upper bound of what Ollama will hold
    await backend.load("qwen", model())
    assert backend.resident_bytes("qwen") == server.resident()["qwen2.5:7b"]
    await backend.unload("qwen")
    after = await OllamaBackend(
        server.url, cache=MeasurementCache(tmp_path / "measured.json")
    ).footprint("qwen", model())
    assert after.source == "measured" and after.total == loaded_bytes(QWEN, 8192)
    await backend.aclose()


async def test_the_estimate_and_the_measurement_count_every_slot(tmp_path: Path) -> None:
    with FakeOllama([QWEN], num_parallel=2) as fake:
        backend = backend_for(fake, tmp_path)
        one = await backend.footprint("qwen", model())
        two = await backend.footprint("qwen", model(parallel=2))
        assert (
            two.kv_cache
            == 2 * one.kv_cache
            == (await backend.footprint("q", model(num_ctx=16384))).kv_cache
        )
        assert two.source == "ollama" and "2 slots of num_ctx" in two.note
        assert two.total >= loaded_bytes(QWEN, 8192, 2)  # an upper bound of what Ollama holds
        await backend.load("qwen", model(parallel=2))
        assert backend.resident_bytes("qwen") == loaded_bytes(QWEN, 8192, 2)  # /api/ps
        await backend.aclose()
        again = backend_for(fake, tmp_path)
        measured = await again.footprint("qwen", model(parallel=2))
        assert (measured.source, measured.total) == ("measured", loaded_bytes(QWEN, 8192, 2))
        # Measured with two slots, it says nothing of one: that is estimated.
        assert (await again.footprint("qwen", model())).source == "ollama"
        await again.aclose()


async def test_residency_is_localmoas_with_options_pinned(
    server: FakeOllama, tmp_path: Path
) -> None:
    backend = backend_for(server, tmp_path)
    await backend.load("qwen", model())
    pieces = [d async for d in backend.chat("qwen", REQUEST)]
    await backend.unload("qwen")
    preload, unload = bodies(server, "/api/generate")
    assert preload["model"] == "qwen2.5:7b" and preload["keep_alive"] == -1
    assert preload["options"] == {"num_ctx": 8192} and "prompt" not in preload
    (chat,) = bodies(server, "/api/chat")
    assert chat["keep_alive"] == -1 and chat["stream"] is True
    assert chat["options"] == {"num_ctx": 8192, "temperature": 0.3, "num_predict": 3}
    assert chat["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]
    assert unload == {"model": "qwen2.5:7b", "keep_alive": 0, "stream": False}
    assert "".join(d.text for d in pieces) == "a fake answer"
    assert sum(d.tokens for d in pieces) == 3
    assert [kind for kind, _ in server.events] == ["load", "unload"]  # no reload, no evict
    assert server.resident() == {}
    await backend.aclose()


async def test_model_not_pulled_gives_the_pull_line(server: FakeOllama, tmp_path: Path) -> None:
    backend = backend_for(server, tmp_path)
    with pytest.raises(ModelNotInstalledError) as caught:
        await backend.footprint("big", model("llama3.1:70b"))
    message = str(caught.value)
    assert f"Ollama at {server.url} has no model " in message
    assert "(models.big.model); run `ollama pull llama3.1:70b`" in message
    assert not [r for r in server.requests if r[1] in ("/api/pull", "/api/generate")]
    await backend.aclose()


async def test_ollama_down_says_where_and_how_to_start_it() -> None:
    with socket.socket() as probe:  # a port on which nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = OllamaBackend(f"http://127.0.0.1:{port}")
    with pytest.raises(ServerUnavailableError, match=rf"not reachable at http://127.0.0.1:{port}"):
        await backend.installed()
    with pytest.raises(ServerUnavailableError, match="`ollama serve`"):
        await backend.footprint("x", model())
    await backend.aclose()


async def test_partial_offload_is_warned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    half = FakeOllamaModel(name="gemma2:9b", family="gemma2", size=5 * GB, vram_fraction=0.5)
    with FakeOllama([half]) as fake:
        backend = backend_for(fake, tmp_path)
        with caplog.at_level(logging.WARNING, logger="localmoa"):
            await backend.load("gemma", model("gemma2:9b", 4096))
        assert 'Ollama put part of "gemma" on the CPU (50% in GPU memory)' in caplog.text
        await backend.aclose()


async def test_a_host_off_this_machine_is_refused_before_connecting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts: list[object] = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, a: attempts.append(a))
    backend = OllamaBackend("http://10.20.30.40:11434")
    with pytest.raises(EgressError, match=r'settings.ollama_host: "10.20.30.40" .*allowed_hosts'):
        await backend.installed()
    assert attempts == []
    await backend.aclose()


@pytest.mark.parametrize(
    ("setting", "env", "expected"),
    [
        (None, None, "http://127.0.0.1:11434"),
        (None, "0.0.0.0", "http://127.0.0.1:11434"),
        (None, "0.0.0.0:12345", "http://127.0.0.1:12345"),
        (None, ":7000", "http://127.0.0.1:7000"),
        ("http://localhost:9999", "10.0.0.1", "http://localhost:9999"),
        ("gpu-box.lan", None, "http://gpu-box.lan:11434"),
    ],
)
def test_host_from_setting_then_environment_then_default(
    monkeypatch: pytest.MonkeyPatch, setting: str | None, env: str | None, expected: str
) -> None:
    if env is None:
        monkeypatch.delenv("OLLAMA_HOST", raising=False)
    else:
        monkeypatch.setenv("OLLAMA_HOST", env)
    assert ollama_host(setting) == expected


# --- nothing stays loaded after an interrupted load -------------------------------------------


def unloads(server: FakeOllama) -> list[dict[str, object]]:
    return [b for b in bodies(server, "/api/generate") if b.get("keep_alive") == 0]


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the event loop until ``condition()`` holds (the backend works on this loop)."""
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.002)


async def held_load(server: FakeOllama, backend: OllamaBackend) -> asyncio.Task[None]:
    """A load of "qwen" whose preload Ollama has begun and holds."""
    load = asyncio.create_task(backend.load("qwen", model()))
    assert await asyncio.to_thread(server.load_started.wait, 10)
    return load


async def test_a_load_cancelled_while_its_preload_is_held_is_unloaded(tmp_path: Path) -> None:
    with FakeOllama([QWEN], hold_loads=True) as fake:
        backend = backend_for(fake, tmp_path)
        load = await held_load(fake, backend)
        assert backend.loaded() == ["qwen"]  # sent, so held: aclose would unload it
        load.cancel()
        await until(lambda: bool(unloads(fake)), "the unload request")
        fake.release_loads()  # Ollama finishes the load (keep_alive -1), then honours the unload
        with pytest.raises(asyncio.CancelledError):
            await load
        assert fake.resident() == {}
        assert unloads(fake) == [{"model": "qwen2.5:7b", "keep_alive": 0, "stream": False}]
        assert backend.loaded() == []
        assert await backend.aclose() == ["qwen"]  # unloaded on the way out: said so


async def test_a_load_cancelled_while_reading_ps_after_the_preload_is_unloaded(
    server: FakeOllama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = backend_for(server, tmp_path)
    reading = asyncio.Event()
    real_running = backend._running

    async def first_read_hangs(tag: str) -> object:
        if not reading.is_set():
            reading.set()
            await asyncio.Event().wait()
        return await real_running(tag)

    monkeypatch.setattr(backend, "_running", first_read_hangs)
    load = asyncio.create_task(backend.load("qwen", model()))
    await reading.wait()
    assert server.resident() == {"qwen2.5:7b": loaded_bytes(QWEN, 8192)}
    load.cancel()
    with pytest.raises(asyncio.CancelledError):
        await load
    assert server.resident() == {} and len(unloads(server)) == 1
    assert backend.loaded() == []
    assert await backend.aclose() == ["qwen"]


async def test_a_load_ollama_refuses_is_undone_and_not_left_loaded(
    server: FakeOllama, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = backend_for(server, tmp_path)
    with caplog.at_level(logging.WARNING, logger="localmoa"), pytest.raises(BackendError):
        await backend.load("embed", model("nomic-embed-text:latest"))
    assert unloads(server) == [
        {"model": "nomic-embed-text:latest", "keep_alive": 0, "stream": False}
    ]
    assert backend.loaded() == [] and caplog.text == ""
    assert await backend.aclose() == []


async def test_a_second_cancellation_does_not_interrupt_the_unload(tmp_path: Path) -> None:
    with FakeOllama([QWEN], hold_loads=True) as fake:
        backend = backend_for(fake, tmp_path)
        load = await held_load(fake, backend)
        load.cancel()
        await until(lambda: bool(unloads(fake)), "the unload request")
        load.cancel()  # a second Ctrl-C while the unload waits for Ollama: delivered at once
        assert load.cancelling() == 2
        fake.release_loads()
        with pytest.raises(asyncio.CancelledError):
            await load
        assert fake.resident() == {} and backend.loaded() == []
        await backend.aclose()


async def test_aclose_during_a_cancelled_held_load_unloads_it_and_says_so(tmp_path: Path) -> None:
    with FakeOllama([QWEN], hold_loads=True) as fake:
        backend = backend_for(fake, tmp_path)
        load = await held_load(fake, backend)
        load.cancel()
        closing = asyncio.create_task(backend.aclose())  # the CLI's cleanup, on a signal
        await until(lambda: len(unloads(fake)) == 2, "both unload requests")
        fake.release_loads()
        assert await closing == ["qwen"]
        with pytest.raises(asyncio.CancelledError):
            await load
        assert fake.resident() == {}


async def test_an_unload_that_times_out_leaves_the_model_for_aclose(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("localmoa.backends.ollama.UNLOAD_TIMEOUT", 0.2)
    with FakeOllama([QWEN], hold_loads=True) as fake:
        backend = backend_for(fake, tmp_path)
        load = await held_load(fake, backend)
        load.cancel()
        with (
            caplog.at_level(logging.WARNING, logger="localmoa"),
            pytest.raises(asyncio.CancelledError),
        ):
            await load  # bounded: Ollama never finishes this load until released
        assert '"qwen": its load was interrupted and Ollama may still hold it' in caplog.text
        assert "did not unload qwen2.5:7b within 0.2 s" in caplog.text
        assert backend.loaded() == ["qwen"]
        fake.release_loads()
        assert await backend.aclose() == ["qwen"]
        assert fake.resident() == {}


async def test_aclose_tries_every_model_and_returns_those_it_unloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gemma = FakeOllamaModel(name="gemma2:9b", family="gemma2", size=5 * GB)
    with FakeOllama([QWEN, gemma]) as fake:
        backend = backend_for(fake, tmp_path)
        await backend.load("qwen", model())
        await backend.load("gemma", model("gemma2:9b"))
        real_unload = backend.unload

        async def qwen_fails(name: str) -> None:
            if name == "qwen":
                raise BackendError(name, "Ollama answered: something broke")
            await real_unload(name)

        monkeypatch.setattr(backend, "unload", qwen_fails)
        with caplog.at_level(logging.WARNING, logger="localmoa"):
            assert await backend.aclose() == ["gemma"]
        assert 'could not unload model "qwen": Ollama answered: something broke' in caplog.text
        assert list(fake.resident()) == ["qwen2.5:7b"]


@pytest.mark.parametrize(
    ("setting", "env", "blamed"),
    [
        (None, "10.20.30.40", "the OLLAMA_HOST environment variable"),
        ("10.20.30.40", None, "settings.ollama_host"),
        ("10.20.30.40", "127.0.0.1", "settings.ollama_host"),
    ],
)
async def test_a_refused_host_is_blamed_on_where_it_came_from(
    monkeypatch: pytest.MonkeyPatch, setting: str | None, env: str | None, blamed: str
) -> None:
    if env is None:
        monkeypatch.delenv("OLLAMA_HOST", raising=False)
    else:
        monkeypatch.setenv("OLLAMA_HOST", env)
    backend = OllamaBackend.from_settings(Settings(ollama_host=setting))
    with pytest.raises(EgressError) as refused:
        await backend.installed()
    assert str(refused.value).startswith(f'{blamed}: "10.20.30.40" is not on this machine')
    await backend.aclose()


async def test_unreachable_ollama_from_the_environment_says_to_point_ollama_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as probe:  # a port on which nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("OLLAMA_HOST", f"127.0.0.1:{port}")
    backend = OllamaBackend.from_settings(Settings())
    with pytest.raises(ServerUnavailableError) as down:
        await backend.installed()
    assert str(down.value).endswith("or point OLLAMA_HOST at it")
    await backend.aclose()


# --- request options ------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"why": {"type": "string"}}, "required": ["why"]}


@pytest.mark.parametrize(
    ("options", "sent_options", "sent_format"),
    [
        ({"stop": "answer"}, {"stop": ["answer"]}, None),
        ({"stop": ["x", "answer"]}, {"stop": ["x", "answer"]}, None),
        ({"seed": 42}, {"seed": 42}, None),
        ({"response_format": {"type": "json_object"}}, {}, "json"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "w", "schema": SCHEMA},
                }
            },
            {},
            SCHEMA,
        ),
        ({"response_format": {"type": "text"}}, {}, None),
    ],
)
async def test_request_options_are_ollamas_own(
    server: FakeOllama,
    tmp_path: Path,
    options: dict[str, object],
    sent_options: dict[str, object],
    sent_format: object,
) -> None:
    backend = backend_for(server, tmp_path)
    await backend.load("qwen", model())
    request = ChatRequest.model_validate({**REQUEST.model_dump(), **options})
    pieces = [d async for d in backend.chat("qwen", request)]
    await backend.aclose()
    (chat,) = bodies(server, "/api/chat")
    assert chat["options"] == {
        "num_ctx": 8192,
        "temperature": 0.3,
        "num_predict": 3,
        **sent_options,
    }
    assert chat.get("format") == sent_format
    # The fake, like Ollama, ends the reply before a stop string.
    expected = "a fake " if "stop" in options else "a fake answer"
    assert "".join(d.text for d in pieces) == expected
    assert [kind for kind, _ in server.events] == ["load", "unload"]  # sampling options: no reload


# --- telemetry: Ollama's own timings -------------------------------------------------------------


class _Kept(httpx.AsyncByteStream):
    """A response body passed on as it is read, a copy kept."""

    def __init__(self, stream: httpx.AsyncByteStream, kept: bytearray) -> None:
        self.stream = stream
        self.kept = kept

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.stream:
            self.kept.extend(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


class Tee(httpx.AsyncBaseTransport):
    """The backend's own transport, with every response body it reads kept by path."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.bodies: list[tuple[str, bytearray]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        kept = bytearray()
        self.bodies.append((request.url.path, kept))
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_Kept(response.stream, kept),
            extensions=response.extensions,
        )


async def test_ollama_s_own_timings_are_the_rates_and_the_request_is_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tees: list[Tee] = []

    def teeing(*args: Any, **kwargs: Any) -> dict[str, Any]:
        options = client_options(*args, **kwargs)
        tees.append(Tee(options["transport"]))
        return {**options, "transport": tees[-1]}

    monkeypatch.setattr("localmoa.backends.ollama.client_options", teeing)
    with FakeOllama([QWEN], token_seconds=0.005) as fake:
        backend = backend_for(fake, tmp_path)
        await backend.load("qwen", model())
        deltas = [d async for d in backend.chat("qwen", REQUEST)]
        assert backend.load_peak_bytes("qwen") == fake.resident()["qwen2.5:7b"]  # /api/ps size
        await backend.aclose()
        (chat,) = bodies(fake, "/api/chat")
    (tee,) = tees
    (answer,) = [body for path, body in tee.bodies if path == "/api/chat"]
    final = json.loads(answer.decode().splitlines()[-1])
    assert final["done"] and final["eval_duration"] > 0
    last = deltas[-1]
    assert last.prompt_tokens == final["prompt_eval_count"]
    # The fake takes 1 µs per prompt token, as its final chunk says: exactly 10^6 tokens/s.
    assert last.prefill_tok_s == final["prompt_eval_count"] * 1e9 / final["prompt_eval_duration"]
    assert last.prefill_tok_s == 1e6
    assert last.decode_tok_s == final["eval_count"] * 1e9 / final["eval_duration"]
    assert all(d.prefill_tok_s is None and d.decode_tok_s is None for d in deltas[:-1])
    assert chat == {  # telemetry asks nothing more of Ollama
        "model": "qwen2.5:7b",
        "stream": True,
        "options": {"num_ctx": 8192, "temperature": 0.3, "num_predict": 3},
        "keep_alive": -1.0,
        "messages": [{"role": "user", "content": "Why is the sky blue?"}],
        "tools": [],
    }


async def test_a_run_on_ollama_records_its_rates_and_the_load_s_size(tmp_path: Path) -> None:
    ensemble = Ensemble(layers=[[Agent(model="qwen")]], aggregator=Agent(model="qwen"))
    models = {"qwen": model()}
    events: list[Event] = []
    with FakeOllama([QWEN], token_seconds=0.002) as fake:
        backend = backend_for(fake, tmp_path)
        sizes = {"qwen": (await backend.footprint("qwen", model())).total}
        plan = make_plan(stages_of(ensemble), sizes, 100 * GB)
        executor = Executor(models, {"ollama": backend}, sizes=sizes)
        try:
            result = await executor.run(
                calls_for(ensemble), plan, [REQUEST.messages[0]], on_event=events.append
            )
        finally:
            await backend.aclose()
        resident = loaded_bytes(QWEN, 8192)
    for record in result.calls:
        assert record.ok and record.prefill_tok_s == 1e6  # Ollama's figure, not the stream's
        assert record.decode_tok_s is not None and record.decode_tok_s > 0
        assert record.ttft_s is not None and record.ttft_s > 0
    (loaded,) = [e for e in events if isinstance(e, ModelLoaded)]
    assert loaded.estimated_bytes == sizes["qwen"] and loaded.peak_bytes == resident
