"""The closing line a stopped command prints, and its exit code (the signals themselves are
sent to real processes in tests/faults/test_signals.py)."""

from __future__ import annotations

import signal

from localmoa.cli.signals import Stopped, Unloads


def test_the_line_says_what_was_unloaded_and_what_was_not() -> None:
    account = Unloads()
    assert account.summary() == "nothing was loaded"
    account.add(["a", "b"])
    account.add(["b", "c"])
    assert account.summary() == "unloaded a, b, c"
    account.failed.append("d")
    assert account.summary() == (
        "unloaded a, b, c; could not unload d (see above): it may still hold memory in its server"
    )


def test_a_stop_exits_128_plus_the_signal_unless_told_otherwise() -> None:
    account = Unloads()
    account.add(["a"])
    interrupted = Stopped(signal.SIGINT, account, exit_code=None)
    assert (str(interrupted), interrupted.exit_code) == ("interrupted; unloaded a", 130)
    term = Stopped(signal.SIGTERM, account, exit_code=None)
    assert (str(term), term.exit_code) == ("stopped by SIGTERM; unloaded a", 143)
    assert Stopped(signal.SIGHUP, account, exit_code=0).exit_code == 0  # serve's clean stop
