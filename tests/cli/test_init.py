"""`localmoa init --preset NAME`: the file is written, reads back, plans and runs as it is.

Real processes on real files: tiny random-weight GGUF models in a folder of the test's cwd, and
a fake Ollama on loopback (tests/fake_ollama.py) for Ollama's models. Ollama is pointed at a
closed port unless a test starts the fake, so a real Ollama on the machine never leaks in."""

from __future__ import annotations

import json
import shutil
import tomllib
from dataclasses import replace
from pathlib import Path

import pytest
from fake_ollama import FakeOllama, FakeOllamaModel
from servers import free_port

from localmoa.cli.init import InitReport
from localmoa.config import LlamaCppModel, OllamaModel, load_config
from localmoa.presets import ENSEMBLE, PRESETS
from localmoa.tinymodels import PRESETS as TINY_SPECS
from localmoa.tinymodels import write_tiny_model

from .invoke import localmoa

GB = 1_000_000_000


@pytest.fixture(autouse=True)
def no_ollama(monkeypatch: pytest.MonkeyPatch) -> str:
    """Ollama's address: a port nothing listens on."""
    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("OLLAMA_HOST", url)
    return url


@pytest.fixture
def models(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """./models with the three tiny models."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name, path in tiny_models.items():
        shutil.copy(path, folder / f"{name}.gguf")
    return folder


@pytest.fixture
def short_models(tmp_path: Path) -> Path:
    """./short: the tiny models trained for 512 tokens, so init sizes n_ctx and max_tokens down
    and a run of the written file stays short (random weights rarely end an answer early)."""
    folder = tmp_path / "short"
    folder.mkdir()
    for name in ("tiny-a", "tiny-b", "tiny-c"):
        write_tiny_model(folder / f"{name}.gguf", replace(TINY_SPECS[name], n_ctx_train=512))
    return folder


def init(*args: str) -> InitReport:
    out = localmoa("init", *args, "--json")
    assert out.returncode == 0, out.stderr
    return InitReport.model_validate_json(out.stdout)


def one_line_error(*args: str) -> str:
    out = localmoa(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("localmoa: error: "), out.stderr
    return lines[0]


# --- each preset, end to end --------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_each_preset_writes_a_file_that_reads_back_and_plans(
    preset: str, models: Path, tmp_path: Path
) -> None:
    report = init("--preset", preset, "--models-dir", "models")
    written = tmp_path / "models.toml"
    assert report.path == str(written) and report.preset == preset
    assert report.ensemble == ENSEMBLE == "default"
    config = load_config(written)
    assert list(config.ensembles) == [ENSEMBLE]
    assert {m.name for m in report.models} == set(config.models)
    for model in report.models:
        table = config.models[model.name]
        assert isinstance(table, LlamaCppModel) and table.n_ctx == model.n_ctx
        assert model.source == f"./models/{model.name}.gguf"
        assert table.path == models / f"{model.name}.gguf"
    plan = localmoa("plan", "--json")  # ./models.toml, the ensemble run uses by default
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert planned["ensemble"] == ENSEMBLE
    # init sized each model as the planner counts it, samples decoding together included
    assert {name: m["bytes"] for name, m in planned["models"].items()} == {
        m.name: m.bytes for m in report.models
    }


def test_without_json_the_reasons_go_to_stderr_and_one_line_to_stdout(models: Path) -> None:
    out = localmoa("init", "--preset", "moa-lite", "--models-dir", "models")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (
        "wrote models.toml: the moa-lite preset, 3 models; check it with `localmoa plan`\n"
    )
    assert "init: proposer and aggregator tiny-c.gguf: the largest model that fits" in out.stderr
    assert "Ollama is not reachable" in out.stderr


def test_moa_lite_as_written_runs_on_llama_cpp(short_models: Path) -> None:
    report = init("--preset", "moa-lite", "--models-dir", "short")
    assert {m.n_ctx for m in report.models} == {512}
    out = localmoa("run", "--config", "models.toml", "hi", "--json")
    assert out.returncode == 0, out.stderr
    calls = json.loads(out.stdout)["calls"]
    assert [c["role"] for c in calls].count("proposer") == 6
    assert [c["role"] for c in calls][-1] == "aggregator" and all(c["ok"] for c in calls)


def test_self_moa_as_written_runs_its_samples_on_llama_cpp(short_models: Path) -> None:
    report = init("--preset", "self-moa", "--models-dir", "short")
    (model,) = report.models
    assert model.name == "tiny-c" and model.samples == 4
    out = localmoa("run", "--config", "models.toml", "hi", "--json")
    assert out.returncode == 0, out.stderr
    calls = json.loads(out.stdout)["calls"]
    proposers = [c for c in calls if c["role"] == "proposer"]
    assert [c["index"] for c in proposers] == [0, 1, 2, 3]
    assert {c["model"] for c in calls} == {"tiny-c"} and calls[-1]["role"] == "aggregator"


def test_sparse_as_written_runs_its_judge_on_llama_cpp(tmp_path: Path) -> None:
    folder = tmp_path / "ctx1024"  # the judge's instructions need more than 512 tokens here
    folder.mkdir()
    for name in ("tiny-a", "tiny-b", "tiny-c"):
        write_tiny_model(folder / f"{name}.gguf", replace(TINY_SPECS[name], n_ctx_train=1024))
    init("--preset", "sparse", "--models-dir", "ctx1024")
    out = localmoa("run", "--config", "models.toml", "hi", "--json")
    assert out.returncode == 0, out.stderr
    roles = [c["role"] for c in json.loads(out.stdout)["calls"]]
    assert "judge" in roles and roles[-1] == "aggregator"


# --- candidates -------------------------------------------------------------------------------


def test_files_that_are_not_usable_models_are_skipped_with_a_reason(
    models: Path, tmp_path: Path
) -> None:
    (models / "junk.gguf").write_bytes(b"not a model at all, just bytes")
    (models / "README.txt").write_text("notes", encoding="utf-8")
    nested = models / "more"
    nested.mkdir()
    write_tiny_model(nested / "big-00001-of-00002.gguf", TINY_SPECS["tiny-a"])
    report = init("--preset", "moa", "--models-dir", "models")
    assert {m.name for m in report.models} == {"tiny-a", "tiny-b", "tiny-c"}
    junk = next(r for r in report.reasons if r.startswith("skipped junk.gguf"))
    assert "not a valid GGUF file" in junk
    shard = next(r for r in report.reasons if "big-00001-of-00002.gguf" in r)
    assert "part 1 of a model split in 2 files" in shard and "llama-gguf-split --merge" in shard
    assert not any("README" in r for r in report.reasons)
    text = (tmp_path / "models.toml").read_text(encoding="utf-8")
    assert "#   skipped junk.gguf: not a valid GGUF file" in text


def test_models_in_subfolders_are_found(models: Path) -> None:
    nested = models / "org" / "repo"
    nested.mkdir(parents=True)
    shutil.move(models / "tiny-b.gguf", nested / "tiny-b.gguf")
    report = init("--preset", "moa-lite", "--models-dir", "models")
    assert {m.source for m in report.models} >= {"./models/org/repo/tiny-b.gguf"}


def test_ollama_models_are_candidates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = [
        FakeOllamaModel(name="llama3.1:8b", family="llama", size=int(4.9 * GB)),
        FakeOllamaModel(name="qwen2.5:7b", family="qwen2", size=int(4.7 * GB)),
        FakeOllamaModel(name="nomic-embed-text", family="nomic-bert", capabilities=["embedding"]),
    ]
    with FakeOllama(fake) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        report = init("--preset", "moa-lite", "--memory-budget", "64GiB")
        assert {(m.name, m.backend, m.source) for m in report.models} == {
            ("llama3-1-8b", "ollama", "llama3.1:8b"),
            ("qwen2-5-7b", "ollama", "qwen2.5:7b"),
        }
        assert any(
            r.startswith("skipped nomic-embed-text:latest: not a chat model")
            for r in report.reasons
        )
        config = load_config(tmp_path / "models.toml")
        table = config.models["llama3-1-8b"]
        assert isinstance(table, OllamaModel) and table.num_ctx == 4096
        assert config.settings.memory_budget == 64 << 30
        plan = localmoa("plan", "--json")
        assert plan.returncode == 0, plan.stderr
        planned = json.loads(plan.stdout)["models"]
        assert {name: m["bytes"] for name, m in planned.items()} == {
            m.name: m.bytes for m in report.models
        }
        assert {path for _, path, _ in server.requests} <= {"/api/tags", "/api/show", "/api/ps"}


def test_ollama_down_is_a_reason_when_a_folder_gave_models(models: Path, no_ollama: str) -> None:
    report = init("--preset", "moa-lite", "--models-dir", "models")
    assert any(r.startswith(f"Ollama is not reachable at {no_ollama}") for r in report.reasons)


def test_no_ollama_leaves_it_out(models: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeOllama([FakeOllamaModel(name="llama3.1:8b")]) as server:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
        report = init("--preset", "moa-lite", "--models-dir", "models", "--no-ollama")
        assert {m.backend for m in report.models} == {"llamacpp"}
        assert server.requests == []


# --- where it writes ----------------------------------------------------------------------------


def test_an_existing_file_is_kept_unless_force(models: Path, tmp_path: Path) -> None:
    target = tmp_path / "models.toml"
    target.write_text("# mine\n", encoding="utf-8")
    line = one_line_error("init", "--preset", "moa", "--models-dir", "models")
    assert "models.toml already exists; pass --force to overwrite it" in line
    assert target.read_text(encoding="utf-8") == "# mine\n"
    init("--preset", "moa", "--models-dir", "models", "--force")
    assert tomllib.loads(target.read_text(encoding="utf-8"))["ensembles"][ENSEMBLE]


def test_output_elsewhere_gets_absolute_paths_and_plans_from_anywhere(
    models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "conf").mkdir()
    report = init("--preset", "sparse", "--models-dir", "models", "--output", "conf/x.toml")
    assert report.path == str(tmp_path / "conf" / "x.toml")
    assert {m.source for m in report.models} == {
        str(models / f"{m.name}.gguf") for m in report.models
    }
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    plan = localmoa("plan", "--config", str(tmp_path / "conf" / "x.toml"))
    assert plan.returncode == 0, plan.stderr


# --- refusals -----------------------------------------------------------------------------------


def test_an_unknown_preset_is_refused_with_the_choices() -> None:
    out = localmoa("init", "--preset", "fancy")
    assert out.returncode == 2
    assert "'fancy' is not one of 'moa', 'moa-lite', 'self-moa', 'sparse'" in out.stderr


def test_no_candidates_says_where_it_looked_and_what_to_do(tmp_path: Path, no_ollama: str) -> None:
    (tmp_path / "empty").mkdir()
    line = one_line_error("init", "--preset", "moa", "--models-dir", "empty")
    assert "no models to choose from" in line and "empty: no .gguf files usable" in line
    assert f"Ollama is not reachable at {no_ollama}" in line
    assert "pass --models-dir with a folder of .gguf files, or start Ollama" in line
    line = one_line_error("init", "--preset", "moa")
    assert "no --models-dir given" in line
    assert not (tmp_path / "models.toml").exists()


def test_nothing_fits_names_the_smallest_model_and_the_budget(models: Path) -> None:
    line = one_line_error(
        "init", "--preset", "moa", "--models-dir", "models", "--memory-budget", "16MiB"
    )
    assert "no model fits the 16.0 MiB budget: the smallest, tiny-a.gguf, needs" in line


def test_a_preset_whose_instructions_cannot_fit_the_models_is_refused(short_models: Path) -> None:
    """The tiny tokenizer spells text byte by byte, so the judge's instructions alone take more
    than the 512 tokens these models were trained for: the file would fail every prompt."""
    line = one_line_error("init", "--preset", "sparse", "--models-dir", "short")
    assert "--preset sparse does not suit these models: even a one-word prompt" in line
    assert 'judge 1: model "tiny-c"' in line
    assert not Path("models.toml").exists()


def test_an_output_in_a_missing_folder_is_refused_before_any_work(models: Path) -> None:
    line = one_line_error("init", "--preset", "moa", "--models-dir", "models", "-o", "no/x.toml")
    assert "cannot write no/x.toml: there is no folder" in line


def test_a_models_dir_that_cannot_be_read_is_refused(tmp_path: Path) -> None:
    line = one_line_error("init", "--preset", "moa", "--models-dir", "nowhere")
    assert "--models-dir nowhere: no such folder" in line
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    line = one_line_error("init", "--preset", "moa", "--models-dir", "afile")
    assert "--models-dir afile: not a folder" in line
