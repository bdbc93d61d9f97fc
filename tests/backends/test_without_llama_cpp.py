"""The core install (``pip install localmoa``, no ``llamacpp`` extra): Ollama and fake ensembles
plan and run, and a llama.cpp model is one line naming the extra.

Each command runs in a fresh interpreter where llama_cpp, gguf and numpy cannot be imported (an
import hook refuses them and writes the attempt down), which is what an install without the
extra looks like to localmoa.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_config
from fake_ollama import FakeOllama, FakeOllamaModel

GB = 1_000_000_000
SOURCE = str(Path(__file__).resolve().parents[2])
"""The checkout under test: the subprocess imports localmoa from it, whatever is installed."""

EXTRA_ONLY = ("llama_cpp", "gguf", "numpy")

WITHOUT_EXTRA = textwrap.dedent(
    f"""
    import atexit, json, sys
    BLOCKED = {EXTRA_ONLY!r}
    attempts = []

    class Refuse:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Refuse)
    atexit.register(lambda: print("ATTEMPTS=" + json.dumps(attempts), file=sys.stderr))
    from localmoa.cli import main
    sys.argv = ["localmoa", *sys.argv[1:]]
    main()
    """
)

OLLAMA_MODELS = [
    FakeOllamaModel(name="llama3.2:1b", family="llama", size=GB),
    FakeOllamaModel(name="qwen2.5:1.5b", family="qwen2", size=GB),
]


def localmoa(tmp_path: Path, *args: str, ollama: FakeOllama | None = None) -> tuple[int, str, str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LOCALMOA_HOME": str(tmp_path / "home"),
        "PYTHONPATH": SOURCE,
    }
    if ollama is not None:
        env["OLLAMA_HOST"] = ollama.url
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_EXTRA, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    return out.returncode, out.stdout, out.stderr


def attempts(stderr: str) -> list[str]:
    line = next(x for x in stderr.splitlines() if x.startswith("ATTEMPTS="))
    return list(json.loads(line.removeprefix("ATTEMPTS=")))


@pytest.fixture
def ollama() -> Iterator[FakeOllama]:
    with FakeOllama(OLLAMA_MODELS) as fake:
        yield fake


def test_an_ollama_and_fake_ensemble_plans_and_runs(tmp_path: Path, ollama: FakeOllama) -> None:
    config = write_config(
        tmp_path,
        """
        [models.llama]
        backend = "ollama"
        model = "llama3.2:1b"

        [models.qwen]
        backend = "ollama"
        model = "qwen2.5:1.5b"

        [models.echo]
        backend = "fake"
        memory = "1GiB"

        [ensembles.default]
        layers = [["llama", "qwen", "echo"]]
        aggregator = "qwen"
        max_tokens = 16
        """,
    )
    flags = ["--config", str(config), "--memory-budget", "64GiB", "--json"]
    code, out, err = localmoa(tmp_path, "plan", *flags, ollama=ollama)
    assert code == 0, err
    assert isinstance(json.loads(out), dict)
    assert attempts(err) == []

    code, out, err = localmoa(tmp_path, "run", "Why is the sky blue?", *flags, ollama=ollama)
    assert code == 0, err
    assert json.loads(out)["answer"].startswith("a fake answer from qwen2.5:1.5b")
    assert attempts(err) == []
    assert ollama.resident() == {}


def test_zero_config_from_ollama_runs(tmp_path: Path, ollama: FakeOllama) -> None:
    code, out, err = localmoa(
        tmp_path, "run", "Hi", "--memory-budget", "64GiB", "--json", ollama=ollama
    )
    assert code == 0, err
    assert json.loads(out)["answer"].startswith("a fake answer from")
    assert attempts(err) == []


@pytest.mark.parametrize("command", [["plan"], ["run", "Hi"]])
def test_a_llamacpp_model_is_exit_2_naming_the_extra(tmp_path: Path, command: list[str]) -> None:
    config = write_config(
        tmp_path,
        """
        [models.tiny]
        backend = "llamacpp"
        path = "tiny.gguf"

        [ensembles.default]
        layers = [["tiny"]]
        aggregator = "tiny"
        """,
    )
    code, _, err = localmoa(tmp_path, *command, "--config", str(config), "--memory-budget", "1GiB")
    assert code == 2, err
    assert "needs llama-cpp-python, which is not installed" in err
    assert "pip install 'localmoa[llamacpp]'" in err
    assert "Traceback" not in err
    assert attempts(err) == ["llama_cpp"]
