"""Batched calls in the cost model (one model's calls for several prompts decoded together as
sequences of one context), Ollama's parallel slots replayed (scripts/policies.py), and the
scheduler benchmark's batch of prompts (scripts/bench_scheduler.py --batch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from localmoa.planning.fewest_loads import make_plan
from localmoa.planning.profiles import PROFILES, Profile
from localmoa.planning.timing import (
    BYTES_PER_PARAM,
    CallSpec,
    Fluid,
    call_seconds,
    decode_rate,
    phases,
    simulate_plan,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from policies import reactive, reactive_clients

from planning.test_policies import load_bench
from planning.toy import BOUND, CAPPED, GB, SIZES, stage

PARAMS = 1 * GB / BYTES_PER_PARAM
"""Parameters of a toy 1 GB model."""
SLOW = Profile(**{**BOUND.__dict__, "name": "slow", "compute": 2 * PARAMS / 0.05})
"""The toy machine computing one token of a 1 GB model in 0.05 s: half a weight read (0.1 s)."""


def together(calls: list[list[CallSpec]], profile: Profile) -> float:
    """Seconds the calls take from a start where every model is loaded already."""
    models = list(dict.fromkeys(c.model for s in calls for c in s))
    plan = make_plan(
        [[c.model for c in s] for s in calls], SIZES, profile.memory_bytes, resident=models
    )
    return simulate_plan(plan, calls, SIZES, profile, resident=models).makespan_s


# --- a group alone ---------------------------------------------------------------------------


def test_the_defaults_are_one_sequence_of_the_whole_size() -> None:
    plain = CallSpec("a", 300, 200)
    spelled = CallSpec("a", 300, 200, 1, total_output_tokens=200, weight_bytes=2 * GB)
    for profile in (BOUND, CAPPED, *PROFILES.values()):
        for mine, theirs in zip(
            phases(spelled, 2 * GB, profile), phases(plain, 2 * GB, profile), strict=True
        ):
            assert mine == pytest.approx(theirs)


def test_a_group_prefills_every_sequences_prompt() -> None:
    one = call_seconds(CallSpec("a", 1000, 0), GB, SLOW)
    assert call_seconds(CallSpec("a", 1000, 0, sequences=4), GB, SLOW) == pytest.approx(4 * one)


def test_a_group_decodes_its_sequences_in_the_steps_of_one_while_memory_binds() -> None:
    # BOUND computes a token in 3.6 µs and reads the weights in 0.1 s: four sequences write
    # four times the tokens in the time of one, where four calls one after another take 40 s.
    assert call_seconds(CallSpec("a", 0, 100), GB, BOUND) == pytest.approx(10.0)
    assert call_seconds(CallSpec("a", 0, 100, sequences=4), GB, BOUND) == pytest.approx(
        10.0, rel=1e-3
    )
    assert together([stage(*[("a", 100)] * 4)], BOUND) == pytest.approx(40.0)


def test_each_further_sequence_adds_its_compute_to_a_step() -> None:
    # A step: 0.1 s of weights and 4 × 0.05 s for the sequences after the first.
    assert call_seconds(CallSpec("a", 0, 100, sequences=5), GB, SLOW) == pytest.approx(30.0)
    rate, share = decode_rate(GB, SLOW, sequences=5)
    assert rate == pytest.approx(1 / 0.3) and share == pytest.approx(1.0)


def test_shorter_sequences_leave_the_batch_and_the_steps_get_cheaper() -> None:
    # Answers of 100 and 50 tokens: 100 steps reading the weights (10 s), the second
    # sequence's compute for 50 of them (2.5 s); running both to the end would take 15 s.
    ragged = CallSpec("a", 0, 100, sequences=2, total_output_tokens=150)
    assert call_seconds(ragged, GB, SLOW) == pytest.approx(12.5)
    assert call_seconds(ragged._replace(total_output_tokens=0), GB, SLOW) == pytest.approx(15.0)


def test_every_sequence_reads_its_kv_cache_at_every_step() -> None:
    # Two sequences of 100 + 100/2 tokens of context at 1 MB a token: 0.3 GB more per step.
    call = CallSpec("a", 100, 100, sequences=2, kv_bytes_per_token=10**6)
    prefill = 2 * PARAMS * 100 * 2 / BOUND.compute
    compute = 2 * PARAMS / BOUND.compute  # the second sequence's token, each step
    expected = prefill + 100 * ((GB + 0.3 * GB) / BOUND.bandwidth + compute)
    assert call_seconds(call, GB, BOUND) == pytest.approx(expected)


def test_the_weights_not_the_cache_a_size_holds_are_read_and_computed() -> None:
    call = CallSpec("a", 500, 100, sequences=3)
    with_cache = call_seconds(call._replace(weight_bytes=GB), 5 * GB, SLOW)
    assert with_cache == pytest.approx(call_seconds(call, GB, SLOW))
    assert call_seconds(call, 5 * GB, SLOW) > 4 * with_cache


def test_the_stream_cap_limits_steps_so_a_group_of_small_sequences_fills_it() -> None:
    # CAPPED caps a stream at 2.5 steps/s, a quarter of the device: four sequences take no
    # longer than one and still use about a quarter of the device.
    assert call_seconds(CallSpec("a", 0, 10, sequences=4), GB, CAPPED) == pytest.approx(4.0)
    rate, share = decode_rate(GB, CAPPED, sequences=4)
    assert rate == 2.5 and share == pytest.approx(0.25, rel=1e-3)


def test_sixteen_sequences_on_an_rtx_4090_match_llama_cpps_measured_rate() -> None:
    # llama 8B Q4_0 (4.66 GB), 16 tokens a step: 1930 tokens/s (ggml-org/llama.cpp#15131).
    rate, _ = decode_rate(4.66e9, PROFILES["desktop-24g"], sequences=16)
    assert 16 * rate == pytest.approx(1930, rel=0.05)


def test_groups_of_two_models_share_the_device_as_two_streams() -> None:
    groups = [[CallSpec("a", 0, 100, sequences=4), CallSpec("b", 0, 100, sequences=4)]]
    assert together(groups, BOUND) == pytest.approx(20.0, rel=1e-3)


def test_a_stream_stopped_midway_gives_back_the_work_it_has_left() -> None:
    fluid = Fluid()
    fluid.start(1, ((10.0, 1.0, 1.0), (5.0, 1.0, 1.0)))
    fluid.advance(4.0)
    assert fluid.stop(1) == pytest.approx(6.0)
    assert not fluid.busy()


# --- Ollama's parallel slots ---------------------------------------------------------------------


def test_ollama_serves_one_request_a_runner_at_a_time_by_default() -> None:
    clients = [[stage(("a", 100))], [stage(("a", 100))]]
    result = reactive_clients(clients, SIZES, BOUND)
    assert result.makespan_s == pytest.approx(1.5 + 10 + 10) and result.loads == 1


def test_ollama_decodes_the_requests_in_its_parallel_slots_together() -> None:
    clients = [[stage(("a", 100))], [stage(("a", 100))], [stage(("a", 100))]]
    result = reactive_clients(clients, SIZES, BOUND, num_parallel=2)
    # two together (10 s), then the third alone (10 s)
    assert result.makespan_s == pytest.approx(1.5 + 20, rel=1e-3) and result.loads == 1
    assert reactive_clients(clients, SIZES, BOUND, num_parallel={"a": 3}).makespan_s == (
        pytest.approx(1.5 + 10, rel=1e-3)
    )


def test_a_request_joins_a_running_batch_as_soon_as_a_slot_is_free() -> None:
    # Client 0's second layer arrives when its first ends (6.5 s) and decodes beside client
    # 1's call, which has 50 tokens left: both end at 11.5 s. One slot: 6.5, 16.5, 21.5.
    clients = [[stage(("a", 50)), stage(("a", 50))], [stage(("a", 100))]]
    joined = reactive_clients(clients, SIZES, BOUND, num_parallel=2)
    assert joined.makespan_s == pytest.approx(11.5, rel=1e-3)
    assert reactive_clients(clients, SIZES, BOUND).makespan_s == pytest.approx(21.5)


def test_a_joining_prompt_holds_the_running_sequences_while_it_is_read() -> None:
    # Client 1's second call reads a 40-token prompt (2 s on SLOW) while client 0 decodes.
    clients = [
        [stage(("a", 100))],
        [stage(("a", 20)), [CallSpec("a", 40, 20)]],
    ]
    result = reactive_clients(clients, SIZES, SLOW, num_parallel=2)
    # load 1.5; 20 steps of both (0.15 s each: 3 s); client 1's prompt (2 s); 20 steps of both
    # (3 s); client 0's last 60 tokens alone (6 s)
    assert result.makespan_s == pytest.approx(1.5 + 3 + 2 + 3 + 6)


def test_one_client_is_the_reactive_policy() -> None:
    calls = [stage(("a", 10), ("b", 10)), stage(("a", 10))]
    assert reactive_clients([calls], SIZES, CAPPED) == reactive(calls, SIZES, CAPPED)


# --- the benchmark's batch of prompts ----------------------------------------------------------


def test_a_batch_makes_one_group_per_model_and_stage_covering_every_prompt() -> None:
    bench = load_bench()
    instance = bench.suite(per_profile=1)[0]
    batch = bench.prompts(instance, 5)
    for most in (None, dict.fromkeys(bench.MODELS, 2)):
        for k, groups in enumerate(bench.grouped(batch, most)):
            calls = [c for prompt in batch for c in prompt[k]]
            for model in {c.model for c in calls}:
                mine = [g for g in groups if g.model == model]
                theirs = [c for c in calls if c.model == model]
                assert sum(g.sequences for g in mine) == len(theirs)
                assert sum(g.total_output_tokens for g in mine) == sum(
                    c.output_tokens for c in theirs
                )
                assert max(g.output_tokens for g in mine) == max(c.output_tokens for c in theirs)
                assert len(mine) == (1 if most is None else -(-len(theirs) // 2))


def test_a_batchs_models_hold_the_kv_cache_of_each_sequence() -> None:
    bench = load_bench()
    assert bench.kv_per_token("llama3.1:8b") == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    sizes = bench.sizes_with({"llama3.1:8b": 16, "qwen2.5:7b": 1})
    assert sizes["llama3.1:8b"] == int(4.7 * GB) + 16 * 128 * 1024 * 4096
    assert sizes["qwen2.5:7b"] == bench.SIZES["qwen2.5:7b"]


def test_the_batch_beats_ollama_and_a_loop_of_runs_on_every_profile() -> None:
    bench = load_bench()
    suite = bench.suite()
    for profile in PROFILES.values():  # the first ensemble of each, as the bench's table
        instance = next(i for i in suite if i.profile is profile)
        results = bench.run_batch(instance, 16)
        mine = results["batch"]
        assert 1 <= mine.chunk <= 16
        for other in ("loop", "ollama_np1", "ollama_np4", "ollama_serial"):
            assert mine.makespan_s < results[other].makespan_s, (instance.name, other)
        assert mine.loads <= results["loop"].loads


def test_the_bench_prints_the_batch_comparison_as_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    bench = load_bench()
    argv = ["bench_scheduler.py", "--batch", "4", "--per-profile", "1", "--json"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    doc = json.loads(capsys.readouterr().out)
    assert doc["prompts"] == 4 and len(doc["instances"]) == len(PROFILES)
    for instance in doc["instances"]:
        assert set(instance["policies"]) == set(bench.BATCH_POLICIES)
        assert set(instance["policies"]["batch"]) == {"makespan_s", "loads", "chunk"}
        assert set(instance["policies"]["loop"]) == {"makespan_s", "loads"}
