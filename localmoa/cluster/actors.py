"""What runs on the cluster's nodes: an inventory per node, and a host per placed model.

Both are plain classes that :mod:`localmoa.cluster.ray_engine` turns into Ray actors, pinned
to their node (``NodeAffinitySchedulingStrategy(node, soft=False)``: never moved elsewhere),
and both ask Ray for no CPU (``num_cpus=0``): Ray's resources are bookkeeping only, and the
planner, not Ray, decides what fits where. Ray pickles them by reference, so every node imports
this module: every node needs localmoa installed (with the ``llamacpp`` extra), with the same
Python and Ray versions as this machine.

- :class:`Inventory` (one per node, tiny) reads the node's devices with
  :func:`localmoa.hardware.detect_devices`, says whether the node enforces Ray's token
  authentication, reads GGUF headers and tokenizers that exist only there, answers pings
  (a node whose inventory answers is alive), and watches a model's process end after an
  unload (a CUDA context's memory returns only when its process exits).
- :class:`ModelHost` (one per loaded model) holds the model in the backend it was built with
  (:class:`~localmoa.backends.llamacpp.LlamaCppBackend` in production) and streams the
  answer back one delta at a time, as Ray streaming generators do: each ``yield`` reaches the
  caller while the next token is being made.

Errors: localmoa's errors are relayed as :class:`Relayed`, because :class:`BackendError`'s
constructor takes (model, message) and Python rebuilds an unpickled exception from its one
formatted message only, which would fail on the caller's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from localmoa.backends.base import Backend, ChatDelta, ChatMessage, ChatRequest
from localmoa.errors import BackendError, LocalMoaError
from localmoa.footprint.estimate import Footprint
from localmoa.hardware import Device, Placement, detect_devices, pin_cuda_order

__all__ = ["Inventory", "Loaded", "ModelHost", "NodeReport", "Relayed"]

EXIT_POLL_S = 0.02
"""How often :meth:`Inventory.wait_exit` looks at a process that should be ending."""


class Relayed(Exception):
    """A localmoa error raised on a node, in a form Ray's pickling carries back intact."""

    def __init__(self, kind: type[LocalMoaError], text: str, model: str | None) -> None:
        super().__init__(kind, text, model)
        self.kind, self.text, self.model = kind, text, model

    @classmethod
    def of(cls, error: LocalMoaError) -> Relayed:
        return cls(type(error), str(error), getattr(error, "model", None))

    def rebuild(self) -> LocalMoaError:
        """The error as it was raised on the node (its message, its class, its model)."""
        if issubclass(self.kind, BackendError):
            error: LocalMoaError = self.kind.__new__(self.kind)
            Exception.__init__(error, self.text)
            error.model = self.model or ""  # type: ignore[attr-defined]
            return error
        try:
            return self.kind(self.text)
        except TypeError:  # a constructor of another shape: keep the words, lose the class
            return LocalMoaError(self.text)


@contextlib.contextmanager
def _relayed() -> Iterator[None]:
    try:
        yield
    except LocalMoaError as error:
        raise Relayed.of(error) from None


@dataclass(frozen=True)
class NodeReport:
    """What a node's inventory says about it."""

    auth: str
    """Ray's authentication mode on the node: "token" or "disabled"."""
    devices: list[Device]
    """Its devices as :func:`localmoa.hardware.detect_devices` reads them (names unqualified),
    or none when the caller declared them."""


@dataclass(frozen=True)
class Loaded:
    """What a model's host says once it is loaded."""

    node: str
    """The Ray node id it runs on."""
    pid: int
    resident: int | None
    peak: int | None


def auth_mode() -> str:
    """This Ray process's authentication mode, as Ray itself decides it ("token" or
    "disabled"); the ``RAY_AUTH_MODE`` variable where Ray does not say."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:
        return "token" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else "disabled"
    return "token" if is_token_auth_enabled() else "disabled"


class Inventory:
    """One per node: its devices, its files, its liveness."""

    def __init__(self, make: Callable[[], Backend]) -> None:
        self._make = make
        self._backend: Backend | None = None

    def _files(self) -> Backend:
        """The backend that reads model files here (headers, tokenizers), made on first use."""
        if self._backend is None:
            self._backend = self._make()
        return self._backend

    async def report(self, detect: bool) -> NodeReport:
        """The node's authentication mode, and its devices when ``detect``."""
        devices = await asyncio.to_thread(detect_devices) if detect else []
        return NodeReport(auth_mode(), devices)

    async def ping(self) -> int:
        return os.getpid()

    async def readable(self, path: str) -> bool:
        return await asyncio.to_thread(os.access, path, os.R_OK)

    async def footprint(self, name: str, config: Any) -> Footprint:
        with _relayed():
            return await self._files().footprint(name, config)

    async def count_tokens(self, name: str, config: Any, messages: list[ChatMessage]) -> int:
        with _relayed():
            return await self._files().count_tokens(name, config, messages)

    async def wait_exit(self, pid: int, timeout: float) -> bool:
        """True once process ``pid`` of this node has ended (a zombie has: its memory is
        freed, only its exit status waits for the raylet); False after ``timeout``."""
        deadline = time.monotonic() + timeout
        while _running(pid):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(EXIT_POLL_S)
        return True


async def _close(stream: AsyncIterator[Any]) -> None:
    """Close a backend's stream now: one the caller cancelled (Ray cancels the task, or the
    caller stopped reading) then stops generating within a token, rather than whenever the
    garbage collector finalizes it."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        await close()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class ModelHost:
    """One per placed model: the model loaded in ``make()``'s backend on this node."""

    def __init__(self, make: Callable[[], Backend]) -> None:
        pin_cuda_order()  # before llama.cpp starts CUDA: "gpu1" is NVML's (PCI) GPU 1
        self.backend = make()

    async def load(self, name: str, config: Any, placement: Placement) -> Loaded:
        import ray

        with _relayed():
            await self.backend.load(name, config, placement)
        return Loaded(
            node=ray.get_runtime_context().get_node_id(),
            pid=os.getpid(),
            resident=self.backend.resident_bytes(name),
            peak=self.backend.load_peak_bytes(name),
        )

    async def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        deltas = self.backend.chat(name, request)
        try:
            with _relayed():
                async for delta in deltas:
                    yield delta
        finally:
            await _close(deltas)

    async def chat_samples(
        self, name: str, requests: Sequence[ChatRequest], parallel: int
    ) -> AsyncIterator[tuple[int, ChatDelta]]:
        pieces = self.backend.chat_samples(name, requests, parallel)
        try:
            with _relayed():
                async for piece in pieces:
                    yield piece
        finally:
            await _close(pieces)

    async def unload(self, name: str) -> None:
        with _relayed():
            await self.backend.unload(name)

    async def ping(self) -> int:
        return os.getpid()
