"""The one planner entry: the fewest loads, timed when the backends are, refined for time, extra
loads only for ``min_gain``; pure and deterministic."""

from __future__ import annotations

import builtins
import dataclasses
import random
import time
from typing import Any

import pytest

import localmoa.hardware
from localmoa.config import Settings
from localmoa.errors import BudgetError
from localmoa.hardware import Budget
from localmoa.planning import PlanPolicy, plan_run
from localmoa.planning.fewest_loads import Plan, make_plan
from localmoa.planning.profiles import PROFILES, Profile
from localmoa.planning.refine import SLACK, calls_as_planned
from localmoa.planning.timing import simulate_plan
from localmoa.runtime.moa import Call

GB = 10**9
GiB = 1 << 30
SERVER = PROFILES["server-80g"]


def call(layer: int, index: int, model: str, max_tokens: int) -> Call:
    return Call(layer, index, model, None, 0.7, max_tokens, False)


def stages_of(models: list[list[str]], max_tokens: int = 512) -> list[list[Call]]:
    return [[call(k + 1, i, m, max_tokens) for i, m in enumerate(s)] for k, s in enumerate(models)]


def names(stages: list[list[Call]]) -> list[list[str]]:
    return [[c.model for c in s] for s in stages]


def estimate(plan: Plan, stages: list[list[Call]], sizes: dict[str, int], speeds: Profile) -> float:
    room = dataclasses.replace(speeds, memory_bytes=plan.budget_bytes)
    return simulate_plan(plan, calls_as_planned(stages, None), sizes, room).makespan_s


# Everything fits: the planner loads in order of first use, the small model first; loading the
# big one first lets its long call overlap the small one's load (same loads, reordered).
FITS = {"small": 2 * GB, "big": 10 * GB, "agg": 4 * GB}
FITS_STAGES = stages_of([["small", "big"], ["agg"]])


def random_case(rng: random.Random) -> tuple[list[list[Call]], dict[str, int], Profile]:
    models = "abcd"[: rng.randint(2, 4)]
    sizes = {m: rng.choice([2, 3, 5, 7, 9]) * GB for m in models}
    layers = [
        [rng.choice(models) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 3))
    ]
    stages = [
        [call(k + 1, i, m, rng.choice([64, 256, 1024])) for i, m in enumerate(s)]
        for k, s in enumerate([*layers, [rng.choice(models)]])
    ]
    room = max(sizes.values()) + rng.choice([0, 2, 5, 12]) * GB
    speeds = dataclasses.replace(rng.choice(list(PROFILES.values())), memory_bytes=room)
    return stages, sizes, speeds


def test_untimed_backends_get_the_fewest_loads_plan_without_an_estimate() -> None:
    plan = plan_run(FITS_STAGES, FITS, 20 * GB, PlanPolicy(None))
    assert plan == make_plan(names(FITS_STAGES), FITS, 20 * GB)
    assert plan.estimated_seconds is None and plan.timed_for is None


def test_plan_for_loads_keeps_the_fewest_loads_plan_and_times_it() -> None:
    plan = plan_run(FITS_STAGES, FITS, 20 * GB, PlanPolicy(SERVER, "loads"))
    fewest = make_plan(names(FITS_STAGES), FITS, 20 * GB)
    assert plan.waves == fewest.waves and plan.timed_for == "server-80g"
    assert plan.estimated_seconds == pytest.approx(estimate(fewest, FITS_STAGES, FITS, SERVER))
    assert plan.fewest_loads is None and plan.fewest_loads_seconds is None


def test_an_equal_loads_reordering_needs_no_min_gain() -> None:
    fewest = make_plan(names(FITS_STAGES), FITS, 20 * GB)
    before = estimate(fewest, FITS_STAGES, FITS, SERVER)
    plan = plan_run(FITS_STAGES, FITS, 20 * GB, PlanPolicy(SERVER, "time", min_gain=0.9))
    assert plan.waves != fewest.waves and plan.loads == fewest.loads
    assert plan.estimated_seconds is not None
    assert before * (1 - 0.9) < plan.estimated_seconds < before * (1 - SLACK)
    assert plan.fewest_loads is None and plan.fewest_loads_seconds is None


def test_extra_loads_are_taken_only_when_estimated_at_least_min_gain_faster() -> None:
    """Where a plan with extra loads is chosen for a negligible margin, its gain over the
    fastest plan with the fewest loads is known: a min_gain just above it keeps the fewest
    loads, just below it keeps the extra loads."""
    rng = random.Random(10)
    extra = 0
    for _ in range(80):
        stages, sizes, speeds = random_case(rng)
        room = speeds.memory_bytes
        fewest = make_plan(names(stages), sizes, room)

        def run(min_gain: float) -> Plan:
            return plan_run(stages, sizes, room, PlanPolicy(speeds, "time", min_gain))  # noqa: B023

        free = run(1e-9)
        if free.loads == fewest.loads:
            assert free.fewest_loads is None and free.fewest_loads_seconds is None
            continue
        extra += 1
        assert free.fewest_loads == fewest.loads and free.fewest_loads_seconds is not None
        assert free.estimated_seconds is not None
        assert free.fewest_loads_seconds <= estimate(fewest, stages, sizes, speeds) * (1 + 1e-9)
        gain = 1 - free.estimated_seconds / free.fewest_loads_seconds
        above, below = run(gain + 1e-6), run(gain - 1e-6)
        assert above.loads == fewest.loads and above.fewest_loads_seconds is None
        assert above.estimated_seconds == pytest.approx(free.fewest_loads_seconds)
        assert below.loads > fewest.loads and below.estimated_seconds is not None
        assert below.fewest_loads_seconds is not None
        assert below.estimated_seconds <= below.fewest_loads_seconds * (1 - gain + 1e-6)
    assert extra >= 3  # the rule was exercised


@pytest.mark.parametrize("min_gain", [0.0, 0.03, 0.2])
def test_a_chosen_plan_with_extra_loads_always_says_what_it_traded(min_gain: float) -> None:
    rng = random.Random(f"trade-{min_gain}")
    for _ in range(30):
        stages, sizes, speeds = random_case(rng)
        policy = PlanPolicy(speeds, "time", min_gain)
        plan = plan_run(stages, sizes, speeds.memory_bytes, policy)
        fewest = make_plan(names(stages), sizes, speeds.memory_bytes)
        assert plan.estimated_seconds == pytest.approx(estimate(plan, stages, sizes, speeds))
        assert plan.estimated_seconds <= estimate(fewest, stages, sizes, speeds) * (1 + 1e-9)
        if plan.loads > fewest.loads:
            assert plan.fewest_loads == fewest.loads and plan.fewest_loads_seconds is not None
            assert plan.estimated_seconds <= plan.fewest_loads_seconds * (1 - min_gain) + 1e-9


def test_plan_run_is_deterministic_and_reads_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("planning read the machine")

    for module, name in (
        (localmoa.hardware, "detect_budget"),
        (localmoa.hardware, "detect_devices"),
        (localmoa.hardware, "_ram_device"),
        (builtins, "open"),
        (time, "time"),
        (time, "monotonic"),
        (time, "perf_counter"),
    ):
        monkeypatch.setattr(module, name, refuse)
    rng = random.Random(4)
    for _ in range(10):
        stages, sizes, speeds = random_case(rng)
        used = sorted({c.model for s in stages for c in s})
        resident = used[:1]
        frozen = (repr(stages), dict(sizes), speeds)
        policy = PlanPolicy(speeds)
        first = plan_run(stages, sizes, speeds.memory_bytes, policy, resident=resident)
        again = plan_run(stages, sizes, speeds.memory_bytes, policy, resident=resident)
        assert first == again and (repr(stages), dict(sizes), speeds) == frozen
        assert first.estimated_seconds is not None


def test_plan_run_refuses_a_model_over_the_budget_as_make_plan_does() -> None:
    with pytest.raises(BudgetError, match='"big"'):
        plan_run(FITS_STAGES, FITS, 5 * GB, PlanPolicy(SERVER))


def budget(source: str, size: int) -> Budget:
    return Budget.model_validate({"bytes": size, "source": source, "detail": "test"})


def test_the_policy_follows_the_settings_and_the_device_given() -> None:
    settings = Settings.model_validate({"plan_for": "loads", "min_gain": 0.1})
    policy = PlanPolicy.from_settings(settings, budget("nvml", 20 * GiB), timed=True)
    assert policy.profile is not None and policy.profile.name == "desktop-24g"
    assert (policy.plan_for, policy.min_gain) == ("loads", 0.1)
    assert PlanPolicy.from_settings(settings, None, timed=False).profile is None
    named = Settings.model_validate({"timing_profile": "apple-32g"})
    policy = PlanPolicy.from_settings(named, None, timed=True)
    assert policy.profile == PROFILES["apple-32g"] and policy.min_gain == Settings().min_gain
    with pytest.raises(ValueError, match="device"):
        PlanPolicy.from_settings(Settings(), None, timed=True)


def test_several_devices_are_timed_each_on_its_own_profile() -> None:
    """Two 6 GB models on 2 x 8 GB: side by side, each on its own GPU's bandwidth, estimated
    faster than on one 16 GB device of the same speed where they share one; with
    timing_profile "auto" each GPU is timed by its size."""
    from localmoa.hardware import Device

    stages = stages_of([["a", "b"], ["a"]])
    sizes = {"a": 6 * GB, "b": 6 * GB}
    policy = PlanPolicy(PROFILES["desktop-24g"], "loads", timing_profile="desktop-24g")
    two = [Device(name="gpu0", memory=8 * GB, index=0), Device(name="gpu1", memory=8 * GB, index=1)]
    split = plan_run(stages, sizes, 0, policy, devices=two)
    shared = plan_run(stages, sizes, 16 * GB, policy)
    assert split.loads == shared.loads == 2
    assert split.estimated_seconds is not None and shared.estimated_seconds is not None
    assert split.estimated_seconds < shared.estimated_seconds
    assert split.timed_for == "desktop-24g"
    auto = plan_run(
        stages, sizes, 0, dataclasses.replace(policy, timing_profile="auto"), devices=two
    )
    assert auto.timed_for == "laptop-8g"  # an 8 GB GPU is timed as a laptop's
