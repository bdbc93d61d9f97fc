"""The models loaded on this machine, shared by the runs of ``localmoa serve``.

One :class:`ModelPool` owns the hardware for every request; each request's run asks it, model by
model, through its own :class:`PoolAdmission` (the engine's memory seam,
:class:`localmoa.runtime.admission.Admission`). The pool:

- never holds more than the budget: bytes loaded, being loaded and being unloaded are counted,
  and a load starts only when they fit;
- never loads a model twice: a model loaded (or loading) for one run serves every run that needs
  it; calls to it take turns (the engine's per-model lock);
- serves runs in arrival order: each request has a ticket, and a load waits behind every older
  request waiting for room;
- keeps models loaded after a run while nothing else needs the memory, so the next request
  reuses them (its plan starts from :meth:`ModelPool.resident`); room is made by evicting idle
  models, least recently used first.

What a run holds. A run *holds* a model from its admission to its release (the stay the plan
gives it), and *pins* it only while a call runs on it. A pinned model is never evicted. A held,
idle model may be evicted by an *older* run that needs the room; the younger run loads it
again, waiting its turn, before its next call on it. A run never evicts what it holds itself,
nor what an older run holds.

Why runs sharing the pool cannot deadlock. (Runs are ordered by ticket: older first.)

1. A pin is taken only on a loaded model, before the call waits for the model's lock or a call
   slot, whose holders are calls already running. A running call needs no more memory, so
   every pin is released in finite time.
2. Loads are asked for in two kinds. A *call* asks for the model it is about to run on (it was
   evicted meanwhile); a *stay* asks for the next model of its plan, ahead of its calls. A stay's
   request first waits, outside the queue, until what its run holds plus the model fits the
   budget: that depends only on the run's own earlier stays ending, which depends only on
   earlier loads and calls of the same run (the engine's dataflow: nothing waits on anything
   later in the plan). Only then does it join the queue, so a queued request never waits for
   its own run.
3. The queue is ordered by (ticket, kind, arrival), calls before stays within a run, and only its
   head may load, one load at a time. The head waits for room that only pins, loads in flight
   and older runs' holds can deny: pins end (1), and so do loads. A younger run may not pin an
   idle model the head could evict while pins are all that keeps the head waiting, so younger
   runs cannot keep it waiting by taking turns.
4. So the oldest run's requests are always served in finite time, and the oldest run ends; then
   the next oldest is the oldest, and so on. No run waits forever, whatever the ensembles.

A stay on a model that is loaded already is held at once, without waiting (it costs no
memory now), so a run may come to hold more than the budget's worth; and a measurement may come
out larger than its estimate. Then a call whose model was evicted may find no room beside its
own run's other holds: it may evict its run's own idle models, which are loaded again for
their calls. Slower, never stuck.

A load that fails, for whatever reason, is an outcome, not an exception (see
:func:`localmoa.runtime.admission.timed_load`): that run's engine fails the model's agents, and
the next stay that needs the model tries again (the file may be back, memory may have freed).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from localmoa.backends.base import Backend
from localmoa.backends.registry import backend_for
from localmoa.errors import LocalMoaError
from localmoa.hardware import Placement
from localmoa.runtime.admission import (
    Admission,
    Admitted,
    Changes,
    still_loaded,
    timed_load,
    too_large,
)

__all__ = ["ModelPool", "PoolAdmission"]

log = logging.getLogger(__name__)

CALL, STAY = 0, 1
"""The kinds of load requests, in the order a run's own requests are served (see step 3)."""

Request = tuple[int, int, int]  # (ticket, kind, arrival)


class ModelPool:
    """The models loaded on this machine, shared by concurrent runs (see the module docstring)."""

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
        self.loaded: OrderedDict[str, int] = OrderedDict()
        """Model -> its bytes (measured when the backend measures), least recently used first."""
        self.holds: dict[int, set[str]] = {}
        """Ticket -> the models that run holds (loaded, or evicted since by an older run)."""
        self.peak_bytes = 0
        self.loads = 0
        self._pinned: dict[str, list[int]] = {}  # model -> the ticket of each call running on it
        self._loading: dict[str, int] = {}  # at most one: loads are serialized
        self._leaving: dict[str, int] = {}  # evicted, their unload under way
        self._queue: dict[Request, str] = {}  # requests waiting for room -> the model
        self._arrivals = itertools.count()
        self._tickets = itertools.count()
        self._changes = Changes()

    def admission(self, ticket: int | None = None) -> PoolAdmission:
        """The memory seam for one run; ``ticket`` orders it among runs (older first, unique
        per run), the pool's own count when None."""
        return PoolAdmission(self, next(self._tickets) if ticket is None else ticket)

    def backend(self, model: str) -> Backend:
        return backend_for(self.backends, self.models, model)

    @property
    def pins(self) -> Counter[str]:
        """Model -> calls running on it now."""
        return Counter({model: len(t) for model, t in self._pinned.items() if t})

    def resident(self) -> list[str]:
        return list(self.loaded)

    def waiting(self) -> list[tuple[int, str]]:
        """(ticket, model) of each request waiting for room, in the order they will be served."""
        return [(request[0], self._queue[request]) for request in sorted(self._queue)]

    def resident_bytes(self) -> int:
        return sum(self.loaded.values())

    # --- what a run asks -------------------------------------------------------------------------

    async def hold(self, ticket: int, model: str) -> Admitted:
        """Hold ``model`` for run ``ticket``'s stay, loading it unless it is loaded."""
        return await self._acquire(ticket, model, STAY)

    async def pin(self, ticket: int, model: str) -> Admitted:
        """Pin ``model`` for one call of run ``ticket``, loading it again if it was evicted.
        Unless the outcome is a failed load, :meth:`unpin` when the call is done."""
        return await self._acquire(ticket, model, CALL)

    def unpin(self, ticket: int, model: str) -> None:
        self._pinned[model].remove(ticket)
        if model in self.loaded:
            self.loaded.move_to_end(model)  # just used
        self._changes.notify()

    def release(self, ticket: int, model: str) -> None:
        """Run ``ticket``'s stay on ``model`` is over; the model stays loaded, idle."""
        self.holds.get(ticket, set()).discard(model)
        self._changes.notify()

    def forget(self, ticket: int) -> None:
        """Run ``ticket`` is over, however it ended: it holds nothing any more."""
        self.holds.pop(ticket, None)
        self._changes.notify()

    async def close(self) -> None:
        """Unload everything (server shutdown)."""
        for model in list(self.loaded):
            self._leaving[model] = self.loaded.pop(model)
            await self._unload(model)

    # --- how --------------------------------------------------------------------------------------

    async def _acquire(self, ticket: int, model: str, kind: int) -> Admitted:
        held = self.holds.setdefault(ticket, set())
        request = (ticket, kind, next(self._arrivals))
        try:
            while True:
                if model in self.loaded:
                    if kind == STAY or self._may_pin(ticket, model):
                        held.add(model)
                        if kind == CALL:
                            self._pinned.setdefault(model, []).append(ticket)
                        self.loaded.move_to_end(model)
                        return Admitted()
                elif model not in self._loading and model not in self._leaving:
                    size = self.sizes[model]
                    if size > self.budget:
                        held.discard(model)
                        return Admitted(outcome=too_large(model, size, self.budget))
                    if request in self._queue or kind == CALL or self._fits_own(ticket, model):
                        self._queue[request] = model
                        evict = self._room(request, model) if self._turn(request) else None
                        if evict is not None:
                            del self._queue[request]
                            return await self._load(ticket, model, kind, evict)
                await self._changes.next()
        finally:
            if self._queue.pop(request, None) is not None:
                self._changes.notify()

    async def _load(self, ticket: int, model: str, kind: int, evict: list[str]) -> Admitted:
        """Evict ``evict``, then load ``model`` for run ``ticket``; the bytes are booked first."""
        size = self.sizes[model]
        held = self.holds.setdefault(ticket, set())
        for gone in evict:
            self._leaving[gone] = self.loaded.pop(gone)
        self._loading[model] = size
        held.add(model)
        if kind == CALL:
            self._pinned.setdefault(model, []).append(ticket)
        backend = self.backend(model)
        unloaded = []
        try:
            for gone in evict:
                if await self._unload(gone):
                    unloaded.append(gone)
            self.peak_bytes = max(self.peak_bytes, self._in_use())  # what the load will hold
            try:
                outcome = await timed_load(backend, model, self.models[model])
            except BaseException:  # cancelled mid-load: kept, idle, if the backend holds it
                if still_loaded(backend, model):
                    self.loaded[model] = size
                raise
        except BaseException:
            held.discard(model)
            if kind == CALL:
                self._pinned[model].remove(ticket)
            raise
        finally:
            del self._loading[model]
            self._changes.notify()
        if outcome.error is not None:
            held.discard(model)
            if kind == CALL:
                self._pinned[model].remove(ticket)
        else:
            self.loads += 1
            measured = outcome.measured if backend.measures_footprint else None
            self.loaded[model] = measured or size
            self.peak_bytes = max(self.peak_bytes, self._in_use())
        return Admitted(unloaded, outcome)

    async def _unload(self, model: str) -> bool:
        """Unload ``model``, moved from :attr:`loaded` to the leaving; False (logged) when that
        failed."""
        try:
            await self.backend(model).unload(model)
        except LocalMoaError as exc:
            log.warning("unloading %s failed: %s", model, exc)
            return False
        finally:
            del self._leaving[model]
            self._changes.notify()
        return True

    def _in_use(self) -> int:
        return sum(self.loaded.values()) + sum(self._loading.values()) + sum(self._leaving.values())

    def _held_bytes(self, ticket: int, model: str) -> tuple[int, int]:
        """Bytes of what run ``ticket`` holds besides ``model``: (loaded, evicted meanwhile)."""
        loaded = missing = 0
        for other in self.holds.get(ticket, set()) - {model}:
            if other in self.loaded:
                loaded += self.loaded[other]
            else:
                missing += self.sizes[other]
        return loaded, missing

    def _fits_own(self, ticket: int, model: str) -> bool:
        """Would ``model`` fit beside everything run ``ticket`` holds (step 2)?"""
        return sum(self._held_bytes(ticket, model)) + self.sizes[model] <= self.budget

    def _turn(self, request: Request) -> bool:
        """The head of the queue, with no other load under way (loads are serialized)."""
        return not self._loading and min(self._queue) == request

    def _holders(self, model: str) -> list[int]:
        return [ticket for ticket, held in self.holds.items() if model in held]

    def _room(
        self, request: Request, model: str, *, without_younger_pins: bool = False
    ) -> list[str] | None:
        """What to evict so that ``request`` can load ``model`` now, or None if nothing would do.

        Candidates are idle, least recently used first: held by nobody, then held only by
        younger runs; for a call whose own run's holds leave no room, the run's own idle models
        last. ``without_younger_pins``: as if calls of younger runs were not running (step 3).
        """
        ticket, kind, _ = request
        size = self.sizes[model]
        need = self._in_use() + size
        own_loaded, own_missing = self._held_bytes(ticket, model)
        if kind == STAY:
            need += own_missing  # its run's evicted models come back for their calls
        own = kind == CALL and own_loaded + size > self.budget
        ranked: list[tuple[int, str]] = []
        for other in self.loaded:  # least recently used first
            pins = self._pinned.get(other, [])
            if pins and not (without_younger_pins and min(pins) > ticket):
                continue
            holders = self._holders(other)
            if not holders:
                ranked.append((0, other))
            elif min(holders) > ticket:
                ranked.append((1, other))
            elif own and min(holders) == ticket:
                ranked.append((2, other))
        evict = []
        for _, other in sorted(ranked, key=lambda r: r[0]):  # stable: LRU within each rank
            if need <= self.budget:
                break
            evict.append(other)
            need -= self.loaded[other]
        return evict if need <= self.budget else None

    def _may_pin(self, ticket: int, model: str) -> bool:
        """May run ``ticket`` pin loaded ``model`` now? Not while an older run waits for room
        it could have but for younger runs' calls, and could evict ``model`` for it (step 3)."""
        holders = self._holders(model)
        for request, wanted in self._queue.items():
            older = request[0]
            if older >= ticket or (holders and min(holders) <= older):
                continue  # not older, or it may never evict this model anyway
            if self._room(request, wanted) is None and (
                self._room(request, wanted, without_younger_pins=True) is not None
            ):
                return False
        return True


class PoolAdmission(Admission):
    """One run's memory seam on a shared :class:`ModelPool`."""

    def __init__(self, pool: ModelPool, ticket: int) -> None:
        self.pool = pool
        self.ticket = ticket

    async def admit(self, model: str, placement: Placement | None = None) -> Admitted:
        # A server plans every request on one device (serve's pool keeps one budget), so its
        # plans place nothing: the backend places the model.
        return await self.pool.hold(self.ticket, model)

    def using(self, model: str) -> AbstractAsyncContextManager[Admitted]:
        return self._pinned(model)

    @contextlib.asynccontextmanager
    async def _pinned(self, model: str) -> AsyncIterator[Admitted]:
        admitted = await self.pool.pin(self.ticket, model)
        if admitted.outcome is not None and admitted.outcome.error is not None:
            yield admitted  # it could not load again: nothing is pinned
            return
        try:
            yield admitted
        finally:
            self.pool.unpin(self.ticket, model)

    async def release(self, model: str) -> list[str]:
        self.pool.release(self.ticket, model)
        return []  # it stays loaded for whoever needs it next

    def resident(self) -> list[str]:
        return self.pool.resident()

    async def finish(self) -> list[str]:
        self.pool.forget(self.ticket)
        return []
