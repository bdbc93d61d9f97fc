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


def test_samples_too_long_for_the_aggregator_are_planned_as_a_sliding_window(
    tmp_path: Path,
) -> None:
    write_config(
        tmp_path,
        """
[models.solo]
backend = "fake"
memory = "1GiB"
reply = "sample {seed} says the sky scatters blue light"
n_ctx = 1200
[ensembles.default]
layers = [[{ model = "solo", samples = 6, seed = 1 }]]
aggregator = "solo"
max_tokens = 200
""",
    )
    plan = localmoa("plan", "--json", "--memory-budget", "1GiB")
    assert plan.returncode == 0, plan.stderr
    labels = [s["label"] for s in json.loads(plan.stdout)["stages"]]
    assert labels[0] == "layer 1" and labels[1:] == [
        f"aggregator step {n}" for n in range(1, len(labels))
    ]
    assert len(labels) > 2
    out = localmoa("run", "q", "--json", "--memory-budget", "1GiB")
    assert out.returncode == 0, out.stderr
    steps = [c for c in json.loads(out.stdout)["calls"] if c["role"] == "aggregator"]
    assert len(steps) == len(labels) - 1 and all(c["ok"] for c in steps)
    seen = [ref for c in steps for ref in c["references"] if ref[0] == 1]
    assert seen == [[1, i] for i in range(6)]  # every sample read once, in order
    assert all(c["references"][0] == [2, k] for k, c in enumerate(steps[1:]))


def test_a_judges_reason_is_shown_short_and_printable() -> None:
    from localmoa.cli.progress import REASON_CHARS, _verdict_line
    from localmoa.runtime.moa import Call

    judge = Call(1, 0, "j", None, 0.0, 8, False, role="judge", stage=1)
    line = _verdict_line(judge, (2, 1), True, "J" + "`" * 500 + "\x07\nmore")
    assert line.startswith("  judge 1 chose 2, 1: J``") and line.endswith("…")
    assert "\x07" not in line and "more" not in line
    assert len(line) <= len("  judge 1 chose 2, 1: ") + REASON_CHARS
    fallback = _verdict_line(judge, (1, 2, 3), False, "no JSON object")
    assert fallback == "  judge 1: fell back to every answer (1, 2, 3): no JSON object"
