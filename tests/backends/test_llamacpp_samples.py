"""Answers decoded together as sequences of one llama.cpp context: an agent's samples of one
prompt (Self-MoA), and one model's calls for different prompts (a batch, concurrent requests).

Real llama.cpp with the tiny random-weight models: their answers are noise, different for every
seed, which is what makes "each sample has its own seed" checkable. llama-cpp-python's own
stream drops some characters whose UTF-8 bytes come in two tokens (it decodes each piece alone,
ignoring errors), which the samples keep; answers are compared with a chat call's on their ASCII
characters and their token counts, which both keep whole.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from localmoa.backends.base import ChatDelta, ChatMessage, ChatRequest
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.backends.llamacpp_batch import Sample
from localmoa.config import LlamaCppModel
from localmoa.errors import BackendError
from localmoa.footprint.estimate import kv_cache_bytes, read_gguf

SEEDS = (11, 22, 33, 44)
MESSAGES = [
    ChatMessage(role="system", content="You are terse."),
    ChatMessage(role="user", content="Tell me about the sea."),
]
SCHEMA = {
    "type": "object",
    "properties": {"calm": {"type": "boolean"}, "waves": {"type": "integer"}},
    "required": ["calm", "waves"],
    "additionalProperties": False,
}


def model(path: Path, **kwargs: Any) -> LlamaCppModel:
    return LlamaCppModel(
        **{"backend": "llamacpp", "path": path, "n_ctx": 512, "seed": 3, "parallel": 4, **kwargs}
    )


def request(seed: int, **options: Any) -> ChatRequest:
    return ChatRequest.model_validate(
        {"messages": MESSAGES, "temperature": 1.0, "max_tokens": 24, "seed": seed, **options}
    )


class Answer:
    """One sample's deltas."""

    def __init__(self) -> None:
        self.deltas: list[ChatDelta] = []

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def tokens(self) -> int:
        return sum(d.tokens for d in self.deltas)

    @property
    def ascii(self) -> str:
        return "".join(c for c in self.text if c.isascii())


async def samples(
    backend: LlamaCppBackend, requests: Sequence[ChatRequest], parallel: int = 4
) -> dict[int, Answer]:
    answers: dict[int, Answer] = defaultdict(Answer)
    async for index, delta in backend.chat_samples("m", requests, parallel):
        assert not answers[index].deltas or not answers[index].deltas[-1].prompt_tokens, (
            "a delta after the sample's last"
        )
        answers[index].deltas.append(delta)
    return dict(answers)


async def chat(backend: LlamaCppBackend, one: ChatRequest) -> Answer:
    answer = Answer()
    answer.deltas = [d async for d in backend.chat("m", one)]
    return answer


def record_decodes(backend: LlamaCppBackend) -> list[int]:
    """The size of every batch model "m"'s context decodes from now on."""
    context = backend._models["m"].llama._ctx
    real_decode = context.decode
    sizes: list[int] = []

    def decode(batch: Any) -> Any:
        sizes.append(batch.n_tokens())
        return real_decode(batch)

    context.decode = decode
    return sizes


def record_sequences(backend: LlamaCppBackend) -> list[set[int]]:
    """The sequences of every batch model "m"'s context decodes from now on."""
    context = backend._models["m"].llama._ctx
    real_decode = context.decode
    sequences: list[set[int]] = []

    def decode(batch: Any) -> Any:
        native = batch.batch
        sequences.append({native.seq_id[i][0] for i in range(native.n_tokens)})
        return real_decode(batch)

    context.decode = decode
    return sequences


@pytest.fixture
async def loaded(tiny_models: dict[str, Path]) -> AsyncIterator[LlamaCppBackend]:
    backend = LlamaCppBackend()
    await backend.load("m", model(tiny_models["tiny-a"]))
    yield backend
    await backend.unload("m")


async def test_each_sample_comes_back_under_its_index_with_its_own_seed(
    loaded: LlamaCppBackend, tiny_models: dict[str, Path]
) -> None:
    decodes = record_decodes(loaded)
    answers = await samples(loaded, [request(seed) for seed in SEEDS])
    assert sorted(answers) == [0, 1, 2, 3]
    assert len({a.text for a in answers.values()}) == 4, [a.text for a in answers.values()]
    prompt = await loaded.count_tokens("m", model(tiny_models["tiny-a"]), MESSAGES)
    # Together: the prompt once, then a token of every live sample a step.
    longest = max(a.tokens for a in answers.values())
    assert decodes[0] == prompt and len(decodes) == longest
    assert decodes[1] == 4 and sorted(decodes[1:], reverse=True) == decodes[1:]
    for answer in answers.values():
        assert 1 <= answer.tokens <= 24
        assert [d.prompt_tokens for d in answer.deltas] == [0] * (len(answer.deltas) - 1) + [prompt]


async def test_samples_are_the_answers_chat_calls_with_their_seeds_give(
    loaded: LlamaCppBackend,
) -> None:
    first = await samples(loaded, [request(seed) for seed in SEEDS])
    again = await samples(loaded, [request(seed) for seed in SEEDS])
    assert {i: a.text for i, a in again.items()} == {i: a.text for i, a in first.items()}
    # The context was emptied: chat calls afterwards answer as on a fresh load.
    for i, seed in enumerate(SEEDS):
        alone = await chat(loaded, request(seed))
        assert (alone.ascii, alone.tokens) == (first[i].ascii, first[i].tokens), seed
        assert alone.deltas[-1].prompt_tokens == first[i].deltas[-1].prompt_tokens


async def test_max_tokens_and_stop_strings_hold_per_sample(loaded: LlamaCppBackend) -> None:
    whole = await samples(loaded, [request(seed, max_tokens=48) for seed in SEEDS])
    limits = (1, 3, 7, 48)
    short = await samples(
        loaded, [request(seed, max_tokens=n) for seed, n in zip(SEEDS, limits, strict=True)]
    )
    for i, limit in enumerate(limits):
        assert short[i].tokens == min(limit, whole[i].tokens), (limit, whole[i].tokens)
        assert whole[i].text.startswith(short[i].text)
    # Each sample stops at its own string: an ASCII character of its answer, not at the start.
    stops = []
    for answer in (whole[i] for i in range(4)):
        firsts = {c: answer.text.index(c) for c in answer.text if c.isalnum() and c.isascii()}
        stops.append(max((c for c in firsts if firsts[c] > 0), key=firsts.__getitem__))
    cut = await samples(
        loaded,
        [
            request(seed, max_tokens=48, stop=[stop, "never in it \u2603"])
            for seed, stop in zip(SEEDS, stops, strict=True)
        ],
    )
    for i, stop in enumerate(stops):
        assert cut[i].text == whole[i].text[: whole[i].text.index(stop)], stop
        assert 0 < len(cut[i].text) < len(whole[i].text)


async def test_json_schema_answers_parse_in_every_sample(loaded: LlamaCppBackend) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "sea", "schema": SCHEMA}}
    answers = await samples(
        loaded, [request(seed, max_tokens=256, response_format=response_format) for seed in SEEDS]
    )
    parsed = [json.loads(answers[i].text) for i in range(4)]
    for answer in parsed:
        assert set(answer) == {"calm", "waves"} and isinstance(answer["calm"], bool)
        assert isinstance(answer["waves"], int) and not isinstance(answer["waves"], bool)
    assert len({json.dumps(a) for a in parsed}) > 1  # still sampled, each with its seed


async def test_more_samples_than_the_context_s_sequences_decode_in_rounds(
    tiny_models: dict[str, Path],
) -> None:
    backend = LlamaCppBackend()
    await backend.load("m", model(tiny_models["tiny-a"], parallel=2))
    try:
        seeds = (*SEEDS, 55)
        decodes = record_decodes(backend)
        answers = await samples(backend, [request(seed) for seed in seeds], parallel=4)
        assert sorted(answers) == [0, 1, 2, 3, 4]
        # Rounds of two, two and one, the prompt evaluated once: a later round decodes only
        # its last token again, for the logits its first token is sampled from.
        prompt = answers[0].deltas[-1].prompt_tokens
        assert decodes[0] == prompt and decodes.count(prompt) == 1 and max(decodes[1:]) == 2
        for i, seed in enumerate(seeds):
            alone = await chat(backend, request(seed))
            assert (answers[i].ascii, answers[i].tokens) == (alone.ascii, alone.tokens), seed
    finally:
        await backend.unload("m")


async def test_closing_the_stream_mid_decode_frees_the_worker(loaded: LlamaCppBackend) -> None:
    """The worker stops within a step of the close: no decode after it."""
    context = loaded._models["m"].llama._ctx
    real_decode = context.decode
    decodes: list[int] = []
    generating = threading.Event()

    def decode(batch: Any) -> Any:
        decodes.append(batch.n_tokens())
        if len(decodes) == 3:  # the prompt, then two steps of four tokens
            generating.set()
            stop = loaded._models["m"].busy[0]
            assert stop.wait(60)  # the test closes the stream meanwhile
        return real_decode(batch)

    context.decode = decode
    consumer = asyncio.create_task(
        samples(loaded, [request(seed, max_tokens=400) for seed in SEEDS])
    )
    assert await asyncio.to_thread(generating.wait, 60)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert decodes[1:] == [4, 4]  # nothing decoded after the stop
    context.decode = real_decode
    assert (await chat(loaded, request(5))).tokens  # the model answers again at once
    await loaded.unload("m")
    assert not [t for t in threading.enumerate() if t.name.startswith("localmoa-m")]


async def test_closing_during_the_prompt_aborts_its_evaluation(loaded: LlamaCppBackend) -> None:
    """llama.cpp's abort callback is armed while the samples' prompt is evaluated."""
    context = loaded._models["m"].llama._ctx
    real_decode = context.decode
    evaluating = threading.Event()
    failures: list[str] = []

    def decode(batch: Any) -> Any:
        evaluating.set()
        assert loaded._models["m"].busy[0].wait(60)
        try:
            return real_decode(batch)
        except RuntimeError as exc:
            failures.append(str(exc))
            raise

    context.decode = decode
    consumer = asyncio.create_task(samples(loaded, [request(seed) for seed in SEEDS]))
    assert await asyncio.to_thread(evaluating.wait, 60)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert failures == ["llama_decode returned 2"]  # aborted, not finished
    context.decode = real_decode
    assert len(await samples(loaded, [request(seed) for seed in SEEDS])) == 4


async def test_each_sample_has_the_configured_context_not_the_whole_cache(
    loaded: LlamaCppBackend, tiny_models: dict[str, Path]
) -> None:
    """The cache holds 4 × 512 cells, but a sequence (a sample or a chat call) has 512."""
    long = [ChatMessage(role="user", content="x" * 600)]
    tokens = await loaded.count_tokens("m", model(tiny_models["tiny-a"]), long)
    assert 512 < tokens < 4 * 512
    expected = (
        f'model "m": the prompt\'s {tokens} tokens do not fit the context (n_ctx 512); raise '
        f"n_ctx of [models.m] to at least {tokens + 24}, or shorten the prompt"
    )
    with pytest.raises(BackendError) as failed:
        await samples(loaded, [request(s).model_copy(update={"messages": long}) for s in SEEDS])
    assert str(failed.value) == expected
    with pytest.raises(BackendError) as failed:
        await chat(loaded, request(1).model_copy(update={"messages": long}))
    assert str(failed.value) == expected
    assert len(await samples(loaded, [request(seed) for seed in SEEDS])) == 4


async def test_count_tokens_is_the_chat_call_s_prompt(
    loaded: LlamaCppBackend, tiny_models: dict[str, Path]
) -> None:
    counted = await loaded.count_tokens("m", model(tiny_models["tiny-a"]), MESSAGES)
    assert counted == (await chat(loaded, request(1))).deltas[-1].prompt_tokens
    assert counted > sum(len(m.content) for m in MESSAGES) / 8


async def test_the_footprint_counts_every_sequence_s_kv_cache(
    tiny_models: dict[str, Path],
) -> None:
    backend = LlamaCppBackend()
    path = tiny_models["tiny-c"]
    one, four = model(path, parallel=1), model(path, parallel=4)
    small, large = await backend.footprint("m", one), await backend.footprint("m", four)
    per_sequence = kv_cache_bytes(read_gguf(path), 512)
    assert (small.kv_cache, large.kv_cache) == (per_sequence, 4 * per_sequence)
    output_rows = 3 * 4 * read_gguf(path).n_vocab  # a row of f32 logits per extra sequence
    assert large.total - small.total == 3 * per_sequence + output_rows
    # What llama.cpp really allocates grows by as much, and stays within the estimate.
    measured = []
    for config, footprint in ((one, small), (four, large)):
        await backend.load("m", config)
        bytes_ = backend.resident_bytes("m")
        await backend.unload("m")
        assert bytes_ is not None and bytes_ <= footprint.total
        measured.append(bytes_)
    # (llama.cpp logs each buffer in MiB with two decimals)
    assert measured[1] - measured[0] == pytest.approx(3 * per_sequence + output_rows, abs=30_000)


# Different prompts, of different lengths (each sequence decodes at its own positions), two
# of them with the chat template's system opening in common.
PROMPTS = {
    "A": MESSAGES,
    "B": [ChatMessage(role="user", content="Why?")],
    "C": [
        ChatMessage(role="system", content="You answer in French, in one long sentence."),
        ChatMessage(role="user", content="Describe a harbour at dawn, its boats and its birds."),
    ],
}


def asking(prompt: str, seed: int, **options: Any) -> ChatRequest:
    return request(seed, **options).model_copy(update={"messages": PROMPTS[prompt]})


async def separately(backend: LlamaCppBackend, requests: Sequence[ChatRequest]) -> list[Answer]:
    return [await chat(backend, one) for one in requests]


def same_answers(together: dict[int, Answer], alone: list[Answer]) -> None:
    assert sorted(together) == list(range(len(alone)))
    for i, answer in enumerate(alone):
        assert (together[i].ascii, together[i].tokens) == (answer.ascii, answer.tokens), i
        assert together[i].deltas[-1].prompt_tokens == answer.deltas[-1].prompt_tokens, i


@pytest.mark.parametrize("temperature", [0.0, 1.0])
async def test_different_prompts_together_are_the_answers_of_separate_chat_calls(
    loaded: LlamaCppBackend, temperature: float
) -> None:
    requests = [
        asking(prompt, seed, temperature=temperature)
        for prompt, seed in zip("ABC", SEEDS, strict=False)
    ]
    decodes = record_decodes(loaded)
    together = await samples(loaded, requests)
    # Each prompt evaluated into its own sequence, then one token of each live sequence a step.
    prompts = [together[i].deltas[-1].prompt_tokens for i in range(3)]
    assert len(set(prompts)) == 3, prompts
    assert decodes[:3] == prompts and max(decodes[3:]) == 3
    assert all(together[i].deltas[-1].prefill_tok_s for i in range(3))
    assert len({answer.text for answer in together.values()}) == 3
    same_answers(together, await separately(loaded, requests))


async def test_a_mix_of_prompts_in_rounds_gives_each_request_its_separate_answer(
    loaded: LlamaCppBackend,
) -> None:
    """Two requests of A, one of B, two of C, two sequences at a time: A is evaluated once for
    both its requests, and C's second round evaluates only its last token again."""
    order = "CABAC"  # one prompt's requests are put together whatever their order
    requests = [asking(p, seed) for p, seed in zip(order, (11, 22, 33, 44, 55), strict=True)]
    decodes = record_decodes(loaded)
    sequences = record_sequences(loaded)
    together = await samples(loaded, requests, parallel=2)
    assert set().union(*sequences) == {0, 1}
    length = {p: together[order.index(p)].deltas[-1].prompt_tokens for p in "ABC"}
    steps = sum(answer.tokens - 1 for answer in together.values())  # after the first token
    evaluated = sum(decodes) - steps
    assert evaluated <= length["A"] + length["B"] + length["C"] + 1, (evaluated, length)
    same_answers(together, await separately(loaded, requests))


async def test_max_tokens_and_stop_strings_hold_per_request_of_different_prompts(
    loaded: LlamaCppBackend,
) -> None:
    whole = await samples(
        loaded, [asking(p, seed, max_tokens=48) for p, seed in zip("ABC", SEEDS, strict=False)]
    )
    limits = (1, 5, 48)
    short = await samples(
        loaded,
        [asking(p, seed, max_tokens=n) for p, seed, n in zip("ABC", SEEDS, limits, strict=False)],
    )
    for i, limit in enumerate(limits):
        assert short[i].tokens == min(limit, whole[i].tokens), (limit, whole[i].tokens)
        assert whole[i].text.startswith(short[i].text)
    stops = []  # an ASCII character of each answer, not at its start
    for answer in (whole[i] for i in range(3)):
        firsts = {c: answer.text.index(c) for c in answer.text if c.isalnum() and c.isascii()}
        stops.append(max((c for c in firsts if firsts[c] > 0), key=firsts.__getitem__))
    cut = await samples(
        loaded,
        [
            asking(p, seed, max_tokens=48, stop=[stop])
            for p, seed, stop in zip("ABC", SEEDS, stops, strict=False)
        ],
    )
    for i, stop in enumerate(stops):
        assert cut[i].text == whole[i].text[: whole[i].text.index(stop)], stop
        assert 0 < len(cut[i].text) < len(whole[i].text)


async def test_closing_mid_decode_of_different_prompts_stops_within_a_step(
    loaded: LlamaCppBackend,
) -> None:
    context = loaded._models["m"].llama._ctx
    real_decode = context.decode
    decodes: list[int] = []
    generating = threading.Event()

    def decode(batch: Any) -> Any:
        decodes.append(batch.n_tokens())
        if len(decodes) == 5:  # three prompts, then two steps of three tokens
            generating.set()
            assert loaded._models["m"].busy[0].wait(60)  # the test closes the stream meanwhile
        return real_decode(batch)

    context.decode = decode
    requests = [asking(p, seed, max_tokens=400) for p, seed in zip("ABC", SEEDS, strict=False)]
    consumer = asyncio.create_task(samples(loaded, requests))
    assert await asyncio.to_thread(generating.wait, 60)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert decodes[3:] == [3, 3]  # nothing decoded after the stop
    context.decode = real_decode
    again = [asking(p, seed) for p, seed in zip("ABC", SEEDS, strict=False)]
    same_answers(await samples(loaded, again), await separately(loaded, again))


async def test_closing_during_a_later_prompt_aborts_it_and_evaluates_no_more(
    loaded: LlamaCppBackend,
) -> None:
    context = loaded._models["m"].llama._ctx
    real_decode = context.decode
    evaluating = threading.Event()
    decodes: list[int] = []
    failures: list[str] = []

    def decode(batch: Any) -> Any:
        decodes.append(batch.n_tokens())
        if len(decodes) == 2:  # B's prompt, after A's
            evaluating.set()
            assert loaded._models["m"].busy[0].wait(60)
        try:
            return real_decode(batch)
        except RuntimeError as exc:
            failures.append(str(exc))
            raise

    context.decode = decode
    requests = [asking(p, seed) for p, seed in zip("ABC", SEEDS, strict=False)]
    consumer = asyncio.create_task(samples(loaded, requests))
    assert await asyncio.to_thread(evaluating.wait, 60)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert failures == ["llama_decode returned 2"] and len(decodes) == 2  # C never began
    context.decode = real_decode
    same_answers(await samples(loaded, requests), await separately(loaded, requests))


async def test_a_prompt_too_long_fails_the_call_naming_the_longest(
    loaded: LlamaCppBackend, tiny_models: dict[str, Path]
) -> None:
    config = model(tiny_models["tiny-a"])
    long = [ChatMessage(role="user", content="x" * 600)]
    longer = [ChatMessage(role="user", content="y" * 700)]
    tokens = {
        "long": await loaded.count_tokens("m", config, long),
        "longer": await loaded.count_tokens("m", config, longer),
    }
    assert 512 < tokens["long"] < tokens["longer"]
    decodes = record_decodes(loaded)
    one = [asking("A", 1), request(2).model_copy(update={"messages": long}), asking("B", 3)]
    with pytest.raises(BackendError) as failed:
        await samples(loaded, one)
    assert str(failed.value) == (
        f'model "m": 1 of 3 prompts does not fit the context (n_ctx 512): it has '
        f"{tokens['long']} tokens; raise n_ctx of [models.m] to at least {tokens['long'] + 24}, "
        "or shorten it"
    )
    two = [
        request(1).model_copy(update={"messages": long}),
        asking("A", 2, max_tokens=600),
        request(3, max_tokens=40).model_copy(update={"messages": longer}),
        request(4).model_copy(update={"messages": long}),
    ]
    with pytest.raises(BackendError) as failed:
        await samples(loaded, two)
    prompt_a = await loaded.count_tokens("m", config, PROMPTS["A"])
    needed = max(tokens["longer"] + 40, prompt_a + 600)  # every request's whole answer
    assert str(failed.value) == (
        f'model "m": 2 of 3 prompts do not fit the context (n_ctx 512): the longest has '
        f"{tokens['longer']} tokens; raise n_ctx of [models.m] to at least {needed}, "
        "or shorten them"
    )
    assert decodes == []  # failed before anything was evaluated
    fine = [asking(p, seed) for p, seed in zip("ABC", SEEDS, strict=False)]
    assert len(await samples(loaded, fine)) == 3


def test_text_waits_for_whole_characters_and_for_what_may_begin_a_stop() -> None:
    sample = Sample(index=0, prompt=[1], sampler=None, stops=["STOP"], limit=99, criteria=None)
    released = [sample._release(piece, final=False) for piece in (b"a\xc3", b"\xa9S", b"T")]
    assert released == [("a", False), ("\u00e9", False), ("", False)]
    assert sample._release(b"OP and more", final=False) == ("", True)
    sample = Sample(index=0, prompt=[1], sampler=None, stops=["STOP"], limit=99, criteria=None)
    assert sample._release(b"xST", final=False) == ("x", False)
    assert sample._release(b"\xe2\x82", final=True) == ("ST", False)  # the end: all of it


async def test_steps_take_the_decode_threads_while_another_model_computes(
    loaded: LlamaCppBackend, tiny_models: dict[str, Path]
) -> None:
    """Several models' batch threads at once would oversubscribe the cores: a step of several
    sequences gets the batch threads alone on the device, the decode threads while another
    model computes, and the context is left with its own threads after."""
    import llama_cpp

    llama = loaded._models["m"].llama
    llama.n_threads, llama.n_threads_batch = 1, 2  # as on a 2-core machine
    llama_cpp.llama_set_n_threads(llama.ctx, 1, 2)
    context = llama._ctx
    real_decode = context.decode
    seen: list[tuple[int, int]] = []  # (tokens in the decode, batch threads it ran with)

    def decode(batch: Any) -> Any:
        seen.append((batch.batch.n_tokens, llama_cpp.llama_n_threads_batch(llama.ctx)))
        return real_decode(batch)

    context.decode = decode
    prompts = [asking("A", 1, max_tokens=4), asking("B", 2, max_tokens=4)]
    await samples(loaded, prompts, parallel=2)
    alone = [threads for tokens, threads in seen if tokens == 2]
    seen.clear()
    await loaded.load("other", model(tiny_models["tiny-b"]))
    try:
        loaded._models["other"].busy.append(threading.Event())  # it computes meanwhile
        await samples(loaded, prompts, parallel=2)
    finally:
        loaded._models["other"].busy.clear()
        await loaded.unload("other")
    crowded = [threads for tokens, threads in seen if tokens == 2]
    assert alone and set(alone) == {2}
    assert crowded and set(crowded) == {1}
    assert llama_cpp.llama_n_threads_batch(llama.ctx) == 2  # its own again
