"""Placement on several devices: the planner packs each wave onto the devices' budgets."""

from __future__ import annotations

import itertools
import random

import pytest

from localmoa.errors import BudgetError
from localmoa.planning.bitsets import bits
from localmoa.planning.fewest_loads import Plan, make_plan
from localmoa.planning.placement import Packer

GiB = 1 << 30


def check_placement(plan: Plan, sizes: dict[str, int]) -> None:
    """Every wave's resident models are placed, no device over its budget, and a model keeps
    its device while it stays resident."""
    on: dict[str, str] = {}
    for wave in plan.waves:
        placed = [m for models in wave.devices.values() for m in models]
        assert sorted(set(placed)) == sorted(wave.resident)
        for device, models in wave.devices.items():
            used = sum(wave.shares[m][device] if m in wave.shares else sizes[m] for m in models)
            assert used <= plan.devices[device], (device, models)
        now = {m: d for d, models in wave.devices.items() for m in models if m not in wave.shares}
        for model, device in now.items():
            if model in on and model not in wave.load:
                assert on[model] == device, f"{model} moved without a reload"
        on = now


def test_two_small_devices_hold_two_models_that_one_would_swap() -> None:
    """The issue's case: two 6 GiB models on a declared 2 x 8 GiB machine run side by side; on
    one 8 GiB device they take turns, and the model used again is loaded twice."""
    stages = [["a", "b"], ["a"]]
    sizes = {"a": 6 * GiB, "b": 6 * GiB}
    one = make_plan(stages, sizes, 8 * GiB)
    two = make_plan(stages, sizes, 0, devices={"gpu0": 8 * GiB, "gpu1": 8 * GiB})
    assert one.loads == 2 and len(one.waves) == 3  # a and b take turns
    assert two.loads == 2 and len(two.waves) == 2
    assert two.waves[0].devices == {"gpu0": ["a"], "gpu1": ["b"]}
    assert two.devices == {"gpu0": 8 * GiB, "gpu1": 8 * GiB}
    assert two.budget_bytes == 16 * GiB
    check_placement(two, sizes)


def test_the_sum_is_not_enough_two_models_need_a_device_each() -> None:
    """12 GiB of models in 2 x 8 GiB fit; 3 x 5 GiB does not fit 2 x 8 GiB at once (15 <= 16
    but no device holds two of them), so they take two waves."""
    sizes = {"a": 5 * GiB, "b": 5 * GiB, "c": 5 * GiB}
    plan = make_plan([["a", "b", "c"]], sizes, 0, devices={"gpu0": 8 * GiB, "gpu1": 8 * GiB})
    assert len(plan.waves) == 2
    assert plan.loads == 3
    check_placement(plan, sizes)


def test_a_model_keeps_its_device_while_resident() -> None:
    stages = [["big", "s1"], ["big", "s2"], ["big", "s3"], ["big"]]
    sizes = {"big": 7 * GiB, "s1": 3 * GiB, "s2": 4 * GiB, "s3": 6 * GiB}
    plan = make_plan(stages, sizes, 0, devices={"gpu0": 8 * GiB, "gpu1": 10 * GiB})
    check_placement(plan, sizes)
    assert plan.loads == 4  # each model once: big stays where it was put


def test_resident_models_stay_where_they_are() -> None:
    sizes = {"a": 4 * GiB, "b": 4 * GiB}
    plan = make_plan(
        [["a", "b"]],
        sizes,
        0,
        devices={"gpu0": 8 * GiB, "gpu1": 8 * GiB},
        resident=["a"],
        where={"a": "gpu1"},
    )
    assert "a" in plan.waves[0].devices["gpu1"]
    assert plan.loads == 1


def test_split_only_when_no_device_holds_it_and_allowed() -> None:
    sizes = {"huge": 12 * GiB, "small": 2 * GiB}
    devices = {"gpu0": 8 * GiB, "gpu1": 8 * GiB}
    with pytest.raises(BudgetError, match=r'"huge".*largest device.*split = true'):
        make_plan([["huge", "small"]], sizes, 0, devices=devices)
    plan = make_plan([["huge", "small"]], sizes, 0, devices=devices, splittable=["huge", "small"])
    check_placement(plan, sizes)
    shares = plan.waves[0].shares
    assert set(shares) == {"huge"}  # small fits alone: never split
    assert sum(shares["huge"].values()) == 12 * GiB
    with pytest.raises(BudgetError, match="more than all 2 devices"):
        make_plan([["x"]], {"x": 17 * GiB}, 0, devices=devices, splittable=["x"])


def test_a_device_with_no_memory_is_refused() -> None:
    with pytest.raises(BudgetError, match='device "gpu1" has no memory'):
        make_plan([["a"]], {"a": GiB}, 0, devices={"gpu0": 8 * GiB, "gpu1": 0})


def test_one_device_plans_are_what_they_were() -> None:
    """A plan for one device is the plan for its budget, named after it."""
    stages = [["a", "b", "c"], ["a", "b"], ["c"]]
    sizes = {"a": 3 * GiB, "b": 4 * GiB, "c": 5 * GiB}
    alone = make_plan(stages, sizes, 9 * GiB)
    named = make_plan(stages, sizes, 0, devices={"ram": 9 * GiB})
    assert [w.resident for w in named.waves] == [w.resident for w in alone.waves]
    assert named.loads == alone.loads
    assert all(w.devices == {"ram": w.resident} for w in named.waves)


def exact_fits(sizes: list[int], caps: list[int], mask: int) -> bool:
    items = list(bits(mask))
    for choice in itertools.product(range(len(caps)), repeat=len(items)):
        used = [0] * len(caps)
        for i, d in zip(items, choice, strict=True):
            used[d] += sizes[i]
        if all(u <= c for u, c in zip(used, caps, strict=True)):
            return True
    return False


def test_packer_agrees_with_exhaustive_assignment() -> None:
    rng = random.Random(14)
    for _ in range(200):
        caps = [rng.randint(4, 12) for _ in range(rng.randint(2, 3))]
        sizes = [rng.randint(1, 8) for _ in range(rng.randint(1, 6))]
        packer = Packer({f"d{i}": c for i, c in enumerate(caps)}, sizes)
        mask = rng.randrange(1, 1 << len(sizes))
        assert packer.fits(mask) == exact_fits(sizes, caps, mask), (caps, sizes, mask)


def check_covers(plan: Plan, stages: list[list[str]]) -> None:
    """Every call of every stage runs in a wave of its stage, with its model resident."""
    for k, stage in enumerate(stages, start=1):
        ran = [m for w in plan.waves if w.layer == k for m in w.runs]
        assert sorted(ran) == sorted(stage), (k, ran, stage)
    for wave in plan.waves:
        assert set(wave.runs) <= set(wave.resident)


def test_random_ensembles_place_validly_and_never_load_more_than_one_device() -> None:
    """On 2 x B the fewest loads is never more than on 1 x B (each device alone is a valid
    plan's room), every call runs in its stage, and every wave is placed within every device,
    also when the plan starts from models already resident."""
    rng = random.Random(7)
    for _ in range(80):
        models = [f"m{i}" for i in range(rng.randint(2, 5))]
        sizes = {m: rng.randint(1, 8) * GiB for m in models}
        stages = [rng.sample(models, rng.randint(1, len(models))) for _ in range(rng.randint(1, 4))]
        resident = [m for m in models if rng.random() < 0.3]
        devices = {"gpu0": 8 * GiB, "gpu1": 8 * GiB}
        where = {m: rng.choice(list(devices)) for m in resident}
        one = make_plan(stages, sizes, 8 * GiB)
        two = make_plan(stages, sizes, 0, devices=devices)
        check_placement(two, sizes)
        check_covers(two, stages)
        assert two.loads <= one.loads
        warm = make_plan(stages, sizes, 0, devices=devices, resident=resident, where=where)
        check_placement(warm, sizes)
        check_covers(warm, stages)


def test_a_pinned_model_goes_on_its_device_only() -> None:
    """A pinned model goes where it is pinned, the others around it (how one Ollama server per
    GPU is planned); a pin to a device too small is refused."""
    sizes = {"a": 3 * GiB, "b": 3 * GiB}
    devices = {"gpu0": 4 * GiB, "gpu1": 8 * GiB}  # best fit: each model where least room is left
    free = make_plan([["a", "b"]], sizes, 0, devices=devices)
    assert free.waves[0].devices == {"gpu0": ["a"], "gpu1": ["b"]}  # best fit: a on the fuller
    pinned = make_plan([["a", "b"]], sizes, 0, devices=devices, pinned={"a": "gpu1"})
    assert pinned.waves[0].devices == {"gpu0": ["b"], "gpu1": ["a"]}
    with pytest.raises(
        BudgetError, match=r'"b" needs 3.0 GiB but device "gpu0", which \[models.b\] pins'
    ):
        make_plan(
            [["b"]], sizes, 0, devices={"gpu0": 2 * GiB, "gpu1": 8 * GiB}, pinned={"b": "gpu0"}
        )


def test_a_split_stays_on_one_node() -> None:
    """Two nodes of 2 x 8 GiB: a 12 GiB model splits over one node's GPUs, never across nodes;
    one larger than any node's devices together is refused though the cluster could hold it."""
    devices = {"a/gpu0": 8 * GiB, "a/gpu1": 8 * GiB, "b/gpu0": 8 * GiB, "b/gpu1": 8 * GiB}
    nodes = {name: name.split("/")[0] for name in devices}
    sizes = {"huge": 12 * GiB, "x": 7 * GiB}
    plan = make_plan([["huge", "x"]], sizes, 0, devices=devices, splittable=["huge"], nodes=nodes)
    check_placement(plan, sizes)
    (spans,) = plan.waves[0].shares.values()
    assert len({device.split("/")[0] for device in spans}) == 1
    with pytest.raises(BudgetError, match="more than any one node's devices together"):
        make_plan([["x"]], {"x": 20 * GiB}, 0, devices=devices, splittable=["x"], nodes=nodes)
