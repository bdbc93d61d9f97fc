"""Shared fixtures: an isolated home, generated tiny models, and ready-made configs."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from localmoa.tinymodels import PRESETS, write_tiny_model

TINY = ("tiny-a", "tiny-b", "tiny-c")


@pytest.fixture(scope="session", autouse=True)
def isolated_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A LOCALMOA_HOME for the whole session, so fixtures wider than one test (a module's
    server) never write the user's own run log or caches; each test then gets its own."""
    home = tmp_path_factory.mktemp("session-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LOCALMOA_HOME", str(home))
        yield home


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Each test in its own cwd and LOCALMOA_HOME, with no proxy settings leaking in."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("LOCALMOA_HOME", str(home))
    for var in list(os.environ):
        if var.lower().endswith("_proxy"):
            monkeypatch.delenv(var)
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The three tiny random-weight GGUF models, written once per session."""
    folder = tmp_path_factory.mktemp("models")
    return {name: write_tiny_model(folder / f"{name}.gguf", PRESETS[name]) for name in TINY}


def write_config(folder: Path, text: str) -> Path:
    path = folder / "models.toml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """models.toml: the three tiny models, a 2-layer ensemble of all three, tiny-a aggregating."""
    models = "\n".join(
        f'[models.{name}]\nbackend = "llamacpp"\npath = "{path}"\nn_ctx = 2048\nseed = 7\n'
        for name, path in tiny_models.items()
    )
    return write_config(
        tmp_path,
        models
        + """
[ensembles.default]
layers = [["tiny-a", "tiny-b", "tiny-c"], ["tiny-a", "tiny-b", "tiny-c"]]
aggregator = "tiny-a"
max_tokens = 24
""",
    )
