"""The llama.cpp backend with real llama.cpp and generated tiny models."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from localmoa.backends.base import ChatMessage, ChatRequest
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.config import LlamaCppModel
from localmoa.errors import BackendError
from localmoa.memory import estimate, read_gguf

REQUEST = ChatRequest(
    messages=[
        ChatMessage(role="system", content="You are terse."),
        ChatMessage(role="user", content="Tell me about the sea."),
    ],
    temperature=0.7,
    max_tokens=16,
)


def model(path: Path, **kwargs: object) -> LlamaCppModel:
    return LlamaCppModel(backend="llamacpp", path=path, n_ctx=512, seed=3, **kwargs)  # type: ignore[arg-type]


def worker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("localmoa-")]


async def test_load_chat_measure_unload(tiny_models: dict[str, Path]) -> None:
    backend = LlamaCppBackend()
    await backend.load("a", model(tiny_models["tiny-a"]))
    assert backend.loaded() == ["a"]
    pieces = [p async for p in backend.chat("a", REQUEST)]
    assert pieces and len(pieces) <= 16
    measured = backend.resident_bytes("a")
    facts = read_gguf(tiny_models["tiny-a"])
    assert measured is not None and measured >= facts.weights_bytes
    await backend.unload("a")
    assert backend.loaded() == [] and worker_threads() == []


async def test_two_models_stream_concurrently_without_touching_stdio(
    tiny_models: dict[str, Path],
) -> None:
    before = os.readlink("/proc/self/fd/1"), os.readlink("/proc/self/fd/2")
    backend = LlamaCppBackend()
    await asyncio.gather(
        backend.load("a", model(tiny_models["tiny-a"])),
        backend.load("b", model(tiny_models["tiny-b"])),
    )

    async def answer(name: str) -> str:
        return "".join([p async for p in backend.chat(name, REQUEST)])

    a, b = await asyncio.gather(answer("a"), answer("b"))
    assert a and b
    assert (os.readlink("/proc/self/fd/1"), os.readlink("/proc/self/fd/2")) == before
    await backend.aclose()
    assert backend.loaded() == [] and worker_threads() == []


async def test_closing_a_stream_early_stops_generation(tiny_models: dict[str, Path]) -> None:
    backend = LlamaCppBackend()
    await backend.load("a", model(tiny_models["tiny-a"]))
    long = REQUEST.model_copy(update={"max_tokens": 400})
    stream = backend.chat("a", long)
    got = [await anext(stream) for _ in range(3)]
    await stream.aclose()  # returns once the worker has stopped
    assert len(got) == 3
    # The model is free again at once: a new call runs on the same worker.
    assert [p async for p in backend.chat("a", REQUEST)]
    await backend.unload("a")


async def test_unusable_file_is_a_backend_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    backend = LlamaCppBackend()
    with pytest.raises(BackendError, match=r'model "x": llama.cpp could not load .*bad.gguf'):
        await backend.load("x", model(bad))
    assert backend.loaded() == [] and worker_threads() == []


def test_estimate_covers_what_llama_cpp_reports(tiny_models: dict[str, Path]) -> None:
    async def measure(path: Path) -> int | None:
        backend = LlamaCppBackend()
        await backend.load("m", model(path))
        try:
            return backend.resident_bytes("m")
        finally:
            await backend.unload("m")

    for path in tiny_models.values():
        measured = asyncio.run(measure(path))
        predicted = estimate(read_gguf(path), n_ctx=512, n_batch=512).total
        assert measured is not None
        assert measured <= predicted, f"{path.name}: estimate {predicted} < buffers {measured}"
