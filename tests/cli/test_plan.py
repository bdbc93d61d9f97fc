"""`localmoa plan`: the plan as tables, or the PlanReport with --json, nothing loaded."""

from __future__ import annotations

import json
from io import StringIO
from pathlib import Path

from conftest import write_config
from rich.console import Console

from localmoa.cli.plan import plan_report
from localmoa.cli.render import print_plan
from localmoa.cli.reports import PlanReport
from localmoa.footprint.estimate import Footprint
from localmoa.hardware import Budget
from localmoa.planning.fewest_loads import Plan, make_plan
from localmoa.runtime.moa import Call
from localmoa.runtime.prepare import Prepared

from .invoke import FAKE_THREE, GiB, localmoa


def test_done_when_plan_json_three_1gib_models_under_2_5_gib(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("plan", "--json", "--memory-budget", "2.5GiB")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout)
    assert plan["loads"] == 4 and plan["lower_bound"] == 3
    assert plan["budget_bytes"] == int(2.5 * GiB)
    assert all(w["bytes"] <= plan["budget_bytes"] for w in plan["waves"])
    assert sum(len(w["load"]) for w in plan["waves"]) == 4
    assert [w["layer"] for w in plan["waves"]][-1] == 3
    assert set(plan["waves"][0]) == {
        "layer",
        "resident",
        "runs",
        "load",
        "unload",
        "bytes",
        "devices",
        "shares",
    }


def test_plan_json_is_exactly_the_plan_report(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("plan", "--json", "--memory-budget", "2.5GiB")
    assert out.returncode == 0, out.stderr
    report = PlanReport.model_validate_json(out.stdout)
    assert out.stdout == json.dumps(report.model_dump(mode="json")) + "\n"
    doc = json.loads(out.stdout)
    assert list(doc)[: len(Plan.model_fields)] == list(Plan.model_fields)  # the plan, flat
    assert doc["models"] == {name: {"bytes": GiB, "source": "override"} for name in "abc"}
    assert doc["footprints"]["a"] == {"weights": GiB, "kv_cache": 0, "compute": 0}
    assert doc["budget_source"] == "--memory-budget" and doc["ensemble"] == "default"
    assert doc["zero_config"] is None  # a models.toml was used


def test_every_plan_field_reaches_plan_json_unchanged() -> None:
    """PlanReport is the Plan plus the command's extras: a field the planner adds (such as
    ``fewest_loads_seconds``) is in ``plan --json`` with no change in the CLI."""
    plan = make_plan([["a", "b"], ["a"]], {"a": GiB, "b": GiB}, GiB)
    timed = plan.model_copy(update={"estimated_seconds": 2.5, "timed_for": "cpu-16g"})
    report = plan_report(_prepared(timed), [])
    dumped = report.model_dump(mode="json")
    assert {key: dumped[key] for key in Plan.model_fields} == timed.model_dump(mode="json")
    assert set(Plan.model_fields) < set(PlanReport.model_fields)


def test_plan_table_is_readable(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("plan", "--memory-budget", "2.5GiB")
    assert out.returncode == 0, out.stderr
    assert "aggregator" in out.stdout and "loads: 4 (lower bound 3; optimal)" in out.stdout
    assert "(--memory-budget)" in out.stdout and "memory override" in out.stdout


def test_plan_of_llama_cpp_models_shows_the_estimate_and_the_profile(tiny_config: Path) -> None:
    out = localmoa("plan", "--memory-budget", "1GiB")
    assert out.returncode == 0, out.stderr
    assert "estimated " in out.stdout and "speeds, every call writing max_tokens" in out.stdout
    doc = json.loads(localmoa("plan", "--json", "--memory-budget", "1GiB").stdout)
    assert doc["estimated_seconds"] > 0 and doc["timed_for"] in (
        "laptop-8g",
        "desktop-24g",
        "server-80g",
        "apple-32g",
        "cpu-16g",
    )
    parts = doc["footprints"]["tiny-a"]
    assert parts["kv_cache"] > 0 and sum(parts.values()) == doc["models"]["tiny-a"]["bytes"]


def test_plan_table_says_when_a_timed_plan_loads_more_than_the_fewest() -> None:
    plan = make_plan([["a"], ["a"]], {"a": GiB}, 2 * GiB)
    timed = plan.model_copy(
        update={"loads": 2, "fewest_loads": 1, "estimated_seconds": 3.31, "timed_for": "cpu-16g"}
    )
    text = _table(plan_report(_prepared(timed), []))
    assert "loads: 2 (lower bound 1; the planner's fewest is 1; more are estimated faster)" in text
    assert "estimated 3.3s with cpu-16g speeds" in text
    assert 'Plan for ensemble "default"' in text


def test_the_table_reads_the_report_it_is_given() -> None:
    """The table shows what the JSON says: a report parsed back from ``--json`` prints the
    same table as the one it was dumped from."""
    plan = make_plan([["a"], ["a"]], {"a": GiB}, 2 * GiB)
    report = plan_report(_prepared(plan), ["proposer a: the only one"])
    again = PlanReport.model_validate_json(json.dumps(report.model_dump(mode="json")))
    text = _table(report)
    assert text == _table(again)
    assert "No models.toml found" in text and "proposer a: the only one" in text
    assert "| aggregator |" in text.replace("│", "|")


def _prepared(plan: Plan) -> Prepared:
    budget = Budget(bytes=plan.budget_bytes, source="flag", detail="--memory-budget")
    names = dict.fromkeys(name for wave in plan.waves for name in wave.runs)
    count = max(wave.layer for wave in plan.waves)
    stages = [  # one call per stage, the last the aggregator: enough for the stage labels
        [Call(k, 0, next(iter(names)), None, 0.7, 8, k == count)] for k in range(1, count + 1)
    ]
    footprints = {name: Footprint.override(GiB) for name in names}
    return Prepared("default", stages, footprints, budget, plan)


def _table(report: PlanReport) -> str:
    out = StringIO()
    print_plan(Console(file=out, width=200), report)
    return out.getvalue()


def test_plan_draws_its_timeline_and_refuses_a_bad_suffix_first(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("plan", "--memory-budget", "2.5GiB", "--timeline", str(tmp_path / "p.svg"))
    assert out.returncode == 0, out.stderr
    svg = (tmp_path / "p.svg").read_text(encoding="utf-8")
    assert svg.startswith("<?xml") and all(f">{m}<" in svg or m in svg for m in "abc")
    (tmp_path / "models.toml").unlink()  # refused before any config is read
    out = localmoa("plan", "--timeline", str(tmp_path / "p.pdf"))
    assert out.returncode == 2 and "name the file .svg or .png" in out.stderr
