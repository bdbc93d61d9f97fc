"""A batch on real llama.cpp (the tiny random-weight models): each prompt's answer is the one a
run of it alone gives, while every model loads once per stage for the whole chunk and one
model's calls for all prompts decode as sequences of one context."""

from __future__ import annotations

import asyncio
from pathlib import Path

from localmoa.backends import make_backends
from localmoa.backends.base import ChatMessage
from localmoa.batch.jobs import Job
from localmoa.batch.runner import BatchPlan, Outcome, ensemble_system, plan_batch, run_batch
from localmoa.config import LlamaCppModel, load_config
from localmoa.runtime.engine import Event, Executor
from localmoa.runtime.prepare import prepare

QUESTIONS = ["Why is the sky blue?", "Name a prime number.", "What is 2 + 2?", "Say hello."]


def test_batch_answers_are_the_runs_answers_with_one_load_per_stage(tiny_config: Path) -> None:
    greedy = tiny_config.read_text().replace(
        "max_tokens = 24", "max_tokens = 24\ntemperature = 0.0"
    )
    tiny_config.write_text(greedy)
    config = load_config(tiny_config)

    async def go() -> tuple[list[Outcome], list[str], int, int]:
        backends = make_backends(config.settings)
        try:
            planned = await plan_batch(
                config, [ensemble_system(config, "default")], len(QUESTIONS), backends
            )
            jobs = [
                Job(id=str(i), messages=[ChatMessage(role="user", content=q)])
                for i, q in enumerate(QUESTIONS)
            ]
            got: list[Outcome] = []
            events: list[Event] = []
            loads = await run_batch(
                config, planned, jobs, backends, on_chunk=got.extend, on_event=events.append
            )
            alone = []
            for question in QUESTIONS:
                prepared = await prepare(config, "default", backends, prompt=question)
                executor = Executor(prepared.models, backends)
                result = await executor.run(
                    prepared.stages,
                    prepared.plan,
                    [ChatMessage(role="user", content=question)],
                )
                alone.append(result.answer)
            table = planned.models["tiny-b"]
            assert isinstance(table, LlamaCppModel)
            return got, alone, loads, table.parallel or 1
        finally:
            for backend in backends.values():
                await backend.aclose()

    got, alone, loads, parallel = asyncio.run(go())
    assert [o.ok for o in got] == [True] * len(QUESTIONS)
    assert [o.answer for o in got] == alone
    assert loads == 3  # every model once: the budget holds all three
    assert parallel == len(QUESTIONS)  # one sequence per prompt
    calls = [c for o in got if o.result for c in o.result.calls]
    assert all(c.ok and c.tokens > 0 for c in calls)


def test_a_chunk_too_wide_for_the_budget_caps_each_models_sequences(tiny_config: Path) -> None:
    """Room for every model with 4 sequences, not 16: the batch keeps its 16 prompts in one
    chunk, each model holding 4 sequences (its calls decode in rounds of 4), and loads each
    model once, rather than falling back to chunks of 4 prompts."""
    from localmoa.footprint.estimate import estimate, read_gguf

    config = load_config(tiny_config)
    room = 0
    for table in config.models.values():
        assert isinstance(table, LlamaCppModel)
        facts = read_gguf(table.path)
        room += estimate(facts, n_ctx=table.n_ctx, n_batch=table.n_batch, n_seq=4).total

    async def go() -> BatchPlan:
        backends = make_backends(config.settings)
        return await plan_batch(
            config, [ensemble_system(config, "default")], 16, backends, memory_budget=str(room)
        )

    planned = asyncio.run(go())
    assert planned.chunk == 16 and planned.sequences == 4 and planned.loads == 3
    assert all(t.parallel == 4 for t in planned.models.values() if isinstance(t, LlamaCppModel))
