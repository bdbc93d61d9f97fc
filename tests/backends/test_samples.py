"""An agent's samples (Self-MoA) on the backends that send them as concurrent requests.

Each backend's ``chat_samples`` is the base class's: at most ``parallel`` requests at once
through ``chat``. What is asserted is what the model's server saw: how many requests it answered
at once, that all of them ran, and what each carried (its own seed, the same pinned options).
Servers hold requests until the test lets them go, so "at once" is observed, never timed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import AsyncIterator

import pytest

from localmoa.backends.base import ChatDelta, ChatMessage, ChatRequest
from localmoa.backends.fake import FakeBackend
from localmoa.config import FakeModel
from localmoa.errors import BackendError

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
