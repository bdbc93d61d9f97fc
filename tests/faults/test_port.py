"""`localmoa serve` on a port another program holds: one line, exit 2, before "serving"."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_config

from localmoa.cli.serve import listen as _listen
from localmoa.errors import AddressInUseError

FAKE = """
[models.a]
backend = "fake"
memory = "1GiB"
[ensembles.default]
layers = [["a"]]
aggregator = "a"
"""


def test_a_busy_port_is_one_line_and_exit_2_before_serving(tmp_path: Path) -> None:
    write_config(tmp_path, FAKE)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "localmoa", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"localmoa: error: cannot listen on 127.0.0.1:{port}: another program is using that "
        "port; pick another with --port, or stop the program that holds it"
    ]


def test_loopback_names_bind_without_a_name_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[str] = []
    real = socket.getaddrinfo

    def recording(host: object, *args: object, **kwargs: object) -> object:
        looked_up.append(str(host))
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    for name in ("localhost", "moa.localhost"):
        sock = _listen(name, 0)
        try:
            assert sock.getsockname()[0] == "127.0.0.1"
        finally:
            sock.close()
    assert looked_up == []


def test_the_error_is_a_user_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(AddressInUseError):
            _listen("127.0.0.1", holder.getsockname()[1])
