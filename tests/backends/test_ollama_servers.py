"""One Ollama server per GPU: each model's ``ollama_host`` names its server, and everything done
for that model goes there. Two real fake Ollama servers on loopback, the request bodies and
which server got them asserted."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from conftest import write_config
from fake_ollama import FakeOllama, FakeOllamaModel, loaded_bytes
from pydantic import ValidationError

from localmoa.backends.base import ChatMessage, ChatRequest
from localmoa.backends.ollama import OllamaBackend
from localmoa.config import OllamaModel
from localmoa.errors import EgressError, ModelNotInstalledError, ServerUnavailableError
from localmoa.footprint.measurements import MeasurementCache

GB = 1_000_000_000
TAG = "qwen2.5:7b"
REQUEST = ChatRequest(
    messages=[ChatMessage(role="user", content="Why is the sky blue?")],
    temperature=0.3,
    max_tokens=3,
)


def qwen(size: int = 4 * GB, vram_fraction: float = 1.0) -> FakeOllamaModel:
    """The same tag on every server, as when one model is pulled once and served per GPU:
    only the server a request reaches can tell the two copies apart."""
    return FakeOllamaModel(name=TAG, family="qwen2", size=size, vram_fraction=vram_fraction)


@pytest.fixture
def gpus() -> Iterator[tuple[FakeOllama, FakeOllama, FakeOllama]]:
    """The run's own server (settings.ollama_host) and one server per GPU."""
    with (
        FakeOllama([qwen()]) as default,
        FakeOllama([qwen()]) as gpu0,
        FakeOllama([qwen(size=3 * GB)]) as gpu1,
    ):
        yield default, gpu0, gpu1


def on(server: FakeOllama | str, num_ctx: int = 4096, tag: str = TAG) -> OllamaModel:
    host = server if isinstance(server, str) else server.url
    return OllamaModel(backend="ollama", model=tag, num_ctx=num_ctx, ollama_host=host)


def backend_for(
    default: FakeOllama, tmp_path: Path, allowed_hosts: Sequence[str] = ()
) -> OllamaBackend:
    cache = MeasurementCache(tmp_path / "measured.json")
    return OllamaBackend(default.url, cache=cache, allowed_hosts=allowed_hosts)


def bodies(server: FakeOllama, path: str) -> list[dict[str, object]]:
    return [body for _, p, body in server.requests if p == path]


def paths(server: FakeOllama) -> list[str]:
    return [p for _, p, _ in server.requests]


async def test_two_models_on_two_servers_load_answer_and_unload_each_on_its_own(
    gpus: tuple[FakeOllama, FakeOllama, FakeOllama], tmp_path: Path
) -> None:
    default, gpu0, gpu1 = gpus
    backend = backend_for(default, tmp_path)
    a, b = on(gpu0, num_ctx=4096), on(gpu1, num_ctx=8192)
    await backend.load("a", a)
    await backend.load("b", b)
    assert backend.loaded() == ["a", "b"]
    assert gpu0.resident() == {TAG: loaded_bytes(qwen(), 4096)}
    assert gpu1.resident() == {TAG: loaded_bytes(qwen(3 * GB), 8192)}
    answers = {
        name: "".join([d.text async for d in backend.chat(name, REQUEST)]) for name in ("a", "b")
    }
    await backend.unload("a")
    assert gpu0.resident() == {} and gpu1.resident() != {}  # b stays where it is
    assert await backend.aclose() == ["b"]  # aclose unloads b, on its own server

    assert answers == {"a": "a fake answer", "b": "a fake answer"}
    for server, num_ctx in ((gpu0, 4096), (gpu1, 8192)):
        preload, unload = bodies(server, "/api/generate")
        assert preload == {
            "model": TAG,
            "stream": False,
            "options": {"num_ctx": num_ctx},
            "keep_alive": -1.0,
        }
        assert unload == {"model": TAG, "keep_alive": 0, "stream": False}
        (chat,) = bodies(server, "/api/chat")
        assert chat["options"] == {"num_ctx": num_ctx, "temperature": 0.3, "num_predict": 3}
        assert chat["keep_alive"] == -1 and chat["messages"] == [
            {"role": "user", "content": "Why is the sky blue?"}
        ]
        assert [kind for kind, _ in server.events] == ["load", "unload"]  # nothing else
        assert paths(server).count("/api/tags") == 1  # listed once, for its model
        assert server.resident() == {}
    assert default.requests == []  # neither model is on the run's server


async def test_a_model_s_measurement_comes_from_its_own_server(
    gpus: tuple[FakeOllama, FakeOllama, FakeOllama], tmp_path: Path
) -> None:
    default, gpu0, gpu1 = gpus
    backend = backend_for(default, tmp_path)
    await backend.load("a", on(gpu0))
    await backend.load("b", on(gpu1))
    a_bytes, b_bytes = loaded_bytes(qwen(), 4096), loaded_bytes(qwen(3 * GB), 4096)
    assert a_bytes != b_bytes  # the same tag, a different size on each server
    assert (backend.resident_bytes("a"), backend.resident_bytes("b")) == (a_bytes, b_bytes)
    assert backend.load_peak_bytes("b") == gpu1.resident()[TAG]
    assert "/api/ps" in paths(gpu0) and "/api/ps" in paths(gpu1)
    await backend.aclose()

    # Remembered per server: each GPU's measurement plans that GPU's model next time, and the
    # run's own server, never loaded, still has only the estimate.
    again = backend_for(default, tmp_path)
    a, b = await again.footprint("a", on(gpu0)), await again.footprint("b", on(gpu1))
    assert (a.source, a.total) == ("measured", a_bytes)
    assert (b.source, b.total) == ("measured", b_bytes)
    plain = OllamaModel(backend="ollama", model=TAG)
    assert (await again.footprint("c", plain)).source == "ollama"
    await again.aclose()


async def test_a_partial_offload_is_read_from_the_model_s_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeOllama([qwen()]) as gpu0, FakeOllama([qwen(vram_fraction=0.5)]) as gpu1:
        backend = backend_for(gpu0, tmp_path)
        with caplog.at_level(logging.WARNING, logger="localmoa"):
            await backend.load("a", on(gpu0))
            await backend.load("b", on(gpu1))
        await backend.aclose()
    assert 'part of "b" on the CPU (50% in GPU memory)' in caplog.text
    assert '"a"' not in caplog.text


async def test_a_model_on_the_run_s_server_shares_its_client_and_listing(
    gpus: tuple[FakeOllama, FakeOllama, FakeOllama], tmp_path: Path
) -> None:
    default, _, _ = gpus
    backend = backend_for(default, tmp_path)
    port = default.url.rsplit(":", 1)[1]
    await backend.load("a", OllamaModel(backend="ollama", model=TAG))
    await backend.load("b", on(f":{port}", num_ctx=8192))  # the same server, spelt otherwise
    await backend.aclose()
    assert paths(default).count("/api/tags") == 1
    preloads = [b for b in bodies(default, "/api/generate") if b["keep_alive"] == -1]
    assert [p["options"] for p in preloads] == [{"num_ctx": 4096}, {"num_ctx": 8192}]


# --- what the user is told -----------------------------------------------------------------


async def test_a_model_host_off_this_machine_is_refused_naming_its_key_before_connecting(
    gpus: tuple[FakeOllama, FakeOllama, FakeOllama],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    default, gpu0, _ = gpus
    backend = backend_for(default, tmp_path, allowed_hosts=["gpu-box.lan"])
    await backend.load("near", on(gpu0))
    attempts: list[object] = []
    monkeypatch.setattr(socket.socket, "connect", lambda self, a: attempts.append(a))
    for name in ("far", "farther"):  # each refusal names its own model, not the first one
        with pytest.raises(EgressError) as refused:
            await backend.footprint(name, on("10.20.30.40:11435"))
        assert str(refused.value).startswith(
            f'models.{name}.ollama_host: "10.20.30.40" is not on this machine'
        )
        assert 'add it to settings.allowed_hosts, e.g. allowed_hosts = ["10.20.30.40"]' in str(
            refused.value
        )
        with pytest.raises(EgressError, match=rf"^models\.{name}\.ollama_host: "):
            await backend.load(name, on("http://10.20.30.40:11435"))
    assert attempts == [] and backend.loaded() == ["near"]
    monkeypatch.undo()
    assert await backend.aclose() == ["near"]
    assert default.requests == []


async def test_a_model_host_that_is_no_url_names_its_key(tmp_path: Path) -> None:
    backend = OllamaBackend("http://127.0.0.1:1", cache=MeasurementCache(tmp_path / "m.json"))
    with pytest.raises(EgressError, match=r'^models\.x\.ollama_host: not a URL: "127.0.0.1:abc"'):
        await backend.footprint("x", on("127.0.0.1:abc"))
    await backend.aclose()


def test_an_empty_ollama_host_is_a_config_error_not_the_default() -> None:
    with pytest.raises(ValidationError, match="ollama_host"):
        OllamaModel(backend="ollama", model=TAG, ollama_host="")


async def test_a_model_s_server_down_says_how_to_start_that_server(
    gpus: tuple[FakeOllama, FakeOllama, FakeOllama], tmp_path: Path
) -> None:
    default, _, _ = gpus
    with socket.socket() as probe:  # a port on which nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = backend_for(default, tmp_path)
    with pytest.raises(ServerUnavailableError) as down:
        await backend.footprint("b", on(f"127.0.0.1:{port}"))
    assert str(down.value) == (
        f"Ollama is not reachable at http://127.0.0.1:{port}: start it on this machine with "
        f"`OLLAMA_HOST=127.0.0.1:{port} ollama serve` (one per GPU, each with its "
        "CUDA_VISIBLE_DEVICES), or point models.b.ollama_host at it"
    )
    await backend.aclose()
    assert default.requests == []


async def test_a_model_missing_on_its_server_gives_that_server_s_pull_line(
    gpus: tuple[FakeOllama, FakeOllama, FakeOllama], tmp_path: Path
) -> None:
    default, _, gpu1 = gpus
    backend = backend_for(default, tmp_path)
    assert "gemma2:9b" not in await backend.installed()
    with pytest.raises(ModelNotInstalledError) as missing:
        await backend.footprint("b", on(gpu1, tag="gemma2:9b"))
    port = gpu1.url.rsplit(":", 1)[1]
    assert str(missing.value) == (
        f'Ollama at {gpu1.url} has no model "gemma2:9b" (models.b.model); run '
        f"`OLLAMA_HOST=127.0.0.1:{port} ollama pull gemma2:9b` (localmoa never downloads "
        "models itself)"
    )
    assert not any(p in ("/api/pull", "/api/generate") for p in paths(gpu1))
    await backend.aclose()


# --- a whole run: two declared GPUs, one Ollama server each ------------------------------------


def localmoa(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "localmoa", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


def two_gpus(gpu0: str, gpu1: str) -> str:
    """Two 4 GB GPUs, a 3 GB model pinned to each through its server: side by side they fit,
    where one 4 GB device would swap them."""
    return f"""
[settings]
[[settings.devices]]
name = "gpu0"
memory = "4GB"
[[settings.devices]]
name = "gpu1"
memory = "4GB"

[models.a]
backend = "ollama"
model = "{TAG}"
memory = "3GB"
ollama_host = "{gpu0}"
device = "gpu0"

[models.b]
backend = "ollama"
model = "{TAG}"
memory = "3GB"
ollama_host = "{gpu1}"
device = "gpu1"

[ensembles.default]
layers = [["a", "b"]]
aggregator = "a"
max_tokens = 8
"""


@pytest.fixture
def small_gpus() -> Iterator[tuple[FakeOllama, FakeOllama, FakeOllama]]:
    """As :func:`gpus`, with a model whose /api/ps size (which replaces the declared memory
    once loaded) stays under the 3 GB declared, so the plan holds through the run."""
    assert loaded_bytes(qwen(2 * GB), 4096) < 3 * GB
    with (
        FakeOllama([qwen(2 * GB)]) as default,
        FakeOllama([qwen(2 * GB)]) as gpu0,
        FakeOllama([qwen(2 * GB)]) as gpu1,
    ):
        yield default, gpu0, gpu1


def test_a_run_over_two_servers_keeps_each_model_on_its_gpu(
    small_gpus: tuple[FakeOllama, FakeOllama, FakeOllama], tmp_path: Path
) -> None:
    default, gpu0, gpu1 = small_gpus
    write_config(tmp_path, two_gpus(gpu0.url, gpu1.url))
    planned = localmoa("plan", "--json")
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)
    assert plan["loads"] == 2
    assert plan["waves"][0]["devices"] == {"gpu0": ["a"], "gpu1": ["b"]}  # side by side
    placed = {(m, d) for w in plan["waves"] for d, ms in w["devices"].items() for m in ms}
    assert placed == {("a", "gpu0"), ("b", "gpu1")}
    out = localmoa("run", "Why is the sky blue?", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["loads"] == 2 and all(c["ok"] for c in result["calls"])
    assert {(c["model"], c["device"]) for c in result["calls"]} == {("a", "gpu0"), ("b", "gpu1")}
    for server, calls in ((gpu0, 2), (gpu1, 1)):  # a proposes and aggregates, b proposes
        assert [kind for kind, _ in server.events] == ["load", "unload"]
        assert len(bodies(server, "/api/chat")) == calls
    assert default.requests == []


def test_a_run_with_a_model_host_not_allowed_exits_2_naming_the_key(
    gpus: tuple[FakeOllama, FakeOllama, FakeOllama], tmp_path: Path
) -> None:
    default, gpu0, _ = gpus
    write_config(tmp_path, two_gpus(gpu0.url, "10.20.30.40:11435"))
    out = localmoa("run", "q")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert 'models.b.ollama_host: "10.20.30.40" is not on this machine' in out.stderr
    assert gpu0.events == [] and default.requests == []


def test_a_declared_memory_overrides_what_ollama_measures(
    gpus: tuple[FakeOllama, FakeOllama, FakeOllama], tmp_path: Path
) -> None:
    """The models measure more than the 3 GB declared (and more than a 4 GB device) once
    loaded; ``memory`` overrides any measurement, so the plan holds: no re-plan, 2 loads."""
    _, gpu0, gpu1 = gpus
    write_config(tmp_path, two_gpus(gpu0.url, gpu1.url))
    out = localmoa("run", "Why is the sky blue?", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["loads"] == 2 and result["replans"] == 0
    assert all(c["ok"] for c in result["calls"])
