"""A run log that cannot be opened or written: one warning naming the file and the way out
(``settings.record = "off"``), and the answer printed all the same.

Each fault is real: garbage where logs.db should be; a file the process may not write; a lock
another connection holds past the busy timeout; a home that cannot be a folder. Read-only needs
care, since these tests may run as root, whom file modes do not stop: where a mode really stops
a write (any other user), the file is made 0400 in a 0500 folder; where it does not (root), the
process runs under RLIMIT_FSIZE = 0, under which the kernel refuses every write that would grow
a file, root's included. Either way SQLite is refused by the system, not by localmoa.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli.invoke import FAKE_THREE, localmoa
from conftest import write_config

from localmoa.backends.base import ChatMessage
from localmoa.config import Agent, Ensemble, Settings
from localmoa.records.recorder import Recorder
from localmoa.records.store import Store, log_path
from localmoa.runtime.events import ModelLoaded

WAY_OUT = 'Set settings.record = "off" (or LOCALMOA_RECORD=off) to not record at all'


def assert_one_warning_and_the_answer(out: subprocess.CompletedProcess[str], path: Path) -> None:
    assert out.returncode == 0, out.stderr
    assert out.stdout == "a has considered: q\n"
    warnings = [line for line in out.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1, out.stderr
    assert warnings[0].startswith(f"localmoa: warning: the run log {path} "), out.stderr
    assert warnings[0].endswith(WAY_OUT)
    assert "Traceback" not in out.stderr


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    write_config(tmp_path, FAKE_THREE)
    return log_path()


def test_a_corrupt_log_is_one_warning_and_is_left_as_it_was(fake: Path) -> None:
    garbage = b"this is not a database, but it is someone's file\n" * 100
    fake.write_bytes(garbage)
    out = localmoa("run", "q", "--memory-budget", "3GiB")
    assert_one_warning_and_the_answer(out, fake)
    assert "file is not a database" in out.stderr
    assert fake.read_bytes() == garbage  # never overwritten: it may be someone's evidence


def test_a_home_that_cannot_be_a_folder_is_one_warning(
    fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LOCALMOA_HOME", str(blocker / "home"))
    out = localmoa("run", "q", "--memory-budget", "3GiB", "--config", "models.toml")
    assert_one_warning_and_the_answer(out, blocker / "home" / "logs.db")


def _modes_stop_writes(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.write_text("")
    probe.chmod(0o400)
    try:
        with probe.open("a"):
            return False  # root: the mode did not stop us
    except PermissionError:
        return True
    finally:
        probe.chmod(0o600)


@pytest.fixture
def read_only(fake: Path, tmp_path: Path) -> Iterator[dict[str, object]]:
    """The log exists, and this test's process can read it but not write it."""
    store = Store.open(fake)
    assert store is not None
    store.close()
    if _modes_stop_writes(tmp_path):
        fake.chmod(0o400)
        fake.parent.chmod(0o500)
        try:
            yield {}
        finally:
            fake.parent.chmod(0o700)
            fake.chmod(0o600)
    else:

        def no_growing_files() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
            resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

        yield {"preexec_fn": no_growing_files}


def test_a_read_only_log_is_one_warning(fake: Path, read_only: dict[str, object]) -> None:
    before = fake.read_bytes()
    out = subprocess.run(
        [sys.executable, "-m", "localmoa", "run", "q", "--memory-budget", "3GiB"],
        capture_output=True,
        text=True,
        timeout=120,
        **read_only,  # type: ignore[call-overload]
    )
    assert_one_warning_and_the_answer(out, fake)
    assert fake.read_bytes() == before


def test_a_log_locked_past_the_busy_timeout_is_one_warning_and_the_run_goes_on(
    fake: Path,
) -> None:
    store = Store.open(fake)
    assert store is not None
    store.close()
    holder = sqlite3.connect(fake, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # held for the whole run
    try:
        out = localmoa("run", "q", "--memory-budget", "3GiB")
    finally:
        holder.execute("ROLLBACK")
    assert_one_warning_and_the_answer(out, fake)
    assert "database is locked" in out.stderr
    assert holder.execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)


def test_after_a_failed_write_the_recorder_stops_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In process: the first write that fails waits the busy timeout once and warns once;
    every later write of the process is skipped, not waited for again."""
    recorder = Recorder.open(Settings())
    ensemble = Ensemble(layers=[[Agent(model="a")]], aggregator=Agent(model="a"))
    conversation = [ChatMessage(role="user", content="q")]
    recording = recorder.start(
        source="run", ensemble="e", ensemble_config=ensemble, conversation=conversation
    )
    assert recording.id is not None
    holder = sqlite3.connect(log_path(), isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with caplog.at_level(logging.WARNING, logger="localmoa"):
            recording.on_event(ModelLoaded("a", 1.0, None))  # fails after the busy timeout
            assert not recorder.recording
            for _ in range(50):  # would take 50 busy timeouts if each were tried
                recording.on_event(ModelLoaded("a", 1.0, None))
            recording.finish("ok", answer="still answered")
            later = recorder.start(
                source="run", ensemble="e", ensemble_config=ensemble, conversation=conversation
            )
    finally:
        holder.execute("ROLLBACK")
    assert later.id is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(log_path()) in warnings[0].getMessage()
    assert holder.execute("SELECT COUNT(*) FROM loads").fetchone() == (0,)


def test_a_corrupt_log_found_by_localmoa_logs_is_one_line_exit_2(fake: Path) -> None:
    fake.write_bytes(b"garbage" * 1000)
    out = localmoa("logs")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"localmoa: error: the run log {fake} cannot be opened: file is not a database"
    ]


def test_the_warning_names_the_file_even_under_a_long_path(
    fake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path.joinpath(*["nested-folder-name"] * 8)
    deep.mkdir(parents=True)
    (deep / "logs.db").write_bytes(b"x" * 4096)
    monkeypatch.setenv("LOCALMOA_HOME", str(deep))
    out = localmoa(
        "run", "q", "--memory-budget", "3GiB", "--config", os.fspath(tmp_path / "models.toml")
    )
    assert_one_warning_and_the_answer(out, deep / "logs.db")
