"""The timeline picture: built from a recorded run and from a plan, drawn as SVG and PNG."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import xml.etree.ElementTree as ET
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from localmoa.backends import make_backends
from localmoa.config import Settings, parse_config
from localmoa.errors import UserError
from localmoa.planning.profiles import PROFILES
from localmoa.planning.refine import calls_as_planned
from localmoa.planning.timing import simulate_plan
from localmoa.records.models import LoggedCall, LoggedLoad, RunDetail
from localmoa.records.timeline import (
    MissingExtraError,
    Residency,
    Timeline,
    draw,
    draw_plan,
    draw_run,
    from_plan,
    from_run,
    memory_steps,
)
from localmoa.runtime.moa import stage_label
from localmoa.runtime.prepare import Prepared, prepare

MiB = 1 << 20
GiB = 1 << 30
T0 = 1_700_000_000.0
"""The run's start, unix time (2023-11-14T22:13:20Z)."""


def call(
    layer: int,
    index: int,
    model: str,
    start: float | None,
    end: float | None,
    *,
    role: str = "proposer",
    first: float | None = None,
    ok: bool = True,
) -> LoggedCall:
    """A recorded call, its times in seconds after T0."""
    return LoggedCall(
        layer=layer,
        index=index,
        role=role,
        model=model,
        backend="llamacpp",
        ok=ok,
        error=None if ok else "boom",
        tokens_in=10,
        tokens_out=5,
        ttft_s=None,
        prefill_tok_s=None,
        decode_tok_s=None,
        seconds=0.0 if start is None or end is None else end - start,
        queued_at=None,
        started_at=None if start is None else T0 + start,
        first_token_at=None if first is None else T0 + first,
        ended_at=None if end is None else T0 + end,
        references=[],
        truncated=False,
        selected=None,
        stop=None,
        parsed=None,
        messages=None,
        text=None,
    )


def load(
    model: str,
    start: float,
    seconds: float,
    unloaded: float | None,
    *,
    measured: int | None = None,
    peak: int | None = None,
    estimated: int | None = None,
) -> LoggedLoad:
    return LoggedLoad(
        model=model,
        started_at=T0 + start,
        seconds=seconds,
        bytes_estimated=estimated,
        bytes_measured=measured,
        bytes_peak=peak,
        unloaded_at=None if unloaded is None else T0 + unloaded,
    )


def detail(calls: list[LoggedCall], loads: list[LoggedLoad], **fields: Any) -> RunDetail:
    base: dict[str, Any] = {
        "id": "01JTIMELINE0000000000000000",
        "status": "ok",
        "source": "run",
        "chat_id": None,
        "ensemble": "default",
        "started": "2023-11-14T22:13:20+00:00",
        "seconds": 10.0,
        "error": None,
        "config": {},
        "plan": None,
        "budget_bytes": 100 * MiB,
        "budget_source": "flag",
        "device": None,
        "versions": {},
        "conversation": None,
        "answer": None,
        "calls": calls,
        "loads": loads,
    }
    return RunDetail.model_validate({**base, **fields})


def swap_run() -> RunDetail:
    """Three models under a 100 MiB budget that holds two: tiny-a leaves for tiny-c."""
    return detail(
        calls=[
            call(1, 0, "tiny-a", 1.0, 2.0, first=1.2),
            call(1, 1, "tiny-b", 2.0, 3.5, first=2.5),
            call(1, 2, "tiny-c", 5.0, 6.0, first=5.1),
            call(2, 0, "tiny-c", 6.0, 7.0, ok=False),
            call(2, 1, "tiny-b", 6.0, 8.0, first=6.4),
            call(3, 0, "tiny-c", 8.0, 9.5, role="aggregator", first=8.2),
        ],
        loads=[
            load("tiny-a", 0.0, 1.0, 3.0, measured=40 * MiB, estimated=45 * MiB),
            load("tiny-b", 1.0, 1.0, None, peak=30 * MiB, estimated=35 * MiB),
            load("tiny-c", 3.0, 2.0, None, estimated=50 * MiB),
        ],
    )


def fake_prepared(budget: str = "2560MiB", **ensemble: Any) -> Prepared:
    """A real Prepared from the shipped fake backend: three 1 GiB models, two layers."""
    config = parse_config(
        {
            "models": {name: {"backend": "fake", "memory": "1GiB"} for name in "abc"},
            "ensembles": {
                "default": {
                    "layers": [["a", "b", "c"], ["a", "b", "c"]],
                    "aggregator": "c",
                    "max_tokens": 64,
                    **ensemble,
                }
            },
        }
    )
    return asyncio.run(prepare(config, "default", make_backends(Settings()), memory_budget=budget))


def peak(timeline: Timeline) -> int:
    return max(step.bytes for step in timeline.memory)


# --- from_run ---------------------------------------------------------------------------------


def test_a_run_has_a_row_per_model_in_order_of_first_appearance() -> None:
    timeline = from_run(swap_run())
    assert timeline.source == "measured"
    assert timeline.models == ["tiny-a", "tiny-b", "tiny-c"]
    assert timeline.end_s == pytest.approx(10.0)
    assert "run 01JTIMELINE0000000000000000" in timeline.title
    starts = [(s.start_s, s.kind != "load") for s in timeline.spans]
    assert starts == sorted(starts)


def test_a_run_s_spans_are_its_loads_and_calls_in_seconds_from_the_start() -> None:
    timeline = from_run(swap_run())
    loads = [(s.model, s.start_s, s.end_s) for s in timeline.spans if s.kind == "load"]
    assert loads == [("tiny-a", 0.0, 1.0), ("tiny-b", 1.0, 2.0), ("tiny-c", 3.0, 5.0)]
    calls = {(s.model, s.label): s for s in timeline.spans if s.kind == "call"}
    assert set(calls) == {
        ("tiny-a", "layer 1"),
        ("tiny-b", "layer 1"),
        ("tiny-c", "layer 1"),
        ("tiny-c", "layer 2"),
        ("tiny-b", "layer 2"),
        ("tiny-c", "aggregator"),
    }
    first = calls[("tiny-b", "layer 1")]
    assert (first.start_s, first.first_token_s, first.end_s) == pytest.approx((2.0, 2.5, 3.5))
    assert (
        not calls[("tiny-c", "layer 2")].ok and calls[("tiny-c", "layer 2")].first_token_s is None
    )
    assert calls[("tiny-c", "aggregator")].layer == 3
    assert calls[("tiny-c", "aggregator")].role == "aggregator"


def test_a_run_s_memory_counts_measured_then_peak_then_estimated_bytes() -> None:
    timeline = from_run(swap_run())
    steps = [(s.at_s, s.bytes) for s in timeline.memory]
    # a (40 measured) 0..3; b (30 peak, its estimate ignored) 1..end; c (50 estimated) 3..end
    assert steps == [(0.0, 40 * MiB), (1.0, 70 * MiB), (3.0, 80 * MiB), (10.0, 0)]
    sources = {r.model: (r.bytes_source, r.end_s) for r in timeline.residencies}
    assert sources == {
        "tiny-a": ("measured", 3.0),
        "tiny-b": ("peak", 10.0),
        "tiny-c": ("estimated", 10.0),
    }
    assert "memory measured for 2 of 3 loads" in timeline.note


def test_an_interrupted_run_ends_its_open_calls_with_the_run_and_skips_unstarted_ones() -> None:
    run = detail(
        calls=[call(1, 0, "m", 0.5, None), call(1, 1, "n", None, None)],
        loads=[load("m", 0.0, 0.5, None, measured=10 * MiB)],
        status="interrupted",
        seconds=None,
    )
    timeline = from_run(run)
    assert "(interrupted)" in timeline.title
    assert timeline.models == ["m"]  # n never started: nothing of it to show
    (open_call,) = [s for s in timeline.spans if s.kind == "call"]
    assert open_call.end_s == timeline.end_s == pytest.approx(0.5)


def test_a_run_with_no_loads_recorded_says_memory_is_not_known() -> None:
    """A chat turn whose models stayed loaded from the turn before loads nothing."""
    timeline = from_run(detail(calls=[call(1, 0, "m", 0.0, 1.0)], loads=[]))
    assert timeline.models == ["m"]
    assert [(s.at_s, s.bytes) for s in timeline.memory] == [(0.0, 0)]
    assert "not known" in timeline.note


def test_time_zero_is_the_first_event_whatever_the_start_stamp_says() -> None:
    """A start stamp coarser than the events (whole seconds) neither makes times negative nor
    leaves an empty stretch before the first load."""
    for stamp in ("2023-11-14T22:13:21Z", "2023-11-14T22:13:19+00:00", "2023-11-14T22:13:19"):
        run = detail(
            calls=[call(1, 0, "m", 1.5, 2.0)],
            loads=[load("m", 0.5, 1.0, 2.5, measured=MiB)],
            started=stamp,
        )
        timeline = from_run(run)
        assert [(s.kind, s.start_s) for s in timeline.spans] == [("load", 0.0), ("call", 1.0)]
        assert timeline.residencies[0].end_s == pytest.approx(2.0)


def test_memory_unloads_before_a_load_at_the_same_moment() -> None:
    stays = [
        Residency(model="a", start_s=0.0, end_s=2.0, bytes=60, bytes_source="measured"),
        Residency(model="b", start_s=2.0, end_s=3.0, bytes=50, bytes_source="measured"),
        Residency(model="c", start_s=1.0, end_s=1.5, bytes=None, bytes_source=None),
    ]
    steps = [(s.at_s, s.bytes) for s in memory_steps(stays)]
    assert steps == [(0.0, 60), (2.0, 50), (3.0, 0)]  # never 110 at t=2
    assert all(b >= 0 for _, b in steps)


# --- from_plan ---------------------------------------------------------------------------------


def test_a_plan_s_timeline_places_every_call_and_every_load_of_the_plan() -> None:
    prepared = fake_prepared()
    timeline = from_plan(prepared)
    assert timeline.source == "planned"
    assert set(timeline.models) == {"a", "b", "c"}
    loads = [s for s in timeline.spans if s.kind == "load"]
    calls = [s for s in timeline.spans if s.kind == "call"]
    assert len(loads) == prepared.plan.loads == 4
    assert len(calls) == sum(len(stage) for stage in prepared.stages)
    starts = [s.start_s for s in timeline.spans]
    assert starts == sorted(starts)
    assert all(0.0 <= s.start_s <= s.end_s <= timeline.end_s for s in timeline.spans)
    labels = [stage_label(stage) for stage in prepared.stages]
    for before, after in pairwise(labels):  # stages run in order
        last_end = max(s.end_s for s in calls if s.label == before)
        assert all(s.start_s >= last_end for s in calls if s.label == after)


def test_a_plan_s_memory_is_never_negative_and_never_over_its_budget() -> None:
    prepared = fake_prepared()
    timeline = from_plan(prepared)
    assert timeline.budget_bytes == prepared.plan.budget_bytes == 2560 * MiB
    assert all(step.bytes >= 0 for step in timeline.memory)
    assert peak(timeline) <= prepared.plan.budget_bytes
    assert peak(timeline) == 2 * GiB  # two of the three fit at once
    assert timeline.memory[-1].bytes == 0  # everything unloaded at the end (for free)
    assert {r.bytes_source for r in timeline.residencies} == {"estimated"}


def test_a_plan_s_calls_run_while_their_model_is_resident() -> None:
    timeline = from_plan(fake_prepared())
    for span in timeline.spans:
        if span.kind == "call":
            assert any(
                r.model == span.model and r.start_s <= span.start_s and span.end_s <= r.end_s
                for r in timeline.residencies
            )


def test_an_untimed_plan_is_pictured_on_a_nominal_profile_and_says_so() -> None:
    prepared = fake_prepared()
    assert prepared.timing is None and prepared.policy.profile is None  # fakes are not timed
    assert "nominal" in from_plan(prepared).note
    timed = from_plan(prepared, profile=PROFILES["desktop-24g"])
    assert "nominal" not in timed.note and "desktop-24g" in timed.title
    within = dataclasses.replace(PROFILES["desktop-24g"], memory_bytes=prepared.plan.budget_bytes)
    expected = simulate_plan(  # as the planner times it: on the profile, within the plan's budget
        prepared.plan,
        calls_as_planned(prepared.stages, None),
        {name: fp.total for name, fp in prepared.footprints.items()},
        within,
    )
    assert timed.end_s == expected.makespan_s
    assert peak(timed) <= prepared.plan.budget_bytes  # though the profile's device holds 24 GB


def test_a_judge_is_labelled_as_its_stage() -> None:
    timeline = from_plan(fake_prepared(judge={"top_k": 2}))
    labels = {s.label for s in timeline.spans if s.kind == "call"}
    assert {"layer 1", "judge 1", "layer 2", "judge 2", "aggregator"} <= labels


# --- drawing -----------------------------------------------------------------------------------


def test_draw_run_writes_an_svg_naming_every_model(tmp_path: Path) -> None:
    path = tmp_path / "run.svg"
    draw_run(swap_run(), path)
    text = path.read_text(encoding="utf-8")
    ET.fromstring(text)  # well-formed XML
    for model in ("tiny-a", "tiny-b", "tiny-c"):
        assert model in text
    assert "<dc:date>" not in text  # no date: the same run draws the same file


def test_draw_plan_writes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "plan.PNG"
    draw_plan(fake_prepared(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("suffix", [".svg", ".png"])
def test_the_same_timeline_draws_the_same_bytes(tmp_path: Path, suffix: str) -> None:
    first, second = tmp_path / f"1{suffix}", tmp_path / f"2{suffix}"
    draw_run(swap_run(), first)
    draw_run(swap_run(), second)
    assert first.read_bytes() == second.read_bytes()


def test_samples_at_once_on_one_model_draw(tmp_path: Path) -> None:
    """An agent's samples in parallel slots overlap on their model's row."""
    run = detail(
        calls=[call(1, k, "m", 0.5, 2.0 + k, first=0.7) for k in range(3)]
        + [call(2, 0, "m", 5.0, 6.0, role="aggregator")],
        loads=[load("m", 0.0, 0.5, None, measured=5 * MiB)],
    )
    path = tmp_path / "samples.svg"
    draw_run(run, path)
    ET.fromstring(path.read_text(encoding="utf-8"))


def test_an_empty_run_draws(tmp_path: Path) -> None:
    path = tmp_path / "empty.svg"
    draw_run(detail(calls=[], loads=[], seconds=0.0), path)
    assert "nothing ran" in path.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ["run.pdf", "run", "run.svg.txt"])
def test_another_suffix_is_refused_naming_the_ones_drawn(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserError, match=r"\.svg or \.png"):
        draw_run(swap_run(), tmp_path / name)
    assert not (tmp_path / name).exists()


def test_a_missing_folder_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        draw_run(swap_run(), tmp_path / "nowhere" / "run.svg")


def test_without_matplotlib_the_error_names_the_plot_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'localmoa\[plot\]'") as caught:
        draw_run(swap_run(), tmp_path / "run.svg")
    assert isinstance(caught.value, UserError)
    assert not (tmp_path / "run.svg").exists()


def test_draw_takes_a_timeline_as_built(tmp_path: Path) -> None:
    timeline = from_run(swap_run())
    path = tmp_path / "t.svg"
    draw(timeline, path)
    assert path.stat().st_size > 0
