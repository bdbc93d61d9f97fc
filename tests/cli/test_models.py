"""`localmoa models`: every model known, configured and Ollama's, as a table or ModelsReport."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_config
from fake_ollama import FakeOllama, FakeOllamaModel
from servers import free_port

from localmoa.cli.reports import ModelsReport

from .invoke import GiB, localmoa

GB = 1_000_000_000


def config(url: str) -> str:
    return f"""
[settings]
ollama_host = "{url}"
[models.a]
backend = "fake"
memory = "1GiB"
[models.llama]
backend = "ollama"
model = "llama3.1:8b"
[models.gone]
backend = "llamacpp"
path = "gone.gguf"
[ensembles.default]
layers = [["a", "llama"]]
aggregator = "a"
"""


def test_models_json_is_exactly_the_models_report(tmp_path: Path) -> None:
    installed = [
        FakeOllamaModel(name="llama3.1:8b", family="llama", size=2 * GB),
        FakeOllamaModel(name="qwen2.5:7b", family="qwen2", size=2 * GB),
    ]
    with FakeOllama(installed) as ollama:
        write_config(tmp_path, config(ollama.url))
        out = localmoa("models", "--json")
        table = localmoa("models")
    assert out.returncode == 0, out.stderr
    report = ModelsReport.model_validate_json(out.stdout)
    assert out.stdout == json.dumps(report.model_dump(mode="json")) + "\n"
    rows = {row.name: row for row in report.models}
    assert list(rows) == ["a", "llama", "gone", "qwen2.5:7b"]  # configured first, then Ollama's
    assert (rows["a"].bytes, rows["a"].source, rows["a"].error) == (GiB, "memory override", None)
    assert rows["a"].estimate_bytes is None and rows["a"].measured_bytes is None
    llama = rows["llama"]
    assert llama.backend == "ollama" and llama.bytes == llama.estimate_bytes and llama.bytes
    assert llama.source is not None and llama.source.startswith("Ollama model facts")
    gone = rows["gone"]
    assert gone.error is not None and "gone.gguf: file not found" in gone.error
    assert gone.bytes is None and gone.source is None
    assert rows["qwen2.5:7b"].backend == "ollama (installed)" and report.notes == []
    doc = json.loads(out.stdout)
    assert all(list(row) == list(doc["models"][0]) for row in doc["models"])  # keys always there
    assert table.returncode == 0, table.stderr
    assert "unusable: " in table.stdout and "qwen2.5:7b" in table.stdout


def test_an_unreachable_ollama_is_a_note_not_a_failure(tmp_path: Path) -> None:
    write_config(tmp_path, config(f"http://127.0.0.1:{free_port()}"))
    out = localmoa("models", "--json")
    assert out.returncode == 0, out.stderr
    report = ModelsReport.model_validate_json(out.stdout)
    assert [row.name for row in report.models] == ["a", "llama", "gone"]
    assert len(report.notes) == 1 and report.notes[0].startswith("Ollama: ")
    assert report.models[1].error is not None  # its footprint needs Ollama too
