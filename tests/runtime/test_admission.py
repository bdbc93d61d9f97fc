"""The run's own budget (BudgetAdmission): `localmoa run`'s memory seam, asked model by model."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from localmoa.backends.fake import FakeBackend
from localmoa.config import FakeModel
from localmoa.runtime.admission import BudgetAdmission, Changes

GiB = 1 << 30


class HeldLoads(FakeBackend):
    """A load of ``hold`` waits until cancelled; with ``resident_first`` the model is resident
    before that (a load the backend completed although its caller was cancelled)."""

    def __init__(self, hold: str, *, resident_first: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hold, self.resident_first = hold, resident_first
        self.holding = asyncio.Event()

    async def load(self, name: str, config: Any, placement: Any = None) -> None:
        if name == self.hold:
            if self.resident_first:
                await super().load(name, config)
            self.holding.set()
            await asyncio.Event().wait()
        await super().load(name, config)


class Measuring(FakeBackend):
    measures_footprint = True

    def resident_bytes(self, name: str) -> int | None:
        return GiB // 2 if name in self.resident else None


def budget_for(
    backend: FakeBackend, budget: int, **sizes: int
) -> tuple[BudgetAdmission, dict[str, int]]:
    models = {name: FakeModel(backend="fake", memory=size) for name, size in sizes.items()}
    return BudgetAdmission(models, lambda name: backend, sizes, budget), sizes


async def test_a_load_waits_for_room_and_a_release_unloads_at_once() -> None:
    backend = FakeBackend(capacity=2 * GiB)
    admission, _ = budget_for(backend, 2 * GiB, a=GiB, b=GiB, c=GiB)
    assert (await admission.admit("a")).outcome is not None
    await admission.admit("b")
    waiting = asyncio.create_task(admission.admit("c"))
    await asyncio.sleep(0)  # let it look: a and b fill the budget
    assert not waiting.done() and "c" not in backend.resident
    assert await admission.release("a") == ["a"]
    admitted = await asyncio.wait_for(waiting, 5)
    assert admitted.outcome is not None and admitted.outcome.error is None
    assert backend.events == [("load", "a"), ("load", "b"), ("unload", "a"), ("load", "c")]
    assert backend.peak_bytes <= 2 * GiB
    assert await admission.finish() == ["b", "c"] and backend.resident == {}


async def test_a_resident_model_is_not_loaded_again() -> None:
    backend = FakeBackend()
    admission, _ = budget_for(backend, GiB, a=GiB)
    await admission.admit("a")
    assert (await admission.admit("a")).outcome is None
    async with admission.using("a") as admitted:
        assert admitted.outcome is None and admitted.unloaded == []
    assert [kind for kind, _ in backend.events] == ["load"]


async def test_a_failed_load_is_an_outcome_and_frees_its_room() -> None:
    backend = FakeBackend(capacity=GiB)  # b cannot fit beside anything: the device says no
    admission, _ = budget_for(backend, 2 * GiB, a=GiB, b=GiB)
    await admission.admit("a")
    failed = (await admission.admit("b")).outcome
    assert failed is not None and failed.error is not None and "out of memory" in failed.error
    assert admission.resident() == ["a"]
    assert await admission.release("b") == []  # never loaded, never said unloaded


async def test_a_model_larger_than_the_budget_fails_rather_than_waits_forever() -> None:
    admission, _ = budget_for(FakeBackend(), GiB, a=2 * GiB)
    outcome = (await asyncio.wait_for(admission.admit("a"), 5)).outcome
    assert outcome is not None and outcome.error is not None
    assert 'model "a" needs' in outcome.error and "more than the whole budget" in outcome.error


@pytest.mark.parametrize("resident_first", [False, True], ids=["load-undone", "load-done"])
async def test_a_cancelled_load_is_unloaded_only_when_the_backend_kept_it(
    resident_first: bool,
) -> None:
    backend = HeldLoads("a", resident_first=resident_first)
    admission, _ = budget_for(backend, GiB, a=GiB)
    task = asyncio.create_task(admission.admit("a"))
    await backend.holding.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await admission.finish() == (["a"] if resident_first else [])
    assert backend.resident == {}


async def test_a_measured_footprint_replaces_the_estimate_in_the_books() -> None:
    backend = Measuring()
    admission, _ = budget_for(backend, 2 * GiB, a=GiB, b=GiB, c=GiB)
    await admission.admit("a")  # measured: half a GiB
    await admission.admit("b")
    third = await asyncio.wait_for(admission.admit("c"), 5)  # 0.5 + 0.5 + 1 fits in 2
    assert third.outcome is not None and third.outcome.error is None


async def test_changes_wake_every_waiter_and_none_is_missed() -> None:
    changes = Changes()
    state = {"n": 0}
    waiters = [asyncio.create_task(changes.wait_for(lambda k=k: state["n"] > k)) for k in range(3)]
    for n in range(1, 4):
        state["n"] = n
        changes.notify()
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
