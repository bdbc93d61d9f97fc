"""Whole runs over network backends: Ollama (the fake server), OpenAI-compatible (a real
llama_cpp.server), and all three backends in one ensemble; zero-config; the egress guard."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import write_config
from fake_ollama import FakeOllama, FakeOllamaModel
from planning.test_fewest_loads import exhaustive_min_loads
from servers import free_port, llama_cpp_server

from localmoa.cli import cli

GB = 1_000_000_000
PROPOSERS = [
    FakeOllamaModel(name="llama3.1:8b", family="llama", size=2 * GB),
    FakeOllamaModel(name="qwen2.5:7b", family="qwen2", size=2 * GB),
    FakeOllamaModel(name="gemma2:9b", family="gemma2", size=2 * GB),
]


def localmoa(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localmoa", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def ollama_config(url: str, budget: int, plan_for: str = "time") -> str:
    models = "\n".join(
        f'[models.{m.family}]\nbackend = "ollama"\nmodel = "{m.name}"\n' for m in PROPOSERS
    )
    return f"""
[settings]
ollama_host = "{url}"
memory_budget = {budget}
plan_for = "{plan_for}"
{models}
[ensembles.default]
layers = [["llama", "qwen2", "gemma2"], ["llama", "qwen2", "gemma2"]]
aggregator = "llama"
max_tokens = 16
"""


def two_of_three_budget(tmp_path: Path, url: str) -> int:
    """A budget that holds the two largest estimates, not all three."""
    write_config(tmp_path, ollama_config(url, 10**15))
    out = localmoa("plan", "--json")
    assert out.returncode == 0, out.stderr
    sizes = sorted(m["bytes"] for m in json.loads(out.stdout)["models"].values())
    return sizes[-1] + sizes[-2] + 1


@pytest.mark.parametrize("plan_for", ["loads", "time"])
def test_done_when_ollama_ensemble_never_makes_ollama_evict_or_reload(
    tmp_path: Path, plan_for: str
) -> None:
    """Fewest loads: the exhaustive minimum, 4. Refined for time (5 loads here: the estimate
    for a CPU overlaps a reload with calls): more loads, still no eviction or reload."""
    with FakeOllama(PROPOSERS) as probe:
        budget = two_of_three_budget(tmp_path, probe.url)
    with FakeOllama(PROPOSERS, capacity_bytes=budget) as server:
        write_config(tmp_path, ollama_config(server.url, budget, plan_for))
        planned = json.loads(localmoa("plan", "--json").stdout)
        sizes = {name: m["bytes"] for name, m in planned["models"].items()}
        stages = [["llama", "qwen2", "gemma2"]] * 2 + [["llama"]]
        fewest = exhaustive_min_loads(stages, sizes, budget)
        # Ollama's loads are timed: the estimate comes with either plan.
        assert planned["estimated_seconds"] > 0
        if plan_for == "loads":
            assert planned["loads"] == fewest == 4
        else:
            assert planned["loads"] >= fewest
        out = localmoa("run", "Why is the sky blue?", "--json")
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        kinds = [kind for kind, _ in server.events]
        assert "evict" not in kinds and "reload" not in kinds and "expire" not in kinds
        assert server.peak_bytes <= budget
        assert server.resident() == {}  # everything unloaded at the end
        assert result["loads"] == kinds.count("load") >= fewest
        if plan_for == "loads":
            assert result["loads"] == planned["loads"]
        # Refined for time, the run's plan may differ from `plan`'s: the run times its calls
        # with the prompt it has, `plan` with none.
        assert len(result["calls"]) == 7 and all(c["ok"] for c in result["calls"])
        assert result["answer"] == "a fake answer from llama3.1:8b"
        # Every request for a model carried the same runner options (no option-change reload).
        options = {
            json.dumps(body.get("options", {}).get("num_ctx"))
            for _, path, body in server.requests
            if path in ("/api/chat", "/api/generate") and body.get("keep_alive") != 0
        }
        assert options == {"4096"}


def test_ollama_down_and_model_not_pulled_exit_2(tmp_path: Path) -> None:
    port = free_port()
    write_config(tmp_path, ollama_config(f"http://127.0.0.1:{port}", 100 * GB))
    out = localmoa("plan")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"Ollama is not reachable at http://127.0.0.1:{port}" in out.stderr
    assert "`ollama serve`" in out.stderr
    with FakeOllama(PROPOSERS[:2]) as server:
        write_config(tmp_path, ollama_config(server.url, 100 * GB))
        out = localmoa("run", "q")
        assert out.returncode == 2 and "Traceback" not in out.stderr
        assert "run `ollama pull gemma2:9b`" in out.stderr
        assert not any(path == "/api/pull" for _, path, _ in server.requests)


def test_non_loopback_base_url_is_refused_before_any_connect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    attempts: list[object] = []
    real_connect = socket.socket.connect

    def connect(self: socket.socket, address: object) -> None:
        attempts.append(address)
        real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    write_config(
        tmp_path,
        """
[models.server]
backend = "openai"
base_url = "http://gpu-box.lan:8080/v1"
model = "qwen"
[ensembles.default]
layers = [["server"]]
aggregator = "server"
""",
    )
    result = CliRunner().invoke(cli, ["run", "q", "--memory-budget", "1GiB"])
    assert result.exit_code == 2
    assert 'models.server.base_url: "gpu-box.lan" is not on this machine' in result.output
    assert 'allowed_hosts = ["gpu-box.lan"]' in result.output
    assert attempts == []


@pytest.fixture(scope="module")
def openai_server(tiny_models: dict[str, Path]) -> Iterator[str]:
    with llama_cpp_server(tiny_models["tiny-b"], alias="tiny-b") as url:
        yield url


def test_done_when_llama_cpp_openai_server_and_ollama_in_one_ensemble(
    tmp_path: Path, tiny_models: dict[str, Path], openai_server: str
) -> None:
    with FakeOllama(PROPOSERS[:1]) as ollama:
        write_config(
            tmp_path,
            f"""
[settings]
ollama_host = "{ollama.url}"

[models.local]
backend = "llamacpp"
path = "{tiny_models["tiny-a"]}"
n_ctx = 2048

[models.server]
backend = "openai"
base_url = "{openai_server}"
model = "tiny-b"

[models.ollama]
backend = "ollama"
model = "llama3.1:8b"

[ensembles.default]
layers = [["local", "server", "ollama"], ["local", "server", "ollama"]]
aggregator = "local"
max_tokens = 16
temperature = 0.0
""",
        )
        out = localmoa("run", "Why is the sky blue?", "--json", "--memory-budget", "64GiB")
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        by_model = {(c["layer"], c["model"]): c for c in result["calls"]}
        assert set(by_model) == {(k, m) for k in (1, 2) for m in ("local", "server", "ollama")} | {
            (3, "local")
        }
        assert all(c["ok"] and c["tokens"] > 0 for c in result["calls"]), result["calls"]
        # The server-backed model costs nothing in the budget; the others are counted.
        plan = localmoa("plan", "--json", "--memory-budget", "64GiB")
        models = json.loads(plan.stdout)["models"]
        assert models["server"] == {"bytes": 0, "source": "server"}
        assert models["local"]["source"] == "gguf" and models["ollama"]["source"] in (
            "ollama",
            "measured",
        )
        assert [kind for kind, _ in ollama.events] == ["load", "unload"]


def test_zero_config_builds_an_ensemble_from_ollama(tmp_path: Path) -> None:
    installed = [
        *PROPOSERS,
        FakeOllamaModel(name="llama3.2:3b", family="llama", size=GB),
        FakeOllamaModel(
            name="nomic-embed-text", family="nomic-bert", size=GB // 4, capabilities=["embedding"]
        ),
        FakeOllamaModel(name="llama3.1:70b", family="llama", size=40 * GB),
    ]
    with FakeOllama(installed) as server:
        env = {"OLLAMA_HOST": server.url}
        out = localmoa("plan", "--memory-budget", "12GiB", env=env)
        assert out.returncode == 0, out.stderr
        text = out.stdout
        assert "No models.toml found: an ensemble was built from Ollama's models." in text
        assert "skipped nomic-embed-text:latest: not a chat model (embedding)" in text
        assert "skipped llama3.1:70b: needs" in text and "over the 12.0 GiB budget" in text
        for tag, family in (
            ("llama3.1:8b", "llama"),
            ("qwen2.5:7b", "qwen2"),
            ("gemma2:9b", "gemma2"),
        ):
            assert f"proposer {tag}: largest {family} model that fits" in text
        assert "aggregator " in text and "largest instruct model that fits" in text
        run = localmoa("run", "Why is the sky blue?", "--json", "--memory-budget", "12GiB", env=env)
        assert run.returncode == 0, run.stderr
        result = json.loads(run.stdout)
        assert len(result["calls"]) == 7 and result["answer"].startswith("a fake answer from")
        assert "zero-config: proposer" in run.stderr
        listed = localmoa("models", "--json", env=env)
        rows = {row["name"]: row for row in json.loads(listed.stdout)["models"]}
        assert rows["qwen2.5:7b"]["measured_bytes"] > 0  # measured by the run just made
        assert rows["llama3.1:70b"]["source"] == "Ollama model facts (estimate from /api/show)"


def test_a_refused_ollama_host_is_blamed_on_where_it_was_set(tmp_path: Path) -> None:
    """Without models.toml the URL can only come from OLLAMA_HOST, and the error says so."""
    from_env = localmoa("plan", env={"OLLAMA_HOST": "10.20.30.40"})
    assert from_env.returncode == 2
    assert 'the OLLAMA_HOST environment variable: "10.20.30.40" is not on this machine' in (
        from_env.stderr
    )
    assert "settings.ollama_host" not in from_env.stderr
    write_config(tmp_path, ollama_config("http://10.20.30.41:11434", 10**12))
    from_file = localmoa("plan", env={"OLLAMA_HOST": "10.20.30.40"})
    assert from_file.returncode == 2
    assert 'settings.ollama_host: "10.20.30.41" is not on this machine' in from_file.stderr


def test_an_ollama_judge_is_asked_for_its_verdict_with_a_schema_and_stops_early(
    tmp_path: Path,
) -> None:
    """The judge's JSON is asked of Ollama with ``format`` = the verdict's schema, narrowed to
    the answers shown; its stop skips layer 2, whose model is never loaded (no preload)."""
    verdict = json.dumps({"selected": [2], "stop": True, "reason": "they agree"})
    models = [
        *PROPOSERS,
        FakeOllamaModel(name="judge:1b", family="llama", size=GB, reply=verdict),
        FakeOllamaModel(name="late:1b", family="phi3", size=GB),
    ]
    with FakeOllama(models) as server:
        write_config(
            tmp_path,
            f"""
[settings]
ollama_host = "{server.url}"
[models.llama]
backend = "ollama"
model = "llama3.1:8b"
[models.qwen2]
backend = "ollama"
model = "qwen2.5:7b"
[models.judge]
backend = "ollama"
model = "judge:1b"
[models.late]
backend = "ollama"
model = "late:1b"
[ensembles.default]
layers = [["llama", "qwen2"], ["late", "qwen2"]]
aggregator = "llama"
judge = {{ model = "judge", top_k = 1, early_stop = true }}
max_tokens = 16
""",
        )
        out = localmoa("run", "q", "--json", "--memory-budget", "64GiB")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["skipped_layers"] == [2]
        judged = [
            b
            for _, path, b in server.requests
            if path == "/api/chat" and b and b.get("model") == "judge:1b" and b.get("messages")
        ]
        assert len(judged) == 1
        schema = judged[0]["format"]
        assert schema["required"][:2] == ["selected", "stop"]
        assert schema["properties"]["selected"]["items"]["enum"] == [1, 2]
        late = [p for _, p, b in server.requests if b and b.get("model") == "late:1b"]
        assert late == ["/api/show"]  # sized before the run; never preloaded, never asked
        assert doc["calls"][-1]["references"] == [[1, 1]]
