"""The llama.cpp backend with real llama.cpp and generated tiny models."""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from localmoa.backends import llamacpp
from localmoa.backends.base import ChatMessage, ChatRequest
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.config import LlamaCppModel
from localmoa.errors import BackendError
from localmoa.footprint.estimate import estimate, read_gguf
from localmoa.tinymodels import TinySpec, write_tiny_model

REQUEST = ChatRequest(
    messages=[
        ChatMessage(role="system", content="You are terse."),
        ChatMessage(role="user", content="Tell me about the sea."),
    ],
    temperature=0.7,
    max_tokens=16,
)


def model(path: Path, **kwargs: Any) -> LlamaCppModel:
    return LlamaCppModel(**{"backend": "llamacpp", "path": path, "n_ctx": 512, "seed": 3, **kwargs})


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

    def stream(name: str, llama: Any, request: ChatRequest, each_token: Any) -> Iterator[str]:
        def spy(input_ids: Any, scores: Any) -> Any:
            generating.set()
            return each_token(input_ids, scores)

        return real_stream(name, llama, request, spy)

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
    with pytest.raises(BackendError) as failed:
        async for _ in backend.chat("a", long):
            pass
    tokens = await backend.prompt_tokens("a", model(tiny_models["tiny-a"]), long.messages)
    assert str(failed.value) == (
        f'model "a": the prompt\'s {tokens} tokens do not fit the context (n_ctx 512); raise '
        f"n_ctx of [models.a] to at least {tokens + 8}, or shorten the prompt"
    )
    await backend.unload("a")


async def test_an_answer_that_fills_the_context_says_which_n_ctx_to_raise(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """llama.cpp reports a full context as "llama_decode returned 1" and nothing more.

    llama-cpp-python caps max_tokens to the room left, but does not count tokens that end
    inside a UTF-8 character: an answer of such tokens overflows, whatever max_tokens says.
    Forcing the byte 0xF0 (a 4-byte character's lead) makes that happen on any weights."""
    real_stream = llamacpp._stream

    def stream(name: str, llama: Any, request: ChatRequest, each_token: Any) -> Iterator[str]:
        lead = next(t for t in range(llama.n_vocab()) if llama.detokenize([t]) == b"\xf0")

        def never_complete(input_ids: Any, scores: Any) -> Any:
            scores = each_token(input_ids, scores).copy()
            scores[:] = -float("inf")
            scores[lead] = 0.0
            return scores

        return real_stream(name, llama, request, never_complete)

    monkeypatch.setattr(llamacpp, "_stream", stream)
    backend = LlamaCppBackend()
    await backend.load("a", model(tiny_models["tiny-a"], n_ctx=256))
    with pytest.raises(BackendError) as failed:
        async for _ in backend.chat("a", REQUEST):
            pass
    assert re.fullmatch(
        r'model "a": the context is full \(n_ctx 256: \d+ prompt tokens \+ \d+ generated\); '
        r"raise n_ctx of \[models\.a\] or lower max_tokens / shorten the prompt",
        str(failed.value),
    ), failed.value
    monkeypatch.setattr(llamacpp, "_stream", real_stream)
    assert [d async for d in backend.chat("a", REQUEST)]  # the model still answers
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


@pytest.fixture(scope="module")
def slow_prompt_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 13 MB model: a 2,300-token prompt takes it about half a second to evaluate on a laptop CPU,
    long enough to cancel in the middle of."""
    path = tmp_path_factory.mktemp("slow") / "slow.gguf"
    spec = TinySpec(n_layer=4, n_embd=256, n_head=8, n_head_kv=4, n_ff=768, seed=5)
    return write_tiny_model(path, spec)


LONG_PROMPT = ChatRequest(
    messages=[ChatMessage(role="user", content=" ".join(str(i) for i in range(600)))],
    temperature=0.7,
    max_tokens=1,
)


async def test_cancelling_during_the_prompt_s_evaluation_frees_the_worker_at_once(
    slow_prompt_model: Path,
) -> None:
    """Generation stops within a token; the prompt's evaluation (one llama_decode over all of
    it: n_batch = n_ctx) must stop too, or unload waits for all of it."""
    config = model(slow_prompt_model, n_ctx=4096, n_batch=4096)
    backend = LlamaCppBackend()
    await backend.load("m", config)
    assert [d async for d in backend.chat("m", REQUEST)]  # warm: weights paged in, threads up
    began = time.perf_counter()
    assert [d async for d in backend.chat("m", LONG_PROMPT)]
    whole = time.perf_counter() - began  # the prompt's evaluation and one token
    await backend.unload("m")

    await backend.load("m", config)  # a fresh context: nothing of the prompt cached
    decoding = threading.Event()
    context = backend._models["m"].llama._ctx
    real_decode = context.decode

    def decode(batch: Any) -> Any:
        decoding.set()
        return real_decode(batch)

    context.decode = decode
    consumer = asyncio.create_task(anext(backend.chat("m", LONG_PROMPT)))
    assert await asyncio.to_thread(decoding.wait, 60)  # the worker is inside llama_decode
    cancelled = time.perf_counter()
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    returned = time.perf_counter() - cancelled
    # The context survives the abort: the same worker answers at once.
    assert [d async for d in backend.chat("m", REQUEST)]
    began = time.perf_counter()
    await backend.unload("m")
    freed = returned + time.perf_counter() - began
    print(f"stopped and unloaded in {freed:.3f}s; the evaluation takes {whole:.3f}s")
    assert freed < whole / 4
    assert worker_threads() == []


async def test_prompt_tokens_counts_as_the_call_does_without_loading(
    tiny_models: dict[str, Path],
) -> None:
    backend = LlamaCppBackend()
    config = model(tiny_models["tiny-b"])
    counted = await backend.prompt_tokens("b", config, REQUEST.messages)
    assert backend.loaded() == []
    await backend.load("b", config)
    deltas = [d async for d in backend.chat("b", REQUEST)]
    await backend.unload("b")
    assert counted == deltas[-1].prompt_tokens > sum(len(m.content) for m in REQUEST.messages) / 8


async def test_a_cancelled_count_never_waits_for_the_tokenizer(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tokenizing cannot be interrupted: a cancelled caller abandons it to a daemon thread."""
    inside, release = threading.Event(), threading.Event()
    real_count = llamacpp._count

    def count(vocab: Any, messages: list[ChatMessage]) -> int:
        inside.set()
        release.wait(60)
        return real_count(vocab, messages)

    monkeypatch.setattr(llamacpp, "_count", count)
    backend = LlamaCppBackend()
    counting = asyncio.create_task(
        backend.prompt_tokens("a", model(tiny_models["tiny-a"]), REQUEST.messages)
    )
    assert await asyncio.to_thread(inside.wait, 60)
    counting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await counting  # at once, while the tokenizer is still busy
    busy = [t for t in threading.enumerate() if t.name == "tokenize-a"]
    assert len(busy) == 1 and busy[0].daemon and busy[0].is_alive()
    release.set()
    busy[0].join(60)


async def test_an_unreadable_vocabulary_is_a_backend_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(BackendError, match=r'model "x": cannot count the prompt\'s tokens'):
        await LlamaCppBackend().prompt_tokens("x", model(bad), REQUEST.messages)


# --- request options: stop, seed, response_format ---------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "calm": {"type": "boolean"},
        "waves": {"type": "integer"},
        "colour": {"enum": ["blue", "grey"]},
    },
    "required": ["calm", "waves", "colour"],
    "additionalProperties": False,
}


@pytest.fixture
async def tiny_a(tiny_models: dict[str, Path]) -> AsyncIterator[LlamaCppBackend]:
    backend = LlamaCppBackend()
    await backend.load("a", model(tiny_models["tiny-a"]))
    yield backend
    await backend.unload("a")


async def reply(backend: LlamaCppBackend, **options: Any) -> str:
    request = ChatRequest.model_validate(
        {**REQUEST.model_dump(), "temperature": 1.0, "max_tokens": 32, **options}
    )
    return "".join([d.text async for d in backend.chat("a", request)])


async def test_the_same_seed_gives_the_same_answer_and_another_differs(
    tiny_a: LlamaCppBackend,
) -> None:
    first = await reply(tiny_a, seed=5)
    assert first and await reply(tiny_a, seed=5) == first
    assert await reply(tiny_a, seed=6) != first
    assert await reply(tiny_a, seed=-1) == await reply(tiny_a, seed=-1)  # never "random"


async def test_a_stop_string_ends_the_answer_before_it(tiny_a: LlamaCppBackend) -> None:
    whole = await reply(tiny_a, seed=5)
    # A character the answer has, not at its start: the stopped answer is what precedes it.
    firsts = {c: whole.index(c) for c in whole if c.isascii() and c.isprintable()}
    stop = max((c for c in firsts if firsts[c] > 0), key=firsts.__getitem__)
    cut = await reply(tiny_a, seed=5, stop=[stop, "never in it \u2603"])
    assert cut == whole[: whole.index(stop)] and 0 < len(cut) < len(whole)


async def test_json_object_answers_are_json_objects(tiny_a: LlamaCppBackend) -> None:
    for seed in range(4):
        text = await reply(
            tiny_a, seed=seed, max_tokens=256, response_format={"type": "json_object"}
        )
        assert isinstance(json.loads(text), dict), text


async def test_json_schema_answers_match_the_schema(tiny_a: LlamaCppBackend) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "sea", "schema": SCHEMA}}
    for seed in range(4):
        text = await reply(tiny_a, seed=seed, max_tokens=256, response_format=response_format)
        answer = json.loads(text)
        assert set(answer) == {"calm", "waves", "colour"}, text
        assert isinstance(answer["calm"], bool) and answer["colour"] in ("blue", "grey")
        assert isinstance(answer["waves"], int) and not isinstance(answer["waves"], bool)


async def test_a_schema_llama_cpp_cannot_express_fails_before_generating(
    tiny_a: LlamaCppBackend,
) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "odd", "schema": {"type": "wave"}}}
    with pytest.raises(BackendError) as failed:
        await reply(tiny_a, response_format=bad)
    assert str(failed.value).startswith(
        'model "a": response_format: llama.cpp cannot turn the JSON schema "odd" into a grammar '
        "(Unrecognized schema"
    )
    assert tiny_a._models["a"].llama.n_tokens == 0  # nothing was evaluated
    assert await reply(tiny_a, seed=1)  # and the model still answers


async def test_max_tokens_holds_even_when_the_text_ends_inside_a_utf8_character(
    tiny_models: dict[str, Path],
) -> None:
    # With these seeds the random model's 4th token leaves a UTF-8 character unfinished, where
    # llama-cpp-python's stream stops checking max_tokens (found by sampling seeds 0-39).
    backend = LlamaCppBackend()
    request = ChatRequest(
        messages=[ChatMessage(role="user", content="hi")], temperature=1.0, max_tokens=4
    )
    for seed in (10, 27):
        await backend.load("m", model(tiny_models["tiny-a"], n_ctx=512, seed=seed))
        try:
            deltas = [d async for d in backend.chat("m", request)]
            prompt = sum(d.prompt_tokens for d in deltas)
            in_context = backend._models["m"].llama.n_tokens
            assert in_context - prompt <= request.max_tokens + 1  # +1: the token that ends it
            assert sum(d.tokens for d in deltas) <= request.max_tokens
        finally:
            await backend.unload("m")


# --- telemetry -----------------------------------------------------------------------------------


async def test_a_load_measures_what_this_process_took(tiny_models: dict[str, Path]) -> None:
    backend = LlamaCppBackend()
    config = model(tiny_models["tiny-b"])
    await backend.load("m", config)
    try:
        peak = backend.load_peak_bytes("m")
        kv_cache = estimate(read_gguf(config.path), n_ctx=config.n_ctx, n_batch=512).kv_cache
        # llama.cpp clears its KV cache when it makes it: those bytes are resident at least.
        assert peak is not None and peak >= kv_cache > 0
    finally:
        await backend.aclose()
    assert backend.load_peak_bytes("m") is None


async def test_samples_state_the_rate_of_the_prompt_they_share(
    tiny_models: dict[str, Path],
) -> None:
    backend = LlamaCppBackend()
    await backend.load("m", model(tiny_models["tiny-a"], parallel=2))
    requests = [
        REQUEST.model_copy(update={"temperature": 1.0, "max_tokens": 8, "seed": seed})
        for seed in (1, 2, 3)
    ]
    last: dict[int, float | None] = {}
    try:
        async for index, delta in backend.chat_samples("m", requests, 2):
            assert index not in last, "a delta after the sample's last"
            if delta.prompt_tokens:  # the last
                last[index] = delta.prefill_tok_s
            else:
                assert delta.prefill_tok_s is None and delta.decode_tok_s is None
    finally:
        await backend.aclose()
    assert sorted(last) == [0, 1, 2]
    (rate,) = set(last.values())  # two rounds of samples, one evaluation of the prompt
    assert rate is not None and 0 < rate < float("inf")


async def test_a_call_states_the_rate_of_the_prompt_it_evaluated(
    tiny_models: dict[str, Path],
) -> None:
    """Timed around llama.cpp's evaluation of the prompt alone: what the context already held
    from the last call is not evaluated again, so it is not counted either."""
    backend = LlamaCppBackend()
    await backend.load("m", model(tiny_models["tiny-a"]))
    timer = backend._models["m"].prompt
    evaluated: list[int] = []
    evaluate = timer._evaluate

    def spy(tokens: Any) -> None:
        evaluated.append(len(tokens))
        evaluate(tokens)

    timer._evaluate = spy
    try:
        for _ in range(2):
            evaluated.clear()
            deltas = [d async for d in backend.chat("m", REQUEST)]
            assert all(d.prefill_tok_s is None for d in deltas[:-1])
            rate = deltas[-1].prefill_tok_s
            assert rate is not None and 0 < rate < float("inf")
            assert evaluated[0] <= deltas[-1].prompt_tokens  # the prompt's evaluation first
        assert evaluated[0] < deltas[-1].prompt_tokens  # the second: only what was not kept
    finally:
        await backend.aclose()
