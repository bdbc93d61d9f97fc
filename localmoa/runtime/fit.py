"""References always fit: cut the answers a call reads so its request fits the model's context.

A call that reads references (a later-layer proposer, a judge, the aggregator) sends its prompt,
the previous answers and room for ``max_tokens`` of its own; when that exceeds the receiving
model's ``n_ctx`` the runtime fails with a context overflow, though the plan accepted the config.
hermes-agent hit exactly this (#60345) and fixed it by checking the request after the references
are appended; :func:`fit_references` does that check, and cuts when it fails:

- **Ranked** references (a judge's order, best first): the lowest-ranked go first. The best are
  kept whole while they fit, the first that does not is shortened to the room left, and every
  one after it is dropped; a reference is dropped rather than shortened when fewer than
  :data:`MIN_REFERENCE_TOKENS` would be left of it (a fragment that short tells the reader
  nothing and costs its numbering).
- **Unranked** references (a layer's answers in order): each keeps the same share of its tokens,
  but never fewer than :data:`MIN_REFERENCE_TOKENS` (an answer shorter than that stays whole);
  when even those minimums do not fit, the longest reference is dropped first.

A shortened text is cut at a character boundary (at a space when one is near, never inside a
combining sequence) and ends with :data:`CUT_MARKER`, ``" [cut]"``, so the model reading it
knows the answer went on and does not take an unfinished sentence for the proposer's own.

**Counting** goes through ``count`` (the backend's tokenizer where it has one, else the
documented estimate, :func:`localmoa.backends.base.estimate_tokens`), which may be slow (the
llama.cpp tokenizer on a long prompt), so it is called few times: once for the request with no
references and once with all of them (all that happens when they fit, or when ``n_ctx`` is None),
then once per reference (each one's size; skipped for a single reference), then once per shrink
round (at most :data:`MAX_SHRINK_ROUNDS`), then once per reference dropped at the very end: at
most ``2 + 2n + MAX_SHRINK_ROUNDS`` for ``n`` references. Cutting is planned in tokens and done
in characters, and tokenizers are not linear in characters, so every cut request is counted
again and shrunk while it is still over, by the overshoot scaled to what the last round missed
by. A result that keeps any reference was counted as sent and fits; when the prompt and
``max_tokens`` alone leave no room, every reference is dropped (``truncated``) and the caller
reports it.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from localmoa.backends.base import ChatMessage

__all__ = [
    "CUT_MARKER",
    "MAX_SHRINK_ROUNDS",
    "MIN_REFERENCE_TOKENS",
    "Count",
    "Fitted",
    "fit_references",
]

Count = Callable[[list[ChatMessage]], Awaitable[int]]
"""Tokens a request's messages take in the receiving model's context."""

MIN_REFERENCE_TOKENS = 16
"""Fewer tokens than this left of a reference (numbering included): drop it instead."""

MAX_SHRINK_ROUNDS = 4
"""Cut-and-count rounds before falling back to dropping whole references."""

CUT_MARKER = " [cut]"
"""Ends a shortened reference."""

_WORD_BOUNDARY_REACH = 0.2
"""A cut moves back to a space found within this fraction of the kept text."""


@dataclass(frozen=True)
class Fitted:
    """The references a call sends after fitting them to its model's context."""

    kept: tuple[int, ...]
    """Positions (into the given references) still sent, in the given order."""
    texts: tuple[str, ...]
    """Their texts, possibly cut."""
    reference_tokens: int
    """Tokens the references take in the request as sent: count(with) - count(with none)."""
    truncated: bool
    """True when any reference was cut or dropped."""


async def fit_references(
    build: Callable[[list[str]], list[ChatMessage]],
    references: Sequence[str],
    *,
    n_ctx: int | None,
    max_tokens: int,
    count: Count,
    ranked: bool,
) -> Fitted:
    """``references`` cut so that ``count(build(texts)) + max_tokens <= n_ctx``.

    ``build(texts)`` is the request's messages with those reference texts; ``ranked`` says the
    references are in a judge's order, best first. With ``n_ctx`` None nothing is checked or
    cut (the tokens are still counted). See the module docstring for how cutting goes and how
    often ``count`` is called.
    """
    texts = list(references)
    base = await count(build([]))
    if not texts:
        return Fitted((), (), 0, False)
    full = await count(build(texts))
    if n_ctx is None or full + max_tokens <= n_ctx:
        return Fitted(tuple(range(len(texts))), tuple(texts), max(0, full - base), False)
    dropped = Fitted((), (), 0, True)
    room = n_ctx - max_tokens - base
    if room < MIN_REFERENCE_TOKENS:
        return dropped
    if len(texts) == 1:
        sizes = [full - base]
    else:
        sizes = [await count(build([text])) - base for text in texts]
    sizes = [max(size, 0) for size in sizes]

    budget = room
    kept: list[int] = []
    cut: list[str] = []
    for _ in range(MAX_SHRINK_ROUNDS):
        shares = _ranked_shares(sizes, budget) if ranked else _proportional_shares(sizes, budget)
        kept, cut = _cut_all(texts, sizes, shares)
        if not kept:
            return dropped
        used = await count(build(cut))
        if used + max_tokens <= n_ctx:
            return Fitted(tuple(kept), tuple(cut), max(0, used - base), True)
        # the budget that gave `used - base` tokens, scaled to the room there is
        scaled = math.floor(budget * room / max(used - base, 1))
        budget = min(scaled, budget - 1)

    while len(kept) > 1:
        victim = _next_to_drop(cut, ranked)
        del kept[victim], cut[victim]
        used = await count(build(cut))
        if used + max_tokens <= n_ctx:
            return Fitted(tuple(kept), tuple(cut), max(0, used - base), True)
    return dropped


def _next_to_drop(texts: Sequence[str], ranked: bool) -> int:
    """The lowest-ranked reference, or the longest (of equals, the later)."""
    if ranked:
        return len(texts) - 1
    return max(range(len(texts)), key=lambda k: (len(texts[k]), k))


def _ranked_shares(sizes: Sequence[int], budget: int) -> dict[int, int]:
    """Tokens per kept reference, best first: whole while they fit, then the first that does
    not gets what is left (if at least the minimum), and the rest nothing."""
    shares: dict[int, int] = {}
    left = budget
    for i, size in enumerate(sizes):
        if size <= left:
            shares[i] = size
            left -= size
            continue
        if left >= MIN_REFERENCE_TOKENS:
            shares[i] = left
        break
    return shares


def _proportional_shares(sizes: Sequence[int], budget: int) -> dict[int, int]:
    """Tokens per kept reference: the same fraction of each, none below its minimum (its
    size, or MIN_REFERENCE_TOKENS if larger); the longest dropped while the minimums alone
    do not fit."""
    kept = list(range(len(sizes)))
    while kept:
        if sum(sizes[i] for i in kept) <= budget:
            return {i: sizes[i] for i in kept}
        least = {i: min(sizes[i], MIN_REFERENCE_TOKENS) for i in kept}
        if sum(least.values()) > budget:
            kept.remove(max(kept, key=lambda i: (sizes[i], i)))
            continue
        # those whose share would fall below their minimum get the minimum; the rest share
        # what is left in proportion (each pass only adds to `fixed`, so this ends)
        fixed: set[int] = set()
        while True:
            free = [i for i in kept if i not in fixed]
            free_size = sum(sizes[i] for i in free)
            left = budget - sum(least[i] for i in fixed)
            share = left / free_size if free_size else 1.0
            below = {i for i in free if share * sizes[i] < least[i]}
            if not below:
                break
            fixed |= below
        return {
            i: least[i] if i in fixed else min(sizes[i], math.floor(share * sizes[i])) for i in kept
        }
    return {}


def _cut_all(
    texts: Sequence[str], sizes: Sequence[int], shares: dict[int, int]
) -> tuple[list[int], list[str]]:
    """The kept positions and their texts, each cut to about its share of tokens; one whose
    cut leaves no text is dropped."""
    kept: list[int] = []
    out: list[str] = []
    for i in sorted(shares):
        if shares[i] >= sizes[i]:
            kept.append(i)
            out.append(texts[i])
            continue
        short = _shorten(texts[i], shares[i] / sizes[i])
        if short:
            kept.append(i)
            out.append(short)
    return kept, out


def _shorten(text: str, fraction: float) -> str:
    """About ``fraction`` of ``text``'s tokens, marker included: cut in proportion by
    characters, moved back to a nearby space and out of a combining sequence; "" when
    nothing would be left."""
    end = math.floor(len(text) * fraction) - len(CUT_MARKER)
    if end <= 0:
        return ""
    space = max(text.rfind(" ", 0, end + 1), text.rfind("\n", 0, end + 1))
    if space >= end * (1 - _WORD_BOUNDARY_REACH):
        end = space
    while end > 0 and unicodedata.combining(text[end]):
        end -= 1
    kept = text[:end].rstrip()
    return kept + CUT_MARKER if kept else ""
