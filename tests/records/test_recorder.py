"""The recorder: the privacy switch, rows written as events come, and what `run` and `serve`
record (ok, failed, interrupted)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cli.invoke import FAKE_THREE, localmoa
from conftest import write_config
from servers import serving

from localmoa.backends import FakeBackend
from localmoa.backends.base import ChatMessage
from localmoa.config import Agent, Ensemble, FakeModel, Settings, parse_config
from localmoa.errors import UserError
from localmoa.planning.fewest_loads import make_plan
from localmoa.records.models import LoggedRun
from localmoa.records.recorder import Recorder, record_mode, recorded
from localmoa.records.store import Store, log_path
from localmoa.runtime.engine import Executor
from localmoa.runtime.events import CallFinished, Event, ModelLoaded, ModelUnloaded
from localmoa.runtime.moa import calls_for, stages_of

from .placed import PLACES, record_placed_run

GiB = 1 << 30
PROMPT = "Zanzibar-quokka-4417 asks about tangerine orbits"
ANSWER = "periwinkle-obelisk-9923"
SYSTEM = "secret-system-mandate-551"


def test_the_environment_overrides_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert record_mode(Settings()) == "full"
    assert record_mode(Settings(record="metadata")) == "metadata"
    monkeypatch.setenv("LOCALMOA_RECORD", "off")
    assert record_mode(Settings(record="full")) == "off"
    monkeypatch.setenv("LOCALMOA_RECORD", " Metadata ")
    assert record_mode(Settings(record="off")) == "metadata"
    monkeypatch.setenv("LOCALMOA_RECORD", "")
    assert record_mode(Settings(record="off")) == "off"


def test_a_wrong_environment_value_is_refused_not_taken_for_full(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LOCALMOA_RECORD", "metdata")
    with pytest.raises(UserError) as refused:
        Recorder.open(Settings())
    assert str(refused.value) == (
        'LOCALMOA_RECORD="metdata" is not a recording mode (choose one of: full, metadata, off); '
        "unset it to use settings.record"
    )
    write_config(tmp_path, FAKE_THREE)
    out = localmoa("run", "q", "--memory-budget", "3GiB")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"localmoa: error: {refused.value}"]
    assert not log_path().exists()


def test_off_opens_and_creates_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "not-yet"
    monkeypatch.setenv("LOCALMOA_HOME", str(home))
    recorder = Recorder.open(Settings(record="off"))
    assert recorder.store is None and not recorder.recording
    ensemble = Ensemble(layers=[[Agent(model="a")]], aggregator=Agent(model="a"))
    recording = recorder.start(
        source="run", ensemble="e", ensemble_config=ensemble, conversation=[]
    )
    recording.on_event(ModelLoaded("a", 1.0, None))
    recording.finish("ok", answer="x")
    assert recording.id is None
    assert not home.exists()


def test_off_by_the_environment_leaves_no_file_after_a_real_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_config(tmp_path, FAKE_THREE)
    monkeypatch.setenv("LOCALMOA_RECORD", "off")
    out = localmoa("run", "q", "--memory-budget", "3GiB")
    assert out.returncode == 0 and out.stdout == "a has considered: q\n"
    assert not list(log_path().parent.glob("logs.db*"))


def fake_ensemble() -> tuple[dict[str, FakeModel], Ensemble]:
    models = {n: FakeModel(backend="fake", memory=GiB) for n in ("a", "b")}
    layer = [Agent(model="a"), Agent(model="b")]
    return models, Ensemble(layers=[layer], aggregator=Agent(model="a"))


async def test_each_call_and_load_is_in_the_file_when_its_event_comes() -> None:
    models, ensemble = fake_ensemble()
    plan = make_plan(stages_of(ensemble), {n: GiB for n in models}, 2 * GiB)
    recorder = Recorder.open(Settings())
    question = [ChatMessage(role="user", content="q")]
    recording = recorder.start(
        source="run",
        ensemble="e",
        ensemble_config=ensemble,
        plan=plan,
        conversation=question,
        models=models,
    )
    assert recording.id is not None
    other = sqlite3.connect(log_path())  # another connection: what a crash would leave
    seen: list[tuple[str, int, int, int]] = []

    def counts() -> tuple[int, int, int]:
        calls = other.execute("SELECT COUNT(*) FROM calls").fetchone()[0]
        loads = other.execute("SELECT COUNT(*) FROM loads").fetchone()[0]
        unloaded = other.execute(
            "SELECT COUNT(*) FROM loads WHERE unloaded_at IS NOT NULL"
        ).fetchone()[0]
        return calls, loads, unloaded

    assert other.execute("SELECT status FROM runs").fetchall() == [("running",)]

    def on_event(event: Event) -> None:
        recording.on_event(event)
        if isinstance(event, CallFinished | ModelLoaded | ModelUnloaded):
            seen.append((type(event).__name__, *counts()))

    executor = Executor(models, {"fake": FakeBackend()}, on_event=on_event)
    result = await executor.run(calls_for(ensemble), plan, question)
    recording.finish("ok", answer=result.answer, seconds=result.seconds)
    calls = [row for row in seen if row[0] == "CallFinished"]
    loads = [row for row in seen if row[0] == "ModelLoaded"]
    unloads = [row for row in seen if row[0] == "ModelUnloaded"]
    assert [row[1] for row in calls] == [1, 2, 3]  # each call's row there as its event passes
    assert [row[2] for row in loads] == [1, 2]
    assert [row[3] for row in unloads] == [1, 2]
    detail = recorder.store.run(recording.id) if recorder.store else None
    assert detail is not None and detail.status == "ok" and detail.answer == result.answer
    assert [c.backend for c in detail.calls] == ["fake"] * 3
    assert detail.calls[-1].references == [(1, 0), (1, 1)]
    assert [c.tokens_out for c in detail.calls] == [c.tokens for c in result.calls]
    assert detail.plan == plan.model_dump(mode="json")
    assert detail.versions["localmoa"] and detail.device is not None
    assert "memory" in detail.device


async def test_where_each_call_and_load_ran_is_recorded() -> None:
    run_id = await record_placed_run()
    store = Store.open(create=False)
    assert store is not None
    detail = store.run(run_id)
    assert [c.model for c in detail.calls] == ["a", "b", "c", "d"] * 2 + ["a"]
    for call in detail.calls:
        assert (call.device, call.node) == PLACES[call.model], call
    assert sorted(load.model for load in detail.loads) == ["a", "b", "c", "d"]
    for load in detail.loads:
        assert (load.device, load.node) == PLACES[load.model], load
    (run,) = store.list_runs()
    assert (run.devices, run.nodes) == (["gpu0", "gpu1", "nodeC/gpu0"], ["nodeB", "nodeC"])


async def test_recorded_closes_a_failed_and_a_cancelled_run() -> None:
    recorder = Recorder.open(Settings())
    _, ensemble = fake_ensemble()
    ids: list[str | None] = []
    thrown: list[BaseException] = [RuntimeError("boom"), asyncio.CancelledError()]
    for error in thrown:
        recording = recorder.start(
            source="batch", ensemble="e", ensemble_config=ensemble, conversation=[]
        )
        ids.append(recording.id)
        with pytest.raises(type(error)), recorded(recording, interrupted="went away"):
            raise error
        recording.finish("ok")  # a run ends once: ignored
    assert recorder.store is not None
    runs: dict[str | None, LoggedRun] = {run.id: run for run in recorder.store.list_runs()}
    assert (runs[ids[0]].status, runs[ids[0]].error) == ("failed", "RuntimeError: boom")
    assert (runs[ids[1]].status, runs[ids[1]].error) == ("interrupted", "went away")


# --- metadata: no text anywhere in the file --------------------------------------------------


def private_config(tmp_path: Path, record: str) -> None:
    write_config(
        tmp_path,
        f"""
[settings]
record = "{record}"
[models.a]
backend = "fake"
memory = "1GiB"
reply = "{{model}} says {ANSWER}"
[models.b]
backend = "fake"
memory = "1GiB"
reply = "{{model}} says {ANSWER}"
[ensembles.default]
layers = [[{{model = "a", system_prompt = "{SYSTEM}"}}, "b"]]
aggregator = "a"
""",
    )


def file_bytes() -> bytes:
    return b"".join(p.read_bytes() for p in sorted(log_path().parent.glob("logs.db*")))


@pytest.mark.parametrize("record", ["metadata", "full"])
def test_metadata_leaves_no_prompt_message_or_answer_in_the_file(
    tmp_path: Path, record: str
) -> None:
    private_config(tmp_path, record)
    out = localmoa("run", PROMPT, "--memory-budget", "2GiB")
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"a says {ANSWER}\n"  # the answer is printed all the same
    content = file_bytes()  # the process has ended: the database, and any -wal and -shm left
    assert b"SQLite format 3" in content
    texts = (PROMPT, ANSWER, SYSTEM, "Zanzibar", "periwinkle")
    for text in texts:
        assert (text.encode() in content) == (record == "full"), text
    detail = json.loads(localmoa("logs", "show", _latest(), "--json").stdout)
    assert detail["status"] == "ok" and len(detail["calls"]) == 3 and len(detail["loads"]) == 2
    assert all(c["tokens_out"] > 0 and c["ended_at"] is not None for c in detail["calls"])
    kept = [detail["answer"], detail["conversation"]] + [
        value for c in detail["calls"] for value in (c["messages"], c["text"])
    ]
    if record == "metadata":
        assert kept == [None] * len(kept)
        assert detail["config"]["layers"][0][0]["system_prompt"] is None
        shown = localmoa("logs", "show", detail["id"]).stdout
        assert '(texts not recorded: record = "metadata")' in shown and "Telemetry" in shown
    else:
        assert None not in kept and detail["answer"] == f"a says {ANSWER}"


def _latest() -> str:
    listed = json.loads(localmoa("logs", "--json", "-n", "1").stdout)
    return str(listed[0]["id"])


# --- run: interrupted ----------------------------------------------------------------------------

SLOW = """
[models.a]
backend = "fake"
memory = "1GiB"
seconds_per_token = 0.05
reply = "{words}"
[models.b]
backend = "fake"
memory = "1GiB"
seconds_per_token = 0.05
reply = "{words}"
[ensembles.default]
layers = [["a", "b"], ["a", "b"]]
aggregator = "a"
"""


def stop_after_layer_1(tmp_path: Path, signum: int) -> tuple[int, str]:
    """Run a slow ensemble; once both calls of layer 1 have ended (the progress says so),
    send ``signum`` (layer 2 is then under way). Returns the exit status and stderr."""
    write_config(tmp_path, SLOW.format(words=" ".join(["word"] * 40)))  # 2 s a call
    process = subprocess.Popen(
        [sys.executable, "-m", "localmoa", "run", "q", "--memory-budget", "2GiB"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    finished = 0
    for line in process.stderr:  # progress: one line per call that ends
        finished += "layer 1 · " in line
        if finished == 2:
            break
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    return process.returncode, err


def test_ctrl_c_records_the_run_as_interrupted_with_the_calls_that_finished(
    tmp_path: Path,
) -> None:
    returncode, err = stop_after_layer_1(tmp_path, signal.SIGINT)
    assert returncode == 130, err
    store = Store.open(create=False)
    assert store is not None
    (run,) = store.list_runs()
    assert run.status == "interrupted" and run.answer is None
    assert run.error == "interrupted (Ctrl-C or a stop signal)"
    detail = store.run(run.id)
    assert [(c.layer, c.ok) for c in detail.calls] == [(1, True), (1, True)]
    assert {load.model for load in detail.loads} == {"a", "b"}
    assert all(load.unloaded_at is not None for load in detail.loads)  # the stop unloaded them


def test_a_crash_loses_only_the_calls_in_flight(tmp_path: Path) -> None:
    returncode, _ = stop_after_layer_1(tmp_path, signal.SIGKILL)  # no cleanup of any kind
    assert returncode == -signal.SIGKILL
    store = Store.open(create=False)
    assert store is not None
    (run,) = store.list_runs()
    assert run.status == "running" and run.seconds is None  # it never ended
    detail = store.run(run.id)
    assert [(c.layer, c.ok, c.text) for c in detail.calls] == [
        (1, True, " ".join(["word"] * 40))
    ] * 2
    assert {load.model for load in detail.loads} == {"a", "b"}


def test_a_failed_run_is_recorded_failed_with_its_error(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE_THREE.replace('memory = "1GiB"', 'memory = "1GiB"\nfail = "x"'))
    out = localmoa("run", "q", "--memory-budget", "3GiB")
    assert out.returncode == 1
    store = Store.open(create=False)
    assert store is not None
    (run,) = store.list_runs()
    assert run.status == "failed" and run.error is not None and run.error in out.stderr
    assert run.calls == 3 and run.seconds is not None


# --- serve ---------------------------------------------------------------------------------------


def serve_config(seconds_per_token: float = 0.0, words: int = 8) -> object:
    reply = " ".join(["word"] * words)
    models = {
        n: {"backend": "fake", "memory": "1GiB", "reply": reply, "seconds_per_token": seconds_per_token}
        for n in ("a", "b")
    }  # fmt: skip
    return parse_config(
        {"models": models, "ensembles": {"default": {"layers": [["a", "b"]], "aggregator": "a"}}}
    )


def test_serve_records_each_request_streamed_or_not() -> None:
    with serving(serve_config(), 2 * GiB) as served:  # type: ignore[arg-type]
        body = {"model": "moa/default", "messages": [{"role": "user", "content": "hello"}]}
        whole = httpx.post(f"{served.url}/chat/completions", json=body, timeout=30).json()
        streamed = ""
        with httpx.stream(
            "POST", f"{served.url}/chat/completions", json={**body, "stream": True}, timeout=30
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:]).get("choices", []):
                        streamed += choice["delta"].get("content") or ""
        served.wait_idle()
        store = Store.open(create=False)
        assert store is not None
        runs = store.list_runs()
    assert [(r.source, r.status, r.ensemble, r.calls) for r in runs] == [
        ("serve", "ok", "default", 3)
    ] * 2
    assert (
        runs[0].answer == streamed != ""
        and runs[1].answer == whole["choices"][0]["message"]["content"]
    )
    assert all(r.prompt == "hello" for r in runs)


def test_a_client_that_goes_away_leaves_an_interrupted_run() -> None:
    slow = serve_config(seconds_per_token=0.05, words=200)  # a whole run: ~30 s
    with serving(slow, 2 * GiB) as served:  # type: ignore[arg-type]
        with httpx.stream(
            "POST",
            f"{served.url}/chat/completions",
            json={
                "model": "moa/default",
                "messages": [{"role": "user", "content": "q"}],
                "stream": True,
            },
            timeout=30,
        ) as response:
            next(response.iter_lines())  # admitted and running; then the client leaves
        served.wait_idle()
        store = Store.open(create=False)
        assert store is not None
        (run,) = store.list_runs()
    assert run.source == "serve" and run.status == "interrupted"
    assert run.error is not None and "cancelled" in run.error


def test_a_model_unloaded_after_its_run_gets_its_unload_time() -> None:
    """A chat's or a server's models outlive each run; when the session ends, their last loads
    are closed too."""
    models, ensemble = fake_ensemble()
    recorder = Recorder.open(Settings())
    recording = recorder.start(
        source="chat",
        ensemble="e",
        ensemble_config=ensemble,
        conversation=[ChatMessage(role="user", content="q")],
        models=models,
    )
    name = next(iter(models))
    recording.on_event(ModelLoaded(name, 0.1, None, estimated_bytes=GiB, peak_bytes=GiB))
    recording.finish("ok", answer="a", seconds=0.2)
    other = sqlite3.connect(log_path())
    assert other.execute("SELECT unloaded_at FROM loads").fetchall() == [(None,)]
    recorder.unloaded(name)
    ((at,),) = other.execute("SELECT unloaded_at FROM loads").fetchall()
    assert at is not None
