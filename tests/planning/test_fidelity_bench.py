"""The fidelity benchmark (scripts/bench_fidelity.py): the plans it runs and the errors it reports,
without running llama.cpp."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest

from localmoa.planning.fewest_loads import make_plan
from localmoa.planning.profiles import PROFILES
from localmoa.planning.refine import calls_as_planned
from localmoa.planning.timing import simulate_plan

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_fidelity as bench

MB = 10**6
# The footprints the benchmark's four models have at its context (estimated from their headers).
SIZES = {"big": 457 * MB, "mid": 358 * MB, "small": 265 * MB, "tiny": 190 * MB}


def test_the_bench_runs_ten_distinct_plans_some_with_extra_loads() -> None:
    rows = []
    for name, models, rule in bench.CASES:
        plans = bench.plans_for(name, models, rule, SIZES, PROFILES["cpu-16g"], 24)
        fewest = plans[0].plan
        assert plans[0].kind == "fewest loads" and len(plans) >= 2
        stages = bench.stages_of(models, 24)
        calls = calls_as_planned(stages, bench.QUESTION)
        for m in plans:
            assert m.plan.loads >= fewest.loads
            room = dataclasses.replace(PROFILES["cpu-16g"], memory_bytes=m.plan.budget_bytes)
            simulate_plan(m.plan, calls, SIZES, room)  # every call once, within the budget
        assert len({str(m.plan.waves) for m in plans}) == len(plans)
        rows += plans
    assert len(rows) >= 10
    assert (
        sum(m.plan.loads > min(r.plan.loads for r in rows if r.case == m.case) for m in rows) >= 5
    )


def test_ratio_errors_compare_the_plans_of_one_case_only() -> None:
    plan = make_plan([["a"]], {"a": 1}, 1)
    more = plan.model_copy(update={"loads": plan.loads + 1})
    rows = [
        bench.Measured("one", "x", plan, predicted_s=2.0, runs=[1.0, 1.0, 3.0]),
        bench.Measured("one", "y", more, predicted_s=4.0, runs=[2.5]),
        bench.Measured("one", "z", plan, predicted_s=2.0, runs=[1.0]),
        bench.Measured("two", "x", plan, predicted_s=1.0, runs=[1.0]),
    ]
    absolute, ratio, other_loads = bench.errors(rows, "predicted_s")
    assert absolute == pytest.approx([1.0, 0.6, 1.0, 0.0])
    xy, yz = abs((2.0 / 4.0) / (1.0 / 2.5) - 1), abs((4.0 / 2.0) / (2.5 / 1.0) - 1)
    assert ratio == pytest.approx([xy, 0.0, yz])
    assert other_loads == pytest.approx([xy, yz])
