"""The search for a faster plan: its margins, its node budget, and its extra-loads rule."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from localmoa.planning.fewest_loads import make_plan
from localmoa.planning.profiles import PROFILES, Profile
from localmoa.planning.search import Found, search
from localmoa.planning.timing import CallSpec, Timing, WaveSpec, simulate_waves, wave_specs

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from policies import optimal

from planning.toy import CAPPED, GB, SIZES, stage


def peak_bytes(timing: Timing, sizes: dict[str, int]) -> int:
    """Most bytes loaded at once, from the spans: a load holds its model from its start, an
    unload frees it (at one instant, frees before loads)."""
    events = [(s.start_s, 1, sizes[s.model]) for s in timing.spans if s.kind == "load"]
    events += [(s.start_s, 0, -sizes[s.model]) for s in timing.spans if s.kind == "unload"]
    used = peak = 0
    for _, _, delta in sorted(events):
        used += delta
        peak = max(peak, used)
    return peak


def random_case(
    rng: random.Random, *, models: int = 5, stages: int = 4, calls: int = 5
) -> tuple[list[list[CallSpec]], dict[str, int], Profile]:
    names = [f"m{i}" for i in range(rng.randint(2, models))]
    sizes = {n: rng.randint(2, 9) * GB for n in names}
    profile = rng.choice(list(PROFILES.values()))
    budget = rng.randint(max(sizes.values()), sum(sizes.values()))
    profile = Profile(**{**profile.__dict__, "memory_bytes": budget})
    made = [
        [CallSpec(rng.choice(names), rng.randint(0, 2000), rng.randint(1, 400)) for _ in range(n)]
        for n in [rng.randint(1, calls) for _ in range(rng.randint(1, stages))]
    ]
    return made, sizes, profile


def test_search_keeps_its_seed_unless_beaten_by_more_than_the_slack() -> None:
    rng = random.Random(11)
    for _ in range(20):
        calls, sizes, profile = random_case(rng, models=4, stages=3, calls=4)
        plan = make_plan([[c.model for c in s] for s in calls], sizes, profile.memory_bytes)
        seed = wave_specs(plan)
        mine = simulate_waves(seed, calls, sizes, profile).makespan_s
        found = search(calls, sizes, profile, seed, max_nodes=10**6, slack=0.05)
        assert found.complete
        best = optimal(calls, sizes, profile, max_nodes=10**6)
        assert best is not None
        if found.waves == seed:
            assert best.makespan_s >= mine * (1 - 0.05) - 1e-9
        else:
            assert found.makespan_s < mine * (1 - 0.05)
            assert simulate_waves(found.waves, calls, sizes, profile).makespan_s == pytest.approx(
                found.makespan_s
            )


def test_search_stops_at_its_node_budget_with_the_best_plan_so_far() -> None:
    calls = [stage(*((m, 10 * (i + 1)) for i, m in enumerate("abcde")))] * 3
    three = Profile(**{**CAPPED.__dict__, "memory_bytes": 3 * GB})
    plan = make_plan([[c.model for c in s] for s in calls], SIZES, three.memory_bytes)
    seed = wave_specs(plan)
    mine = simulate_waves(seed, calls, SIZES, three).makespan_s
    found = search(calls, SIZES, three, seed, max_nodes=200)
    assert not found.complete
    assert found.makespan_s <= mine
    timing = simulate_waves(found.waves, calls, SIZES, three)  # a valid plan: every call, budget
    assert timing.makespan_s == pytest.approx(found.makespan_s)
    assert peak_bytes(timing, SIZES) <= three.memory_bytes


def complete(
    calls: list[list[CallSpec]],
    sizes: dict[str, int],
    profile: Profile,
    seed: list[WaveSpec],
    min_gain: float,
) -> Found:
    found = search(calls, sizes, profile, seed, max_nodes=10**6, min_gain=min_gain)
    assert found.complete
    return found


def test_a_plan_with_extra_loads_must_beat_the_fastest_with_the_fewest_by_min_gain() -> None:
    """Found with no margin to speak of, the fastest plan with extra loads gains ``gain`` over
    the fastest with the fewest: a margin just above that keeps the fewest loads (that fastest
    plan), one just below still takes the extra loads."""
    rng = random.Random(5)
    extra = 0
    for _ in range(60):
        calls, sizes, profile = random_case(rng, models=4, stages=3, calls=4)
        plan = make_plan([[c.model for c in s] for s in calls], sizes, profile.memory_bytes)
        seed = wave_specs(plan)
        free = complete(calls, sizes, profile, seed, 1e-9)
        if free.loads <= plan.loads:
            assert free.makespan_s == pytest.approx(free.fewest_s)
            continue
        extra += 1
        gain = 1 - free.makespan_s / free.fewest_s
        above = complete(calls, sizes, profile, seed, gain + 1e-6)
        below = complete(calls, sizes, profile, seed, gain - 1e-6)
        assert above.loads <= plan.loads
        assert above.makespan_s == pytest.approx(free.fewest_s) == above.fewest_s
        assert below.loads > plan.loads and below.makespan_s == pytest.approx(free.makespan_s)
        assert below.fewest_s == pytest.approx(free.fewest_s)
        assert below.makespan_s <= below.fewest_s * (1 - (gain - 1e-6))
    assert extra >= 3  # the rule was exercised


def test_with_no_margin_time_alone_decides_and_fewer_loads_break_ties() -> None:
    rng = random.Random(6)
    for _ in range(30):
        calls, sizes, profile = random_case(rng, models=4, stages=3, calls=4)
        plan = make_plan([[c.model for c in s] for s in calls], sizes, profile.memory_bytes)
        seed = wave_specs(plan)
        free = search(calls, sizes, profile, seed, max_nodes=10**6)
        best = optimal(calls, sizes, profile, max_nodes=10**6)
        assert best is not None and free.makespan_s == pytest.approx(best.makespan_s)
        priced = search(calls, sizes, profile, seed, max_nodes=10**6, min_gain=0.5)
        assert priced.makespan_s >= free.makespan_s * (1 - 1e-9)
        assert priced.loads <= free.loads or priced.makespan_s <= priced.fewest_s * 0.5
