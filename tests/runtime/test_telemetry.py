"""Per-call and per-load telemetry: when each call was ready, sent, first answered and done, how
fast it went, and what each load took; the summary line ``run`` ends with.

The fake backend's timing is its simulated work (``seconds_per_token``): the first token after
one token's time, each next a token's time later, and it states its rates like Ollama. Real
llama.cpp with the tiny random-weight models is timed from the stream, except the rate of its
prompt's evaluation, which it states.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
import types
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cli.invoke import FAKE_THREE, localmoa
from conftest import write_config

from localmoa.backends.base import Backend, ChatDelta, ChatMessage, ChatRequest
from localmoa.backends.fake import FakeBackend
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.cli.render import run_summary
from localmoa.cli.reports import RunReport
from localmoa.config import Agent, Ensemble, FakeModel, LlamaCppModel
from localmoa.errors import BackendError
from localmoa.footprint import measurements
from localmoa.footprint.measurements import ProcessMemory
from localmoa.planning.fewest_loads import make_plan
from localmoa.runtime.engine import CallRecord, Event, Executor, ModelLoaded, RunResult
from localmoa.runtime.moa import calls_for, stages_of

GiB = 1 << 30
QUESTION = [ChatMessage(role="user", content="Why is the sky blue?")]
TICK = 0.01
"""The fake's seconds per token."""
CLOCK = 1e-6
"""Slack for comparing a measured interval with a sleep: asyncio may wake a timer up to its
clock's resolution early (1 ns on Linux), and a unix time today is a float good to 0.24 µs."""
THREE = Ensemble(layers=[["a", "b", "c"], ["a", "b", "c"]], aggregator=Agent(model="a"))


def fakes(*names: str, **overrides: dict[str, Any]) -> dict[str, FakeModel]:
    table = {"memory": GiB, "seconds_per_token": TICK, "reply": "one two three four"}
    return {
        n: FakeModel.model_validate({"backend": "fake", **table, **overrides.get(n, {})})
        for n in names
    }


async def run(
    ensemble: Ensemble, models: dict[str, Any], backend: Backend, budget: int
) -> tuple[RunResult, list[Event]]:
    events: list[Event] = []
    sizes = {n: (await backend.footprint(n, m)).total for n, m in models.items()}
    plan = make_plan(stages_of(ensemble), sizes, budget)
    executor = Executor(models, {models[next(iter(models))].backend: backend}, sizes=sizes)
    result = await executor.run(calls_for(ensemble), plan, QUESTION, on_event=events.append)
    return result, events


def assert_ordered(record: CallRecord) -> None:
    """queued ≤ started ≤ first token ≤ end, and ttft the interval it says."""
    assert record.queued_at is not None and record.started_at is not None
    assert record.first_token_at is not None and record.ended_at is not None
    assert record.queued_at <= record.started_at <= record.first_token_at <= record.ended_at
    assert record.ttft_s is not None and record.ttft_s > 0
    assert math.isclose(
        record.ttft_s, record.first_token_at - record.started_at, rel_tol=0, abs_tol=CLOCK
    )


class Untimed(FakeBackend):
    """The fake as a runtime that states no rates (llama.cpp in process): the engine times
    the stream."""

    async def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        async for delta in super().chat(name, request):
            yield delta._replace(prefill_tok_s=None, decode_tok_s=None)


# --- calls on the fake --------------------------------------------------------------------------


async def test_every_call_is_timed_and_a_runtime_s_own_rates_are_kept() -> None:
    result, _ = await run(THREE, fakes("a", "b", "c"), FakeBackend(), 2 * GiB)
    assert len(result.calls) == 7
    for record in result.calls:
        assert record.ok
        assert_ordered(record)
        assert record.ttft_s is not None and record.ttft_s >= TICK - CLOCK  # one token's time
        assert record.ended_at is not None and record.first_token_at is not None
        assert record.ended_at - record.first_token_at >= 3 * TICK - CLOCK  # three more tokens
        # The fake states its rates, which win over the stream's (a little slower: overhead).
        assert record.decode_tok_s == 1 / TICK
        assert record.prefill_tok_s == record.prompt_tokens / TICK


async def test_a_call_is_queued_once_the_answers_it_reads_are_in() -> None:
    result, _ = await run(THREE, fakes("a", "b", "c"), FakeBackend(), 2 * GiB)
    by_layer: dict[int, list[CallRecord]] = {}
    for record in result.calls:
        by_layer.setdefault(record.layer, []).append(record)
    for layer in (2, 3):
        read = max(r.ended_at or 0 for r in by_layer[layer - 1])
        assert all((r.queued_at or 0) >= read for r in by_layer[layer])


async def test_without_a_runtime_s_rates_the_stream_is_timed() -> None:
    result, _ = await run(THREE, fakes("a", "b", "c"), Untimed(), 2 * GiB)
    for record in result.calls:
        assert_ordered(record)
        assert record.tokens == 4
        assert record.ttft_s is not None and record.prompt_tokens > 0
        assert record.prefill_tok_s == record.prompt_tokens / record.ttft_s
        assert record.decode_tok_s is not None and record.ended_at and record.first_token_at
        span = record.ended_at - record.first_token_at
        assert math.isclose(record.decode_tok_s, 3 / span, rel_tol=1e-4)  # unix floats
        assert 0 < record.decode_tok_s <= 1 / TICK * (1 + CLOCK)  # never faster than its work


async def test_samples_each_get_their_own_first_token() -> None:
    ensemble = Ensemble(
        layers=[[Agent(model="solo", samples=3, seed=5)]], aggregator=Agent(model="solo")
    )
    models = fakes("solo", solo={"parallel": 1})  # one at a time: a sample waits for the last
    result, _ = await run(ensemble, models, Untimed(), GiB)
    samples = [r for r in result.calls if r.role == "proposer"]
    assert len(samples) == 3
    for record in samples:
        assert_ordered(record)
    assert len({r.started_at for r in samples}) == 1  # made together, sent together
    for before, after in itertools.pairwise(samples):
        assert before.ended_at is not None and after.first_token_at is not None
        assert after.first_token_at > before.ended_at
        assert after.ttft_s is not None and before.ttft_s is not None
        assert after.ttft_s >= before.ttft_s + 4 * TICK - CLOCK


async def test_a_failed_call_has_an_end_and_no_first_token() -> None:
    models = fakes("a", "b", "c", b={"fail": "no GPU"})
    result, _ = await run(THREE, models, FakeBackend(), 2 * GiB)
    failed = [r for r in result.calls if not r.ok]
    assert failed and all(r.model == "b" for r in failed)
    for record in failed:
        assert record.started_at is not None and record.ended_at is not None
        assert record.queued_at is not None and record.queued_at <= record.started_at
        assert record.started_at <= record.ended_at
        assert record.first_token_at is None and record.ttft_s is None
        assert record.prefill_tok_s is None and record.decode_tok_s is None


class NoRoomForC(FakeBackend):
    async def load(self, name: str, config: Any, placement: Any = None) -> None:
        if name == "c":
            raise BackendError(name, "out of memory")
        await super().load(name, config)


async def test_a_call_whose_model_did_not_load_was_never_sent() -> None:
    result, _ = await run(THREE, fakes("a", "b", "c"), NoRoomForC(), 2 * GiB)
    failed = [r for r in result.calls if r.model == "c"]
    assert failed and not any(r.ok for r in failed)
    for record in failed:
        assert record.started_at is None and record.first_token_at is None
        assert record.queued_at is not None and record.ended_at is not None
        assert record.queued_at <= record.ended_at


async def test_loads_say_what_the_plan_counted_and_what_they_took() -> None:
    models = fakes("a", "b", "c", b={"memory": 2 * GiB})
    _, events = await run(THREE, models, FakeBackend(), 3 * GiB)
    loaded = [e for e in events if isinstance(e, ModelLoaded)]
    assert loaded
    for event in loaded:
        size = int(models[event.model].memory)
        assert event.estimated_bytes == size and event.peak_bytes == size


# --- llama.cpp in process -------------------------------------------------------------------------


def tiny(path: Path, **kwargs: Any) -> LlamaCppModel:
    return LlamaCppModel.model_validate(
        {"backend": "llamacpp", "path": path, "n_ctx": 512, "seed": 7, **kwargs}
    )


async def test_llama_cpp_calls_are_timed_and_loads_measured(
    tiny_models: dict[str, Path],
) -> None:
    models = {"tiny-a": tiny(tiny_models["tiny-a"]), "tiny-b": tiny(tiny_models["tiny-b"])}
    ensemble = Ensemble(
        layers=[["tiny-a", "tiny-b"]], aggregator=Agent(model="tiny-a"), max_tokens=16
    )
    backend = LlamaCppBackend()
    try:
        result, events = await run(ensemble, models, backend, GiB)
    finally:
        await backend.aclose()
    answered = [r for r in result.calls if r.tokens]
    assert answered, "the tiny models said nothing at all"
    for record in answered:
        assert record.ok
        assert_ordered(record)
        assert record.prefill_tok_s is not None and math.isfinite(record.prefill_tok_s)
        assert record.prefill_tok_s > 0
        if record.decode_tok_s is not None:  # None only when every token came in one piece
            assert math.isfinite(record.decode_tok_s) and record.decode_tok_s > 0
    assert any(r.decode_tok_s is not None for r in answered)
    loaded = [e for e in events if isinstance(e, ModelLoaded)]
    assert {e.model for e in loaded} == {"tiny-a", "tiny-b"}
    for event in loaded:
        estimate = (await backend.footprint(event.model, models[event.model])).total
        assert event.estimated_bytes == estimate
        assert event.peak_bytes is not None and event.peak_bytes > 0


async def test_llama_cpp_samples_each_get_their_own_first_token(
    tiny_models: dict[str, Path],
) -> None:
    models = {"m": tiny(tiny_models["tiny-a"], parallel=2)}
    ensemble = Ensemble(
        layers=[[Agent(model="m", samples=4, seed=11, temperature=1.0)]],
        aggregator=Agent(model="m"),
        max_tokens=12,
    )
    backend = LlamaCppBackend()
    try:
        result, _ = await run(ensemble, models, backend, GiB)
    finally:
        await backend.aclose()
    samples = [r for r in result.calls if r.role == "proposer"]
    assert len(samples) == 4 and all(r.ok and r.tokens for r in samples)
    for record in samples:
        assert_ordered(record)
        # Stated by the backend: the one evaluation of the prompt they share.
        assert record.prefill_tok_s is not None and math.isfinite(record.prefill_tok_s)
    assert len({r.started_at for r in samples}) == 1  # made together, sent together
    # Two sequences at a time: the second round's first tokens come after the first round.
    first_round, second_round = samples[:2], samples[2:]
    ended = max(r.ended_at or 0 for r in first_round)
    assert all((r.first_token_at or 0) > ended for r in second_round)
    assert min(r.ttft_s or 0 for r in second_round) > max(r.ttft_s or 0 for r in first_round)
    assert len({r.prefill_tok_s for r in samples}) == 1  # one prompt, evaluated once for all


# --- what this process holds: RSS and, where NVML is, GPU memory ---------------------------------


class FakeNvml(types.ModuleType):
    """``pynvml`` as a driver would answer: two GPUs, this process on both (once as a compute
    and once as a graphics process on the first), another process beside it."""

    def __init__(self, held: list[int | None], *, broken: bool = False) -> None:
        super().__init__("pynvml")
        self.held = held
        self.broken = broken

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetCount(self) -> int:
        if self.broken:
            raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
        return len(self.held)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetComputeRunningProcesses(self, device: int) -> list[SimpleNamespace]:
        mine = SimpleNamespace(pid=os.getpid(), usedGpuMemory=self.held[device])
        return [mine, SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=10 * GiB)]

    def nvmlDeviceGetGraphicsRunningProcesses(self, device: int) -> list[SimpleNamespace]:
        mine = SimpleNamespace(pid=os.getpid(), usedGpuMemory=self.held[device])
        return [mine] if device == 0 else []


def with_nvml(monkeypatch: pytest.MonkeyPatch, module: types.ModuleType | None) -> None:
    monkeypatch.setattr(measurements, "_nvml", None)  # initialized again, from this module
    monkeypatch.setitem(sys.modules, "pynvml", module)  # None: not installed


def test_gpu_memory_is_this_process_s_on_every_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    with_nvml(monkeypatch, FakeNvml([3 * GiB, GiB]))
    assert measurements.gpu_bytes_of_this_process() == 4 * GiB  # listed twice, counted once
    with_nvml(monkeypatch, FakeNvml([None, GiB]))  # a driver that cannot tell says None
    assert measurements.gpu_bytes_of_this_process() == GiB


def test_without_nvml_gpu_memory_is_not_measured_and_nothing_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with_nvml(monkeypatch, None)
    assert measurements.gpu_bytes_of_this_process() is None
    now = ProcessMemory.now()
    assert now.gpu is None and now.rss > 0 and now.anon is not None and now.anon > 0
    with_nvml(monkeypatch, FakeNvml([GiB], broken=True))
    assert measurements.gpu_bytes_of_this_process() is None


def test_a_load_s_growth_counts_each_kind_of_memory_and_never_goes_negative() -> None:
    before = ProcessMemory(rss=10 * GiB, anon=8 * GiB, gpu=GiB)
    assert ProcessMemory(rss=11 * GiB, anon=9 * GiB, gpu=3 * GiB).growth_since(before) == 3 * GiB
    # File pages reclaimed meanwhile do not cancel the load's anonymous memory out.
    assert ProcessMemory(rss=10 * GiB, anon=9 * GiB, gpu=GiB).growth_since(before) == GiB
    assert ProcessMemory(rss=9 * GiB, anon=7 * GiB, gpu=2 * GiB).growth_since(before) == GiB
    # Where the system does not say what is anonymous, or NVML what is on the GPU: RSS alone.
    assert ProcessMemory(rss=12 * GiB, anon=None, gpu=None).growth_since(before) == 2 * GiB


# --- the summary line -----------------------------------------------------------------------------


def record(ttft: float | None, decode: float | None, ok: bool = True) -> CallRecord:
    return CallRecord(
        layer=1,
        index=0,
        model="a",
        ok=ok,
        error=None if ok else "no",
        seconds=1.0,
        tokens=3,
        text="",
        ttft_s=ttft,
        decode_tok_s=decode,
    )


def report(
    calls: list[CallRecord], loads: int = 3, replans: int = 0, load_seconds: float = 0.0
) -> RunReport:
    plan = make_plan([["a"]], {"a": GiB}, GiB)
    return RunReport(
        answer="",
        calls=calls,
        loads=loads,
        load_seconds=load_seconds,
        replans=replans,
        seconds=3.4,
        skipped_layers=[],
        plan=plan,
    )


def test_the_summary_gives_load_seconds_and_the_median_ttft_and_decode() -> None:
    calls = [record(0.1, 40.0), record(0.12, 41.0), record(0.5, 45.0), record(None, None, False)]
    assert (
        run_summary(report(calls, load_seconds=2.1))
        == "4 calls (1 failed), 3 loads (2.1s), ttft 0.12s median, decode 41 tok/s median, 3.40s"
    )


def test_the_summary_leaves_out_what_was_not_measured() -> None:
    calls = [record(None, None, False)]
    assert run_summary(report(calls, replans=1)) == (
        "1 calls (1 failed), 3 loads, re-planned 1x mid-run, 3.40s"
    )
    slow = [record(2.0, 3.25)]
    assert run_summary(report(slow)).endswith("ttft 2.00s median, decode 3.2 tok/s median, 3.40s")


def test_run_ends_with_the_telemetry_and_json_has_every_call_s_times(tmp_path: Path) -> None:
    timed = FAKE_THREE.replace('memory = "1GiB"', 'memory = "1GiB"\nseconds_per_token = 0.002')
    write_config(tmp_path, timed)
    out = localmoa("run", "q", "--json", "--memory-budget", "3GiB")
    assert out.returncode == 0, out.stderr
    assert "7 calls (0 failed), 3 loads" in out.stderr
    assert "s median, decode 500 tok/s median" in out.stderr
    calls = RunReport.model_validate_json(out.stdout).calls
    for call in calls:
        assert_ordered(call)
        assert call.decode_tok_s == 500
