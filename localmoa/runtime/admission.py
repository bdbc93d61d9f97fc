"""Who decides what is loaded while a plan runs: the plan alone, or a pool shared by runs.

``localmoa run`` has one run and one plan, and the plan is exact: :class:`PlanResidency` loads
and unloads what each wave says, and unloads everything at the end.

``localmoa serve`` has many runs at once on one machine, so one :class:`ModelPool` owns the
hardware. Each run asks it, wave by wave, for the models the wave needs (:class:`PoolResidency`).
The pool:

- never holds more than the budget: before a load it evicts idle models, least recently used
  first, and if pinned models of other runs leave too little room it waits for them;
- never loads a model twice: a model loaded for one run serves every run that needs it (calls
  to it are serialized by the executor's per-model lock);
- serves runs in arrival order: a waiting run with an earlier ticket goes first, and nobody
  overtakes a waiting run (no starvation);
- keeps models loaded after a run while nothing else needs the memory, so the next request
  reuses them (its plan starts from what is resident).

A run pins only the wave it is in and releases it before asking for the next, so no run holds
memory while it waits: the pool cannot deadlock. Loads are serialized, as Ollama does.

A load that fails, for whatever reason, is an outcome, not an exception (:func:`timed_load`):
the executor fails that model's agents and the run goes on on quorum. The pool tries such a
model again for the next wave that needs it (the file may be back, memory may have freed).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from localmoa.backends.base import Backend
from localmoa.errors import BackendError, LocalMoaError
from localmoa.planning.fewest_loads import Wave

__all__ = [
    "LoadOutcome",
    "ModelPool",
    "PlanResidency",
    "PoolResidency",
    "Residency",
    "still_loaded",
    "timed_load",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOutcome:
    """One load a wave needed: how long it took and what it measured, or why it failed."""

    model: str
    seconds: float
    measured: int | None
    error: str | None = None


class Residency(ABC):
    """Makes each wave's models resident; the executor runs the calls in between."""

    @abstractmethod
    async def enter(self, wave: Wave) -> tuple[list[str], list[LoadOutcome]]:
        """Make ``wave.resident`` loaded; returns (models unloaded, loads done)."""

    @abstractmethod
    async def leave(self, wave: Wave) -> None:
        """The wave's calls are done."""

    @abstractmethod
    def resident(self) -> list[str]:
        """Models loaded now (a re-plan starts from them)."""

    @abstractmethod
    async def finish(self) -> list[str]:
        """The run is over, however it ended; returns the models unloaded."""


async def timed_load(backend: Backend, model: str, config: Any) -> LoadOutcome:
    """Load ``model``, timing it; any failure becomes the outcome's error.

    A failed load fails that model's agents only, and the run goes on on quorum: a file that
    vanished since planning (ModelFileError), out of memory or a server's refusal
    (BackendError), or a runtime's own exception. Only cancellation (Ctrl-C, a client gone)
    propagates: it is not a failure of this model but the end of the run.
    """
    began = time.perf_counter()
    try:
        await backend.load(model, config)
    except Exception as exc:
        return LoadOutcome(model, time.perf_counter() - began, None, _load_error(model, exc))
    return LoadOutcome(model, time.perf_counter() - began, backend.resident_bytes(model))


def _load_error(model: str, exc: Exception) -> str:
    """Why ``model`` could not load, for its agents' records: the model named once."""
    if isinstance(exc, BackendError):
        return str(exc)  # already 'model "NAME": ...'
    if isinstance(exc, LocalMoaError):
        return f'model "{model}" could not load: {exc}'
    log.debug("loading %s failed", model, exc_info=True)
    return f'model "{model}" could not load: {type(exc).__name__}: {exc}'


def still_loaded(backend: Backend, model: str) -> bool:
    """After a load was cancelled: does the backend hold the model anyway (a load that
    completed before the cancellation reached it)? Then the caller must unload it."""
    return model in backend.loaded()


class PlanResidency(Residency):
    """One run, one plan: load and unload exactly as the waves say."""

    def __init__(self, models: Mapping[str, Any], backend: Callable[[str], Backend]) -> None:
        self.models = models
        self.backend = backend
        self._resident: list[str] = []

    async def enter(self, wave: Wave) -> tuple[list[str], list[LoadOutcome]]:
        unloaded = [m for m in wave.unload if m in self._resident]
        for model in unloaded:
            self._resident.remove(model)
            await self.backend(model).unload(model)
        outcomes = []
        for model in wave.load:
            backend = self.backend(model)
            try:
                outcome = await timed_load(backend, model, self.models[model])
            except BaseException:
                if still_loaded(backend, model):
                    self._resident.append(model)  # finish() unloads it
                raise
            if outcome.error is None:
                self._resident.append(model)
            outcomes.append(outcome)
        return unloaded, outcomes

    async def leave(self, wave: Wave) -> None:
        return None

    def resident(self) -> list[str]:
        return list(self._resident)

    async def finish(self) -> list[str]:
        unloaded = []
        for model in reversed(self._resident):
            try:
                await self.backend(model).unload(model)
                unloaded.append(model)
            except LocalMoaError as exc:
                log.warning("unloading %s failed: %s", model, exc)
        self._resident.clear()
        return unloaded


class ModelPool:
    """The models loaded on this machine, shared by concurrent runs (see module docstring)."""

    def __init__(
        self,
        models: Mapping[str, Any],
        backends: Mapping[str, Backend],
        sizes: Mapping[str, int],
        budget: int,
    ) -> None:
        self.models = models
        self.backends = backends
        self.sizes = dict(sizes)
        self.budget = budget
        self.loaded: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self.pins: Counter[str] = Counter()
        self.peak_bytes = 0
        self.loads = 0
        self._changed = asyncio.Condition()
        self._waiting: list[tuple[int, int]] = []
        self._order = itertools.count()

    def backend(self, model: str) -> Backend:
        return self.backends[self.models[model].backend]

    def resident(self) -> list[str]:
        return list(self.loaded)

    def resident_bytes(self) -> int:
        return sum(self.loaded.values())

    async def acquire(self, ticket: int, need: list[str]) -> tuple[list[str], list[LoadOutcome]]:
        """Pin ``need`` loaded for run ``ticket``; waits its turn and for the room."""
        me = (ticket, next(self._order))
        async with self._changed:
            heapq.heappush(self._waiting, me)
            try:
                await self._changed.wait_for(lambda: self._waiting[0] == me and self._room(need))
            finally:
                self._waiting.remove(me)
                heapq.heapify(self._waiting)
                self._changed.notify_all()
            pinned = list(need)
            self.pins.update(pinned)  # pinned before anything moves: nobody evicts them now
            try:
                unloaded = await self._evict_for(need)
                outcomes = []
                for model in need:
                    if model in self.loaded:
                        self.loaded.move_to_end(model)
                        continue
                    backend = self.backend(model)
                    try:
                        outcome = await timed_load(backend, model, self.models[model])
                    except BaseException:
                        if still_loaded(backend, model):
                            self.loaded[model] = self.sizes[model]  # close() unloads it
                        raise
                    outcomes.append(outcome)
                    if outcome.error is not None:
                        pinned.remove(model)
                        self.pins[model] -= 1
                        continue
                    self.loads += 1
                    measured = outcome.measured if self.backend(model).measures_footprint else None
                    self.loaded[model] = measured or self.sizes[model]
                    self.peak_bytes = max(self.peak_bytes, self.resident_bytes())
            except BaseException:
                self.pins.subtract(pinned)
                raise
            finally:
                self.pins = +self.pins  # drop zero counts
                self._changed.notify_all()
            return unloaded, outcomes

    async def release(self, need: list[str]) -> None:
        async with self._changed:
            self.pins.subtract(m for m in need if self.pins[m] > 0)
            self.pins = +self.pins
            self._changed.notify_all()

    async def close(self) -> None:
        """Unload everything (server shutdown)."""
        async with self._changed:
            for model in list(self.loaded):
                await self._unload(model)

    def _room(self, need: list[str]) -> bool:
        """Would ``need`` fit beside every model another run has pinned?"""
        keep = set(need) | {m for m, n in self.pins.items() if n > 0}
        return sum(self.loaded.get(m, self.sizes[m]) for m in keep) <= self.budget

    async def _evict_for(self, need: list[str]) -> list[str]:
        wanted = set(need)
        total = sum(self.loaded.values()) + sum(self.sizes[m] for m in wanted - set(self.loaded))
        evicted = []
        for model in list(self.loaded):  # least recently used first
            if total <= self.budget:
                break
            if model in wanted or self.pins[model] > 0:
                continue
            total -= self.loaded[model]
            await self._unload(model)
            evicted.append(model)
        return evicted

    async def _unload(self, model: str) -> None:
        self.loaded.pop(model, None)
        try:
            await self.backend(model).unload(model)
        except LocalMoaError as exc:
            log.warning("unloading %s failed: %s", model, exc)


class PoolResidency(Residency):
    """One run's view of a shared pool: pins each wave's models while the wave runs."""

    def __init__(self, pool: ModelPool, ticket: int) -> None:
        self.pool = pool
        self.ticket = ticket
        self._held: list[str] = []

    async def enter(self, wave: Wave) -> tuple[list[str], list[LoadOutcome]]:
        need = list(wave.resident)
        unloaded, outcomes = await self.pool.acquire(self.ticket, need)
        failed = {o.model for o in outcomes if o.error is not None}
        self._held = [m for m in need if m not in failed]
        return unloaded, outcomes

    async def leave(self, wave: Wave) -> None:
        held, self._held = self._held, []
        await self.pool.release(held)

    def resident(self) -> list[str]:
        return self.pool.resident()

    async def finish(self) -> list[str]:
        held, self._held = self._held, []  # non-empty when the run ended mid-wave
        if held:
            await self.pool.release(held)
        return []
