"""The variants through the CLI on the fake backend: what `plan` shows of judge, roles and
conditional stages, and what `run` prints of a judge's choice, an early stop and a selection."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_config

from .invoke import localmoa

SPARSE = """
[models.p1]
backend = "fake"
memory = "1GiB"
reply = "first answer"
[models.p2]
backend = "fake"
memory = "1GiB"
reply = "second answer"
[models.late]
backend = "fake"
memory = "1GiB"
[models.judge]
backend = "fake"
memory = "1GiB"
reply = '{"selected": [2], "stop": true, "reason": "they agree"}'
[ensembles.default]
layers = [["p1", "p2"], ["p1", "late"], ["p2", "late"]]
aggregator = "p1"
judge = { model = "judge", top_k = 1, early_stop = true }
"""


def test_plan_shows_judges_and_the_stages_an_early_stop_may_skip(tmp_path: Path) -> None:
    write_config(tmp_path, SPARSE)
    out = localmoa("plan", "--json", "--memory-budget", "2GiB")
    assert out.returncode == 0, out.stderr
    stages = json.loads(out.stdout)["stages"]
    assert [(s["label"], s["role"], s["conditional"]) for s in stages] == [
        ("layer 1", "proposer", False),
        ("judge 1", "judge", False),
        ("layer 2", "proposer", True),
        ("judge 2", "judge", True),
        ("layer 3", "proposer", True),
        ("judge 3", "judge", True),
        ("aggregator", "aggregator", False),
    ]
    table = localmoa("plan", "--memory-budget", "2GiB")
    assert "judge 1" in table.stdout and "layer 2 *" in table.stdout


def test_run_shows_the_choice_and_the_early_stop_and_never_loads_late(tmp_path: Path) -> None:
    write_config(tmp_path, SPARSE)
    out = localmoa("run", "q", "--json", "--memory-budget", "2GiB")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["skipped_layers"] == [2, 3]
    assert "late" not in {c["model"] for c in doc["calls"]}
    assert "loaded late" not in out.stderr
    assert "judge 1 chose 2: they agree" in out.stderr
    assert "early stop: the answers agree; layers 2, 3 skipped" in out.stderr
    assert doc["calls"][-1]["references"] == [[1, 1]]


def test_select_mode_prints_the_chosen_answer(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        SPARSE.split("[ensembles.default]")[0]
        + """
[ensembles.default]
layers = [["p1", "p2"]]
aggregator = "judge"
final = "select"
""",
    )
    out = localmoa("run", "q", "--memory-budget", "2GiB")
    assert out.returncode == 0, out.stderr
    assert out.stdout == "second answer\n"
