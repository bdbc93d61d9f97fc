"""The planner against an exhaustive search, and the invariants every plan must keep."""

from __future__ import annotations

import heapq
import random
from collections import Counter

import pytest

from localmoa.errors import BudgetError
from localmoa.planning.fewest_loads import Plan, make_plan

GiB = 1 << 30


def exhaustive_min_loads(
    stages: list[list[str]], sizes: dict[str, int], budget: int, start: frozenset[str] = frozenset()
) -> int:
    """Fewest loads over *every* sequence of resident sets: Dijkstra on (stage, calls done,
    resident set), where any set within budget may follow any other and runs whatever of the
    stage it holds. No assumption of the planner's is built in."""
    names = sorted({m for stage in stages for m in stage})
    bit = {name: 1 << i for i, name in enumerate(names)}
    demand = [sum({bit[m] for m in stage}) for stage in stages]
    fits = [
        mask
        for mask in range(1, 1 << len(names))
        if sum(sizes[n] for n in names if mask & bit[n]) <= budget
    ]
    initial = sum(bit[m] for m in start)
    best: dict[tuple[int, int, int], int] = {(0, 0, initial): 0}
    heap = [(0, 0, 0, initial)]
    while heap:
        loads, k, done, resident = heapq.heappop(heap)
        if k == len(stages):
            return loads
        if best.get((k, done, resident), loads) < loads:
            continue
        moves = (
            [(loads, k + 1, 0, resident)]
            if done == demand[k]
            else [
                (loads + (mask & ~resident).bit_count(), k, done | (mask & demand[k]), mask)
                for mask in fits
                if mask & demand[k] & ~done
            ]
        )
        for move in moves:
            if move[0] < best.get(move[1:], 1 << 30):
                best[move[1:]] = move[0]
                heapq.heappush(heap, move)
    raise AssertionError("no plan found")


def assert_valid(
    plan: Plan,
    stages: list[list[str]],
    sizes: dict[str, int],
    budget: int,
    start: frozenset[str] = frozenset(),
) -> None:
    resident: set[str] = set(start)
    loads = 0
    layers = [w.layer for w in plan.waves]
    assert layers == sorted(layers)
    assert set(layers) == set(range(1, len(stages) + 1))
    for wave in plan.waves:
        assert set(wave.unload) <= resident
        assert not set(wave.load) & resident
        resident = (resident - set(wave.unload)) | set(wave.load)
        assert resident == set(wave.resident)
        assert wave.bytes == sum(sizes[m] for m in resident) <= budget
        assert set(wave.runs) <= resident
        loads += len(wave.load)
    for k, stage in enumerate(stages, start=1):
        runs = Counter(m for w in plan.waves if w.layer == k for m in w.runs)
        assert runs == Counter(stage), f"stage {k}: every call placed exactly once"
        per_model_waves = Counter(m for w in plan.waves if w.layer == k for m in set(w.runs))
        assert max(per_model_waves.values()) == 1, "a model's calls in a layer share one wave"
    assert plan.loads == loads >= plan.lower_bound
    if not start:
        assert plan.lower_bound == len({m for s in stages for m in s})
    assert plan.bytes_loaded == sum(sizes[m] for w in plan.waves for m in w.load)


def random_instance(rng: random.Random) -> tuple[list[list[str]], dict[str, int], int]:
    names = [f"m{i}" for i in range(rng.randint(2, 5))]
    sizes = {name: rng.randint(1, 10) for name in names}
    layers = [rng.choices(names, k=rng.randint(1, 4)) for _ in range(rng.randint(1, 3))]
    stages = [*layers, [rng.choice(names)]]
    used = {m for s in stages for m in s}
    low, high = max(sizes[m] for m in used), sum(sizes[m] for m in used)
    return stages, sizes, rng.randint(low, high)


def test_done_when_three_models_3_3_aggregator_under_2_5_gib() -> None:
    stages = [["a", "b", "c"], ["a", "b", "c"], ["a"]]
    sizes = {"a": GiB, "b": GiB, "c": GiB}
    plan = make_plan(stages, sizes, int(2.5 * GiB))
    assert_valid(plan, stages, sizes, int(2.5 * GiB))
    assert plan.loads == 4 == exhaustive_min_loads(stages, sizes, int(2.5 * GiB))
    assert plan.lower_bound == 3 and plan.optimal


@pytest.mark.parametrize("seed", range(400))
def test_loads_match_exhaustive_search(seed: int) -> None:
    stages, sizes, budget = random_instance(random.Random(seed))
    plan = make_plan(stages, sizes, budget)
    assert_valid(plan, stages, sizes, budget)
    assert plan.optimal
    assert plan.loads == exhaustive_min_loads(stages, sizes, budget)


@pytest.mark.parametrize("seed", range(150))
def test_from_resident_models_loads_match_exhaustive_search(seed: int) -> None:
    """Mid-run plans: what is loaded already is free; what no longer fits or is needed leaves."""
    rng = random.Random(1000 + seed)
    stages, sizes, budget = random_instance(rng)
    loaded = [m for m in sizes if rng.random() < 0.5]
    plan = make_plan(stages, sizes, budget, resident=loaded)
    fits: set[str] = set()
    for m in sorted(
        (m for m in loaded if any(m in s for s in stages)),
        key=lambda m: next(k for k, s in enumerate(stages) if m in s),
    ):
        if sum(sizes[x] for x in fits | {m}) <= budget:
            fits.add(m)
    start = frozenset(loaded)
    assert_valid(plan, stages, sizes, budget, start)
    assert plan.optimal
    assert plan.loads == exhaustive_min_loads(stages, sizes, budget, frozenset(fits))


def test_everything_fits_loads_each_model_once_and_one_wave_per_layer() -> None:
    stages = [["a", "b", "c"], ["c", "b", "a"], ["b"]]
    sizes = {"a": 3, "b": 2, "c": 1}
    plan = make_plan(stages, sizes, 6)
    assert plan.loads == plan.lower_bound == 3
    assert [w.layer for w in plan.waves] == [1, 2, 3]


def test_aggregator_reuses_a_resident_proposer() -> None:
    stages = [["a", "b"], ["a", "b"], ["b"]]
    plan = make_plan(stages, {"a": 2, "b": 2}, 2)
    # b, a | a (still resident), b | b (still resident): 3 loads, the aggregator's free.
    assert plan.loads == 3 == exhaustive_min_loads(stages, {"a": 2, "b": 2}, 2)
    assert plan.waves[-1].load == []


def test_model_called_twice_in_a_layer_is_loaded_once() -> None:
    stages = [["a", "a", "b"], ["a"]]
    plan = make_plan(stages, {"a": 1, "b": 1}, 1)
    assert [w.runs for w in plan.waves if w.layer == 1] == [["b"], ["a", "a"]]
    assert plan.loads == 2 == exhaustive_min_loads(stages, {"a": 1, "b": 1}, 1)


def test_model_larger_than_budget_is_refused_by_name() -> None:
    with pytest.raises(BudgetError, match=r'model "big" needs 3\.0 GiB .* budget is 2\.0 GiB'):
        make_plan([["small", "big"], ["small"]], {"small": GiB, "big": 3 * GiB}, 2 * GiB)


def test_non_positive_budget_is_refused() -> None:
    with pytest.raises(BudgetError, match="must be positive"):
        make_plan([["a"]], {"a": 1}, 0)


def test_plans_are_deterministic() -> None:
    rng = random.Random(7)
    for _ in range(20):
        stages, sizes, budget = random_instance(rng)
        assert make_plan(stages, sizes, budget) == make_plan(stages, sizes, budget)


def test_large_ensembles_fall_back_to_a_bounded_heuristic() -> None:
    rng = random.Random(3)
    names = [f"m{i:02}" for i in range(24)]
    sizes = {name: rng.randint(1, 9) * GiB for name in names}
    stages = [rng.sample(names, 20) for _ in range(3)] + [["m00"]]
    budget = 20 * GiB
    plan = make_plan(stages, sizes, budget)
    assert_valid(plan, stages, sizes, budget)
    assert not plan.optimal
    assert plan.loads <= sum(len(set(stage)) for stage in stages)


def test_a_negative_size_is_refused_at_once() -> None:
    """Footprints are never negative; should one get here, the planner refuses it instead of
    handing the cost model sizes that do not add up (one once made it search forever)."""
    with pytest.raises(ValueError, match='model "a": -1099511627776 is not a size'):
        make_plan([["a", "b"], ["a", "b"]], {"a": -(1 << 40), "b": GiB}, 2 * GiB)
