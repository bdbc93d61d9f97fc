"""The cost model: fluid sharing, loads, and dataflow execution, on cases small enough to time
by hand."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

from localmoa.planning.fewest_loads import Plan, Wave, make_plan
from localmoa.planning.profiles import PROFILES, Profile
from localmoa.planning.timing import (
    BYTES_PER_PARAM,
    CallSpec,
    Span,
    Timing,
    call_seconds,
    load_seconds,
    simulate_plan,
    simulate_waves,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from policies import candidate_plans, wave_by_wave

from planning.toy import BOUND, CAPPED, GB, SIZES, stage


def together(calls: list[list[CallSpec]], profile: Profile) -> float:
    """Seconds the calls take from a start where every model is loaded already."""
    models = list(dict.fromkeys(c.model for s in calls for c in s))
    plan = make_plan(
        [[c.model for c in s] for s in calls], SIZES, profile.memory_bytes, resident=models
    )
    timing = simulate_plan(plan, calls, SIZES, profile, resident=models)
    assert timing.loads == 0 and timing.compute_s == pytest.approx(timing.makespan_s)
    return timing.makespan_s


def plan_of(budget: int, *waves: tuple[int, list[str], list[str], list[str], list[str]]) -> Plan:
    """A hand-made plan: (layer, resident, runs, load, unload) per wave."""
    return Plan(
        budget_bytes=budget,
        loads=sum(len(w[3]) for w in waves),
        lower_bound=0,
        optimal=False,
        bytes_loaded=0,
        waves=[
            Wave(layer=k, resident=r, runs=runs, load=load, unload=unload, bytes=0)
            for k, r, runs, load, unload in waves
        ],
    )


def span(timing: Timing, kind: str, model: str, nth: int = 0) -> Span:
    return [s for s in timing.spans if s.kind == kind and s.model == model][nth]


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


def load_bench() -> ModuleType:
    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_scheduler.py"
    spec = importlib.util.spec_from_file_location("bench_scheduler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_scheduler"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# --- sharing -----------------------------------------------------------------------------------


def test_two_bandwidth_bound_streams_together_take_twice_as_long() -> None:
    alone = together([stage(("a", 100))], BOUND)
    assert alone == pytest.approx(10.0)
    assert together([stage(("a", 100), ("b", 100))], BOUND) == pytest.approx(20.0)


def test_capped_small_streams_overlap_for_free_until_the_device_is_full() -> None:
    assert together([stage(("a", 10))], CAPPED) == pytest.approx(4.0)
    assert together([stage(*((m, 10) for m in "abcd"))], CAPPED) == pytest.approx(4.0)
    # Five quarters: everyone slows by 1/1.25.
    assert together([stage(*((m, 10) for m in "abcde"))], CAPPED) == pytest.approx(5.0)


def test_rates_change_when_a_stream_ends_exactly_not_in_steps() -> None:
    # Both at half speed until b's 50 tokens are out (10 s); a's last 50 then go at full speed.
    assert together([stage(("a", 100), ("b", 50))], BOUND) == pytest.approx(15.0)


def test_calls_to_one_model_are_serialized() -> None:
    assert together([stage(("a", 10), ("a", 10))], CAPPED) == pytest.approx(8.0)


# --- single-call formulas ----------------------------------------------------------------------


def test_load_time_is_bytes_over_disk_plus_init() -> None:
    assert load_seconds(3 * GB, BOUND) == pytest.approx(3.5)
    desktop = PROFILES["desktop-24g"]
    assert load_seconds(7 * GB, desktop) == pytest.approx(1.0 + desktop.load_init_s)


def test_prefill_is_compute_bound_and_decode_bandwidth_bound() -> None:
    size, prompt = 2 * GB, 1000
    prefill = 2 * (size / BYTES_PER_PARAM) * prompt / BOUND.compute
    assert call_seconds(CallSpec("a", prompt, 0), size, BOUND) == pytest.approx(prefill)
    assert call_seconds(CallSpec("a", 0, 50), size, BOUND) == pytest.approx(50 / 5)
    assert call_seconds(CallSpec("a", 0, 50), size, CAPPED) == pytest.approx(50 / 2.5)


def test_every_profile_is_plausible() -> None:
    assert set(PROFILES) == {"laptop-8g", "desktop-24g", "server-80g", "apple-32g", "cpu-16g"}
    for p in PROFILES.values():
        assert 4 * GB < p.memory_bytes < 80 * GB and p.bandwidth > 0


# --- dataflow execution by hand ----------------------------------------------------------------


def test_a_waves_second_load_overlaps_its_first_models_call() -> None:
    calls = [stage(("a", 100), ("b", 100))]
    plan = plan_of(100 * GB, (1, ["a", "b"], ["a", "b"], ["a", "b"], []))
    flow = simulate_plan(plan, calls, SIZES, BOUND)
    # load a 0-1.5; a runs alone from 1.5 while b loads 1.5-3.0 (15 tokens); then both at half
    # speed: a's other 85 take 17 s (ends 20.0), b has 15 left at full speed (ends 21.5).
    assert span(flow, "call", "a").start_s == pytest.approx(1.5)
    assert span(flow, "load", "b")[4:] == pytest.approx((1.5, 3.0))
    assert span(flow, "call", "a").end_s == pytest.approx(20.0)
    assert flow.makespan_s == pytest.approx(21.5)
    assert flow.load_s == pytest.approx(3.0) and flow.compute_s == pytest.approx(20.0)
    # Wave by wave (the executor before dataflow): both loads (3.0), then both calls (20.0).
    waves = wave_by_wave(plan, calls, SIZES, BOUND)
    assert waves.makespan_s == pytest.approx(23.0)
    assert span(waves, "call", "a").start_s == pytest.approx(3.0)


def test_a_victim_leaves_when_its_last_call_ends_and_the_next_load_starts_then() -> None:
    # Room for two: a (short) and b (long) together, then c where one of them was.
    calls = [stage(("a", 10), ("b", 100), ("c", 10))]
    plan = plan_of(
        2 * GB,
        (1, ["a", "b"], ["a", "b"], ["a", "b"], []),
        (1, ["c"], ["c"], ["c"], ["a", "b"]),
    )
    two = Profile(**{**CAPPED.__dict__, "memory_bytes": 2 * GB})
    flow = simulate_plan(plan, calls, SIZES, two)
    # a 1.5-5.5 (10 tokens at 2.5/s), b 3.0-43.0; a leaves at 5.5 and c loads 5.5-7.0 while b
    # still runs, c runs 7.0-11.0; b is unloaded at 43.0 (it was not waited for).
    assert span(flow, "unload", "a").start_s == pytest.approx(5.5)
    assert span(flow, "load", "c")[4:] == pytest.approx((5.5, 7.0))
    assert span(flow, "call", "c")[4:] == pytest.approx((7.0, 11.0))
    assert span(flow, "unload", "b").start_s == pytest.approx(43.0)
    assert flow.makespan_s == pytest.approx(43.0)
    assert peak_bytes(flow, SIZES) == 2 * GB
    # Wave by wave, c waits for b: 3.0 + 40 + 1.5 + 4.
    assert wave_by_wave(plan, calls, SIZES, two).makespan_s == pytest.approx(48.5)


def test_a_call_waits_for_every_reference_of_the_stage_before() -> None:
    calls = [stage(("a", 10), ("b", 30)), stage(("a", 10))]
    plan = plan_of(
        100 * GB,
        (1, ["a", "b"], ["a", "b"], ["a", "b"], []),
        (2, ["a"], ["a"], [], ["b"]),
    )
    flow = simulate_plan(plan, calls, SIZES, CAPPED)
    # a's second call waits for b's (3.0-15.0), not only for its own first (1.5-5.5).
    assert span(flow, "call", "a", 1)[4:] == pytest.approx((15.0, 19.0))


def test_a_reload_waits_for_the_models_earlier_residency_to_end() -> None:
    calls = [stage(("a", 30), ("b", 10)), stage(("a", 10))]
    # a leaves in wave 2 and comes back in wave 3; the plan allows both at once (a budget of 3).
    plan = plan_of(
        3 * GB,
        (1, ["a"], ["a"], ["a"], []),
        (1, ["b"], ["b"], ["b"], ["a"]),
        (2, ["a"], ["a"], ["a"], ["b"]),
    )
    three = Profile(**{**CAPPED.__dict__, "memory_bytes": 3 * GB})
    flow = simulate_plan(plan, calls, SIZES, three)
    assert span(flow, "load", "a", 1).start_s >= span(flow, "unload", "a").start_s
    assert span(flow, "load", "a", 1).start_s == pytest.approx(13.5)  # a's first call ends


def test_dataflow_never_exceeds_the_budget_and_beats_waves_on_the_bench() -> None:
    bench = load_bench()
    for instance in bench.suite():
        calls, profile = instance.calls, instance.profile
        plan = make_plan([[c.model for c in s] for s in calls], bench.SIZES, profile.memory_bytes)
        flow = simulate_plan(plan, calls, bench.SIZES, profile)
        waves = wave_by_wave(plan, calls, bench.SIZES, profile)
        assert peak_bytes(flow, bench.SIZES) <= profile.memory_bytes
        assert flow.makespan_s <= waves.makespan_s * (1 + 1e-9)
        assert flow.loads == waves.loads == plan.loads
        assert flow.compute_s <= flow.makespan_s - min(s.end_s for s in flow.spans) + 1e-9


def test_dataflow_never_exceeds_the_budget_on_random_plans() -> None:
    rng = random.Random(3)
    for _ in range(40):
        calls, sizes, profile = random_case(rng)
        for n, waves in enumerate(candidate_plans(calls, sizes, profile)):
            if n == 30:
                break
            assert peak_bytes(simulate_waves(waves, calls, sizes, profile), sizes) <= (
                profile.memory_bytes
            )


def test_a_plan_over_its_budget_cannot_run() -> None:
    plan = plan_of(2 * GB, (1, ["a", "b"], ["a", "b"], ["a", "b"], []))
    tight = Profile(**{**BOUND.__dict__, "memory_bytes": int(1.5 * GB)})
    with pytest.raises(ValueError, match="never fits"):
        simulate_plan(plan, [stage(("a", 1), ("b", 1))], SIZES, tight)


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


def test_a_plan_that_skips_calls_is_refused() -> None:
    plan = make_plan([["a"]], SIZES, BOUND.memory_bytes)
    with pytest.raises(ValueError, match="unrun"):
        simulate_plan(plan, [stage(("a", 1)), stage(("b", 1))], SIZES, BOUND)
