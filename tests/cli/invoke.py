"""The `localmoa` command as a user runs it: a real process, real exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

GiB = 1 << 30

FAKE_THREE = """
[models.a]
backend = "fake"
memory = "1GiB"
[models.b]
backend = "fake"
memory = "1GiB"
[models.c]
backend = "fake"
memory = "1GiB"
[ensembles.default]
layers = [["a", "b", "c"], ["a", "b", "c"]]
aggregator = "a"
"""
"""Three 1 GiB fake models, two layers of all three and ``a`` aggregating."""

TWO_OF_THREE = FAKE_THREE.replace("[models.a]", '[settings]\nmemory_budget = "2GiB"\n[models.a]')
"""The three fakes on a budget that holds two of them: one prompt alone needs 4 loads."""


def localmoa(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localmoa", *args],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


def interrupt_when(line_marker: str, *args: str) -> tuple[int, str]:
    """Start `localmoa ARGS`, send SIGINT once stderr shows ``line_marker``, return (rc, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "localmoa", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line_marker in line:
            break
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=30)
    return process.returncode, "".join(seen) + err
