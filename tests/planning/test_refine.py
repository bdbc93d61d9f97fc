"""Refining the fewest-loads plan for time: what it assumes, what it may change, what it keeps."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from pathlib import Path

import pytest

from localmoa.backends.base import ChatMessage
from localmoa.backends.fake import FakeBackend
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.config import Agent, Ensemble, FakeModel, load_config
from localmoa.hardware import Budget
from localmoa.planning.fewest_loads import make_plan
from localmoa.planning.profiles import profile_for
from localmoa.planning.refine import (
    CHARS_PER_TOKEN,
    MAX_MODELS,
    SLACK,
    calls_as_planned,
    refine,
)
from localmoa.planning.timing import PROFILES, simulate_plan, wave_specs
from localmoa.runtime.engine import Executor
from localmoa.runtime.moa import AGGREGATE_PROMPT, Call, calls_for
from localmoa.runtime.prepare import prepare

GiB = 1 << 30
GB = 10**9
SERVER = PROFILES["server-80g"]


def budget(source: str, size: int) -> Budget:
    return Budget.model_validate({"bytes": size, "source": source, "detail": "test"})


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        (budget("nvml", 6 * GiB), "laptop-8g"),
        (budget("nvml", 20 * GiB), "desktop-24g"),
        (budget("nvml", 70 * GiB), "server-80g"),
        (budget("apple", 20 * GiB), "apple-32g"),
        (budget("ram", 13 * GiB), "cpu-16g"),
    ],
)
def test_the_profile_follows_the_kind_of_device_and_takes_the_budget(
    device: Budget, expected: str
) -> None:
    profile = profile_for(device)
    assert profile.name == expected
    assert profile.memory_bytes == device.bytes
    assert profile.bandwidth == PROFILES[expected].bandwidth


def test_a_budget_from_a_flag_is_timed_with_the_device_behind_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import localmoa.hardware

    read: list[str] = []

    def detect() -> Budget:
        read.append("device")
        return budget("nvml", 22 * GiB)

    monkeypatch.setattr(localmoa.hardware, "detect_budget", detect)
    detected = budget("nvml", 70 * GiB)
    assert localmoa.hardware.device_budget(detected) is detected and not read
    device = localmoa.hardware.device_budget(budget("flag", 3 * GiB))
    assert read == ["device"] and profile_for(device).name == "desktop-24g"


def test_the_profile_is_pure_and_auto_needs_the_device() -> None:
    with pytest.raises(ValueError, match="device"):
        profile_for(None)
    assert profile_for(None, name="cpu-16g") == PROFILES["cpu-16g"]


def call(layer: int, index: int, model: str, max_tokens: int, system: str | None = None) -> Call:
    return Call(layer, index, model, system, 0.7, max_tokens, False)


def test_calls_as_planned_write_max_tokens_and_read_every_reference_at_full_length() -> None:
    stages = [
        [call(1, 0, "a", 100, system="x" * 40), call(1, 1, "b", 300)],
        [call(2, 0, "c", 50)],
    ]
    specs = calls_as_planned(stages, "y" * 400)
    prompt = 400 // CHARS_PER_TOKEN
    assert [(s.model, s.prompt_tokens, s.output_tokens) for s in specs[0]] == [
        ("a", prompt + 10, 100),
        ("b", prompt, 300),
    ]
    aggregate = len(AGGREGATE_PROMPT) // CHARS_PER_TOKEN
    assert specs[1][0].prompt_tokens == prompt + aggregate + 400
    assert specs[1][0].output_tokens == 50


def stages_of(models: list[list[str]], max_tokens: int = 512) -> list[list[Call]]:
    return [[call(k + 1, i, m, max_tokens) for i, m in enumerate(s)] for k, s in enumerate(models)]


# Everything fits: the planner loads in order of first use, the small model first; its call is
# the shortest, so the stage waits for the big model's load and then its long call. Loading the
# big one first lets its call overlap the small one's load.
FITS = {"small": 2 * GB, "big": 10 * GB, "agg": 4 * GB}
FITS_STAGES = stages_of([["small", "big"], ["agg"]])


def test_a_faster_load_order_replaces_the_planners_and_keeps_the_loads() -> None:
    plan = make_plan([[c.model for c in s] for s in FITS_STAGES], FITS, SERVER.memory_bytes)
    assert plan.waves[0].load[:2] == ["small", "big"]
    refined = refine(plan, FITS_STAGES, FITS, SERVER)
    calls = calls_as_planned(FITS_STAGES, None)
    before = simulate_plan(plan, calls, FITS, SERVER).makespan_s
    after = simulate_plan(refined, calls, FITS, SERVER).makespan_s
    assert refined.estimated_seconds == pytest.approx(after)
    assert after < before * (1 - SLACK)
    assert [m for w in refined.waves for m in w.load].index("big") == 0
    assert refined.loads == plan.loads and refined.fewest_loads is None and refined.optimal
    assert refined.timed_for == "server-80g"


def test_a_plan_nothing_beats_is_kept_with_its_estimate() -> None:
    stages = stages_of([["a"], ["a"]])
    sizes = {"a": 4 * GB}
    plan = make_plan([["a"], ["a"]], sizes, SERVER.memory_bytes)
    refined = refine(plan, stages, sizes, SERVER)
    assert refined.waves == plan.waves and refined.loads == plan.loads
    expected = simulate_plan(plan, calls_as_planned(stages, None), sizes, SERVER).makespan_s
    assert refined.estimated_seconds == pytest.approx(expected)


def test_beyond_max_models_the_plan_is_only_timed() -> None:
    names = [f"m{i}" for i in range(MAX_MODELS + 1)]
    sizes = dict.fromkeys(names, 1 * GB)
    stages = stages_of([names, ["m0"]])
    plan = make_plan([[c.model for c in s] for s in stages], sizes, SERVER.memory_bytes)
    refined = refine(plan, stages, sizes, SERVER)
    assert refined.waves == plan.waves and refined.estimated_seconds is not None


def random_case(rng: random.Random) -> tuple[list[list[Call]], dict[str, int], int]:
    names = "abcde"[: rng.randint(2, 5)]
    sizes = {m: rng.choice([2, 3, 5, 7, 9]) * GB for m in names}
    layers = [
        [rng.choice(names) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 3))
    ]
    models = [*layers, [rng.choice(names)]]
    stages = [
        [call(k + 1, i, m, rng.choice([64, 256, 1024])) for i, m in enumerate(s)]
        for k, s in enumerate(models)
    ]
    room = max(sizes.values()) + rng.choice([0, 2, 5, 12]) * GB
    return stages, sizes, room


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_refined_plans_run_every_call_within_budget_and_are_never_estimated_slower(
    profile: str,
) -> None:
    rng = random.Random(profile)
    for _ in range(12):
        stages, sizes, room = random_case(rng)
        speeds = dataclasses.replace(PROFILES[profile], memory_bytes=room)
        plan = make_plan([[c.model for c in s] for s in stages], sizes, room)
        refined = refine(plan, stages, sizes, speeds)
        assert refined == refine(plan, stages, sizes, speeds)  # deterministic
        calls = calls_as_planned(stages, None)
        # simulate_plan refuses a plan that skips a call, runs one twice or overflows the budget
        before = simulate_plan(plan, calls, sizes, speeds).makespan_s
        after = simulate_plan(refined, calls, sizes, speeds).makespan_s
        assert after <= before * (1 + 1e-9)
        assert all(w.bytes <= room for w in refined.waves)
        assert sorted(m for w in refined.waves for m in w.runs) == sorted(
            c.model for s in stages for c in s
        )
        assert refined.loads == sum(len(w.load) for w in refined.waves)
        if refined.loads > plan.loads:
            assert refined.fewest_loads == plan.loads and not refined.optimal
        assert wave_specs(refined) == wave_specs(refined)  # the waves convert back


def test_the_executor_follows_a_refined_plan_within_the_device_capacity() -> None:
    models = {m: FakeModel(backend="fake", memory=size) for m, size in FITS.items()}
    ensemble = Ensemble(
        layers=[[Agent(model="small"), Agent(model="big")]], aggregator=Agent(model="agg")
    )
    plan = make_plan([["small", "big"], ["agg"]], FITS, SERVER.memory_bytes)
    refined = refine(plan, calls_for(ensemble), FITS, SERVER)
    assert refined.waves != plan.waves
    backend = FakeBackend(capacity=SERVER.memory_bytes)
    executor = Executor(models, {"fake": backend}, sizes=FITS)
    question = [ChatMessage(role="user", content="hi")]
    result = asyncio.run(executor.run(calls_for(ensemble), refined, question))
    assert all(c.ok for c in result.calls) and result.loads == refined.loads
    loads = [model for kind, model in backend.events if kind == "load"]
    assert loads == [m for w in refined.waves for m in w.load]
    assert backend.peak_bytes <= SERVER.memory_bytes and backend.resident == {}


def test_prepare_refines_a_llama_cpp_ensemble_and_plan_for_loads_keeps_the_fewest_timed(
    tiny_config: Path,
) -> None:
    config = load_config(tiny_config)
    backends = {"llamacpp": LlamaCppBackend()}
    timed = asyncio.run(prepare(config, "default", backends, prompt="Why is the sky blue?"))
    assert timed.plan.timed_for is not None and timed.plan.estimated_seconds is not None
    assert timed.plan.estimated_seconds > 0
    text = tiny_config.read_text().replace(
        "[ensembles.default]", '[settings]\nplan_for = "loads"\n\n[ensembles.default]'
    )
    tiny_config.write_text(text)
    fewest = asyncio.run(prepare(load_config(tiny_config), "default", backends))
    assert fewest.plan.timed_for == timed.plan.timed_for
    assert fewest.plan.estimated_seconds is not None and fewest.plan.estimated_seconds > 0
    assert fewest.plan.loads <= timed.plan.loads and fewest.plan.fewest_loads is None
    assert fewest.timing is None and fewest.policy.plan_for == "loads"


def test_a_fake_ensemble_keeps_the_fewest_loads_plan(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.a]\nbackend = "fake"\nmemory = "1GiB"\n'
        '[ensembles.default]\nlayers = [["a"]]\naggregator = "a"\n'
    )
    prepared = asyncio.run(prepare(load_config(path), "default", {"fake": FakeBackend()}))
    assert prepared.plan.estimated_seconds is None


def test_a_named_timing_profile_wins_over_the_device() -> None:
    profile = profile_for(budget("nvml", 20 * GiB), name="cpu-16g")
    assert (profile.name, profile.memory_bytes) == ("cpu-16g", 20 * GiB)


def test_the_config_accepts_exactly_the_cost_model_profiles(tmp_path: Path) -> None:
    from typing import get_args

    from localmoa.config import Settings
    from localmoa.errors import ConfigError

    annotation = Settings.model_fields["timing_profile"].annotation
    assert set(get_args(annotation)) == {"auto", *PROFILES}
    path = tmp_path / "models.toml"
    path.write_text(
        '[settings]\ntiming_profile = "gpu"\n[models.a]\nbackend = "fake"\nmemory = "1GiB"\n'
        '[ensembles.default]\nlayers = [["a"]]\naggregator = "a"\n'
    )
    with pytest.raises(ConfigError, match=r"settings\.timing_profile.*cpu-16g"):
        load_config(path)


def test_the_plans_budget_holds_whatever_the_profile_says() -> None:
    """A profile with more memory would let the aggregator load during the big model's call;
    the plan's budget (12 GB) does not, and the estimate must say so."""
    stages = stages_of([["big"], ["agg"]])
    plan = make_plan([["big"], ["agg"]], FITS, 12 * GB)
    roomy = dataclasses.replace(SERVER, memory_bytes=1000 * GB)
    refined = refine(plan, stages, FITS, roomy)
    tight = dataclasses.replace(SERVER, memory_bytes=12 * GB)
    calls = calls_as_planned(stages, None)
    assert refined.estimated_seconds == pytest.approx(
        simulate_plan(refined, calls, FITS, tight).makespan_s
    )
    assert refined.estimated_seconds > simulate_plan(refined, calls, FITS, roomy).makespan_s
    assert refined.budget_bytes == 12 * GB and all(w.bytes <= 12 * GB for w in refined.waves)


@pytest.mark.parametrize("profile", ["desktop-24g", "cpu-16g"])
def test_a_plan_made_mid_run_is_refined_from_what_is_resident(profile: str) -> None:
    rng = random.Random(f"resident-{profile}")
    for _ in range(12):
        stages, sizes, room = random_case(rng)
        used = list(dict.fromkeys(c.model for s in stages for c in s))
        resident: list[str] = []
        for model in rng.sample(used, k=rng.randint(1, len(used))):
            if sum(sizes[m] for m in resident) + sizes[model] <= room:
                resident.append(model)
        speeds = dataclasses.replace(PROFILES[profile], memory_bytes=room)
        names = [[c.model for c in s] for s in stages]
        plan = make_plan(names, sizes, room, resident=resident)
        refined = refine(plan, stages, sizes, speeds, resident=resident)
        calls = calls_as_planned(stages, None)
        before = simulate_plan(plan, calls, sizes, speeds, resident=resident).makespan_s
        after = simulate_plan(refined, calls, sizes, speeds, resident=resident).makespan_s
        assert after <= before * (1 + 1e-9)
        assert refined.estimated_seconds == pytest.approx(after)
        assert not set(resident) & {m for w in refined.waves[:1] for m in w.load}


def test_a_resident_model_the_run_no_longer_needs_only_gets_the_plan_timed() -> None:
    stages = stages_of([["small"], ["agg"]])
    plan = make_plan([["small"], ["agg"]], FITS, 20 * GB, resident=["big"])
    refined = refine(plan, stages, FITS, SERVER, resident=["big"])
    assert refined.waves == plan.waves and refined.estimated_seconds is not None
    assert "big" in refined.waves[0].unload


def test_a_batchs_calls_of_one_model_are_timed_as_one_group_reading_their_own_references() -> None:
    from localmoa.config import Agent, Ensemble
    from localmoa.planning.refine import calls_as_planned
    from localmoa.runtime.moa import batched, calls_for

    ensemble = Ensemble(
        layers=[["a", "b"]], aggregator=Agent(model="a"), max_tokens=100, temperature=0.0
    )
    one = calls_for(ensemble)
    jobs = batched([one] * 4)
    merged = [[c for job in jobs for c in job[k]] for k in range(len(one))]
    alone = calls_as_planned(one, "x" * 400)
    together = calls_as_planned(merged, "x" * 400)
    assert [len(stage) for stage in together] == [2, 1]  # one spec per model and stage
    (first_a, _), (aggregator,) = together
    assert first_a.sequences == 4 and first_a.total_output_tokens == 400
    # each prompt's aggregator reads its own prompt's two answers, not all eight
    assert aggregator.prompt_tokens == alone[1][0].prompt_tokens
    assert aggregator.sequences == 4
