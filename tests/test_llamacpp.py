"""The llama.cpp backend with real llama.cpp and generated tiny models."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localmoa.backends import llamacpp
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
    deltas = [d async for d in backend.chat("a", REQUEST)]
    assert 1 <= sum(d.tokens for d in deltas) <= 16
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

    async def tokens(name: str) -> int:
        return sum([d.tokens async for d in backend.chat(name, REQUEST)])

    a, b = await asyncio.gather(tokens("a"), tokens("b"))
    assert a > 0 and b > 0
    assert (os.readlink("/proc/self/fd/1"), os.readlink("/proc/self/fd/2")) == before
    await backend.aclose()
    assert backend.loaded() == [] and worker_threads() == []


async def test_cancelling_a_stream_stops_generation_within_a_token(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    generating = threading.Event()
    real_stream = llamacpp._stream

    def stream(llama: Any, request: ChatRequest, each_token: Any) -> Iterator[str]:
        def spy(input_ids: Any, scores: Any) -> Any:
            generating.set()
            return each_token(input_ids, scores)

        return real_stream(llama, request, spy)

    monkeypatch.setattr(llamacpp, "_stream", stream)
    backend = LlamaCppBackend()
    await backend.load("a", model(tiny_models["tiny-a"]))
    consumer = asyncio.create_task(
        anext(backend.chat("a", REQUEST.model_copy(update={"max_tokens": 400})))
    )
    await asyncio.to_thread(generating.wait)  # the worker is sampling tokens
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    # Tokens in the context: the prompt (~70 byte tokens) and the few generated before the
    # stop, nowhere near the 400 asked for.
    assert backend._models["a"].llama.n_tokens < 200
    # The model is free again at once: a new call runs on the same worker.
    assert [d async for d in backend.chat("a", REQUEST)]
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


async def test_prompt_longer_than_the_context_says_what_to_raise(
    tiny_models: dict[str, Path],
) -> None:
    backend = LlamaCppBackend()
    await backend.load("a", model(tiny_models["tiny-a"]))
    long = ChatRequest(
        messages=[ChatMessage(role="user", content="x" * 2000)], temperature=0.7, max_tokens=8
    )
    with pytest.raises(
        BackendError, match=r"exceed context window of 512; raise n_ctx of \[models\.a\]"
    ):
        async for _ in backend.chat("a", long):
            pass
    await backend.unload("a")


def test_loading_quiets_only_the_loading_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """llama-cpp-python prints to sys.stderr while it loads; other threads' output (progress of
    calls running on other models) must still get through."""
    import io
    import sys

    real = io.StringIO()
    monkeypatch.setattr(sys, "stderr", real)
    inside = threading.Event()
    leave = threading.Event()

    def load() -> None:
        with llamacpp._quiet_this_thread() as quiet:
            print("Model metadata: {...}", file=sys.stderr)
            inside.set()
            leave.wait(10)
        assert "Model metadata" in quiet.getvalue()

    loader = threading.Thread(target=load)
    loader.start()
    assert inside.wait(10)
    print("layer 1 · a: ok", file=sys.stderr)  # another thread, during the load
    leave.set()
    loader.join(10)
    assert real.getvalue() == "layer 1 · a: ok\n"
    assert sys.stderr is real
