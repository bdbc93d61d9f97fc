"""``localmoa batch`` as a user runs it: OUT's lines, the summary, resume after a kill or Ctrl-C,
bad input before anything loads, ``--plan``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .invoke import TWO_OF_THREE, localmoa


def setup(tmp_path: Path, prompts: int, config: str = TWO_OF_THREE) -> tuple[Path, Path]:
    (tmp_path / "models.toml").write_text(config)
    source = tmp_path / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": i, "prompt": f"question {i}"}) + "\n" for i in range(prompts))
    )
    return source, tmp_path / "out.jsonl"


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_prompt_gets_its_line_and_the_summary_counts_them(tmp_path: Path) -> None:
    source, out = setup(tmp_path, 16)
    done = localmoa("batch", str(source), "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary == {
        "prompts": 16,
        "answered": 16,
        "skipped": 0,
        "failed": 0,
        "loads": summary["loads"],
        "seconds": summary["seconds"],
    }
    assert summary["loads"] <= 5  # one prompt alone needs 4
    got = lines(out)
    assert [line["id"] for line in got] == [str(i) for i in range(16)]
    assert set(got[0]) == {"id", "answer", "ok", "error", "seconds", "run_id"}
    assert got[3]["answer"] == "a has considered: question 3" and got[3]["ok"] is True
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    # every prompt is a recorded run
    logged = localmoa("logs", "--json")
    runs = json.loads(logged.stdout)
    assert sum(1 for r in runs if r["source"] == "batch") == 16
    # the same command again: everything is there already
    again = localmoa("batch", str(source), "-o", str(out), "--json")
    assert again.returncode == 0
    assert json.loads(again.stdout)["skipped"] == 16
    assert json.loads(again.stdout)["loads"] == 0
    assert len(lines(out)) == 16


def test_a_bad_line_is_exit_2_naming_it_before_anything_loads(tmp_path: Path) -> None:
    source, out = setup(tmp_path, 3)
    source.write_text(
        '{"id": 1, "prompt": "fine"}\n{"id": 2}\n{"id": 1, "prompt": "again"}\nnot json\n'
    )
    done = localmoa("batch", str(source), "-o", str(out))
    assert done.returncode == 2
    assert "line 2" in done.stderr and "line 3" in done.stderr and "line 4" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()


def test_without_an_output_it_says_what_to_give(tmp_path: Path) -> None:
    source, _ = setup(tmp_path, 1)
    done = localmoa("batch", str(source))
    assert done.returncode == 2
    assert "-o OUT.jsonl" in done.stderr


def test_plan_shows_the_chunks_and_the_loads_without_running(tmp_path: Path) -> None:
    source, out = setup(tmp_path, 40)
    done = localmoa("batch", str(source), "--plan", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["prompts"] == 40 and report["chunk"] == 16 and report["chunks"] == 3
    assert report["loads_by_chunk"]["16"] == report["loads"]
    assert report["loads_by_chunk"]["1"] > report["loads"]
    assert report["chunk_plan"]["waves"][0]["load"] == ["a"]
    text = localmoa("batch", str(source), "--plan")
    assert "40 prompts in 3 chunk(s) of up to 16" in text.stdout
    assert "a ×16" in text.stdout
    assert not out.exists()


def test_failed_prompts_are_written_and_the_exit_is_1(tmp_path: Path) -> None:
    config = TWO_OF_THREE + '[models.d]\nbackend = "fake"\nmemory = "1GiB"\nfail = "it broke"\n'
    config += '[ensembles.weak]\nlayers = [["d"]]\naggregator = "a"\n'
    source, out = setup(tmp_path, 2, config)
    done = localmoa("batch", str(source), "-o", str(out), "-e", "weak", "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["failed"] == 2
    assert "2 of 2 prompts failed" in done.stderr
    got = lines(out)
    assert [line["ok"] for line in got] == [False, False]
    assert all("it broke" in str(line["error"]) and line["answer"] is None for line in got)


SLOW = TWO_OF_THREE.replace('memory = "1GiB"', 'memory = "1GiB"\nseconds_per_token = 0.02')


def start(source: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "localmoa", "batch", str(source), "-o", str(out), "--chunk", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for_lines(out: Path, count: int, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if out.exists() and len(out.read_text().splitlines()) >= count:
            return
        time.sleep(0.02)  # polling a file another process writes, bounded
    raise AssertionError(f"{out} never had {count} lines")


def test_a_killed_batch_resumes_without_losing_or_repeating_a_prompt(tmp_path: Path) -> None:
    source, out = setup(tmp_path, 8, SLOW)
    process = start(source, out)
    wait_for_lines(out, 2, process)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=30)
    before = lines(out)  # every line whole: a chunk is one write
    assert 2 <= len(before) < 8 and len(before) % 2 == 0
    done = localmoa("batch", str(source), "-o", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["skipped"] == len(before)
    ids = [line["id"] for line in lines(out)]
    assert sorted(ids, key=int) == [str(i) for i in range(8)]


def test_ctrl_c_keeps_the_chunks_written_and_the_rest_runs_next_time(tmp_path: Path) -> None:
    source, out = setup(tmp_path, 8, SLOW)
    process = start(source, out)
    wait_for_lines(out, 2, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert "nothing was loaded" not in err and "unloaded" in err  # says what it unloaded
    before = lines(out)
    assert len(before) % 2 == 0 and len(before) < 8
    done = localmoa("batch", str(source), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted((line["id"] for line in lines(out)), key=int) == [str(i) for i in range(8)]


def test_on_ollama_a_models_calls_for_every_prompt_are_concurrent_requests(
    tmp_path: Path,
) -> None:
    """Each Ollama model is loaded once for the batch, and a stage's requests to it for every
    prompt go at once, answered within Ollama's slots (OLLAMA_NUM_PARALLEL), bodies asserted."""
    from fake_ollama import FakeOllama, FakeOllamaModel

    gb = 1_000_000_000
    installed = [
        FakeOllamaModel(name="llama3.1:8b", family="llama", size=2 * gb),
        FakeOllamaModel(name="qwen2.5:7b", family="qwen2", size=2 * gb),
    ]
    with FakeOllama(installed, num_parallel=4, token_seconds=0.002) as ollama:
        text = f"""
[settings]
ollama_host = "{ollama.url}"
[models.llama]
backend = "ollama"
model = "llama3.1:8b"
num_ctx = 2048
[models.qwen]
backend = "ollama"
model = "qwen2.5:7b"
num_ctx = 2048
parallel = 4  # the server's slots
[ensembles.default]
layers = [["llama", "qwen"]]
aggregator = "llama"
max_tokens = 16
"""
        source, out = setup(tmp_path, 4, text)
        done = localmoa("batch", str(source), "-o", str(out), "--json", "--memory-budget", "64GiB")
        loads = [model for kind, model in ollama.events if kind == "load"]
        chats = [body for method, path, body in ollama.requests if path == "/api/chat"]
        most = dict(ollama.max_in_flight)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["answered"] == 4
    assert sorted(loads) == ["llama3.1:8b", "qwen2.5:7b"]  # each once for all four prompts
    layer_1 = [c for c in chats if c["model"] == "qwen2.5:7b"]
    asked = sorted(c["messages"][-1]["content"] for c in layer_1)
    assert asked == [f"question {i}" for i in range(4)]  # every prompt's own request
    assert 2 <= most["qwen2.5:7b"] <= 4  # at once, within the server's slots
    assert most["llama3.1:8b"] == 1  # parallel unset: one at a time, as Ollama's default
