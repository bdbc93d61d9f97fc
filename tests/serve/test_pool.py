"""The pool `localmoa serve`'s requests share: per model, in arrival order, within the budget,
never a model loaded twice, idle models evicted least recently used first, and no deadlock
however many runs of whatever ensembles share it."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import pytest

from localmoa.backends.base import ChatMessage
from localmoa.backends.fake import FakeBackend
from localmoa.config import Agent, Ensemble, FakeModel
from localmoa.errors import BackendError
from localmoa.planning import PlanPolicy, plan_run
from localmoa.runtime.engine import Executor
from localmoa.runtime.events import CallPiece, Event, LoadFailed, RunResult
from localmoa.runtime.moa import calls_for
from localmoa.serve.pool import ModelPool

GiB = 1 << 30
QUESTION = [ChatMessage(role="user", content="Why is the sky blue?")]


def fake_models(sizes: dict[str, int], **settings: Any) -> dict[str, FakeModel]:
    return {
        name: FakeModel(backend="fake", memory=size, **settings) for name, size in sizes.items()
    }


def pool_of(backend: FakeBackend, budget: int, **sizes: int) -> ModelPool:
    return ModelPool(fake_models(sizes), {"fake": backend}, sizes, budget)


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    """A bounded poll: the condition, or a failure once ``seconds`` have passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, "timed out waiting for the pool"
        await asyncio.sleep(0.001)


def loads(backend: FakeBackend) -> list[str]:
    return [model for kind, model in backend.events if kind == "load"]


# --- the pool, request by request --------------------------------------------------------------


async def test_a_model_two_runs_need_at_once_is_loaded_once() -> None:
    sizes = {"a": GiB}
    backend = FakeBackend(capacity=GiB)
    pool = ModelPool(fake_models(sizes, load_seconds=0.01), {"fake": backend}, sizes, GiB)
    first, second = await asyncio.gather(pool.hold(1, "a"), pool.hold(2, "a"))
    assert [first.outcome is None, second.outcome is None].count(True) == 1  # one loaded it
    assert loads(backend) == ["a"] and pool.loads == 1
    assert pool.holds == {1: {"a"}, 2: {"a"}}


async def test_requests_are_served_in_arrival_order_and_none_overtakes() -> None:
    backend = FakeBackend(capacity=2 * GiB)
    pool = pool_of(backend, 2 * GiB, x=GiB, y=2 * GiB, z=GiB)
    await pool.pin(1, "x")  # run 1 calls x
    wants_y = asyncio.create_task(pool.hold(2, "y"))  # needs x gone
    await until(lambda: pool.waiting() == [(2, "y")])
    wants_z = asyncio.create_task(pool.hold(3, "z"))  # would fit beside x now, but came later
    await until(lambda: pool.waiting() == [(2, "y"), (3, "z")])
    pool.unpin(1, "x")
    pool.release(1, "x")
    await wants_y
    assert pool.waiting() == [(3, "z")]  # y is run 2's: run 3 may not evict it
    pool.release(2, "y")
    await wants_z
    assert backend.events == [
        ("load", "x"),
        ("unload", "x"),
        ("load", "y"),
        ("unload", "y"),
        ("load", "z"),
    ]
    assert pool.peak_bytes <= 2 * GiB and backend.peak_bytes <= 2 * GiB


async def test_idle_models_are_evicted_least_recently_used_first() -> None:
    backend = FakeBackend(capacity=2 * GiB)
    pool = pool_of(backend, 2 * GiB, a=GiB, b=GiB, c=GiB)
    for model in ("a", "b"):
        await pool.hold(1, model)
    await pool.pin(1, "a")  # a is used again: b is now the least recently used
    pool.unpin(1, "a")
    pool.forget(1)
    admitted = await pool.hold(2, "c")
    assert admitted.unloaded == ["b"] and sorted(pool.resident()) == ["a", "c"]


async def test_a_stay_waits_for_its_own_runs_earlier_stays_and_never_evicts_them() -> None:
    backend = FakeBackend(capacity=2 * GiB)
    pool = pool_of(backend, 2 * GiB, a=GiB, b=GiB, c=GiB)
    await pool.hold(1, "a")
    await pool.hold(1, "b")
    wants_c = asyncio.create_task(pool.hold(1, "c"))
    await until(lambda: not wants_c.done() and sorted(pool.resident()) == ["a", "b"])
    assert pool.waiting() == []  # waiting for itself is not waiting in the queue
    pool.release(1, "a")
    assert (await wants_c).unloaded == ["a"]


async def test_an_older_run_evicts_a_younger_runs_idle_model_which_comes_back_for_its_call() -> (
    None
):
    """The deadlock per-model holds invite: run 1 holds m1 and needs room that run 2's m2 holds,
    while run 2 waits for room behind run 1. The older run takes the younger's idle model; the
    younger loads it again, its call first, when room frees."""
    backend = FakeBackend(capacity=2 * GiB)
    pool = pool_of(backend, 2 * GiB, m1=GiB, m2=GiB, m3=GiB, m4=GiB)
    await pool.hold(1, "m1")
    await pool.hold(2, "m2")
    run2_next = asyncio.create_task(pool.hold(2, "m4"))  # m1 is the older run's: it waits
    await until(lambda: pool.waiting() == [(2, "m4")])
    taken = await asyncio.wait_for(pool.hold(1, "m3"), 10)
    assert taken.unloaded == ["m2"]  # the younger's idle model, not a wait behind it
    run2_call = asyncio.create_task(pool.pin(2, "m2"))  # its call needs m2 back
    await until(lambda: pool.waiting() == [(2, "m2"), (2, "m4")])  # the call before the stay
    pool.release(1, "m1")
    back = await asyncio.wait_for(run2_call, 10)
    assert back.outcome is not None and back.outcome.error is None and back.unloaded == ["m1"]
    assert pool.pins == {"m2": 1}
    pool.unpin(2, "m2")
    pool.release(2, "m2")
    pool.forget(1)
    assert (await asyncio.wait_for(run2_next, 10)).outcome is not None
    assert backend.peak_bytes <= 2 * GiB and not pool.pins


async def test_younger_runs_cannot_keep_an_older_one_waiting_by_taking_turns() -> None:
    backend = FakeBackend(capacity=2 * GiB)
    pool = pool_of(backend, 2 * GiB, a=GiB, b=GiB, c=GiB)
    await pool.pin(2, "a")
    await pool.pin(2, "b")  # run 2 calls a and b
    wants_c = asyncio.create_task(pool.hold(1, "c"))  # older, needs one of them gone
    await until(lambda: pool.waiting() == [(1, "c")])
    pool.unpin(2, "b")
    again = asyncio.create_task(pool.pin(2, "b"))  # another call on b: it must wait its turn
    assert (await asyncio.wait_for(wants_c, 10)).unloaded == ["b"]
    await until(lambda: pool.waiting() == [(2, "b")])  # b comes back when room frees
    pool.forget(1)
    assert (await asyncio.wait_for(again, 10)).unloaded == ["c"]
    assert backend.peak_bytes <= 2 * GiB


async def test_a_model_alone_larger_than_the_budget_fails_at_once() -> None:
    pool = pool_of(FakeBackend(), GiB, big=2 * GiB)
    outcome = (await asyncio.wait_for(pool.hold(1, "big"), 10)).outcome
    assert outcome is not None and outcome.error is not None and "whole budget" in outcome.error


# --- runs on the pool ---------------------------------------------------------------------------


THREE = Ensemble(layers=[["a", "b", "c"], ["a", "b", "c"]], aggregator=Agent(model="a"))


class Server:
    """What `localmoa serve` does per request, without HTTP: plan from what the pool holds,
    then the one engine on the pool's admission (the requests share one executor)."""

    def __init__(self, models: dict[str, FakeModel], backend: FakeBackend, budget: int) -> None:
        self.sizes = {name: int(model.memory) for name, model in models.items()}
        self.budget = budget
        self.backend = backend
        self.pool = ModelPool(models, {"fake": backend}, self.sizes, budget)
        self.executor = Executor(models, {"fake": backend}, sizes=self.sizes)
        self.tickets = 0

    async def request(
        self, ensemble: Ensemble, on_event: Callable[[Event], None] | None = None
    ) -> RunResult:
        stages = calls_for(ensemble)
        plan = plan_run(
            stages, self.sizes, self.budget, PlanPolicy(None), resident=self.pool.resident()
        )
        self.tickets += 1
        admission = self.pool.admission(self.tickets)
        return await self.executor.run(
            stages, plan, QUESTION, admission=admission, on_event=on_event
        )


async def test_concurrent_runs_share_models_within_the_budget() -> None:
    sizes = {"a": GiB, "b": GiB, "c": GiB}
    backend = FakeBackend(capacity=3 * GiB)
    server = Server(fake_models(sizes, seconds_per_token=0.001), backend, 3 * GiB)
    results = await asyncio.wait_for(asyncio.gather(*(server.request(THREE) for _ in range(4))), 30)
    assert all(c.ok for r in results for c in r.calls)
    assert sorted(loads(backend)) == ["a", "b", "c"]  # each loaded once for all four runs
    assert sum(r.loads for r in results) == 3
    assert not server.pool.pins and not server.pool.holds
    assert sorted(server.pool.resident()) == ["a", "b", "c"]  # kept for the next request


async def test_models_stay_loaded_between_runs_and_the_next_plan_counts_on_them() -> None:
    sizes = {"a": GiB, "b": GiB, "c": GiB}
    backend = FakeBackend(capacity=2 * GiB)
    server = Server(fake_models(sizes), backend, 2 * GiB)
    first = await server.request(THREE)
    kept = server.pool.resident()
    assert len(kept) == 2 and first.loads == 4
    second = await server.request(THREE)
    assert second.loads < first.loads  # it started from what the first one left
    assert all(c.ok for c in second.calls) and backend.peak_bytes <= 2 * GiB


async def test_a_cancelled_run_releases_what_it_held() -> None:
    sizes = {"a": GiB, "b": GiB}
    backend = FakeBackend(capacity=2 * GiB)
    server = Server(fake_models(sizes, seconds_per_token=0.01), backend, 2 * GiB)
    streaming = asyncio.Event()
    ensemble = Ensemble(layers=[["a", "b"]], aggregator=Agent(model="a"))

    def on_event(event: Event) -> None:
        if isinstance(event, CallPiece):
            streaming.set()

    task = asyncio.create_task(server.request(ensemble, on_event))
    await streaming.wait()
    assert server.pool.pins  # a call is running
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not server.pool.pins and not server.pool.holds
    assert sorted(server.pool.resident()) == sorted(backend.resident)  # the books are right
    after = await asyncio.wait_for(server.request(ensemble), 10)  # and the next run goes on
    assert all(c.ok for c in after.calls)


class FlakyLoads(FakeBackend):
    """The first load of ``model`` fails; later ones work (the file came back)."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model, self.failed = model, False

    async def load(self, name: str, config: Any, placement: Any = None) -> None:
        if name == self.model and not self.failed:
            self.failed = True
            raise BackendError(name, "out of memory")
        await super().load(name, config)


async def test_a_model_that_failed_to_load_is_tried_again_by_the_next_run() -> None:
    sizes = {"a": GiB, "b": GiB, "c": GiB}
    backend = FlakyLoads("b", capacity=3 * GiB)
    server = Server(fake_models(sizes), backend, 3 * GiB)
    events: list[Event] = []
    first = await server.request(THREE, events.append)
    assert [e.model for e in events if isinstance(e, LoadFailed)] == ["b"]
    assert [c.model for c in first.calls if not c.ok] == ["b", "b"]
    second = await server.request(THREE)
    assert all(c.ok for c in second.calls) and second.loads == 1


@pytest.mark.parametrize("seed", range(8))
async def test_many_concurrent_runs_of_different_ensembles_on_a_tight_budget_all_finish(
    seed: int,
) -> None:
    """Random ensembles over six models of random sizes, twelve runs at once, a budget that
    forces swaps and evictions: every run ends (a deadlock fails the timeout, never hangs),
    every call succeeds (a model loaded twice or beyond the device would fail its agents),
    and nothing is held once they are done."""
    rng = random.Random(seed)
    names = [f"m{i}" for i in range(6)]
    sizes = {name: rng.choice([1, 1, 2, 3]) * GiB for name in names}
    budget = max(sizes.values()) + rng.choice([0, 1, 2]) * GiB
    models = {
        name: FakeModel(
            backend="fake",
            memory=sizes[name],
            load_seconds=rng.uniform(0, 0.004),
            seconds_per_token=rng.uniform(0, 0.001),
            reply="{model} says " + " ".join(["word"] * rng.randint(1, 6)),
        )
        for name in names
    }
    ensembles = [
        Ensemble(
            layers=[
                [rng.choice(names) for _ in range(rng.randint(1, 3))]
                for _ in range(rng.randint(1, 3))
            ],
            aggregator=Agent(model=rng.choice(names)),
        )
        for _ in range(12)
    ]
    backend = FakeBackend(capacity=budget)
    server = Server(models, backend, budget)
    results = await asyncio.wait_for(
        asyncio.gather(*(server.request(ensemble) for ensemble in ensembles)), 60
    )
    assert all(c.ok for r in results for c in r.calls), [
        c.error for r in results for c in r.calls if not c.ok
    ]
    assert backend.peak_bytes <= budget and server.pool.peak_bytes <= budget
    assert not server.pool.pins and not server.pool.holds and not server.pool.waiting()
    assert sorted(server.pool.resident()) == sorted(backend.resident)
