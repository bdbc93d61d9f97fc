"""The offline promise: a whole run with every network connection made to fail."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from fake_ollama import FakeOllama, FakeOllamaModel

GB = 1_000_000_000
SOURCE = str(Path(__file__).resolve().parents[1])
"""The checkout under test: the subprocess imports localmoa from it, whatever is installed."""

# Installed before localmoa is imported: any connect to a non-loopback address, and any name
# lookup at all (localhost names included: they are loopback by definition and never looked up),
# fails and is written down.
GUARD = textwrap.dedent(
    """
    import ipaddress, json, socket, sys
    attempts = []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def is_loopback(host):
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return False

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and not is_loopback(host):
            attempts.append(repr(address))
            raise OSError("network disabled by test: " + repr(address))
        return real_connect(self, address)

    def connect_ex(self, address):
        try:
            connect(self, address)
            return 0
        except OSError:
            return 111

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not is_loopback(str(host)):
            attempts.append("lookup " + str(host))
            raise socket.gaierror("name lookup disabled by test: " + str(host))
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect = connect
    socket.socket.connect_ex = connect_ex
    socket.getaddrinfo = getaddrinfo
    import atexit
    atexit.register(lambda: print("ATTEMPTS=" + json.dumps(attempts), file=sys.stderr))
    from localmoa.cli import main
    sys.argv = ["localmoa", *sys.argv[1:]]
    main()
    """
)


def test_a_whole_ensemble_runs_with_the_network_unreachable(tiny_config: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            GUARD,
            "run",
            "Is this private?",
            "--json",
            "--memory-budget",
            "1GiB",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "HF_HUB_OFFLINE": "0",
            "HOME": str(tiny_config.parent),
            "PYTHONPATH": SOURCE,
        },
    )
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["calls"]) == 7
    assert "ATTEMPTS=[]" in out.stderr


def test_ollama_on_a_localhost_name_runs_without_any_lookup(tmp_path: Path) -> None:
    """No models.toml: the ensemble is built from the Ollama that OLLAMA_HOST names."""
    models = [FakeOllamaModel(name="llama3.2:1b", family="llama", size=GB)]
    with FakeOllama(models) as ollama:
        port = ollama.url.rsplit(":", 1)[1]
        out = subprocess.run(
            [sys.executable, "-c", GUARD, "run", "Is this private?", "--json"],
            capture_output=True,
            text=True,
            timeout=120,
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": str(tmp_path),
                "LOCALMOA_HOME": str(tmp_path / "home"),
                "OLLAMA_HOST": f"ollama.localhost:{port}",
                "PYTHONPATH": SOURCE,
            },
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["answer"].startswith("a fake answer from")
        assert "ATTEMPTS=[]" in out.stderr
        assert ollama.resident() == {}
