"""An agent's samples (Self-MoA) on the backends that send them as concurrent requests.

Each backend's ``chat_samples`` is the base class's: at most ``parallel`` requests at once
through ``chat``. What is asserted is what the model's server saw: how many requests it answered
at once, that all of them ran, and what each carried (its own seed, the same pinned options).
Servers hold requests until the test lets them go, so "at once" is observed, never timed.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from fake_ollama import FakeOllama, FakeOllamaModel
from servers import Recorded, stub_server

from localmoa.backends.base import ChatDelta, ChatMessage, ChatRequest
from localmoa.backends.fake import FakeBackend
from localmoa.backends.ollama import OllamaBackend
from localmoa.backends.openai import OpenAIBackend
from localmoa.config import FakeModel, OllamaModel, OpenAIModel
from localmoa.errors import BackendError
from localmoa.footprint.measurements import MeasurementCache

SEEDS = (11, 22, 33, 44)


def samples(max_tokens: int = 8) -> list[ChatRequest]:
    """One agent's four samples: the same request but for the seed."""
    return [
        ChatRequest(
            messages=[ChatMessage(role="user", content="Why is the sky blue?")],
            temperature=0.7,
            max_tokens=max_tokens,
            seed=seed,
        )
        for seed in SEEDS
    ]


async def answers(stream: AsyncIterator[tuple[int, ChatDelta]]) -> dict[int, str]:
    """The text of each request's answer, by its index."""
    texts: dict[int, str] = defaultdict(str)
    async for index, delta in stream:
        texts[index] += delta.text
    return dict(texts)


async def step_through(
    seen: Callable[[], list[str]],
    wait_for: Callable[[list[str]], bool],
    release_one: Callable[[], None],
    parallel: int,
) -> None:
    """Let a server's held answers to the samples end one at a time, checking after each that
    the next request took its place and no other came: ``seen()`` lists the server's answers'
    ``"start"`` and ``"end"`` in order, and ``wait_for(expected)`` waits (in a thread) until
    they read ``expected``. A backend that sent more than ``parallel`` at once fails here."""
    expected = ["start"] * min(parallel, len(SEEDS))
    started = len(expected)
    assert await asyncio.to_thread(wait_for, list(expected)), (seen(), expected)
    for _ in SEEDS:
        release_one()
        expected.append("end")
        if started < len(SEEDS):
            expected.append("start")
            started += 1
        assert await asyncio.to_thread(wait_for, list(expected)), (seen(), expected)


# --- the shipped fake backend --------------------------------------------------------------------


@pytest.mark.parametrize("parallel", [1, 2, 4])
async def test_fake_samples_run_parallel_at_a_time_with_distinct_answers(parallel: int) -> None:
    config = FakeModel(backend="fake", memory=1, reply="{model} sample {seed}", parallel=parallel)
    backend = FakeBackend()
    await backend.load("qwen", config)
    texts = await answers(backend.chat_samples("qwen", samples(), config.parallel))
    assert texts == {i: f"qwen sample {seed}" for i, seed in enumerate(SEEDS)}
    assert backend.max_in_flight == {"qwen": parallel}
    assert [r.seed for _, r in backend.requests] == list(SEEDS)


async def test_a_failing_sample_fails_the_agent() -> None:
    backend = FakeBackend()
    await backend.load("qwen", FakeModel(backend="fake", memory=1, fail="boom", parallel=2))
    with pytest.raises(BackendError, match="boom"):
        await answers(backend.chat_samples("qwen", samples(), 2))


# --- Ollama ----------------------------------------------------------------------------------

QWEN = FakeOllamaModel(name="qwen2.5:7b", family="qwen2", reply="{model} seed {seed}")


def kinds(fake: FakeOllama) -> list[str]:
    return [kind for kind, _, _ in fake.generations]


@pytest.mark.parametrize("parallel", [1, 2])
async def test_ollama_samples_go_parallel_at_a_time_each_with_its_seed(
    tmp_path: Path, parallel: int
) -> None:
    # The server has more slots than declared, so only the backend can keep to `parallel`.
    with FakeOllama([QWEN], num_parallel=4, hold_chats=True) as fake:
        backend = OllamaBackend(fake.url, cache=MeasurementCache(tmp_path / "measured.json"))
        config = OllamaModel(backend="ollama", model="qwen2.5:7b", parallel=parallel)
        await backend.load("qwen", config)
        answering = asyncio.create_task(
            answers(backend.chat_samples("qwen", samples(), config.parallel))
        )
        await step_through(
            lambda: kinds(fake),
            lambda expected: fake.wait_until(lambda f: kinds(f) == expected),
            lambda: fake.release_chats(1),
            parallel,
        )
        texts = await answering
        await backend.aclose()
    assert texts == {i: f"qwen2.5:7b seed {seed}" for i, seed in enumerate(SEEDS)}
    assert fake.max_in_flight == {"qwen2.5:7b": parallel}
    chats = [body for _, path, body in fake.requests if path == "/api/chat"]
    assert sorted(chat["options"]["seed"] for chat in chats) == sorted(SEEDS)
    assert {chat["options"]["num_ctx"] for chat in chats} == {4096}  # as pinned at the preload
    assert {chat["keep_alive"] for chat in chats} == {-1}
    assert [kind for kind, _ in fake.events] == ["load", "unload"]  # never reloaded


async def test_ollama_samples_with_the_servers_one_slot_run_one_after_another(
    tmp_path: Path,
) -> None:
    with FakeOllama([QWEN]) as fake:  # OLLAMA_NUM_PARALLEL unset: 1
        backend = OllamaBackend(fake.url, cache=MeasurementCache(tmp_path / "measured.json"))
        await backend.load("qwen", OllamaModel(backend="ollama", model="qwen2.5:7b"))
        texts = await answers(backend.chat_samples("qwen", samples(), 1))
        await backend.aclose()
    assert len(texts) == len(SEEDS)
    assert kinds(fake) == ["start", "end"] * len(SEEDS)


# --- OpenAI-compatible servers ---------------------------------------------------------------


class HeldServer:
    """A stub OpenAI-compatible server whose answers wait, each in its own handler thread,
    until the test lets them go one at a time; it records each answer's start and end."""

    def __init__(self) -> None:
        self.kinds: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self._changed = threading.Condition()
        self._permits = threading.Semaphore(0)

    def answer(self, request: Recorded) -> tuple[int, str, str]:
        if request.method == "GET":
            return 200, "application/json", json.dumps({"data": [{"id": "tiny"}]})
        with self._changed:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.kinds.append("start")
            self._changed.notify_all()
        self._permits.acquire(timeout=30)
        with self._changed:
            self.in_flight -= 1
            self.kinds.append("end")
            self._changed.notify_all()
        text = f"seed {request.json()['seed']}"
        chunks = [
            {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        ]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return 200, "text/event-stream", body

    def release(self) -> None:
        self._permits.release()

    def wait_for(self, expected: list[str]) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.kinds == expected, timeout=10)


@pytest.mark.parametrize("parallel", [1, 2])
async def test_openai_samples_go_parallel_at_a_time_each_with_its_seed(parallel: int) -> None:
    held = HeldServer()
    with stub_server(held.answer) as (base, received):
        backend = OpenAIBackend()
        config = OpenAIModel(backend="openai", base_url=base, model="tiny", parallel=parallel)
        await backend.load("tiny", config)
        answering = asyncio.create_task(
            answers(backend.chat_samples("tiny", samples(), config.parallel))
        )
        await step_through(lambda: held.kinds, held.wait_for, held.release, parallel)
        texts = await answering
        await backend.aclose()
    assert texts == {i: f"seed {seed}" for i, seed in enumerate(SEEDS)}
    assert held.max_in_flight == parallel
    posts = [r.json() for r in received if r.method == "POST"]
    assert sorted(p["seed"] for p in posts) == sorted(SEEDS)
