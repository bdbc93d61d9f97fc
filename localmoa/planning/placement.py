"""Which device holds each model: bin packing of a resident set onto the devices' budgets.

Pure and deterministic, like the rest of planning. The fewest-loads search
(:mod:`~localmoa.planning.fewest_loads`) asks :meth:`Packer.fits` wherever one device would
compare bytes with the budget: a set of models can be resident together when each model has a
device whose remaining memory holds it. Once the plan is made, :meth:`Packer.place` assigns the
devices wave by wave, keeping every model on its device for as long as it stays resident (moving
it would mean unloading and loading it again).

A model too large for every device alone may span several (llama.cpp's ``tensor_split``) when
its config allows ``split``; it is never split otherwise, since a split model pays for transfers
between devices on every token, and each device holds its own compute buffers
(llama.cpp#27953, ollama#7146). Split models are packed last, poured into the devices with the
most room left.

Packing is NP-hard in general; an ensemble's resident set is a handful of models over a handful
of devices, so an exhaustive search (best fit first, identical bins tried once) answers exactly
within ``MAX_NODES`` steps, and first-fit decreasing answers beyond that (then a set might be
judged not to fit that does: the plan is still valid, maybe not the fewest loads).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache

from localmoa.planning.bitsets import bits

__all__ = ["MAX_NODES", "Assignment", "Packer"]

MAX_NODES = 20_000

Assignment = dict[int, tuple[tuple[int, int], ...]]
"""Model index -> ((device index, bytes), ...): one pair, or one per device a split model spans."""


class Packer:
    """Packs sets of models (bit masks over ``sizes``) onto ``bins`` (device -> bytes)."""

    def __init__(
        self,
        bins: Mapping[str, int],
        sizes: Sequence[int],
        splittable: int = 0,
        pins: Mapping[int, str] | None = None,
        nodes: Mapping[str, str | None] | None = None,
    ) -> None:
        if not bins:
            raise ValueError("at least one device is needed")
        self.names = list(bins)
        self.pins = {i: self.names.index(d) for i, d in (pins or {}).items()}
        """Models pinned to a device (``device = "..."`` in their table): placed there only."""
        node_of = [(nodes or {}).get(name) for name in self.names]
        self.groups = [
            [d for d in range(len(self.names)) if node_of[d] == node]
            for node in dict.fromkeys(node_of)
        ]
        """Devices a split model may span together: one machine's (a split never crosses
        nodes: its layers talk on every token)."""
        self.caps = [bins[name] for name in self.names]
        self.sizes = list(sizes)
        largest = max(self.caps)
        # Split only what fits on no device alone, and only when allowed.
        self.split = sum(1 << i for i in bits(splittable) if self.sizes[i] > largest)
        self.single = len(self.caps) == 1
        self.fits = cache(self._fits)

    def _fits(self, mask: int) -> bool:
        if self.single:
            return sum(self.sizes[i] for i in bits(mask)) <= self.caps[0]
        return self.pack(mask) is not None

    def pack(self, mask: int, fixed: Mapping[int, int] | None = None) -> Assignment | None:
        """An assignment of ``mask``'s models to devices, or None when none exists (within the
        search's limit). ``fixed``: models already on a device (index -> device index) that stay
        there; the others are placed around them."""
        fixed = {i: d for i, d in {**self.pins, **(fixed or {})}.items() if mask >> i & 1}
        room = list(self.caps)
        out: Assignment = {}
        for i, d in fixed.items():
            room[d] -= self.sizes[i]
            out[i] = ((d, self.sizes[i]),)
        if any(r < 0 for r in room):
            return None
        whole = sorted(
            (i for i in bits(mask & ~self.split) if i not in fixed),
            key=lambda i: (-self.sizes[i], i),
        )
        placed = self._search(whole, room) or self._first_fit(whole, room)
        if placed is None:
            return None
        for i, d in placed.items():
            room[d] -= self.sizes[i]
            out[i] = ((d, self.sizes[i]),)
        for i in sorted(bits(mask & self.split), key=lambda i: (-self.sizes[i], i)):
            if i in fixed:
                continue
            spans = None
            for group in sorted(self.groups, key=lambda g: -sum(max(room[d], 0) for d in g)):
                spans = self._pour(self.sizes[i], room, group)
                if spans is not None:
                    break
            if spans is None:
                return None
            out[i] = spans
        return out

    def _search(self, items: list[int], room: list[int]) -> dict[int, int] | None:
        """Exhaustive: each item on the fullest device that holds it first (best fit), devices
        with the same room tried once; None when nothing fits or the search ran too long."""
        left = list(room)
        chosen: dict[int, int] = {}
        nodes = [0]

        def place(n: int) -> bool | None:
            if n == len(items):
                return True
            nodes[0] += 1
            if nodes[0] > MAX_NODES:
                return None
            i = items[n]
            tried: set[int] = set()
            for d in sorted(range(len(left)), key=lambda d: (left[d], d)):
                if left[d] < self.sizes[i] or left[d] in tried:
                    continue
                tried.add(left[d])
                left[d] -= self.sizes[i]
                chosen[i] = d
                found = place(n + 1)
                if found is not False:
                    return found
                left[d] += self.sizes[i]
                del chosen[i]
            return False

        return dict(chosen) if place(0) else None

    def _first_fit(self, items: list[int], room: list[int]) -> dict[int, int] | None:
        left = list(room)
        chosen: dict[int, int] = {}
        for i in items:
            d = next((d for d in range(len(left)) if left[d] >= self.sizes[i]), None)
            if d is None:
                return None
            left[d] -= self.sizes[i]
            chosen[i] = d
        return chosen

    @staticmethod
    def _pour(size: int, room: list[int], group: list[int]) -> tuple[tuple[int, int], ...] | None:
        """A split model's bytes over ``group``'s devices with the most room, fewest first."""
        if sum(max(room[d], 0) for d in group) < size:
            return None
        spans: list[tuple[int, int]] = []
        need = size
        for d in sorted(group, key=lambda d: (-room[d], d)):
            take = min(need, room[d])
            if take > 0:
                spans.append((d, take))
                room[d] -= take
                need -= take
            if need == 0:
                break
        return tuple(sorted(spans))
