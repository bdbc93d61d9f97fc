"""The OpenAI-compatible backend against a real ``python -m llama_cpp.server`` on loopback.

One server for the module (starting one takes a couple of seconds); each test has its own
backend, since an httpx client belongs to the event loop of the test that made it. Replies a
real server will not give on demand (401, a 400 for ``stream_options``) come from a stub.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from servers import Recorded, free_port, llama_cpp_server, recording_proxy, stub_server

from localmoa.backends.base import ChatDelta, ChatMessage, ChatRequest
from localmoa.backends.openai import OpenAIBackend
from localmoa.config import OpenAIModel
from localmoa.errors import BackendError, ConfigError, EgressError, ServerUnavailableError

# Greedy decoding makes the tiny model's noise deterministic: this prompt runs to max_tokens
# (sampling at random, a tiny model sometimes ends on its first token and says nothing).
REQUEST = ChatRequest(
    messages=[
        ChatMessage(role="system", content="You are terse."),
        ChatMessage(role="user", content="Why is the sky blue?"),
    ],
    temperature=0.0,
    max_tokens=16,
)


def model(base_url: str, **kwargs: Any) -> OpenAIModel:
    return OpenAIModel.model_validate(
        {"backend": "openai", "base_url": base_url, "model": "tiny", **kwargs}
    )


@pytest.fixture(scope="module")
def server(tiny_models: dict[str, Path]) -> Iterator[str]:
    with llama_cpp_server(tiny_models["tiny-a"], alias="tiny") as url:
        yield url


@pytest.fixture
async def backend() -> AsyncIterator[OpenAIBackend]:
    backend = OpenAIBackend()
    yield backend
    await backend.aclose()


def port_of(url: str) -> int:
    return int(url.split("://")[1].split("/")[0].rsplit(":", 1)[1])


def connections_to(port: int) -> int:
    """Established TCP connections from this process to ``port``."""
    return sum(
        1
        for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


async def answer(
    backend: OpenAIBackend, name: str, request: ChatRequest = REQUEST
) -> list[ChatDelta]:
    return [delta async for delta in backend.chat(name, request)]


async def test_load_then_stream_twice(server: str, backend: OpenAIBackend) -> None:
    config = model(server)
    footprint = await backend.footprint("tiny", config)
    assert (footprint.source, footprint.total) == ("server", 0)
    await backend.load("tiny", config)
    assert backend.loaded() == ["tiny"]
    assert backend.resident_bytes("tiny") is None
    for _ in range(2):
        deltas = await answer(backend, "tiny")
        assert any(d.text for d in deltas)
        assert 1 <= sum(d.tokens for d in deltas) <= REQUEST.max_tokens
    await backend.unload("tiny")
    assert backend.loaded() == []


async def test_declared_memory_is_the_footprint(server: str, backend: OpenAIBackend) -> None:
    config = model(server, memory="3GiB")
    assert (await backend.footprint("tiny", config)).total == 3 << 30
    await backend.load("tiny", config)
    assert backend.resident_bytes("tiny") == 3 << 30


async def test_the_request_on_the_wire(server: str, backend: OpenAIBackend) -> None:
    with recording_proxy(server) as proxy:
        base = f"http://127.0.0.1:{proxy.port}/v1"
        await backend.load("tiny", model(base, api_key="sekret"))
        deltas = await answer(backend, "tiny")
        sent = proxy.requests()
    assert [(r.method, r.path) for r in sent] == [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
    ]
    assert all(r.headers["authorization"] == "Bearer sekret" for r in sent)
    assert sent[1].json() == {
        "model": "tiny",
        "messages": [m.model_dump() for m in REQUEST.messages],
        "temperature": 0.0,
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    # The server honoured that max_tokens: this prompt generates until it is reached.
    assert sum(d.tokens for d in deltas) == 16


async def test_unknown_model_names_the_ids_the_server_has(
    server: str, backend: OpenAIBackend
) -> None:
    config = model(server, model="Tiny")  # ids are case-sensitive
    with pytest.raises(BackendError, match=r'no model "Tiny" \(it has: tiny\).*models\.x\.model'):
        await backend.load("x", config)
    with pytest.raises(ConfigError, match=r"it has: tiny"):
        await backend.footprint("x", config)
    assert backend.loaded() == []


async def test_nothing_listening(backend: OpenAIBackend) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}/v1"
    for attempt in (backend.load("x", model(base)), backend.footprint("x", model(base))):
        with pytest.raises(ServerUnavailableError) as caught:
            await attempt
        message = str(caught.value)
        assert base in message and "nothing answers" in message
        assert "python -m llama_cpp.server" in message and "models.x.base_url" in message
        assert "\n" not in message
    # A localhost name is reached at 127.0.0.1, which is what the server should bind.
    with pytest.raises(ServerUnavailableError) as named:
        await backend.load("x", model(f"http://api.localhost:{port}/v1"))
    assert f"--host 127.0.0.1 --port {port}`" in str(named.value)


async def test_other_hosts_are_refused_before_connecting(
    backend: OpenAIBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[Any] = []

    def connect(self: socket.socket, address: Any) -> Any:
        attempts.append(address)
        raise OSError("this test allows no connection")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    config = model("http://10.255.255.1:8080/v1")
    with pytest.raises(EgressError, match=r"models\.x\.base_url.*settings\.allowed_hosts"):
        await backend.load("x", config)
    with pytest.raises(EgressError, match="allowed_hosts"):
        await backend.footprint("x", config)
    assert attempts == []


async def test_closing_a_stream_early_closes_its_connection(
    server: str, backend: OpenAIBackend
) -> None:
    await backend.load("tiny", model(server))
    long = REQUEST.model_copy(update={"max_tokens": 1500})
    stream = backend.chat("tiny", long)
    first = await anext(stream)
    assert first.text
    assert connections_to(port_of(server)) == 1
    await stream.aclose()
    # At once, not after the garbage collector has finalized an abandoned generator.
    assert connections_to(port_of(server)) == 0
    assert sum(d.tokens for d in await answer(backend, "tiny")) == 16


async def test_a_prompt_beyond_the_context_fails_and_the_server_still_answers(
    server: str, backend: OpenAIBackend
) -> None:
    await backend.load("tiny", model(server))
    huge = REQUEST.model_copy(
        update={"messages": [ChatMessage(role="user", content="word " * 3000)]}
    )
    # llama_cpp.server says 200, then ends the stream with no data (the reason is in its log).
    with pytest.raises(BackendError, match="closed the stream before the answer was finished"):
        await answer(backend, "tiny", huge)
    # It also drops the kept-alive connection, which the next request must survive.
    assert sum(d.tokens for d in await answer(backend, "tiny")) == 16


# --- what a real server will not do on demand -----------------------------------------------------

LISTING = json.dumps({"object": "list", "data": [{"id": "tiny", "object": "model"}]})


def sse(*chunks: dict[str, Any]) -> str:
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def piece(text: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


async def test_wrong_api_key_names_the_setting(backend: OpenAIBackend) -> None:
    def refuse(request: Recorded) -> tuple[int, str, str]:
        return 401, "application/json", json.dumps({"detail": "Invalid API key"})

    with (
        stub_server(refuse) as (base, _),
        pytest.raises(BackendError, match=r"Invalid API key.*models\.x\.api_key"),
    ):
        await backend.load("x", model(base, api_key="wrong"))


async def test_stream_options_rejected_then_asked_without_and_usage_counted(
    backend: OpenAIBackend,
) -> None:
    def strict(request: Recorded) -> tuple[int, str, str]:
        if request.method == "GET":
            return 200, "application/json", LISTING
        if "stream_options" in request.json():
            error = {"error": {"message": "Unrecognized request argument: stream_options"}}
            return 400, "application/json", json.dumps(error)
        usage = {"choices": [], "usage": {"completion_tokens": 5}}
        body = sse(piece("Hel"), piece(""), piece("lo"), piece(None, "stop"), usage)
        return 200, "text/event-stream", body

    with stub_server(strict) as (base, received):
        await backend.load("tiny", model(base))
        for _ in range(2):
            deltas = await answer(backend, "tiny")
            # Text as sent; the empty piece's token rides on "lo"; usage tops up the rest.
            assert deltas == [ChatDelta("Hel", 1), ChatDelta("lo", 2), ChatDelta("", 2)]
    posts = [r.json() for r in received if r.method == "POST"]
    assert ["stream_options" in p for p in posts] == [True, False, False]  # remembered


async def test_errors_reported_by_the_server(backend: OpenAIBackend) -> None:
    replies = {
        "400": (400, "application/json", json.dumps({"error": {"message": "bad things"}})),
        "cut": (200, "text/event-stream", sse(piece("Hi"))),  # [DONE] with no finish_reason
        "mid": (200, "text/event-stream", sse(piece("Hi"), {"error": {"message": "oom"}})),
        "json": (200, "application/json", "{}"),
    }
    current = ["400"]

    def reply(request: Recorded) -> tuple[int, str, str]:
        return (
            (200, "application/json", LISTING) if request.method == "GET" else replies[current[0]]
        )

    with stub_server(reply) as (base, _):
        await backend.load("tiny", model(base))
        for key, pattern in [
            ("400", "answered 400: bad things"),
            ("cut", "cut short"),
            ("mid", "failed mid-answer: oom"),
            ("json", "not an event stream"),
        ]:
            current[0] = key
            with pytest.raises(BackendError, match=pattern):
                await answer(backend, "tiny")


# --- request options: passed through as OpenAI's own fields ----------------------------------

SCHEMA = {"type": "object", "properties": {"why": {"type": "string"}}, "required": ["why"]}


def answering(request: Recorded) -> tuple[int, str, str]:
    if request.method == "GET":
        return 200, "application/json", LISTING
    return 200, "text/event-stream", sse(piece("{}"), piece(None, "stop"))


@pytest.mark.parametrize(
    ("options", "sent"),
    [
        ({"stop": "END"}, {"stop": ["END"]}),
        ({"stop": ["a", "b", "c", "d"]}, {"stop": ["a", "b", "c", "d"]}),
        ({"seed": -7}, {"seed": -7}),
        (
            {"response_format": {"type": "json_object"}},
            {"response_format": {"type": "json_object"}},
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "why", "schema": SCHEMA, "strict": True},
                }
            },
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "why", "schema": SCHEMA, "strict": True},
                }
            },
        ),
    ],
)
async def test_request_options_pass_through(
    backend: OpenAIBackend, options: dict[str, Any], sent: dict[str, Any]
) -> None:
    with stub_server(answering) as (base, received):
        await backend.load("tiny", model(base))
        request = ChatRequest.model_validate({**REQUEST.model_dump(), **options})
        assert [d.text for d in await answer(backend, "tiny", request)] == ["{}"]
    (post,) = [r.json() for r in received if r.method == "POST"]
    assert post == {
        "model": "tiny",
        "messages": [m.model_dump() for m in REQUEST.messages],
        "temperature": 0.0,
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
        **sent,
    }


async def test_a_refused_option_is_the_servers_words_and_not_a_stream_options_retry(
    backend: OpenAIBackend,
) -> None:
    def no_schemas(request: Recorded) -> tuple[int, str, str]:
        if request.method == "GET":
            return 200, "application/json", LISTING
        if request.json().get("response_format", {}).get("type") == "json_schema":
            error = {"detail": "response_format.type: Input should be 'text' or 'json_object'"}
            return 422, "application/json", json.dumps(error)
        return answering(request)

    schema = {"type": "json_schema", "json_schema": {"name": "why", "schema": SCHEMA}}
    with stub_server(no_schemas) as (base, received):
        await backend.load("tiny", model(base))
        request = ChatRequest.model_validate({**REQUEST.model_dump(), "response_format": schema})
        with pytest.raises(BackendError, match=r"answered 422: response_format.type: Input should"):
            await answer(backend, "tiny", request)
        await answer(backend, "tiny")
    posts = [r.json() for r in received if r.method == "POST"]
    assert ["stream_options" in p for p in posts] == [True, True]  # asked once; still asked


async def test_the_real_server_honours_stop_and_seed(server: str, backend: OpenAIBackend) -> None:
    """llama_cpp.server, sampling at temperature 1: the same seed twice gives the same answer,
    and a stop string cuts it before the stop."""
    await backend.load("tiny", model(server))
    sampled = {**REQUEST.model_dump(), "temperature": 1.0, "seed": 11}

    async def text(**options: Any) -> str:
        request = ChatRequest.model_validate({**sampled, **options})
        return "".join(d.text for d in await answer(backend, "tiny", request))

    whole = await text()
    assert whole and await text() == whole
    firsts = {c: whole.index(c) for c in whole if c.isascii() and c.isprintable()}
    stop = max((c for c in firsts if firsts[c] > 0), key=firsts.__getitem__)
    assert await text(stop=stop) == whole[: whole.index(stop)]


async def test_a_cut_short_answer_with_parallel_slots_says_to_set_parallel_1(
    backend: OpenAIBackend,
) -> None:
    def cut(request: Recorded) -> tuple[int, str, str]:
        if request.method == "GET":
            return 200, "application/json", LISTING
        return 200, "text/event-stream", sse(piece("Hi"))  # [DONE] with no finish_reason

    with stub_server(cut) as (base, _):
        await backend.load("tiny", model(base, parallel=2))
        with pytest.raises(BackendError) as cut_short:
            await answer(backend, "tiny")
    assert "models.tiny.parallel is 2, which such a server cannot answer at once; set it to 1" in (
        str(cut_short.value)
    )


async def test_samples_on_the_real_server_one_after_another(
    server: str, backend: OpenAIBackend
) -> None:
    """llama_cpp.server answers one request at a time (parallel = 1): four samples, each with
    its seed, all answered in full and each its own."""
    await backend.load("tiny", model(server))
    requests = [
        ChatRequest.model_validate({**REQUEST.model_dump(), "temperature": 1.0, "seed": seed})
        for seed in (1, 2, 3, 4)
    ]
    texts: dict[int, str] = dict.fromkeys(range(4), "")
    tokens = dict.fromkeys(range(4), 0)
    async for index, delta in backend.chat_samples("tiny", requests, 1):
        texts[index] += delta.text
        tokens[index] += delta.tokens
    assert all(1 <= t <= REQUEST.max_tokens for t in tokens.values()), tokens
    assert len(set(texts.values())) == 4, texts  # distinct seeds, distinct answers


# --- telemetry: llama-server's timings ---------------------------------------------------------

TIMINGS = {
    "prompt_n": 12,
    "prompt_ms": 30.0,
    "prompt_per_token_ms": 2.5,
    "prompt_per_second": 400.0,
    "predicted_n": 2,
    "predicted_ms": 40.0,
    "predicted_per_token_ms": 20.0,
    "predicted_per_second": 50.0,
}


@pytest.mark.parametrize(
    ("timings", "prefill", "decode"),
    [
        (TIMINGS, 400.0, 50.0),  # llama-server's own rates
        ({"prompt_n": 12, "prompt_ms": 30.0, "predicted_n": 2, "predicted_ms": 40.0}, 400, 50),
        ({"prompt_per_second": 0, "prompt_n": 0, "predicted_per_second": True}, None, None),
        ({"prompt_per_second": "fast", "predicted_ms": 0, "predicted_n": 2}, None, None),
    ],
)
async def test_llama_server_timings_are_the_last_delta_s_rates(
    backend: OpenAIBackend,
    timings: dict[str, Any],
    prefill: float | None,
    decode: float | None,
) -> None:
    def timed(request: Recorded) -> tuple[int, str, str]:
        if request.method == "GET":
            return 200, "application/json", LISTING
        last = piece(None, "stop") | {"timings": timings}
        usage = {"choices": [], "usage": {"completion_tokens": 2, "prompt_tokens": 12}}
        return 200, "text/event-stream", sse(piece("Hel"), piece("lo"), last, usage)

    with stub_server(timed) as (base, received):
        await backend.load("tiny", model(base))
        deltas = await answer(backend, "tiny")
    assert deltas[:-1] == [ChatDelta("Hel", 1), ChatDelta("lo", 1)]
    assert deltas[-1] == ChatDelta("", 0, 12, prefill, decode)
    (post,) = [r.json() for r in received if r.method == "POST"]
    assert "timings_per_token" not in post and "timings" not in post  # nothing more is asked


async def test_llama_cpp_server_states_no_timings_so_the_stream_is_timed(
    server: str, backend: OpenAIBackend
) -> None:
    await backend.load("tiny", model(server))
    deltas = await answer(backend, "tiny")
    assert sum(d.tokens for d in deltas) == REQUEST.max_tokens
    assert all(d.prefill_tok_s is None and d.decode_tok_s is None for d in deltas)
