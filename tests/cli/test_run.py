"""`localmoa run`: the answer on stdout, progress on stderr, the RunReport with --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import write_config

from localmoa.backends import make_backends
from localmoa.cli.reports import RunReport
from localmoa.cli.run import executor_for, run_report
from localmoa.cli.session import Session
from localmoa.config import load_config
from localmoa.footprint.estimate import Footprint
from localmoa.hardware import Budget
from localmoa.planning import PlanPolicy
from localmoa.planning.fewest_loads import make_plan
from localmoa.runtime.engine import CallRecord, RunResult
from localmoa.runtime.prepare import Prepared

from .invoke import FAKE_THREE, GiB, interrupt_when, localmoa


def test_done_when_run_of_three_tiny_models(tiny_config: Path) -> None:
    out = localmoa("run", "What is the capital of France?", "--json", "--memory-budget", "1GiB")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["calls"]) == 7
    assert [c["layer"] for c in result["calls"]] == [1, 1, 1, 2, 2, 2, 3]
    assert all(c["ok"] and c["tokens"] > 0 and c["error"] is None for c in result["calls"])
    assert all(c["prompt_tokens"] > 0 for c in result["calls"])
    assert result["answer"] == result["calls"][-1]["text"] != ""
    assert result["loads"] == result["plan"]["loads"] == 3
    assert "Traceback" not in out.stderr


def test_run_json_is_exactly_the_run_report(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("run", "q", "--json", "--memory-budget", "3GiB")
    assert out.returncode == 0, out.stderr
    report = RunReport.model_validate_json(out.stdout)
    assert out.stdout == json.dumps(report.model_dump(mode="json")) + "\n"
    doc = json.loads(out.stdout)
    assert list(doc) == [
        "answer",
        "calls",
        "loads",
        "load_seconds",
        "replans",
        "seconds",
        "skipped_layers",
        "plan",
    ]
    assert all(list(call) == list(CallRecord.model_fields) for call in doc["calls"])
    assert report.answer == "a has considered: q" and report.replans == 0
    assert report.loads == report.plan.loads == 3
    assert "7 calls (0 failed), 3 loads" in out.stderr


def test_run_report_rounds_seconds_to_a_tenth_of_a_millisecond() -> None:
    plan = make_plan([["a"]], {"a": GiB}, GiB)
    record = CallRecord(
        layer=1, index=0, model="a", ok=True, error=None, seconds=0.5, tokens=3, text="hi"
    )
    result = RunResult(
        answer="hi", calls=[record], loads=1, replans=2, plan=plan, seconds=1.23456789
    )
    report = run_report(result)
    assert report.seconds == 1.2346 and report.replans == 2 and report.calls == [record]
    assert report.plan == plan


def test_a_run_re_plans_the_way_its_first_plan_was_made(tmp_path: Path) -> None:
    """A re-plan mid-run follows the first plan's policy, ``min_gain`` and ``plan_for`` included,
    not only its cost-model profile."""
    config = load_config(write_config(tmp_path, FAKE_THREE))
    session = Session(config, make_backends(config.settings), [])
    plan = make_plan([["a"], ["a"]], {"a": GiB}, GiB)
    policy = PlanPolicy(None, plan_for="loads", min_gain=0.25)
    budget = Budget(bytes=GiB, source="flag", detail="--memory-budget")
    prepared = Prepared("default", [], {"a": Footprint.override(GiB)}, budget, plan, None, policy)
    executor = executor_for(session, prepared, lambda event: None)
    assert executor.policy is policy and executor.sizes == {"a": GiB}


def test_run_streams_the_answer_to_stdout_and_progress_to_stderr(tiny_config: Path) -> None:
    out = localmoa("run", "Hello?", "--show-layers", "--memory-budget", "1GiB")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # the aggregator's (noise) answer
    assert "layer 1 · tiny-b: ok" in out.stderr and "aggregator · tiny-a: ok" in out.stderr
    assert out.stderr.count("╭") == 6  # one panel per proposer response
    assert "7 calls (0 failed), 3 loads" in out.stderr


def test_prompt_from_stdin(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("run", "--memory-budget", "3GiB", stdin="piped question\n")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "a has considered: piped question"


def test_failed_run_exits_1_and_names_the_models(tmp_path: Path) -> None:
    write_config(
        tmp_path, FAKE_THREE.replace('memory = "1GiB"', 'memory = "1GiB"\nfail = "no GPU"')
    )
    out = localmoa("run", "q", "--memory-budget", "3GiB")
    assert out.returncode == 1
    assert "localmoa: run failed: every agent of layer 1 failed" in out.stderr
    assert 'model "a": no GPU' in out.stderr and "Traceback" not in out.stderr


def test_ctrl_c_stops_cleanly(tmp_path: Path) -> None:
    long_reply = "word " * 200
    write_config(
        tmp_path,
        FAKE_THREE.replace(
            'memory = "1GiB"', f'memory = "1GiB"\nseconds_per_token = 0.05\nreply = "{long_reply}"'
        ),
    )
    code, err = interrupt_when("loaded c", "run", "q", "--memory-budget", "3GiB")
    assert code == 130
    assert "localmoa: interrupted; unloaded " in err and "Traceback" not in err


def test_ctrl_c_while_llama_cpp_generates(tiny_config: Path) -> None:
    config = tiny_config.read_text().replace("max_tokens = 24", "max_tokens = 8000")
    tiny_config.write_text(config.replace("n_ctx = 2048", "n_ctx = 8192"))
    code, err = interrupt_when("loaded tiny-c", "run", "q", "--memory-budget", "4GiB")
    assert code == 130
    assert "localmoa: interrupted; unloaded " in err and "Traceback" not in err
    assert "calls (" not in err  # it really was cut short, not finished


def test_stdin_that_is_not_utf8_is_refused_before_anything_loads(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = subprocess.run(
        [sys.executable, "-m", "localmoa", "run", "--memory-budget", "3GiB"],
        input=b"caf\xe9 au lait",
        capture_output=True,
        timeout=120,
    )
    err = out.stderr.decode()
    assert out.returncode == 2 and "Traceback" not in err
    assert err.strip() == (
        "localmoa: error: stdin is not UTF-8 text (byte 0xe9 at offset 3); convert it first, "
        "e.g. iconv -f latin1 -t utf-8"
    )


def test_a_prompt_argument_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = subprocess.run(
        [sys.executable.encode(), b"-m", b"localmoa", b"run", b"caf\xe9"],
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert b"the PROMPT argument is not UTF-8 text" in out.stderr
