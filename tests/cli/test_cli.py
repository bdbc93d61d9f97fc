"""The `localmoa` group: exit codes and one-line errors for every command, and the entry points."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
from conftest import write_config

from localmoa.cli import cli, main

from .invoke import FAKE_THREE, localmoa

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


def test_the_commands_and_the_console_script() -> None:
    assert sorted(cli.commands) == [
        "batch",
        "chat",
        "eval",
        "init",
        "logs",
        "models",
        "plan",
        "run",
        "serve",
    ]
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="localmoa")
    assert script.value == "localmoa.cli:main" and script.load() is main
    out = localmoa("--help")
    assert out.returncode == 0
    for command in cli.commands:
        assert command in out.stdout


def test_cli_modules_stay_small() -> None:
    """One concept per module: a CLI module much over 500 lines holds two."""
    import localmoa.cli

    folder = Path(localmoa.cli.__file__).parent
    sizes = {path.name: len(path.read_text().splitlines()) for path in folder.glob("*.py")}
    assert max(sizes.values()) <= 500, sizes
