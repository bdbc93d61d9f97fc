"""llama.cpp models on the nodes of a Ray cluster: the ``llamacpp`` backend when
``[settings.cluster] engine = "ray"``.

Each loaded model is one Ray actor (:class:`~localmoa.cluster.actors.ModelHost`) pinned to the
node its placement names, holding a :class:`~localmoa.backends.llamacpp.LlamaCppBackend` that
loads the model there with the placement (``main_gpu``, ``tensor_split``: llama.cpp's own
placement on that node) and the GGUF path as that node reads it
(:func:`~localmoa.cluster.ray_engine.node_path`). Answers stream back through a Ray streaming
generator: each delta crosses as soon as the node makes it. Nothing here blocks the event loop
on Ray: object refs are awaited, the generator is iterated asynchronously, and the node table
is read in a thread.

**When a node dies.** A call or a load whose actor's node is gone raises
:class:`~localmoa.errors.DeviceLost` naming the placement's devices, and :meth:`lost` then
names every device of that node, so the engine plans the rest of the run without them. Every
model loaded on that node is no longer loaded (:meth:`loaded`), and a call to one raises
DeviceLost too, until it is loaded again elsewhere. Which
failures are the node's is decided by :func:`~localmoa.cluster.ray_engine.node_gone`: Ray's node
table says so, or the node's inventory stops answering; an actor that died on a node that still
answers (a crash, Ray's out-of-memory killer) is a plain BackendError.

**Unloading** asks the host to free the model (llama.cpp's close), then kills the actor
(``ray.kill``) and waits, through the node's inventory, until its process has ended: a CUDA
context's memory comes back only then.

**Files.** A footprint or a token count reads the GGUF file here when it is readable here,
else on the first node (by label) that can read it, through that node's inventory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from localmoa.backends.base import Backend, ChatDelta, ChatMessage, ChatRequest
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.cluster.actors import Loaded, ModelHost, Relayed
from localmoa.cluster.ray_engine import (
    Node,
    alive_nodes,
    connect,
    inventory,
    label_of,
    node_devices,
    node_gone,
    node_path,
    pinned,
    reason,
)
from localmoa.errors import BackendError, DeviceLost, LocalMoaError, ModelFileError
from localmoa.footprint.estimate import Footprint
from localmoa.hardware import Placement

if TYPE_CHECKING:
    from localmoa.config import Settings

__all__ = ["RayLlamaCppBackend"]

log = logging.getLogger(__name__)

_ModelActor: Any = ray.remote(ModelHost)

_NODE_FAILURES = (
    ray.exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray.exceptions.ActorUnschedulableError,  # pinned to a node that is no more
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,  # OwnerDiedError and the like: an answer lost with its node
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.LocalRayletDiedError,
)
"""Ray's errors that may mean the node went away (decided by node_gone)."""


@dataclass
class _Host:
    """A model's actor, where it is, and what its load reported."""

    actor: Any
    placement: Placement
    node: str
    loaded: Loaded | None = None


class RayLlamaCppBackend(Backend):
    """GGUF models run by llama.cpp in Ray actors on the cluster's nodes, as the plan placed
    them (module docstring). ``make`` builds the backend inside each actor (llama.cpp; tests
    give the fake)."""

    places_models = True
    supports = LlamaCppBackend.supports

    def __init__(self, settings: Settings, *, make: Callable[[], Backend] = LlamaCppBackend):
        self._settings = settings
        self._make = make
        self._here = make()
        """The same backend in this process, for files readable here (headers, tokens)."""
        self._hosts: dict[str, _Host] = {}
        self._gone: dict[str, _Host] = {}
        """Models that were loaded on a node now gone: no longer loaded, and a call to one
        raises DeviceLost (not "not loaded"), until it is loaded again."""
        self._lost: set[str] = set()
        self._lost_nodes: set[str] = set()

    # -- files ------------------------------------------------------------------------------

    async def footprint(self, name: str, config: Any) -> Footprint:
        if getattr(config, "memory", None) is not None:
            return Footprint.override(int(config.memory))
        if await self._readable_here(config):
            return await self._here.footprint(name, config)
        node = await self._reader(name, config)
        asked = inventory(node.id).footprint.remote(name, self._on(config, node))
        found: Footprint = await self._answer(name, asked)
        return found

    async def count_tokens(self, name: str, config: Any, messages: list[ChatMessage]) -> int:
        if await self._readable_here(config):
            return await self._here.count_tokens(name, config, messages)
        node = await self._reader(name, config)
        asked = inventory(node.id).count_tokens.remote(name, self._on(config, node), messages)
        tokens: int = await self._answer(name, asked)
        return tokens

    async def _readable_here(self, config: Any) -> bool:
        path = getattr(config, "path", None)
        return path is None or await asyncio.to_thread(os.access, path, os.R_OK)

    async def _reader(self, name: str, config: Any) -> Node:
        """The first node, by label, that can read model ``name``'s file; ModelFileError
        naming where it was looked for when none can."""
        connect(self._settings)
        nodes = await asyncio.to_thread(alive_nodes)
        paths = [self._on(config, node).path for node in nodes]
        asked = [inventory(n.id).readable.remote(str(p)) for n, p in zip(nodes, paths, strict=True)]
        found = await asyncio.gather(*asked, return_exceptions=True)
        for node, readable in zip(nodes, found, strict=True):
            if readable is True:
                return node
        tried = ", ".join(f"{node.label}: {path}" for node, path in zip(nodes, paths, strict=True))
        raise ModelFileError(
            f"{config.path}: not readable here nor on any node of the Ray cluster (tried "
            f"{tried}) (model {name}); copy the file there, or say where each node keeps it "
            "in [settings.cluster] models_dir"
        )

    def _on(self, config: Any, node: Node) -> Any:
        """``config`` as node ``node`` reads it: its ``path`` resolved there."""
        path = getattr(config, "path", None)
        if not isinstance(path, Path):
            return config
        return config.model_copy(update={"path": node_path(self._settings.cluster, node, path)})

    # -- residency --------------------------------------------------------------------------

    async def load(self, name: str, config: Any, placement: Placement | None = None) -> None:
        if name in self._hosts:
            raise BackendError(name, "already loaded")
        self._gone.pop(name, None)
        node_id = placement.device.node if placement is not None else None
        if placement is None or node_id is None:
            raise BackendError(
                name,
                "the Ray engine runs only models placed on a cluster node; plan the run on "
                "the cluster's devices (localmoa.cluster.ray_engine.cluster_devices)",
            )
        spans = {device.node for device in placement.devices}
        if len(spans) > 1:
            raise BackendError(
                name,
                f"placed across devices of {len(spans)} nodes ({', '.join(placement.names)}); "
                "llama.cpp splits a model only among one machine's devices",
            )
        connect(self._settings)
        node = next((n for n in await asyncio.to_thread(alive_nodes) if n.id == node_id), None)
        if node is None:
            gone = ray.exceptions.ActorUnschedulableError(f"node {node_id} is not alive")
            raise await self._failure(name, gone, _Host(None, placement, node_id))
        host = _Host(_ModelActor.options(**pinned(node_id)).remote(self._make), placement, node_id)
        try:
            host.loaded = await host.actor.load.remote(name, self._on(config, node), placement)
        except BaseException as exc:
            with contextlib.suppress(Exception):  # its process goes, and what it held with it
                ray.kill(host.actor)
            if isinstance(exc, Exception):
                raise await self._failure(name, exc, host) from exc
            raise
        self._hosts[name] = host

    async def unload(self, name: str) -> None:
        self._gone.pop(name, None)  # its memory went with its node
        host = self._hosts.pop(name, None)
        if host is None:
            return
        timeout = self._settings.cluster.node_timeout
        try:  # llama.cpp's own close first: the model's buffers, freed in order
            await asyncio.wait_for(host.actor.unload.remote(name), timeout)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            log.debug("model %s: unload on node %s: %s", name, label_of(host.node), exc)
        ray.kill(host.actor)
        pid = host.loaded.pid if host.loaded else None
        if pid is None:
            return
        try:
            ended = await asyncio.wait_for(
                inventory(host.node).wait_exit.remote(pid, timeout), timeout * 2
            )
        except (ray.exceptions.RayError, TimeoutError):
            ended = await node_gone(host.node, timeout)  # no inventory: gone with its node?
        if not ended:
            raise BackendError(
                name,
                f"its process (pid {pid}) on node {label_of(host.node)} did not end within "
                f"{timeout} s of being killed; its memory may still be held there",
            )

    # -- calls ------------------------------------------------------------------------------

    async def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        host = self._host(name)
        self.refuse_unsupported(name, request)
        async for delta in self._stream(name, host, host.actor.chat.remote(name, request)):
            yield delta

    async def chat_samples(
        self, name: str, requests: Sequence[ChatRequest], parallel: int
    ) -> AsyncIterator[tuple[int, ChatDelta]]:
        """The samples decoded together on the node, as :class:`LlamaCppBackend` does here."""
        host = self._host(name)
        for request in requests:
            self.refuse_unsupported(name, request)
        pieces = host.actor.chat_samples.remote(name, list(requests), parallel)
        async for piece in self._stream(name, host, pieces):
            yield piece

    async def _stream(self, name: str, host: _Host, stream: Any) -> AsyncIterator[Any]:
        """What a Ray streaming generator yields, each item as soon as the node yields it;
        closing this early cancels the generator on the node (which stops generating)."""
        ended = False
        try:
            async for ref in stream:
                yield await ref
            ended = True
        except ray.exceptions.RayError as exc:
            ended = True
            raise await self._failure(name, exc, host) from exc
        finally:
            if not ended:
                with contextlib.suppress(Exception):
                    ray.cancel(stream)

    def _host(self, name: str) -> _Host:
        host = self._hosts.get(name)
        if host is not None:
            return host
        gone = self._gone.get(name)
        if gone is not None:
            raise DeviceLost(name, gone.placement.names, f"node {label_of(gone.node)} is gone")
        raise BackendError(name, "called while not loaded")

    async def _answer(self, name: str, ref: Any) -> Any:
        try:
            return await ref
        except ray.exceptions.RayError as exc:
            raise await self._failure(name, exc) from exc

    async def _failure(self, name: str, exc: Exception, host: _Host | None = None) -> Exception:
        """``exc``, raised by Ray for model ``name``, as localmoa's error: the node's own error
        as it was raised there, DeviceLost when the node is gone, else a BackendError."""
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Relayed):
            return cause.rebuild()
        if isinstance(exc, LocalMoaError):
            return exc
        if host is None:
            return BackendError(name, f"the Ray cluster failed: {reason(exc)}")
        label = label_of(host.node)
        if isinstance(exc, _NODE_FAILURES):
            timeout = self._settings.cluster.node_timeout
            if host.node in self._lost_nodes or await node_gone(host.node, timeout):
                self._node_lost(host)
                return DeviceLost(
                    name, host.placement.names, f"node {label} is gone: {reason(exc)}"
                )
        if isinstance(cause, Exception):  # raised by the node's code: say what it was
            return BackendError(name, f"failed on node {label}: {type(cause).__name__}: {cause}")
        return BackendError(name, f"failed on node {label}: {reason(exc)}")

    def _node_lost(self, host: _Host) -> None:
        """``host``'s node is gone: its devices are lost, and every model on it with them."""
        self._lost_nodes.add(host.node)
        self._lost.update(host.placement.names, node_devices(host.node))
        for name, other in list(self._hosts.items()):
            if other.node == host.node:
                del self._hosts[name]
                self._gone[name] = other
                with contextlib.suppress(Exception):
                    ray.kill(other.actor)

    # -- books ------------------------------------------------------------------------------

    def resident_bytes(self, name: str) -> int | None:
        host = self._hosts.get(name)
        return host.loaded.resident if host and host.loaded else None

    def load_peak_bytes(self, name: str) -> int | None:
        host = self._hosts.get(name)
        return host.loaded.peak if host and host.loaded else None

    def loaded(self) -> list[str]:
        return list(self._hosts)

    def lost(self) -> frozenset[str]:
        return frozenset(self._lost)

    def host_of(self, name: str) -> Loaded | None:
        """Where loaded model ``name`` runs, as its actor reported it: the Ray node id (for
        records: ``node``) and its process there."""
        host = self._hosts.get(name)
        return host.loaded if host else None
