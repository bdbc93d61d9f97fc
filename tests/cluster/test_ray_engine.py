"""The Ray engine on a local cluster of two nodes (tests/cluster/conftest.py): the nodes'
devices, models loaded on the node they were placed on, answers streamed back, unloads that end
the model's process, and a node stopped mid-run."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from localmoa.backends.base import ChatDelta, ChatMessage, ChatRequest
from localmoa.backends.fake import FakeBackend
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.cluster.backend import RayLlamaCppBackend
from localmoa.cluster.ray_engine import Node, check_node_auth, cluster_devices, connect
from localmoa.cluster.settings import ClusterSettings
from localmoa.config import FakeModel, LlamaCppModel, Settings
from localmoa.errors import BackendError, DeviceLost, ModelFileError, UsageRefused
from localmoa.hardware import Device, Placement

from .conftest import HEAD_RAM_MIB, MIB, NODE_GPU_MIB, LocalCluster

HI = ChatRequest(
    messages=[ChatMessage(role="user", content="Say something.")],
    temperature=0.8,
    max_tokens=12,
    seed=5,
)


def settings_for(cluster: LocalCluster, **options: Any) -> Settings:
    return Settings(cluster=ClusterSettings(engine="ray", address=cluster.address, **options))


def device(devices: list[Device], name: str) -> Placement:
    return Placement(devices=(next(d for d in devices if d.name == name),))


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_each_node_s_declared_devices_are_bins_named_by_node(ray_cluster: LocalCluster) -> None:
    devices = cluster_devices(settings_for(ray_cluster))
    assert [(d.name, d.memory, d.kind, d.index, d.node) for d in devices] == [
        ("box-a/ram", HEAD_RAM_MIB * MIB, "cpu", None, ray_cluster.head.node_id),
        ("box-b/gpu0", NODE_GPU_MIB * MIB, "gpu", 0, ray_cluster.node.node_id),
    ]


async def test_a_model_loads_on_its_node_streams_and_unloads(
    ray_cluster: LocalCluster, tiny_models: dict[str, Path]
) -> None:
    settings = settings_for(ray_cluster)
    devices = cluster_devices(settings)
    backend = RayLlamaCppBackend(settings)
    config = LlamaCppModel(backend="llamacpp", path=tiny_models["tiny-a"], n_ctx=512, seed=3)
    await backend.load("tiny-a", config, device(devices, "box-b/gpu0"))
    host = backend.host_of("tiny-a")
    assert host is not None and host.node == ray_cluster.node.node_id  # the actor said so
    assert backend.loaded() == ["tiny-a"] and backend.resident_bytes("tiny-a")
    # Ray leaves the node's GPUs visible to it, though it asked Ray for none.
    actor = backend._hosts["tiny-a"].actor
    flag = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"
    assert await actor.__ray_call__.remote(lambda _: os.environ.get(flag)) == "1"

    deltas = [delta async for delta in backend.chat("tiny-a", HI)]
    assert len(deltas) > 1 and sum(d.tokens for d in deltas) > 1
    # Samples decode together on the node, each piece tagged with its request.
    samples = [HI, HI.model_copy(update={"seed": 6})]
    pieces = [piece async for piece in backend.chat_samples("tiny-a", samples, parallel=2)]
    assert {index for index, _ in pieces} == {0, 1}

    await backend.unload("tiny-a")
    assert not running(host.pid)  # the actor's process ended before unload returned
    assert backend.loaded() == [] and backend.lost() == frozenset()
    with pytest.raises(BackendError, match="called while not loaded"):
        await anext(aiter(backend.chat("tiny-a", HI)))


async def test_deltas_arrive_as_the_node_makes_them(ray_cluster: LocalCluster) -> None:
    settings = settings_for(ray_cluster)
    devices = cluster_devices(settings)
    backend = RayLlamaCppBackend(settings, make=FakeBackend)
    per_token = 0.15
    words = " ".join(f"w{i}" for i in range(100))
    slow = FakeModel(backend="fake", memory=MIB, reply=words, seconds_per_token=per_token)
    await backend.load("slow", slow, device(devices, "box-a/ram"))
    try:
        arrived: list[float] = []
        async for _ in backend.chat("slow", HI.model_copy(update={"max_tokens": 8})):
            arrived.append(time.monotonic())
        assert len(arrived) == 8
        # Streamed: the first word came about seven words' time before the last, not with it.
        assert arrived[-1] - arrived[0] > 4 * per_token

        # Closing a stream early stops the answer on the node (100 words would take 15 s).
        stream = backend.chat("slow", HI.model_copy(update={"max_tokens": 100}))
        assert (await anext(aiter(stream))).text == "w0 "
        await stream.aclose()  # type: ignore[attr-defined]
        host = backend._hosts["slow"].actor  # the fake inside the node's actor, read there
        deadline = time.monotonic() + 5
        while await host.__ray_call__.remote(lambda actor: actor.backend._in_flight["slow"]):
            assert time.monotonic() < deadline, "the node kept answering a closed stream"
            await asyncio.sleep(0.02)
        assert [
            d.text async for d in backend.chat("slow", HI.model_copy(update={"max_tokens": 2}))
        ] == ["w0 ", "w1"]
    finally:
        assert await backend.aclose() == ["slow"]


async def test_a_model_file_is_read_where_models_dir_says(
    ray_cluster: LocalCluster, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    real = tiny_models["tiny-b"]
    elsewhere = tmp_path / "not-here" / real.name  # this machine has no such file
    settings = settings_for(ray_cluster, models_dir={"box-b": str(real.parent)})
    devices = cluster_devices(settings)
    backend = RayLlamaCppBackend(settings)
    config = LlamaCppModel(backend="llamacpp", path=elsewhere, n_ctx=512)
    local = LlamaCppModel(backend="llamacpp", path=real, n_ctx=512)

    # Read on box-b, the one node that has it (box-a reads the path as given: missing).
    assert await backend.footprint("b", config) == await LlamaCppBackend().footprint("b", local)
    asked = [ChatMessage(role="user", content="How many tokens is this?")]
    assert await backend.count_tokens("b", config, asked) == await LlamaCppBackend().count_tokens(
        "b", local, asked
    )
    with pytest.raises(ModelFileError, match=f"{elsewhere}: file not found"):
        await backend.load("b", config, device(devices, "box-a/ram"))
    await backend.load("b", config, device(devices, "box-b/gpu0"))
    assert [d async for d in backend.chat("b", HI)]
    assert await backend.aclose() == ["b"]

    nowhere = LlamaCppModel(backend="llamacpp", path=tmp_path / "nowhere.gguf")
    with pytest.raises(ModelFileError, match=r"not readable here nor on any node.*box-a: .*box-b:"):
        await backend.footprint("c", nowhere)


def test_a_node_without_token_authentication_is_refused_off_this_machine() -> None:
    node = Node(id="ab" * 28, label="box-z", name="box-z", address="10.0.0.7", resources={})
    off = ClusterSettings(engine="ray", address="10.0.0.5:6379")
    with pytest.raises(
        UsageRefused, match=r'node box-z \(10\.0\.0\.7\) runs without token.*"disabled"'
    ):
        check_node_auth(off, node, "disabled")
    check_node_auth(off, node, "token")
    check_node_auth(ClusterSettings(engine="ray", address="127.0.0.1:6379"), node, "disabled")


def test_one_process_joins_one_cluster(ray_cluster: LocalCluster) -> None:
    connect(settings_for(ray_cluster))
    with pytest.raises(UsageRefused, match=r"already joined to the Ray cluster at 127\.0\.0\.1:"):
        connect(Settings(cluster=ClusterSettings(engine="ray", address="127.0.0.1:1")))


async def test_a_node_stopped_mid_run_fails_its_calls_and_its_devices_are_lost(
    ray_cluster: LocalCluster,
) -> None:
    settings = settings_for(ray_cluster)
    doomed = ray_cluster.add_node("box-c", {"localmoa_mib_gpu0": 1024, "localmoa_mib_gpu1": 1024})
    devices = cluster_devices(settings)
    assert {"box-c/gpu0", "box-c/gpu1"} <= {d.name for d in devices}
    backend = RayLlamaCppBackend(settings, make=FakeBackend)
    words = " ".join(["word"] * 200)
    await backend.load(
        "talker",
        FakeModel(backend="fake", memory=MIB, reply=words, seconds_per_token=0.1),
        device(devices, "box-c/gpu0"),
    )
    loading = asyncio.create_task(
        backend.load(
            "loader",
            FakeModel(backend="fake", memory=MIB, load_seconds=600),
            device(devices, "box-c/gpu1"),
        )
    )
    stream = backend.chat("talker", HI.model_copy(update={"max_tokens": 200}))
    got: list[ChatDelta] = []
    with pytest.raises(DeviceLost) as lost_call:
        async for delta in stream:
            got.append(delta)
            if len(got) == 2:  # mid-answer, and while "loader" is being loaded
                ray_cluster.cluster.remove_node(doomed)
    assert len(got) < 200
    assert lost_call.value.devices == ["box-c/gpu0"]
    assert str(lost_call.value).startswith('model "talker": node box-c is gone')
    with pytest.raises(DeviceLost) as lost_load:
        await loading
    assert lost_load.value.devices == ["box-c/gpu1"]
    assert backend.lost() == frozenset({"box-c/gpu0", "box-c/gpu1"})

    # The rest re-plans on what remains: box-c's bins are gone, and nothing loads there.
    assert "box-c/gpu0" not in {d.name for d in cluster_devices(settings)}
    with pytest.raises(DeviceLost, match="node box-c is gone"):
        await backend.load(
            "again", FakeModel(backend="fake", memory=MIB), device(devices, "box-c/gpu0")
        )
    # Its models went with it: none is loaded, and a call to one says why.
    assert backend.loaded() == []
    with pytest.raises(DeviceLost, match='model "talker": node box-c is gone'):
        await anext(aiter(backend.chat("talker", HI)))
    assert await backend.aclose() == []
