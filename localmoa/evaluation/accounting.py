"""What one answer cost when answers are made together: device seconds and loads, shared out.

In an evaluation every system answers every question in one batch, so no answer has a cost of
its own to read off a clock: one model's calls for many questions decode together, several
models may answer at once, and one load serves every call to that model in its chunk. The two
figures per question that ``localmoa eval`` shows are shares, and this module is how they are
shared; the rule in each case is that the shares add up to the whole, so the systems' figures
times the questions give back what the machine really did.

**Seconds** (:func:`shared_seconds`): processor sharing. The calls of a chunk are intervals on
one clock (each call's ``started_at`` to ``ended_at``); at any moment the device's time is split
evenly among the calls then in flight. A call alone gets all its seconds; sixteen calls decoded
together over ten seconds get ten sixteenths each. The shares add up to the time at least one
call was running, so a system's seconds are the wall time it would add to a batch, not the
latency of one lone run (which would also pay loads and forgo decoding together). Loads are
left out: they are counted apart.

**Loads** (:class:`LoadLedger`): a load of model M in a chunk is shared by the answers of that
chunk that call M, in proportion to their calls to it (an ensemble that calls M twice per
question takes twice the share of M alone). A load no answer of its chunk calls (the plan
loaded it ahead, for the next chunk) waits for the next chunk that calls it; one that none
ever calls is shared evenly by every system at the end.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from localmoa.runtime.events import CallRecord

__all__ = ["LoadLedger", "Shares", "shared_seconds"]

K = TypeVar("K", bound=Hashable)


def shared_seconds(calls: Sequence[CallRecord]) -> list[float]:
    """Each call's share of the device time (see the module docstring), in ``calls`` order.

    A call is placed by ``started_at`` and ``ended_at`` (Unix times); one with only an end is
    placed ``seconds`` before it, and one with neither (it never reached a backend) is counted
    as alone for its ``seconds``.
    """
    shares = [0.0] * len(calls)
    spans: list[tuple[float, float, int]] = []
    for i, record in enumerate(calls):
        end = record.ended_at
        start = record.started_at
        if start is None and end is None:
            shares[i] = max(record.seconds, 0.0)
            continue
        if start is None:
            assert end is not None
            start = end - max(record.seconds, 0.0)
        if end is None:
            end = start + max(record.seconds, 0.0)
        if end > start:
            spans.append((start, end, i))
    edges: list[tuple[float, int, int]] = sorted(
        [(start, 1, i) for start, _, i in spans] + [(end, 0, i) for _, end, i in spans]
    )
    active: set[int] = set()
    last = edges[0][0] if edges else 0.0
    for moment, opening, i in edges:  # ends sort before starts at one moment
        if active and moment > last:
            each = (moment - last) / len(active)
            for j in active:
                shares[j] += each
        last = moment
        if opening:
            active.add(i)
        else:
            active.discard(i)
    return shares


@dataclass
class Shares(Generic[K]):
    """Loads and their seconds, shared out to keys (systems)."""

    loads: dict[K, float] = field(default_factory=dict)
    seconds: dict[K, float] = field(default_factory=dict)

    def add(self, key: K, loads: float, seconds: float) -> None:
        self.loads[key] = self.loads.get(key, 0.0) + loads
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds


class LoadLedger(Generic[K]):
    """Loads as they happen (:meth:`loaded`), shared out chunk by chunk (:meth:`settle`) to
    the keys whose answers called the model, by their calls to it."""

    def __init__(self) -> None:
        self.shares: Shares[K] = Shares()
        self._waiting: list[tuple[str, float]] = []

    def loaded(self, model: str, seconds: float) -> None:
        self._waiting.append((model, seconds))

    def settle(self, calls: Iterable[tuple[K, str]]) -> None:
        """Share the loads so far among the chunk's ``calls`` (each a key and the model it
        called); a load of a model none of them called waits for a later chunk."""
        by_model: dict[str, Counter[K]] = {}
        for key, model in calls:
            by_model.setdefault(model, Counter())[key] += 1
        waiting = []
        for model, seconds in self._waiting:
            counts = by_model.get(model)
            if not counts:
                waiting.append((model, seconds))
                continue
            self._share(counts, seconds)
        self._waiting = waiting

    def close(self, keys: Sequence[K]) -> Shares[K]:
        """The shares, once every load still waiting is shared evenly by ``keys``."""
        if keys:
            for _, seconds in self._waiting:
                self._share(Counter(dict.fromkeys(keys, 1)), seconds)
        self._waiting = []
        return self.shares

    def _share(self, counts: Mapping[K, int], seconds: float) -> None:
        total = sum(counts.values())
        for key, count in counts.items():
            self.shares.add(key, count / total, seconds * count / total)
