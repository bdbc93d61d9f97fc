"""Sets of models as integer bit masks: the planner and the search branch on subsets of an
ensemble's models, and a mask makes a subset hashable, cheap to combine and cheap to count."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

__all__ = ["bits", "mask_of", "submasks"]


def mask_of(indices: Iterable[int]) -> int:
    mask = 0
    for i in indices:
        mask |= 1 << i
    return mask


def bits(mask: int) -> Iterator[int]:
    """The indices in ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def submasks(mask: int) -> Iterator[int]:
    """Every subset of ``mask``, largest first (keeping more is the likelier winner)."""
    sub = mask
    while True:
        yield sub
        if sub == 0:
            return
        sub = (sub - 1) & mask
