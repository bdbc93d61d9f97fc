"""`localmoa logs`: the list, its filters and search, `logs show`, `logs path`, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config
from records.placed import record_placed_run

from localmoa.cli.logs import parse_since
from localmoa.records.models import LoggedCall, LoggedLoad, LoggedRun, RunDetail
from localmoa.records.store import log_path

from .invoke import FAKE_THREE, localmoa

FAILING = FAKE_THREE.replace("[ensembles.default]", '[models.x]\nbackend = "fake"\nmemory = "1GiB"\nfail = "out of luck"\n[ensembles.broken]\nlayers = [["x"]]\naggregator = "x"\n[ensembles.default]')  # fmt: skip


def listed(*args: str) -> list[LoggedRun]:
    out = localmoa("logs", "--json", *args)
    assert out.returncode == 0, out.stderr
    return [LoggedRun.model_validate(run) for run in json.loads(out.stdout)]


@pytest.fixture
def three_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Two good runs of "default" and one failed run of "broken", oldest first: their ids.
    COLUMNS is set wide: the test process may carry COLUMNS=80 in its C environment (GNU
    readline exports it when loaded) without os.environ knowing, and rich would obey it."""
    monkeypatch.setenv("COLUMNS", "200")
    write_config(tmp_path, FAILING)
    for prompt in ("Why is the sky blue?", "How deep is the sea?"):
        assert localmoa("run", prompt, "--memory-budget", "3GiB").returncode == 0
    failed = localmoa("run", "Will this fail?", "-e", "broken", "--memory-budget", "3GiB")
    assert failed.returncode == 1
    return [run.id for run in reversed(listed())]


def test_done_when_logs_lists_runs_newest_first_with_the_contract_keys(
    three_runs: list[str],
) -> None:
    out = localmoa("logs", "--json")
    doc = json.loads(out.stdout)
    assert [run["id"] for run in doc] == three_runs[::-1]
    assert all(list(run) == list(LoggedRun.model_fields) for run in doc)
    assert {"id", "status", "ensemble", "started", "seconds", "calls", "loads"} <= set(doc[0])
    failed, sea, sky = doc
    assert (failed["status"], failed["ensemble"], failed["calls"], failed["loads"]) == (
        "failed",
        "broken",
        1,  # its one layer failed whole: the aggregator never ran
        1,
    )
    assert "out of luck" in failed["error"]
    assert (sky["status"], sky["calls"], sky["loads"], sky["source"]) == ("ok", 7, 3, "run")
    assert sky["prompt"] == "Why is the sky blue?" and sky["answer"] == "a has considered: " + (
        "Why is the sky blue?"
    )
    assert sea["seconds"] > 0 and sea["started"].endswith("Z")


def test_filters_and_search(three_runs: list[str]) -> None:
    sky, sea, failed = three_runs

    def ids(*args: str) -> list[str]:
        return [run.id for run in listed(*args)]

    assert ids("-n", "1") == [failed]
    assert ids("--status", "failed") == [failed]
    assert ids("--ensemble", "default") == [sea, sky]
    assert ids("--model", "x") == [failed]
    assert ids("--model", "b") == [sea, sky]
    assert ids("-q", "sky") == [sky]
    assert ids("-q", "considered deep") == [sea]  # words of the answer and of the prompt
    assert ids("--since", "1h") == [failed, sea, sky]
    assert ids("--since", "2999-01-01") == []
    assert ids("--status", "ok", "-n", "1", "-q", "blue") == [sky]


def test_the_table_shows_each_run_on_one_line(three_runs: list[str]) -> None:
    out = localmoa("logs")
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert lines[0].split()[:7] == ["id", "started", "status", "ensemble", "calls", "loads", "s"]
    for line, run_id in zip(lines[1:], three_runs[::-1], strict=True):
        assert line.startswith(run_id + " ")
    assert "failed" in lines[1] and "Will this fail?" in lines[1]


def test_into_a_pipe_no_row_is_cut(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE)
    prompt = "a long question " * 5  # cut at 80 columns, whole at 200
    assert localmoa("run", prompt, "--memory-budget", "3GiB").returncode == 0
    without_columns = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run(
        [sys.executable, "-m", "localmoa", "logs"],
        capture_output=True,
        text=True,
        env=without_columns,
        timeout=60,
        check=True,
    )
    (row,) = out.stdout.splitlines()[1:]
    assert row.rstrip().endswith(" ".join(prompt.split()))


def test_show_json_is_the_run_detail_with_every_call_and_load(three_runs: list[str]) -> None:
    sky = three_runs[0]
    out = localmoa("logs", "show", sky[:22].lower(), "--json")
    assert out.returncode == 0, out.stderr
    detail = RunDetail.model_validate_json(out.stdout)
    doc = json.loads(out.stdout)
    assert list(doc) == list(RunDetail.model_fields)
    assert all(list(call) == list(LoggedCall.model_fields) for call in doc["calls"])
    assert all(list(load) == list(LoggedLoad.model_fields) for load in doc["loads"])
    assert detail.id == sky and detail.status == "ok" and detail.source == "run"
    assert [(c.layer, c.index, c.role, c.model) for c in detail.calls] == [
        (1, 0, "proposer", "a"),
        (1, 1, "proposer", "b"),
        (1, 2, "proposer", "c"),
        (2, 0, "proposer", "a"),
        (2, 1, "proposer", "b"),
        (2, 2, "proposer", "c"),
        (3, 0, "aggregator", "a"),
    ]
    aggregator = detail.calls[-1]
    assert aggregator.references == [(2, 0), (2, 1), (2, 2)]
    assert aggregator.text == detail.answer == "a has considered: Why is the sky blue?"
    assert aggregator.messages is not None and aggregator.messages[-1].content == (
        "Why is the sky blue?"
    )
    assert all(c.backend == "fake" and c.tokens_in > 0 and c.tokens_out > 0 for c in detail.calls)
    assert [load.model for load in detail.loads] == ["a", "b", "c"]
    assert all(load.bytes_estimated == 1 << 30 for load in detail.loads)
    assert detail.plan is not None and len(detail.plan["waves"]) == 3
    assert detail.budget_bytes == 3 << 30 and detail.budget_source == "flag"
    assert detail.config["aggregator"]["model"] == "a"
    assert detail.config["models"]["a"]["backend"] == "fake"


def test_show_prints_every_answer_by_layer_the_plan_loads_and_telemetry(
    three_runs: list[str],
) -> None:
    out = localmoa("logs", "show", three_runs[1])
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith(f"run {three_runs[1]} · ok · run · ensemble default · ")
    assert "user: How deep is the sea?" in text
    for layer in (1, 2, 3):
        assert f"layer {layer} ─" in text
    assert text.count("has considered: How deep is the sea?") == 7 + 1  # 7 calls, the answer
    assert "3.1 aggregator a (fake) · " in text and "read 2.1, 2.2, 2.3" in text
    for title in ("Plan", "Loads (times from the run's start)", "Telemetry"):
        assert title in text
    assert text.index("layer 1") < text.index("answer ─") < text.index("Telemetry")


def header(text: str, title: str) -> list[str]:
    """The column names of the table titled ``title`` in ``logs show``'s output."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    row = next(line for line in lines[start + 1 :] if line.strip())
    return row.replace("ttft s", "ttft_s").split()


BEFORE_TELEMETRY = ["call", "role", "model", "ok", "in", "out", "ttft_s", "prefill/s",
                    "decode/s", "s"]  # fmt: skip
BEFORE_LOADS = ["model", "at", "seconds", "estimated", "measured", "peak", "unloaded"]


async def test_show_says_where_each_call_and_load_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    run_id = await record_placed_run()
    out = localmoa("logs", "show", run_id)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for layer in (1, 2):
        assert f"{layer}.1 proposer a (fake on gpu0) · " in text
        assert f"{layer}.2 proposer b (fake on nodeB/gpu1) · " in text  # the node, then its GPU
        assert f"{layer}.3 proposer c (fake) · " in text  # placed nowhere: as before
        assert f"{layer}.4 proposer d (fake on nodeC/gpu0) · " in text  # the node said once
    assert "3.1 aggregator a (fake on gpu0) · " in text
    assert header(text, "Telemetry") == [*BEFORE_TELEMETRY[:3], "device", *BEFORE_TELEMETRY[3:]]
    loads = header(text, "Loads (times from the run's start)")
    assert loads == ["model", "device", *BEFORE_LOADS[1:]]
    rows = [line.split() for line in text.splitlines()]
    assert ["1.2", "proposer", "b", "nodeB/gpu1", "yes"] in [row[:5] for row in rows]
    assert ["2.3", "proposer", "c", "-", "yes"] in [row[:5] for row in rows]
    assert ["d", "nodeC/gpu0"] in [row[:2] for row in rows]  # its load

    detail = json.loads(localmoa("logs", "show", run_id, "--json").stdout)
    assert [(c["model"], c["device"], c["node"]) for c in detail["calls"][:4]] == [
        ("a", "gpu0", None),
        ("b", "gpu1", "nodeB"),
        ("c", None, None),
        ("d", "nodeC/gpu0", "nodeC"),
    ]
    assert {(load["model"], load["device"], load["node"]) for load in detail["loads"]} == {
        ("a", "gpu0", None),
        ("b", "gpu1", "nodeB"),
        ("c", None, None),
        ("d", "nodeC/gpu0", "nodeC"),
    }
    (run,) = listed()
    assert (run.devices, run.nodes) == (["gpu0", "gpu1", "nodeC/gpu0"], ["nodeB", "nodeC"])


def test_a_run_placed_nowhere_reads_as_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Single-device runs, and every run recorded before devices were, print as they did; the
    JSON has the keys, null (empty lists in the run list)."""
    monkeypatch.setenv("COLUMNS", "200")
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("run", "q", "--memory-budget", "3GiB", "--json")
    assert out.returncode == 0, out.stderr
    calls = json.loads(out.stdout)["calls"]
    assert len(calls) == 7 and all(c["device"] is None and c["node"] is None for c in calls)
    (run,) = listed()
    assert (run.devices, run.nodes) == ([], [])
    text = localmoa("logs", "show", run.id).stdout
    assert header(text, "Telemetry") == BEFORE_TELEMETRY
    assert header(text, "Loads (times from the run's start)") == BEFORE_LOADS
    assert " on " not in text and "device " not in text.split("\n", 1)[1]
    assert "1.1 proposer a (fake) · " in text and "3.1 aggregator a (fake) · " in text
    detail = json.loads(localmoa("logs", "show", run.id, "--json").stdout)
    assert all(c["device"] is None and c["node"] is None for c in detail["calls"])
    assert all(load["device"] is None and load["node"] is None for load in detail["loads"])


def test_show_of_a_failed_run_says_why(three_runs: list[str]) -> None:
    out = localmoa("logs", "show", three_runs[2])
    assert "· failed ·" in out.stdout.splitlines()[0]
    assert "error: " in out.stdout and "out of luck" in out.stdout


def test_logs_path_is_where_the_log_is_and_reading_creates_nothing(isolated: Path) -> None:
    out = localmoa("logs", "path")
    assert out.stdout == f"{isolated / 'home' / 'logs.db'}\n" == f"{log_path()}\n"
    assert localmoa("logs", "--json").stdout == "[]\n"
    empty = localmoa("logs")
    assert empty.returncode == 0 and empty.stdout == ""
    assert "no runs recorded yet" in empty.stderr
    assert not log_path().exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["-n", "zero"], "Invalid value for '-n' / '--count'"),
        (["-n", "0"], "Invalid value for '-n' / '--count'"),
        (["--since", "yesterday"], "is neither a time ago like 30m"),
        (["--status", "great"], "'great' is not one of"),
        (["--bogus"], "No such option '--bogus'"),
        (["shw"], "No such command 'shw'"),
        (["show"], "Missing argument 'ID'"),
        (["show", "01AB"], 'no run "01AB" in'),
        (["show", "not-an-id"], '"not-an-id" is not a run id'),
        (["show", "01"], "matches more than one run"),
    ],
)
def test_every_bad_input_is_one_line_and_exit_2(
    three_runs: list[str], args: list[str], says: str
) -> None:
    out = localmoa("logs", *args)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith("localmoa: error: ") and says in line, line
    assert out.stdout == ""


def test_show_before_anything_was_recorded_is_one_line() -> None:
    out = localmoa("logs", "show", "01AB")
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f'localmoa: error: no run "01AB": nothing is recorded yet ({log_path()} does not exist)'
    ]


def test_since_reads_times_ago_and_iso_dates() -> None:
    assert parse_since("90s", now=1000.0) == 910.0
    assert parse_since("1.5h", now=10_000.0) == 10_000.0 - 5400
    assert parse_since("3d", now=1e6) == 1e6 - 3 * 86400
    assert parse_since("1w", now=1e6) == 1e6 - 7 * 86400
    assert parse_since("2025-01-31T09:00:00+01:00") == 1738310400.0
    with pytest.raises(ValueError, match="neither a time ago"):
        parse_since("3 days")


def test_show_timeline_draws_the_recorded_run(three_runs: list[str], tmp_path: Path) -> None:
    picture = tmp_path / "run.svg"
    out = localmoa("logs", "show", three_runs[0], "--timeline", str(picture))
    assert out.returncode == 0, out.stderr
    assert "<svg" in picture.read_text(encoding="utf-8")
    assert f"timeline: {picture}" in out.stderr
    bad = localmoa("logs", "show", three_runs[0], "--timeline", str(tmp_path / "run.gif"))
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1


def test_done_when_a_tiny_llamacpp_run_is_recorded_with_its_telemetry(tiny_config: Path) -> None:
    out = localmoa("run", "What is the capital of France?", "--memory-budget", "1GiB", "--json")
    assert out.returncode == 0, out.stderr
    (run,) = listed()
    assert (run.status, run.calls, run.loads) == ("ok", 7, 3)
    detail = RunDetail.model_validate_json(localmoa("logs", "show", run.id, "--json").stdout)
    assert detail.answer == json.loads(out.stdout)["answer"]
    assert detail.versions["llama-cpp-python"]
    for call in detail.calls:
        assert call.backend == "llamacpp" and call.ok and call.text
        assert call.tokens_in > 0 and call.tokens_out > 0
        assert call.ttft_s is not None and call.ttft_s > 0
        assert call.started_at is not None and call.ended_at is not None
        assert call.started_at <= (call.first_token_at or call.ended_at) <= call.ended_at
    for load in detail.loads:
        assert load.seconds > 0 and load.bytes_estimated and load.unloaded_at is not None
        assert load.started_at < load.unloaded_at
    assert str(detail.config["models"]["tiny-a"]["path"]).endswith("tiny-a.gguf")
    shown = localmoa("logs", "show", run.id)
    assert shown.returncode == 0 and "tiny-a (llamacpp)" in shown.stdout
    assert os.path.getsize(log_path()) > 0


def test_logs_show_names_each_waves_stage(tmp_path: Path) -> None:
    """A plan's waves number stages; the log keeps their labels, so a judge reads as one."""
    write_config(
        tmp_path,
        FAKE_THREE.replace('aggregator = "a"', 'aggregator = "a"\nfinal = "select"'),
    )
    out = localmoa("run", "q", "--memory-budget", "3GiB")
    assert out.returncode == 0, out.stderr
    listed = json.loads(localmoa("logs", "--json").stdout)
    shown = localmoa("logs", "show", listed[0]["id"])
    assert shown.returncode == 0, shown.stderr
    assert "judge 2" in shown.stdout and "layer 1" in shown.stdout
    detail = json.loads(localmoa("logs", "show", listed[0]["id"], "--json").stdout)
    assert detail["plan"]["stage_labels"] == ["layer 1", "layer 2", "judge 2"]
