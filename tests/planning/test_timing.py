"""The cost model: fluid sharing, loads, and dataflow execution, on cases small enough to time
by hand."""

from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

from localmoa.hardware import Device
from localmoa.planning.fewest_loads import Plan, Wave, make_plan
from localmoa.planning.profiles import PROFILES, Profile, device_profiles, profile_for_device
from localmoa.planning.timing import (
    BYTES_PER_PARAM,
    CallSpec,
    DeviceProfiles,
    Span,
    Timing,
    WaveSpec,
    call_seconds,
    load_seconds,
    simulate_plan,
    simulate_waves,
    wave_specs,
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


# --- several devices ---------------------------------------------------------------------------


def with_memory(profile: Profile, memory: float) -> Profile:
    return Profile(**{**profile.__dict__, "memory_bytes": int(memory)})


def wave(
    stage: int,
    resident: str,
    runs: str,
    load: str = "",
    unload: str = "",
    *,
    placed: dict[str, str],
    shares: tuple[tuple[str, str, int], ...] = (),
) -> WaveSpec:
    """A hand-made wave of one-letter models, each placed on a device."""
    return WaveSpec(
        stage,
        frozenset(resident),
        tuple(load),
        tuple(unload),
        frozenset(runs),
        tuple(sorted(placed.items())),
        shares,
    )


def test_calls_on_two_devices_do_not_share_bandwidth() -> None:
    calls = [stage(("a", 100), ("b", 100))]
    two = {"g0": BOUND, "g1": BOUND}
    apart = wave(0, "ab", "ab", placed={"a": "g0", "b": "g1"})
    side_by_side = simulate_waves([apart], calls, SIZES, BOUND, resident="ab", devices=two)
    # Each alone on its device: 100 tokens at 10/s. On one device both at half speed (20 s,
    # test_two_bandwidth_bound_streams_together_take_twice_as_long): Σf = 2 is the gain.
    assert side_by_side.makespan_s == pytest.approx(10.0)
    shared = wave(0, "ab", "ab", placed={"a": "g0", "b": "g0"})
    assert simulate_waves(
        [shared], calls, SIZES, BOUND, resident="ab", devices=two
    ).makespan_s == pytest.approx(20.0)
    # Each device times its own calls: b on a device of half the bandwidth takes 20 s.
    slow = Profile(**{**BOUND.__dict__, "bandwidth": BOUND.bandwidth / 2})
    mixed = simulate_waves([apart], calls, SIZES, BOUND, resident="ab", devices={**two, "g1": slow})
    assert span(mixed, "call", "a").end_s == pytest.approx(10.0)
    assert span(mixed, "call", "b").end_s == pytest.approx(20.0)


def test_a_load_waits_for_room_on_its_own_device_while_another_has_room() -> None:
    calls = [stage(("a", 100), ("b", 100), ("c", 10))]
    devices = {"g0": with_memory(BOUND, 1 * GB), "g1": with_memory(BOUND, 2 * GB)}
    waves = [
        wave(0, "a", "a", "a", placed={"a": "g0"}),
        wave(0, "ab", "b", "b", placed={"a": "g0", "b": "g1"}),
        wave(0, "bc", "c", "c", "a", placed={"b": "g1", "c": "g0"}),
    ]
    flow = simulate_waves(waves, calls, SIZES, BOUND, devices=devices)
    # a loads 0-1.5 and runs 1.5-11.5 on g0; b loads 1.5-3.0 on g1 and runs 3.0-13.0 beside a,
    # at full speed. c is for g0, full until a's call ends: it loads 11.5-13.0, though g1 had
    # room for it all along, and runs 13.0-14.0.
    assert span(flow, "call", "a")[4:] == pytest.approx((1.5, 11.5))
    assert span(flow, "call", "b")[4:] == pytest.approx((3.0, 13.0))
    assert span(flow, "load", "c")[4:] == pytest.approx((11.5, 13.0))
    assert flow.makespan_s == pytest.approx(14.0)
    # On one device with both devices' memory, c would load at once (after b): 3.0-4.5.
    one = simulate_waves(
        [w._replace(placed=()) for w in waves], calls, SIZES, with_memory(BOUND, 3 * GB)
    )
    assert span(one, "load", "c").start_s == pytest.approx(3.0)


def test_a_split_model_holds_its_share_on_each_device_and_runs_on_the_main_one() -> None:
    sizes = {"s": 2 * GB, "a": 1 * GB, "b": int(1.5 * GB)}
    calls = [stage(("s", 100), ("a", 50), ("b", 10))]
    split = (("s", "g0", int(1.2 * GB)), ("s", "g1", int(0.8 * GB)))
    devices = {"g0": with_memory(BOUND, 2.2 * GB), "g1": with_memory(BOUND, 2 * GB)}
    waves = [
        wave(0, "sa", "sa", "sa", placed={"s": "g0", "a": "g0"}, shares=split),
        wave(0, "ab", "b", "b", "s", placed={"a": "g0", "b": "g1"}),
    ]
    flow = simulate_waves(waves, calls, sizes, BOUND, devices=devices)
    # s loads 0-2.5 (all its bytes off the disk) and decodes at 5 tokens/s; a fits on g0 beside
    # s's 1.2 GB share (not its 2 GB), loads 2.5-4.0 and shares g0's bandwidth with s, the main
    # device: both at half speed, a's 50 tokens end at 14.0, s's last 67.5 alone by 27.5.
    assert span(flow, "load", "a")[4:] == pytest.approx((2.5, 4.0))
    assert span(flow, "call", "a").end_s == pytest.approx(14.0)
    assert span(flow, "call", "s").end_s == pytest.approx(27.5)
    # b (1.5 GB) does not fit on g1 beside s's 0.8 GB share: it waits for s to leave.
    assert span(flow, "load", "b")[4:] == pytest.approx((27.5, 29.5))
    assert flow.makespan_s == pytest.approx(31.0)


def test_a_model_moved_while_resident_or_placed_nowhere_is_refused() -> None:
    calls = [stage(("a", 1), ("b", 1))]
    two = {"g0": BOUND, "g1": BOUND}
    moved = [
        wave(0, "a", "a", "a", placed={"a": "g0"}),
        wave(0, "ab", "b", "b", placed={"a": "g1", "b": "g1"}),
    ]
    with pytest.raises(ValueError, match="moves 'a'"):
        simulate_waves(moved, calls, SIZES, BOUND, devices=two)
    elsewhere = [wave(0, "ab", "ab", "ab", placed={"a": "g0", "b": "g2"})]
    with pytest.raises(ValueError, match="'g2', not a device"):
        simulate_waves(elsewhere, calls, SIZES, BOUND, devices=two)
    unplaced = [wave(0, "ab", "ab", "ab", placed={"a": "g0"})]
    with pytest.raises(ValueError, match="'b' on no device"):
        simulate_waves(unplaced, calls, SIZES, BOUND, devices=two)


def test_a_load_that_never_fits_its_device_names_it() -> None:
    two = {"g0": with_memory(BOUND, 1 * GB), "g1": BOUND}
    both = [wave(0, "ab", "ab", "ab", placed={"a": "g0", "b": "g0"})]
    with pytest.raises(ValueError, match="'b' never fits beside what is loaded on 'g0'"):
        simulate_waves(both, [stage(("a", 1), ("b", 1))], SIZES, BOUND, devices=two)


def test_one_named_device_times_every_plan_as_before() -> None:
    bench = load_bench()
    for instance in bench.suite(per_profile=3):
        calls, profile = instance.calls, instance.profile
        plan = make_plan([[c.model for c in s] for s in calls], bench.SIZES, profile.memory_bytes)
        assert all(w.placed == () for w in wave_specs(plan))
        before = simulate_plan(plan, calls, bench.SIZES, profile)
        named = simulate_plan(plan, calls, bench.SIZES, BOUND, devices={"gpu0": profile})
        assert named == before


def test_two_devices_run_the_models_one_device_would_swap_side_by_side() -> None:
    """The issue's case: two 6 GB models on 2 × 8 GB run together, where 8 GB swaps them."""
    sizes = {"a": 6 * GB, "b": 6 * GB}
    calls = [stage(("a", 100), ("b", 100)), stage(("a", 50), ("b", 50))]
    models = [[c.model for c in s] for s in calls]
    plan = make_plan(models, sizes, 0, devices={"g0": 8 * GB, "g1": 8 * GB})
    specs = wave_specs(plan)
    assert {w.placed for w in specs} >= {(("a", "g0"), ("b", "g1"))}
    devices: DeviceProfiles = {"g0": with_memory(BOUND, 8 * GB), "g1": with_memory(BOUND, 8 * GB)}
    two = simulate_plan(plan, calls, sizes, BOUND, devices=devices)
    one = simulate_plan(make_plan(models, sizes, 8 * GB), calls, sizes, with_memory(BOUND, 8 * GB))
    assert (two.loads, one.loads) == (2, 3)
    # 6 GB decodes at 10/6 tokens/s: a and b each alone on a device, never slowed.
    for model in "ab":
        for nth, tokens in enumerate((100, 50)):
            call = span(two, "call", model, nth)
            assert call.end_s - call.start_s == pytest.approx(tokens * 6 / 10)
    assert two.makespan_s < one.makespan_s


def test_wave_specs_reads_each_models_device_and_a_split_models_shares() -> None:
    plan = plan_of(10 * GB, (1, ["a", "s"], ["a", "s"], ["a", "s"], []))
    plan.devices = {"g0": 5 * GB, "g1": 5 * GB}
    plan.waves[0].devices = {"g0": ["a", "s"], "g1": ["s"]}
    plan.waves[0].shares = {"s": {"g0": 1 * GB, "g1": 3 * GB}}
    (spec,) = wave_specs(plan)
    assert spec.placed == (("a", "g0"), ("s", "g1"))  # s: where most of it is
    assert spec.shares == (("s", "g0", 1 * GB), ("s", "g1", 3 * GB))
    plan.waves[0].shares = {}
    with pytest.raises(ValueError, match="'s' is on devices"):
        wave_specs(plan)


def peak_per_device(
    timing: Timing, waves: list[WaveSpec], sizes: dict[str, int], first: str
) -> dict[str, int]:
    """Most bytes loaded at once on each device, from the spans and the waves' placement (none:
    all on the ``first`` device)."""
    events = [(s.start_s, s.kind == "load", s) for s in timing.spans if s.kind != "call"]
    held: dict[str, list[tuple[str, int]]] = {}
    used: dict[str, int] = {}
    peak: dict[str, int] = {}
    for _, _, s in sorted(events, key=lambda e: e[:2]):
        if s.kind == "unload":
            for device, part in held.pop(s.model):
                used[device] -= part
            continue
        w = waves[s.wave]
        split = [(d, part) for m, d, part in w.shares if m == s.model]
        held[s.model] = split or [(dict(w.placed).get(s.model, first), sizes[s.model])]
        for device, part in held[s.model]:
            used[device] = used.get(device, 0) + part
            peak[device] = max(peak.get(device, 0), used[device])
    return peak


def test_no_device_is_ever_over_its_budget_on_random_plans() -> None:
    rng = random.Random(14)
    for _ in range(40):
        calls, sizes, profile = random_case(rng)
        caps = {f"g{d}": rng.randint(4, 9) * GB for d in range(rng.randint(2, 3))}
        models = [[c.model for c in s] for s in calls]
        plan = make_plan(models, sizes, 0, devices=caps, splittable=set(sizes))
        devices = {name: with_memory(profile, cap) for name, cap in caps.items()}
        waves = wave_specs(plan)
        timing = simulate_plan(plan, calls, sizes, profile, devices=devices)
        assert timing.loads == plan.loads
        peak = peak_per_device(timing, waves, sizes, "g0")
        assert all(peak[d] <= caps[d] for d in peak), (peak, caps)


def test_each_device_kind_has_a_profile_with_its_memory() -> None:
    gpu = Device(name="gpu0", memory=20 * 2**30)
    big = Device(name="gpu1", memory=70 * 2**30)
    ram = Device(name="ram", memory=30 * 2**30, kind="cpu")
    mac = Device(name="mac", memory=20 * 2**30, kind="unified")
    profiles = device_profiles([gpu, big, ram, mac])
    assert list(profiles) == ["gpu0", "gpu1", "ram", "mac"]
    assert [p.bandwidth for p in profiles.values()] == [
        PROFILES[n].bandwidth for n in ("desktop-24g", "server-80g", "cpu-16g", "apple-32g")
    ]
    assert [p.memory_bytes for p in profiles.values()] == [d.memory for d in (gpu, big, ram, mac)]
    # A named profile says how fast the GPUs are; RAM stays RAM.
    assert profile_for_device(big, name="desktop-24g").compute == PROFILES["desktop-24g"].compute
    assert profile_for_device(ram, name="desktop-24g").compute == PROFILES["cpu-16g"].compute
