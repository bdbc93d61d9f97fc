"""A Ray cluster's nodes as the planner's bins: connecting, the inventory, and where files are.

The planner stays the one owner of memory. Each alive node's devices become devices like this
machine's (:class:`~localmoa.hardware.Device` with ``node`` = the Ray node id and ``name`` =
``"LABEL/DEVICE"``), the plan places models on them, and Ray only runs what the plan placed
(:mod:`localmoa.cluster.backend`). Ray's own resources are bookkeeping, not limits (docs.ray.io,
"Resources"), and it knows nothing of GPU memory (ray#37574), so localmoa never asks Ray to fit
anything: every actor it starts asks for no CPU and is pinned to its node.

**A node's devices.** A node started with resources named ``localmoa_mib_DEVICE`` declares its
devices, each the MiB a plan may use on it (nothing taken off)::

    ray start --address=HEAD:6379 \\
        --resources='{"localmoa_mib_gpu0": 22528, "localmoa_mib_ram": 16384}'

``gpuN`` is the GPU llama.cpp numbers N (NVML's PCI order: the model's host sets
``CUDA_DEVICE_ORDER=PCI_BUS_ID``), ``ram`` is memory for models run on the CPU, ``unified`` is
Apple unified memory. A node that declares none is read by its inventory actor with
:func:`localmoa.hardware.detect_devices` (every NVIDIA GPU's free memory, else unified memory,
else RAM, each less the margin). Declaring is how tests give one machine several nodes with
devices of their own, and how an operator keeps part of a GPU for something else.

**A node's label** names it in plans and records: its Ray node name (``ray start
--node-name``; by default the node's IP), or, when two alive nodes share one (two nodes of one
machine), the name and the first 8 hex digits of the node id. A node keeps its label for the
session, so device names do not change when another node comes or goes.

**Files.** A model's GGUF ``path`` is read on the node it runs on: as
``models_dir[node] / path.name`` when ``[settings.cluster] models_dir`` lists the node (by
label, name or IP), else as the same path as here.

Everything here blocks on Ray (``ray.init``, the node table, the inventory's answers) and is
meant for preparing a run; the backend's calls, made while a run streams, go through asyncio
(:func:`node_gone`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.cluster.actors import Inventory, NodeReport
from localmoa.cluster.checks import check_cluster
from localmoa.cluster.settings import ClusterSettings, split_address
from localmoa.egress import is_loopback
from localmoa.errors import ConfigError, ServerUnavailableError, UsageRefused
from localmoa.hardware import Device, DeviceKind

if TYPE_CHECKING:
    from localmoa.config import Settings

__all__ = [
    "DEVICE_RESOURCE_PREFIX",
    "Node",
    "alive_nodes",
    "check_node_auth",
    "cluster_devices",
    "connect",
    "declared_devices",
    "disconnect",
    "inventory",
    "label_of",
    "node_devices",
    "node_gone",
    "node_path",
    "pinned",
    "reason",
]

log = logging.getLogger(__name__)

DEVICE_RESOURCE_PREFIX = "localmoa_mib_"
"""Ray resources named ``localmoa_mib_DEVICE`` declare a node's devices, in MiB."""

_DEVICE = re.compile(r"^(?:gpu(?P<index>\d+)|(?P<ram>ram)|(?P<unified>unified))$")

PING_S = 2.0
"""How long one ping of a node's inventory may take before it counts as unanswered."""

POLL_S = 0.2
"""How often :func:`node_gone` reads the node table while it waits for a verdict."""

ActorHandle = Any
"""A Ray actor handle: its methods are made at run time, so there is nothing to type."""

_InventoryActor: Any = ray.remote(Inventory)


@dataclass(frozen=True)
class Node:
    """One alive node of the cluster."""

    id: str
    """Ray's node id (hex)."""
    label: str
    """How plans name it (module docstring)."""
    name: str
    """Its Ray node name (its IP unless ``ray start --node-name`` said otherwise)."""
    address: str
    """Its IP."""
    resources: Mapping[str, float]


@dataclass
class _Session:
    """This process's view of the cluster: Ray's connection is per process, and so is this."""

    address: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    """Node id → label, kept for the session once given."""
    inventories: dict[str, ActorHandle] = field(default_factory=dict)
    devices: dict[str, list[Device]] = field(default_factory=dict)
    """Node id → its devices, as :func:`cluster_devices` last reported them."""


_session = _Session()


def connect(settings: Settings) -> None:
    """Join the cluster at ``settings.cluster.address`` (once per process; again is a no-op),
    after :func:`~localmoa.cluster.checks.check_cluster`. Quiet: Ray logs warnings only, and
    the workers' output is not copied to this process's stdout (where the answer goes). No
    dashboard is started: joining a cluster starts nothing on it.

    ServerUnavailableError when nothing answers at the address within ``connect_timeout``
    seconds, or Ray cannot join it; UsageRefused when the cluster refuses this process's token.
    """
    check_cluster(settings)
    cluster = settings.cluster
    address = cluster.address
    assert address is not None  # check_cluster refuses engine "ray" without one
    if ray.is_initialized():
        if _session.address in (None, address):
            _session.address = address
            return
        raise UsageRefused(
            f"settings.cluster.address: this process is already joined to the Ray cluster at "
            f"{_session.address}, not {address}; run localmoa again to use another cluster"
        )
    _probe(address, cluster.connect_timeout)
    try:
        ray.init(
            address=address,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=False,
        )
    except Exception as exc:  # ray.init raises many kinds; each one means "not joined"
        first = reason(exc)
        if isinstance(exc, ray.exceptions.AuthenticationError):
            raise UsageRefused(
                f"settings.cluster.address: the Ray cluster at {address} refused this "
                f"process's token ({first}); set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to "
                "the token the cluster was started with (`ray get-auth-token` on the head)"
            ) from exc
        raise ServerUnavailableError(
            f"settings.cluster.address: cannot join the Ray cluster at {address}: {first}; "
            "check that the head runs the same Ray and Python versions as this machine"
        ) from exc
    _session.address = address


def disconnect() -> None:
    """Leave the cluster. The actors this process started (inventories, models) end with
    the connection, as Ray ends an owner's actors."""
    global _session
    if ray.is_initialized():
        ray.shutdown()
    _session = _Session()


def _probe(address: str, timeout: float) -> None:
    """ServerUnavailableError unless the head's port answers: ``ray.init`` would otherwise
    retry for many minutes before it gives up on an address where nothing listens."""
    host, port = split_address(address)
    target = _ray_host(host)
    try:
        socket.create_connection((target, port), timeout=timeout).close()
    except OSError as exc:
        raise ServerUnavailableError(
            f"settings.cluster.address: nothing answers at {address} ({exc}); start the head "
            f"there with `ray start --head --port={port}`, or correct the address"
        ) from None


def _ray_host(host: str) -> str:
    """The host Ray itself connects to for ``host``: Ray replaces a loopback host by this
    machine's own address (``resolve_ip_for_localhost``), so that is what must answer."""
    if not is_loopback(host):
        return host
    try:
        from ray._private.services import resolve_ip_for_localhost
    except ImportError:
        return host
    return str(resolve_ip_for_localhost(host))


def alive_nodes() -> list[Node]:
    """The cluster's alive nodes, labelled (module docstring), in the order of their labels."""
    table = [entry for entry in _table() if entry.get("Alive")]
    names = [str(entry.get("NodeName") or entry.get("NodeManagerAddress")) for entry in table]
    given = set(_session.labels.values())
    nodes = []
    for entry, name in zip(table, names, strict=True):
        node_id = str(entry["NodeID"])
        label = _session.labels.get(node_id)
        if label is None:
            shared = names.count(name) > 1 or name in given
            label = f"{name}-{node_id[:8]}" if shared else name
            _session.labels[node_id] = label
            given.add(label)
        nodes.append(
            Node(
                id=node_id,
                label=label,
                name=name,
                address=str(entry.get("NodeManagerAddress", "")),
                resources=dict(entry.get("Resources") or {}),
            )
        )
    return sorted(nodes, key=lambda node: node.label)


def label_of(node_id: str) -> str:
    """The label node ``node_id`` was given, else its id's first 8 hex digits."""
    return _session.labels.get(node_id, node_id[:8])


ALL_GPUS_VISIBLE = {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}
"""Keeps Ray from setting ``CUDA_VISIBLE_DEVICES`` in localmoa's actors. They ask for no GPU
(``num_gpus=0``), and Ray before ray#62492 (2026) then hid every GPU from them (an empty
``CUDA_VISIBLE_DEVICES``); with this (the flag vLLM sets for the same reason) each actor sees
the node's GPUs as the node does, and the placement's ``main_gpu`` picks one."""


def pinned(node_id: str) -> dict[str, Any]:
    """Ray actor options that run an actor on node ``node_id`` and nowhere else, asking Ray
    for no resources (the plan decided that it fits; module docstring) and seeing every GPU
    of the node (:data:`ALL_GPUS_VISIBLE`)."""
    return {
        "num_cpus": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        "runtime_env": {"env_vars": dict(ALL_GPUS_VISIBLE)},
    }


def inventory(node_id: str) -> ActorHandle:
    """Node ``node_id``'s inventory actor, started on first use."""
    handle = _session.inventories.get(node_id)
    if handle is None:
        handle = _InventoryActor.options(**pinned(node_id)).remote(LlamaCppBackend)
        _session.inventories[node_id] = handle
    return handle


def declared_devices(node: Node) -> list[Device]:
    """The devices node ``node`` declares with ``localmoa_mib_*`` resources (module
    docstring), unqualified names; ConfigError for a name localmoa cannot place on."""
    devices = []
    for resource, amount in sorted(node.resources.items()):
        if not resource.startswith(DEVICE_RESOURCE_PREFIX):
            continue
        name = resource.removeprefix(DEVICE_RESOURCE_PREFIX)
        match = _DEVICE.match(name)
        if match is None:
            raise ConfigError(
                f'Ray node {node.label} declares resource "{resource}", and localmoa knows no '
                f'device "{name}"; name devices gpuN (the GPU llama.cpp numbers N), ram or '
                f"unified, e.g. ray start --resources='{{\"{DEVICE_RESOURCE_PREFIX}gpu0\": 22528}}'"
            )
        kind: DeviceKind = "gpu" if match["index"] else "cpu" if match["ram"] else "unified"
        devices.append(
            Device(
                name=name,
                memory=int(amount) << 20,
                kind=kind,
                index=int(match["index"]) if match["index"] else None,
                detail=f"declared by Ray resource {resource}",
            )
        )
    return devices


def cluster_devices(settings: Settings) -> list[Device]:
    """Every alive node's devices, named ``LABEL/DEVICE`` with ``node`` set: the bins a run on
    the cluster is planned on (joins the cluster first: :func:`connect`).

    One inventory actor per node answers for it (module docstring). A node whose inventory
    does not answer within ``node_timeout`` is left out, with a warning; one that cannot run
    it (localmoa not installed there) is an error naming it. With an address off this
    machine, a node that does not enforce Ray's token authentication is refused: the
    cluster would run anyone's code.
    """
    connect(settings)
    cluster = settings.cluster
    nodes = alive_nodes()
    if not nodes:
        raise ServerUnavailableError(
            f"settings.cluster.address: the Ray cluster at {cluster.address} has no alive node"
        )
    declared = {node.id: declared_devices(node) for node in nodes}
    asked = {node.id: inventory(node.id).report.remote(not declared[node.id]) for node in nodes}
    ready, _ = ray.wait(list(asked.values()), num_returns=len(asked), timeout=cluster.node_timeout)
    answered = set(ready)
    devices: list[Device] = []
    for node in nodes:
        ref = asked[node.id]
        if ref not in answered:
            log.warning(
                "Ray node %s did not answer within %s s (settings.cluster.node_timeout); "
                "planning without it",
                node.label,
                cluster.node_timeout,
            )
            continue
        report = _report(node, ref)
        check_node_auth(cluster, node, report.auth)
        found = [
            device.model_copy(update={"name": f"{node.label}/{device.name}", "node": node.id})
            for device in declared[node.id] or report.devices
        ]
        _session.devices[node.id] = found
        devices.extend(found)
    if not devices:
        raise ServerUnavailableError(
            f"settings.cluster.address: no node of the Ray cluster at {cluster.address} "
            f"answered within {cluster.node_timeout} s (settings.cluster.node_timeout)"
        )
    return devices


def _report(node: Node, ref: Any) -> NodeReport:
    try:
        report: NodeReport = ray.get(ref)
    except ray.exceptions.RayError as exc:
        raise ConfigError(
            f"Ray node {node.label} ({node.address}) cannot run localmoa's inventory: "
            f"{reason(exc)}; install localmoa (pip install 'localmoa[ray,llamacpp]') on "
            "every node, with the same Python and Ray versions as this machine"
        ) from exc
    return report


def check_node_auth(cluster: ClusterSettings, node: Node, auth: str) -> None:
    """UsageRefused when ``node`` runs without token authentication (``auth``, as its
    inventory reports Ray's mode there) and the cluster is reached off this machine."""
    assert cluster.address is not None
    host, _ = split_address(cluster.address)
    if auth != "token" and not is_loopback(host):
        raise UsageRefused(
            f"settings.cluster.address: Ray node {node.label} ({node.address}) runs without "
            f'token authentication (RAY_AUTH_MODE is "{auth}" there), so anyone who '
            "reaches its ports can run code on it; restart every node with RAY_AUTH_MODE=token "
            "and the cluster's token (README: several machines)"
        )


def node_devices(node_id: str) -> list[str]:
    """The names of node ``node_id``'s devices as last reported."""
    return [device.name for device in _session.devices.get(node_id, [])]


def node_path(cluster: ClusterSettings, node: Node, path: Path) -> Path:
    """Where ``node`` reads the file this machine calls ``path`` (module docstring)."""
    keys = (node.label, node.name, node.address)
    folder = next((cluster.models_dir[k] for k in keys if k in cluster.models_dir), None)
    return path if folder is None else Path(PurePath(folder) / path.name)


def _table() -> list[dict[str, Any]]:
    """Ray's node table (one GCS request; blocks)."""
    entries: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return entries


def _alive(node_id: str) -> bool:
    return any(e.get("NodeID") == node_id and e.get("Alive") for e in _table())


async def node_gone(node_id: str, timeout: float) -> bool:
    """Whether node ``node_id`` is gone, once something on it failed: True as soon as Ray's
    node table says it is dead, False as soon as its inventory answers a ping (the node is
    there: what failed was the process), and True when neither happens within ``timeout``
    seconds (a node nobody reaches is as good as gone for the run)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if not await asyncio.to_thread(_alive, node_id):
            return True
        left = deadline - loop.time()
        try:
            await asyncio.wait_for(inventory(node_id).ping.remote(), timeout=min(PING_S, left))
        except ray.exceptions.RayActorError:
            _session.inventories.pop(node_id, None)  # dead: the next ping starts another
        except (ray.exceptions.RayError, TimeoutError):
            pass
        else:
            return False
        if loop.time() >= deadline:
            return True
        await asyncio.sleep(POLL_S)  # a bounded poll of the node table, not a wait for luck


def reason(exc: BaseException) -> str:
    """One line of ``exc``'s message: Ray's own sentence saying why ("The actor died because
    its node has died.") where there is one, else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return next((line for line in lines if "because" in line), lines[0])
