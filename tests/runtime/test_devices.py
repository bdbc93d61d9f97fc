"""Several devices: the engine loads each model where its wave placed it, never over any
device's memory, and plans the rest on what remains when a device is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from localmoa.backends.base import ChatDelta, ChatMessage, ChatRequest
from localmoa.backends.configs import pinned_models
from localmoa.backends.fake import FakeBackend
from localmoa.config import Agent, Ensemble, FakeModel
from localmoa.errors import DeviceLost
from localmoa.hardware import Device, Placement
from localmoa.planning import PlanPolicy, plan_run
from localmoa.runtime.admission import BudgetAdmission
from localmoa.runtime.engine import Executor
from localmoa.runtime.moa import calls_for

GiB = 1 << 30
QUESTION = [ChatMessage(role="user", content="Why is the sky blue?")]
TWO = [Device(name="gpu0", memory=8 * GiB, index=0), Device(name="gpu1", memory=8 * GiB, index=1)]
PAIR = Ensemble(layers=[["a", "b"], ["a", "b"]], aggregator=Agent(model="a"))


class PerDevice(FakeBackend):
    """Checks every load against each device's own memory (the fake's capacity is one sum)."""

    def __init__(self, devices: list[Device], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.memory = {d.name: d.memory for d in devices}
        self.most_at_once = 0
        self.history: list[tuple[str, str | None]] = []  # (model, device) of every load

    async def load(self, name: str, config: Any, placement: Placement | None = None) -> None:
        await super().load(name, config, placement)
        self.history.append((name, None if placement is None else placement.device.name))
        used: dict[str, int] = {}
        for model, where in self.placements.items():
            if model in self.resident and where is not None:
                used[where.device.name] = used.get(where.device.name, 0) + self.resident[model]
        for device, size in used.items():
            assert size <= self.memory[device], f"{device} holds {size} > {self.memory[device]}"
        self.most_at_once = max(self.most_at_once, len(self.resident))


def six_gib(*names: str) -> dict[str, FakeModel]:
    return {n: FakeModel(backend="fake", memory=6 * GiB) for n in names}


async def run_on(devices: list[Device], backend: FakeBackend | None = None) -> Any:
    models = six_gib("a", "b")
    sizes = {n: int(m.memory) for n, m in models.items()}
    stages = calls_for(PAIR)
    plan = plan_run(stages, sizes, 8 * GiB, PlanPolicy(None), devices=devices)
    backend = backend or PerDevice(devices)
    executor = Executor(models, {"fake": backend}, devices=devices)
    return await executor.run(stages, plan, QUESTION), backend


async def test_two_8_gib_devices_run_two_6_gib_models_side_by_side() -> None:
    """The issue's case: on one 8 GiB device the two models take turns (a reload); on two
    they are loaded once each, one per device, and stay side by side."""
    one, alone = await run_on([Device(name="gpu0", memory=8 * GiB, index=0)])
    two, side = await run_on(TWO)
    assert one.loads == 3 and alone.peak_bytes == 6 * GiB
    assert two.loads == 2 and side.peak_bytes == 12 * GiB
    assert isinstance(side, PerDevice) and side.most_at_once == 2
    where = {m: p.device.name for m, p in side.placements.items() if p is not None}
    assert sorted(where.values()) == ["gpu0", "gpu1"]
    assert all(c.ok for c in two.calls)
    assert {c.model: c.device for c in two.calls} == where  # records say where calls ran
    assert all(c.node is None for c in two.calls)


async def test_admission_waits_for_room_on_the_model_s_own_device() -> None:
    """16 GiB in all, 6 GiB loaded on gpu0: a 6 GiB model placed on gpu0 waits, though the sum
    would allow it, until gpu0 has room again."""
    backend = FakeBackend()
    models = six_gib("a", "b")
    admission = BudgetAdmission(
        models, lambda _: backend, {"a": 6 * GiB, "b": 6 * GiB}, 16 * GiB, TWO
    )
    gpu0 = Placement(devices=(TWO[0],))
    await admission.admit("a", gpu0)
    waiting = asyncio.create_task(admission.admit("b", gpu0))
    for _ in range(5):
        await asyncio.sleep(0)  # let it look: gpu0 is full
    assert not waiting.done() and "b" not in backend.resident
    await admission.release("a")
    await asyncio.wait_for(waiting, 5)
    assert "b" in backend.resident
    assert admission.where()["b"].device.name == "gpu0"


class LosesGpu1(PerDevice):
    """gpu1 goes away at the first call made there (a cluster node dying mid-run)."""

    def __init__(self, devices: list[Device], **kwargs: Any) -> None:
        super().__init__(devices, **kwargs)
        self.gone: set[str] = set()

    async def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        where = self.placements.get(name)
        if where is not None and where.device.name == "gpu1":
            self.gone.add("gpu1")
            self.resident.pop(name, None)
            raise DeviceLost(name, ["gpu1"], "node is gone")
        async for piece in super().chat(name, request):
            yield piece

    def lost(self) -> frozenset[str]:
        return frozenset(self.gone)


async def test_a_lost_device_fails_its_calls_and_the_rest_is_planned_on_what_remains() -> None:
    devices = TWO
    backend = LosesGpu1(devices)
    result, _ = await run_on(devices, backend)
    failed = [c for c in result.calls if not c.ok]
    assert failed and all("gone" in (c.error or "") for c in failed)
    assert result.replans >= 1
    # After the loss every load went to gpu0, and the run still answered on quorum.
    assert result.answer
    first_b = backend.history.index(("b", "gpu1"))
    later = backend.history[first_b + 1 :]
    assert later and all(device == "gpu0" for _, device in later), backend.history


class LosesEverything(PerDevice):
    """Every device goes away as the first answer ends (the whole cluster stopped)."""

    def __init__(self, devices: list[Device], **kwargs: Any) -> None:
        super().__init__(devices, **kwargs)
        self.gone: frozenset[str] = frozenset()

    async def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        if self.gone:
            raise DeviceLost(name, ["gpu0", "gpu1"], "node is gone")
        async for piece in super().chat(name, request):
            yield piece
        self.gone = frozenset({"gpu0", "gpu1"})

    def lost(self) -> frozenset[str]:
        return self.gone


async def test_when_every_device_is_gone_the_run_says_so() -> None:
    import pytest

    from localmoa.errors import RunError

    with pytest.raises(RunError, match="every device of the run is gone"):
        await run_on(TWO, LosesEverything(TWO))


def test_pins_hold_only_to_devices_the_plans_name() -> None:
    models = {
        "a": FakeModel(backend="fake", memory=GiB, device="gpu1"),
        "b": FakeModel(backend="fake", memory=GiB, device="gpu0+gpu1"),
        "c": FakeModel(backend="fake", memory=GiB),
    }
    assert pinned_models(models, [d.name for d in TWO]) == {"a": "gpu1"}
