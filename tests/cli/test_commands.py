"""The `localmoa` command as a user runs it: a real process, real exit codes, real models."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config

GiB = 1 << 30


def localmoa(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localmoa", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


FAKE_THREE = """
[models.a]
backend = "fake"
memory = "1GiB"
[models.b]
backend = "fake"
memory = "1GiB"
[models.c]
backend = "fake"
memory = "1GiB"
[ensembles.default]
layers = [["a", "b", "c"], ["a", "b", "c"]]
aggregator = "a"
"""


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
    assert set(plan["waves"][0]) == {"layer", "resident", "runs", "load", "unload", "bytes"}


def test_plan_table_is_readable(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("plan", "--memory-budget", "2.5GiB")
    assert out.returncode == 0, out.stderr
    assert "aggregator" in out.stdout and "loads: 4 (lower bound 3; optimal)" in out.stdout


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


def test_plan_table_says_when_a_timed_plan_loads_more_than_the_fewest() -> None:
    from io import StringIO

    from rich.console import Console

    from localmoa.cli.commands import _print_plan
    from localmoa.footprint.estimate import Footprint
    from localmoa.hardware import Budget
    from localmoa.planning.fewest_loads import make_plan
    from localmoa.runtime.prepare import Prepared

    plan = make_plan([["a"], ["a"]], {"a": GiB}, 2 * GiB)
    timed = plan.model_copy(
        update={"loads": 2, "fewest_loads": 1, "estimated_seconds": 3.31, "timed_for": "cpu-16g"}
    )
    budget = Budget(bytes=2 * GiB, source="flag", detail="--memory-budget")
    out = StringIO()
    _print_plan(
        Console(file=out, width=200),
        Prepared("default", [], {"a": Footprint.override(GiB)}, budget, timed),
    )
    text = out.getvalue()
    assert "loads: 2 (lower bound 1; the planner's fewest is 1; more are estimated faster)" in text
    assert "estimated 3.3s with cpu-16g speeds" in text


def test_done_when_run_of_three_tiny_models(tiny_config: Path) -> None:
    out = localmoa("run", "What is the capital of France?", "--json", "--memory-budget", "1GiB")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["calls"]) == 7
    assert [c["layer"] for c in result["calls"]] == [1, 1, 1, 2, 2, 2, 3]
    assert all(c["ok"] and c["tokens"] > 0 and c["error"] is None for c in result["calls"])
    assert result["answer"] == result["calls"][-1]["text"] != ""
    assert result["loads"] == result["plan"]["loads"] == 3
    assert "Traceback" not in out.stderr


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


CORRUPT = b"GGUF\x03\x00\x00\x00" + b"\xff" * 40


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("unknown model", 'ensembles.default.aggregator: unknown model "zz"'),
        ("malformed toml", "not valid TOML"),
        ("unknown key", "models.a.colour: unknown key"),
        ("missing gguf", "missing.gguf: file not found"),
        ("corrupt gguf", "corrupt.gguf: not a valid GGUF file"),
        ("empty gguf", "empty.gguf: not a valid GGUF file"),
        ("too large", 'model "a" needs 1.0 GiB but the memory budget is 512.0 MiB'),
        ("missing config", "no models.toml found"),
        ("bad budget flag", "--memory-budget: not a size: 'lots'"),
    ],
)
def test_bad_input_exits_2_with_one_clear_message(tmp_path: Path, case: str, expected: str) -> None:
    args = ["plan"]
    config = FAKE_THREE
    if case == "unknown model":
        config = config.replace('aggregator = "a"', 'aggregator = "zz"')
    elif case == "malformed toml":
        config = config.replace("[models.b]", "[models.b")
    elif case == "unknown key":
        config = config.replace(
            'backend = "fake"\nmemory', 'backend = "fake"\ncolour = 1\nmemory', 1
        )
    elif case in ("missing gguf", "corrupt gguf", "empty gguf"):
        name = case.split()[0] + ".gguf"
        if case == "corrupt gguf":
            (tmp_path / name).write_bytes(CORRUPT)
        elif case == "empty gguf":
            (tmp_path / name).write_bytes(b"")
        config = config.replace(
            'backend = "fake"\nmemory = "1GiB"', f'backend = "llamacpp"\npath = "{name}"', 1
        )
    elif case == "too large":
        args += ["--memory-budget", "512MiB"]
    elif case == "bad budget flag":
        args += ["--memory-budget", "lots"]
    if case != "missing config":
        write_config(tmp_path, config)
    for command in (args, ["run", "question", *args[1:]]):
        out = localmoa(*command)
        assert out.returncode == 2, out.stderr
        assert expected in out.stderr
        assert out.stderr.startswith("localmoa: error: ")
        assert "Traceback" not in out.stderr and out.stdout == ""


def test_failed_run_exits_1_and_names_the_models(tmp_path: Path) -> None:
    write_config(
        tmp_path, FAKE_THREE.replace('memory = "1GiB"', 'memory = "1GiB"\nfail = "no GPU"')
    )
    out = localmoa("run", "q", "--memory-budget", "3GiB")
    assert out.returncode == 1
    assert "localmoa: run failed: every agent of layer 1 failed" in out.stderr
    assert 'model "a": no GPU' in out.stderr and "Traceback" not in out.stderr


def interrupt_when(line_marker: str, *args: str) -> tuple[int, str]:
    """Start `localmoa ARGS`, send SIGINT once stderr shows ``line_marker``, return (rc, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "localmoa", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line_marker in line:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    return process.returncode, "".join(seen) + err


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
