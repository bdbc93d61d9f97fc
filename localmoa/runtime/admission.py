"""The memory seam: the engine asks, per model, for it to be resident, and says when it is done.

The engine (:mod:`localmoa.runtime.engine`) follows a plan; what it may load *when* is an
:class:`Admission`'s decision, asked one model at a time:

- :meth:`~Admission.admit` before a model's stay: wait for room (or make it), load the model
  unless it is resident already, and hold it for this run. It returns what it unloaded to make
  room and the load's outcome;
- :meth:`~Admission.using` around each call on a held model: it is loaded while the call runs;
- :meth:`~Admission.release` when the stay's calls are done: this run no longer needs it;
- :meth:`~Admission.resident` for a re-plan, :meth:`~Admission.finish` on every exit.

Two implementations. :class:`BudgetAdmission` is ``localmoa run``'s: one run owns the budget, a
load starts once the bytes loaded plus its own fit, a released model is unloaded at once, and
:meth:`~Admission.finish` unloads everything. ``localmoa serve`` shares one pool among its
requests (:class:`localmoa.serve.pool.ModelPool`): models stay loaded between requests, and room
is made by evicting idle ones.

A load that fails, for whatever reason, is an outcome, not an exception (:func:`timed_load`):
the engine fails that model's agents and the run goes on on quorum. A load that worked says how
long it took, what the backend measures the model holds, and what the load really took where
the backend can tell (``Backend.load_peak_bytes``: this process's growth for llama.cpp in process,
Ollama's ``/api/ps`` size).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any

from localmoa.backends.base import Backend
from localmoa.errors import BackendError, LocalMoaError
from localmoa.hardware import Device, Placement

__all__ = [
    "Admission",
    "Admitted",
    "BudgetAdmission",
    "Changes",
    "LoadOutcome",
    "overridden",
    "still_loaded",
    "timed_load",
    "too_large",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOutcome:
    """One load: how long it took and what it measured, or why it failed."""

    model: str
    seconds: float
    measured: int | None
    error: str | None = None
    peak: int | None = None
    """Memory the load really took, where the backend can tell (``Backend.load_peak_bytes``)."""


@dataclass(frozen=True)
class Admitted:
    """What making a model resident for a run took."""

    unloaded: list[str] = field(default_factory=list)
    """Models unloaded to make room, in the order they went."""
    outcome: LoadOutcome | None = None
    """The load; None when the model was resident already."""


class Admission(ABC):
    """Decides when each model a run needs is loaded, and when it leaves (see module docs)."""

    @abstractmethod
    async def admit(self, model: str, placement: Placement | None = None) -> Admitted:
        """Hold ``model`` resident for this run, loading it unless it is already; where the
        plan placed it (None: the backend places it)."""

    @abstractmethod
    def using(self, model: str) -> AbstractAsyncContextManager[Admitted]:
        """Keep held ``model`` loaded while one call runs on it; loads it again first if it was
        made to leave meanwhile (the outcome says so, and whether that load failed)."""

    @abstractmethod
    async def release(self, model: str) -> list[str]:
        """This run no longer needs ``model``; returns the models unloaded now."""

    @abstractmethod
    def resident(self) -> list[str]:
        """The models loaded now, that a re-plan may count on."""

    @abstractmethod
    async def finish(self) -> list[str]:
        """The run is over, however it ended; returns the models unloaded."""

    def where(self) -> dict[str, Placement]:
        """Where each resident model this admission placed is (a re-plan keeps it there)."""
        return {}

    def forget(self, model: str) -> None:  # noqa: B027 - most seams never lose a device
        """``model`` is gone with its device (a cluster node died): it holds nothing now, and
        there is nothing to unload."""


class Changes:
    """Wakes every waiter when shared state changes.

    asyncio runs one task at a time, so state read and written between two awaits needs no lock;
    only waiting for a condition does. A waiter checks its condition, and only if it is false
    waits for the next :meth:`notify`, with no await in between: no wake-up can be missed.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.next()

    async def next(self) -> None:
        """The next change; call it right after finding the state wanting."""
        await self._event.wait()


async def timed_load(
    backend: Backend, model: str, config: Any, placement: Placement | None = None
) -> LoadOutcome:
    """Load ``model``, timing it; any failure becomes the outcome's error.

    A failed load fails that model's agents only, and the run goes on on quorum: a file that
    vanished since planning (ModelFileError), out of memory or a server's refusal
    (BackendError), or a runtime's own exception. Only cancellation (Ctrl-C, a client gone)
    propagates: it is not a failure of this model but the end of the run.
    """
    began = time.perf_counter()
    try:
        await backend.load(model, config, placement)
    except Exception as exc:
        return LoadOutcome(model, time.perf_counter() - began, None, _load_error(model, exc))
    seconds = time.perf_counter() - began
    peak = backend.load_peak_bytes(model)
    return LoadOutcome(model, seconds, backend.resident_bytes(model), peak=peak)


def _load_error(model: str, exc: Exception) -> str:
    """Why ``model`` could not load, for its agents' records: the model named once."""
    if isinstance(exc, BackendError):
        return str(exc)  # already 'model "NAME": ...'
    if isinstance(exc, LocalMoaError):
        return f'model "{model}" could not load: {exc}'
    log.debug("loading %s failed", model, exc_info=True)
    return f'model "{model}" could not load: {type(exc).__name__}: {exc}'


def overridden(table: Any) -> bool:
    """Does the model's table set the optional ``memory`` override (Ollama's, llama.cpp's)?
    Then the plan keeps that figure whatever a backend measures; a table whose ``memory`` is
    its size (the fake's) is not an override."""
    field = getattr(type(table), "model_fields", {}).get("memory")
    return field is not None and not field.is_required() and table.memory is not None


def still_loaded(backend: Backend, model: str) -> bool:
    """After a load was cancelled: does the backend hold the model anyway (a load that
    completed before the cancellation reached it)? Then the caller must unload it."""
    return model in backend.loaded()


def too_large(model: str, size: int, budget: int) -> LoadOutcome:
    """The outcome of a load that could never fit: the model alone exceeds the budget (a
    measurement came out larger than the estimate the plan was made with)."""
    error = f'model "{model}" needs {size} bytes, more than the whole budget of {budget}'
    return LoadOutcome(model, 0.0, None, error)


class BudgetAdmission(Admission):
    """One run owns ``budget`` bytes (``localmoa run``), or each of several ``devices``' memory.

    A load starts once the bytes held plus its own fit (the engine asks in plan order, so loads
    happen in plan order); a released model is unloaded at once, so its memory lets the next
    load start while other models still compute. These are the semantics the cost model times
    (``localmoa.planning.timing.simulate_plan``). Held bytes are the plan's sizes, or what the
    backend measured once a model is loaded, when it measures whole footprints (Ollama).

    With several devices, a placed model's bytes count on its device (a split model's share on
    each), and its load waits for room there: no device is ever asked for more than its
    memory, whatever the others hold.
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        backend: Callable[[str], Backend],
        sizes: Mapping[str, int],
        budget: int,
        devices: Sequence[Device] = (),
    ) -> None:
        self.models = models
        self.backend = backend
        self.sizes = sizes
        self.budget = budget
        self.devices = {d.name: d.memory for d in devices}
        self.loaded: dict[str, int] = {}
        """Model -> the bytes it holds against the budget (reserved before its load starts)."""
        self.on: dict[str, dict[str, int]] = {}
        """Placed models -> device -> the bytes they hold there."""
        self.placements: dict[str, Placement] = {}
        """Where each placed model was loaded (the records' device and node)."""
        self.changes = Changes()

    def _shares(self, size: int, placement: Placement | None) -> dict[str, int]:
        if placement is None or not self.devices:
            return {}
        if placement.shares:
            scale = size / max(1, sum(placement.shares))  # a measurement rescales the split
            return {
                d.name: round(share * scale)
                for d, share in zip(placement.devices, placement.shares, strict=True)
            }
        return {placement.device.name: size}

    def _room(self, size: int, shares: Mapping[str, int]) -> bool:
        if sum(self.loaded.values()) + size > self.budget:
            return False
        return all(
            sum(on.get(device, 0) for on in self.on.values()) + share <= self.devices[device]
            for device, share in shares.items()
            if device in self.devices
        )

    async def admit(self, model: str, placement: Placement | None = None) -> Admitted:
        if model in self.loaded:
            return Admitted()
        size = self.sizes[model]
        shares = self._shares(size, placement)
        over = next((d for d, b in shares.items() if b > self.devices.get(d, b)), None)
        if size > self.budget or over is not None:
            room = self.budget if over is None else self.devices[over]
            return Admitted(outcome=too_large(model, size, room))
        await self.changes.wait_for(lambda: self._room(size, shares))
        self.loaded[model] = size  # reserved before the load starts
        if shares:
            self.on[model] = shares
        if placement is not None:
            self.placements[model] = placement
        backend = self.backend(model)
        try:
            outcome = await timed_load(backend, model, self.models[model], placement)
        except BaseException:  # cancelled mid-load: finish() frees only what is loaded
            if not still_loaded(backend, model):
                self._forget(model)
            raise
        if outcome.error is not None:
            self._forget(model)
        elif (
            outcome.measured is not None
            and backend.measures_footprint
            and not overridden(self.models[model])
        ):
            self.loaded[model] = outcome.measured
            if shares:
                self.on[model] = self._shares(outcome.measured, placement)
        return Admitted(outcome=outcome)

    @contextlib.asynccontextmanager
    async def _held(self, model: str) -> AsyncIterator[Admitted]:
        yield Admitted()  # a held model stays loaded until released: nothing to do

    def using(self, model: str) -> AbstractAsyncContextManager[Admitted]:
        return self._held(model)

    async def release(self, model: str) -> list[str]:
        if model not in self.loaded:
            return []
        try:
            await self.backend(model).unload(model)
        finally:
            self._forget(model)
        return [model]

    def resident(self) -> list[str]:
        return list(self.loaded)

    def where(self) -> dict[str, Placement]:
        return dict(self.placements)

    async def finish(self) -> list[str]:
        unloaded = []
        for model in list(self.loaded):
            try:
                unloaded += await self.release(model)
            except LocalMoaError as exc:
                log.warning("unloading %s failed: %s", model, exc)
        return unloaded

    def forget(self, model: str) -> None:
        self._forget(model)

    def _forget(self, model: str) -> None:
        self.loaded.pop(model, None)
        self.on.pop(model, None)
        self.placements.pop(model, None)
        self.changes.notify()
