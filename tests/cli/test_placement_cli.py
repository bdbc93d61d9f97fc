"""Several devices from the command line: `plan` and `run` on a declared 2 x 8 GiB machine."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import write_config
from fake_ollama import FakeOllama, FakeOllamaModel
from servers import free_port

from .invoke import GiB, localmoa

TWO_DEVICES = """
[settings]
[[settings.devices]]
name = "gpu0"
memory = "8GiB"
index = 0
[[settings.devices]]
name = "gpu1"
memory = "8GiB"
index = 1
[models.a]
backend = "fake"
memory = "6GiB"
[models.b]
backend = "fake"
memory = "6GiB"
[ensembles.default]
layers = [["a", "b"], ["a", "b"]]
aggregator = "a"
"""


def test_two_8_gib_devices_hold_two_6_gib_models_where_one_would_swap(tmp_path: Path) -> None:
    """The issue's done-when: declared 2 x 8 GiB, two 6 GiB models side by side (2 loads);
    --memory-budget 8GiB is one device, where they take turns (3 loads)."""
    write_config(tmp_path, TWO_DEVICES)
    two = localmoa("plan", "--json")
    assert two.returncode == 0, two.stderr
    plan = json.loads(two.stdout)
    assert plan["devices"] == {"gpu0": 8 * GiB, "gpu1": 8 * GiB}
    assert plan["loads"] == 2
    assert plan["waves"][0]["devices"] == {"gpu0": ["a"], "gpu1": ["b"]}
    one = localmoa("plan", "--json", "--memory-budget", "8GiB")
    assert one.returncode == 0, one.stderr
    single = json.loads(one.stdout)
    assert single["loads"] == 3 and len(single["devices"]) == 1
    assert all(len(w["resident"]) == 1 for w in single["waves"])  # never side by side

    table = localmoa("plan")
    assert table.returncode == 0, table.stderr
    assert "gpu0: a · gpu1: b" in table.stdout
    assert "budget: 16.0 GiB (2 devices: gpu0 8.0 GiB, gpu1 8.0 GiB)" in table.stdout


def test_run_json_calls_say_their_device(tmp_path: Path) -> None:
    write_config(tmp_path, TWO_DEVICES)
    out = localmoa("run", "--json", "Why is the sky blue?")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    devices = {c["model"]: c["device"] for c in report["calls"]}
    assert devices == {"a": "gpu0", "b": "gpu1"}
    assert report["loads"] == 2


def test_a_pin_to_a_device_that_is_not_there_is_refused(tmp_path: Path) -> None:
    write_config(
        tmp_path, TWO_DEVICES.replace('memory = "6GiB"\n', 'memory = "6GiB"\ndevice = "gpu7"\n', 1)
    )
    out = localmoa("plan")
    assert out.returncode == 2
    assert 'models.a.device: "gpu7" is not a device here (gpu0, gpu1)' in out.stderr
    assert "Traceback" not in out.stderr


def test_a_model_too_large_for_every_device_and_not_splittable(tmp_path: Path) -> None:
    write_config(tmp_path, TWO_DEVICES.replace('memory = "6GiB"', 'memory = "12GiB"', 1))
    out = localmoa("plan")
    assert out.returncode == 2
    assert 'model "a" needs 12.0 GiB but the largest device, "gpu0"' in out.stderr
    assert "split = true" in out.stderr and "Traceback" not in out.stderr


def test_servers_that_place_models_themselves_plan_against_the_sum_with_a_warning(
    tmp_path: Path,
) -> None:
    """Ollama cannot be told which GPU to use: an unpinned Ollama model makes the plan one
    device of the sum, and the user is told how to plan per GPU."""
    with FakeOllama([FakeOllamaModel(name="llama3.1:8b")]) as ollama:
        config = TWO_DEVICES.replace(
            '[models.b]\nbackend = "fake"\nmemory = "6GiB"',
            '[models.b]\nbackend = "ollama"\nmodel = "llama3.1:8b"\nmemory = "6GiB"',
        ).replace("[settings]\n", f'[settings]\nollama_host = "{ollama.url}"\n')
        write_config(tmp_path, config)
        out = localmoa("plan", "--json")
        assert out.returncode == 0, out.stderr
        plan = json.loads(out.stdout)
        assert plan["devices"] == {"gpu0+gpu1": 16 * GiB}
        assert "ollama place models themselves (b not pinned)" in plan["notes"][0]
        write_config(
            tmp_path,
            config.replace('memory = "6GiB"\n[ens', 'memory = "6GiB"\ndevice = "gpu1"\n[ens'),
        )
        pinned = localmoa("plan", "--json")
        assert pinned.returncode == 0, pinned.stderr
        placed = json.loads(pinned.stdout)
        assert placed["devices"] == {"gpu0": 8 * GiB, "gpu1": 8 * GiB} and not placed["notes"]
        assert placed["waves"][0]["devices"] == {"gpu0": ["a"], "gpu1": ["b"]}


def test_serve_plans_on_the_largest_device_and_says_so(tmp_path: Path) -> None:
    """A server's pool keeps one budget: with two devices it plans on the largest, and says so
    (a model file missing stops it right after)."""
    config = TWO_DEVICES.replace('memory = "8GiB"\nindex = 1', 'memory = "12GiB"\nindex = 1')
    config = config.replace(
        '[models.b]\nbackend = "fake"\nmemory = "6GiB"',
        '[models.b]\nbackend = "llamacpp"\npath = "missing.gguf"',
    )
    write_config(tmp_path, config)
    out = localmoa("serve", "--port", str(free_port()))
    assert out.returncode == 2, out.stderr
    assert "serve plans on one device, the largest of 2" in out.stderr
    assert "missing.gguf" in out.stderr


def test_a_cluster_address_not_allowed_exits_2_before_connecting(tmp_path: Path) -> None:
    models = TWO_DEVICES[TWO_DEVICES.index("[models.a]") :]
    write_config(
        tmp_path, f'[settings.cluster]\nengine = "ray"\naddress = "10.20.30.40:6379"\n{models}'
    )
    out = localmoa("plan")
    assert out.returncode == 2, out.stderr
    assert 'settings.cluster.address: "10.20.30.40" is not on this machine' in out.stderr
    assert "Traceback" not in out.stderr
