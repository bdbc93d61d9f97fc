"""The search for a faster plan: branch and bound over wave plans, each simulated.

The fewest-loads plan (:mod:`localmoa.planning.fewest_loads`) is exact for loads, but plans
with as many loads can differ in time, and one with more loads can finish sooner (a model loaded
while another computes costs nothing). :func:`search` looks for the plan the cost model
(:mod:`localmoa.planning.timing`) times fastest, starting from the planner's plan and keeping it
unless beaten by the margins its caller sets (:mod:`localmoa.planning.refine`). Pure and
deterministic; anytime: it stops after a number of partial plans with the best found so far.

:class:`PlanSpace` says what a candidate is; the search prunes it by a lower bound on any
completion (:meth:`PlanSpace.bound`) and by dominance between partial plans that leave the run in
the same state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

from localmoa.planning.bitsets import bits, mask_of, submasks
from localmoa.planning.profiles import Profile
from localmoa.planning.timing import (
    Stages,
    Timing,
    WaveSpec,
    load_seconds,
    phases,
    simulate_prefix,
    simulate_waves,
)

__all__ = ["Found", "PartialPlan", "PlanSpace", "search"]


class Found(NamedTuple):
    """What :func:`search` found: the waves, their simulated run, and whether it is proven the
    fastest (the search ran to its end)."""

    waves: list[WaveSpec]
    makespan_s: float
    loads: int
    complete: bool
    fewest_s: float
    """The simulated run of the fastest plan found with no more loads than the seed (the seed's
    own when none beat it): what a plan with extra loads was weighed against."""


def search(
    calls: Stages,
    sizes: Mapping[str, int],
    profile: Profile,
    seed: Sequence[WaveSpec],
    *,
    max_nodes: int,
    slack: float = 0.0,
    min_gain: float = 0.0,
    resident: Sequence[str] = (),
) -> Found:
    """The fastest wave plan found under dataflow execution, starting from ``seed``.

    Depth-first branch and bound over every sequence of waves (see :class:`PlanSpace` for what a
    candidate is), each partial plan simulated. Two prunings: a lower bound on any completion
    (:meth:`PlanSpace.bound`), and dominance: of two partial plans that leave the run in the same
    state (stage, models of it done, resident set), one whose every resource (the load queue,
    the stages begun, each model's memory and turn) is free no later than the other's is kept
    alone. Both assume that running a call earlier never delays the rest, which sharing can
    break (a call started earlier slows a neighbour whose unload a load was waiting for): then
    the optimum can be missed by a little (tests/planning/test_search.py compares with the
    exhaustive enumeration: when written, 1 random case in 1,100 came out 0.5 % above it).

    Two margins, because the estimate is not the run. A plan with no more loads than ``seed``
    replaces it only when faster by more than ``slack`` (a fraction): with estimated call
    lengths, a plan a hair faster on paper is as likely slower in fact. A plan with more loads
    than ``seed`` is taken only when also at least ``min_gain`` faster than the fastest plan
    found with no more loads (each extra load is a cost the estimate may understate; with
    ``min_gain`` 0 only time counts, fewer loads breaking ties). The search is anytime: after
    ``max_nodes`` partial plans it returns the best found so far (``complete`` False).
    ``resident`` models are loaded at the start (a plan made mid-run: ``seed``'s first wave
    keeps or unloads them); each must be one the run calls.
    """
    space = PlanSpace(calls, sizes, profile, resident)
    mine = simulate_waves(seed, calls, sizes, profile, resident=resident)
    fewest = mine.loads
    # The fastest plan with no more loads than the seed (None: the seed), and the bar a plan
    # of that kind must pass to replace it: the seed less the slack (with a slack, no tie
    # goes to fewer loads), then the plan found. ``fewest_s`` is its own makespan.
    best: PartialPlan | None = None
    best_s, best_loads = mine.makespan_s * (1 - slack), mine.loads if slack == 0 else -1
    fewest_s = mine.makespan_s
    # The fastest plan with extra loads, whether or not it pays for them yet.
    extra: PartialPlan | None = None
    extra_s, extra_loads = math.inf, 0
    nodes = 0
    seen: dict[tuple[int, int, int, int], list[tuple[tuple[float, ...], tuple[float, ...], int]]]
    seen = {}

    def bar(loads: int) -> float:
        """What a completion with ``loads`` so far must beat to matter. One with more loads
        than the seed must beat both kinds, the plans with no more loads by ``min_gain``. One
        with no more loads must be the fastest of its kind: when extra loads must pay, that
        plan is what they are weighed against (and its time is reported), so it is searched
        for in full; with no margin, it only matters if faster than any plan found."""
        if loads > fewest:
            return min(extra_s, best_s, fewest_s * (1 - min_gain))
        return best_s if min_gain > 0 else min(best_s, extra_s)

    def dominated(node: PartialPlan, early: tuple[float, ...], late: tuple[float, ...]) -> bool:
        """Has another partial plan reached the same state with everything free no later, at
        its latest, than this one at its earliest? Then its best continuation does as well
        (when extra loads must pay, only one with no more loads counts)."""
        key = (node.stage, node.done, node.resident, node.unrun)
        marks = seen.setdefault(key, [])
        loads = node.loads if min_gain > 0 else 0
        if any(n <= loads and _le(other_late, early) for _, other_late, n in marks):
            return True
        marks[:] = [(e, la, n) for e, la, n in marks if not (loads <= n and _le(late, e))]
        marks.append((early, late, loads))
        return False

    def visit(node: PartialPlan, makespan: float) -> bool:
        nonlocal nodes, best, best_s, best_loads, fewest_s, extra, extra_s, extra_loads
        if node.stage == len(calls):  # a complete plan: its bound is its makespan
            if node.loads <= fewest:
                if (makespan, node.loads) < (best_s, best_loads):
                    best, best_s, best_loads, fewest_s = node, makespan, node.loads, makespan
            elif (makespan, node.loads) < (extra_s, extra_loads):
                extra, extra_s, extra_loads = node, makespan, node.loads
            return True
        children = sorted(space.children(node), key=lambda c: (space.quick_bound(c), c.loads))
        for child in children:
            quick = space.quick_bound(child)
            if quick >= bar(0) * (1 - 1e-12):
                break
            if quick >= bar(child.loads) * (1 - 1e-12):
                continue
            nodes += 1
            if nodes > max_nodes:
                return False
            bound, early, late = space.bound(child)
            if child.stage < len(calls) and (
                bound >= bar(child.loads) * (1 - 1e-12) or dominated(child, early, late)
            ):
                continue
            if not visit(child, bound):
                return False
        return True

    complete = visit(space.root(), math.inf)
    pays = (extra_s, extra_loads) < (best_s, best_loads) and extra_s <= fewest_s * (1 - min_gain)
    if extra is not None and pays:
        return Found(extra.waves(), extra_s, extra_loads, complete, fewest_s)
    if best is None:
        return Found(list(seed), mine.makespan_s, mine.loads, complete, fewest_s)
    return Found(best.waves(), best_s, best_loads, complete, fewest_s)


@dataclass(frozen=True)
class PartialPlan:
    """A partial plan: its waves so far and where they leave the run."""

    stage: int
    done: int
    """Models of ``stage`` whose calls have run."""
    resident: int
    unrun: int
    """Resident models loaded ahead of their stage that have not run yet (they stay until they
    run: loading a model and dropping it unused only costs)."""
    loads: int
    bytes_loaded: int
    load_s: float
    """Seconds of loads so far: loads are serial, so the last one ends no sooner."""
    bound: float
    """The largest bound any load so far gives (see :meth:`PlanSpace.bound`)."""
    count: int
    parent: PartialPlan | None
    wave: WaveSpec | None

    def waves(self) -> list[WaveSpec]:
        out: list[WaveSpec] = []
        node: PartialPlan | None = self
        while node is not None and node.wave is not None:
            out.append(node.wave)
            node = node.parent
        return out[::-1]


class PlanSpace:
    """The candidate plans: every sequence of waves where each wave is a resident set within
    the budget that runs every pending call of the current stage whose model it holds (at
    least one), stages in order. Loads are what the wave holds that the previous did not, in
    the planner's order (first use in the run), unloads what it held that this wave does not.

    Three choices are left out as dominated: holding a model no later call needs (unloads are
    free and memory only delays loads), dropping a model loaded ahead of its stage before it
    ran (the load was wasted), and a wave that runs nothing.
    """

    def __init__(
        self,
        calls: Stages,
        sizes: Mapping[str, int],
        profile: Profile,
        resident: Sequence[str] = (),
    ) -> None:
        self.calls, self.sizes, self.profile = calls, sizes, profile
        self.names = list(dict.fromkeys(c.model for stage in calls for c in stage))
        index = {name: i for i, name in enumerate(self.names)}
        if any(model not in index for model in resident):
            raise ValueError("a model resident at the start must be one the run calls")
        self.resident = tuple(resident)
        self.start = mask_of(index[model] for model in resident)
        self.size = [sizes[n] for n in self.names]
        self.load_s = [load_seconds(s, profile) for s in self.size]
        self.budget = profile.memory_bytes
        n = len(calls)
        self.demand = [mask_of(index[c.model] for c in stage) for stage in calls]
        self.after = [0] * n  # models some later stage calls
        for k in range(n - 2, -1, -1):
            self.after[k] = self.after[k + 1] | self.demand[k + 1]
        # Seconds alone: each model's calls per stage (serialized), and what each stage needs
        # at least: its longest model chain, or its device-seconds if the device is the limit.
        self.work = [[0.0] * n for _ in self.names]
        stage_lb: list[float] = []
        for k, stage in enumerate(calls):
            device = 0.0
            for c in stage:
                steps = phases(c, sizes[c.model], profile)
                self.work[index[c.model]][k] += sum(w / rate for w, rate, _ in steps)
                device += sum(w / rate * share for w, rate, share in steps)
            stage_lb.append(max(device, *(self.work[i][k] for i in bits(self.demand[k]))))
        first = (
            0.0
            if self.demand[0] & self.start
            else min(self.load_s[i] for i in bits(self.demand[0]))
        )
        self.head = [first + sum(stage_lb[:k]) for k in range(n)]
        self.tail = [sum(stage_lb[k + 1 :]) for k in range(n)]
        self.floor = self.head[-1] + stage_lb[-1]
        self.stage_lb = stage_lb
        self.bytes_of = cache(lambda mask: sum(self.size[i] for i in bits(mask)))

    def root(self) -> PartialPlan:
        return PartialPlan(0, 0, self.start, 0, 0, 0, 0.0, self.floor, 0, None, None)

    def children(self, node: PartialPlan) -> list[PartialPlan]:
        k, resident = node.stage, node.resident
        todo = self.demand[k] & ~node.done
        live = todo | self.after[k]
        must = resident & node.unrun
        out = []
        for extra in submasks(live & ~must):
            wave = extra | must
            if not wave & todo or self.bytes_of(wave) > self.budget:
                continue
            out.append(self._child(node, wave))
        return out

    def _child(self, node: PartialPlan, wave: int) -> PartialPlan:
        k = node.stage
        todo = self.demand[k] & ~node.done
        runs = wave & todo
        new = wave & ~node.resident
        load_s, bound = node.load_s, node.bound
        for i in bits(new):
            load_s += self.load_s[i]
            # This residency runs its model's calls of this stage, or (loaded ahead) all of
            # those of its next stage; either after the load and after the stages before.
            s = k if runs >> i & 1 else self._next_use(i, k)
            bound = max(bound, max(load_s, self.head[s]) + self.work[i][s] + self.tail[s])
        done = node.done | runs
        stage, done = (k + 1, 0) if done == self.demand[k] else (k, done)
        spec = WaveSpec(
            k,
            frozenset(self.names[i] for i in bits(wave)),
            tuple(self.names[i] for i in bits(new)),
            tuple(self.names[i] for i in bits(node.resident & ~wave)),
            frozenset(self.names[i] for i in bits(runs)),
        )
        return PartialPlan(
            stage,
            done,
            wave,
            ((node.unrun & wave) | new) & ~runs,
            node.loads + new.bit_count(),
            node.bytes_loaded + self.bytes_of(new),
            load_s,
            bound,
            node.count + 1,
            node,
            spec,
        )

    def _next_use(self, i: int, k: int) -> int:
        return next(s for s in range(k + 1, len(self.demand)) if self.demand[s] >> i & 1)

    def quick_bound(self, node: PartialPlan) -> float:
        """A lower bound on the makespan of any plan that starts with ``node``'s waves, from
        load seconds and call seconds alone.

        Loads are serial, so the n-th ends no sooner than the first n together; a residency's
        calls start after its load and after every stage before theirs, each stage lasting at
        least its longest model chain and its device-seconds. Every model a later call needs
        that is not resident must be loaded again after all of this, and the last such load is
        followed by its model's calls and every later stage.
        """
        if node.stage == len(self.demand):
            return node.bound
        k = node.stage
        heads = {s: self.head[s] for s in range(k, len(self.demand))}
        return max(node.bound, self._reloads(node, node.load_s, heads))

    def bound(self, node: PartialPlan) -> tuple[float, tuple[float, ...], tuple[float, ...]]:
        """:meth:`quick_bound` sharpened by simulating ``node``'s waves as if the next wave
        unloaded everything: loads then also wait for memory, and stages for real calls. With
        it, two marks of when each thing the rest of the run waits for is free (the last load,
        the stages begun, each model): at the earliest any continuation sees, and at the latest
        (they differ when the next waves' unloads could free memory for this prefix's loads).

        Exact for a complete plan. For a partial one it bounds every continuation as long as
        adding calls only slows the ones already placed (see :func:`search` on when sharing
        breaks that; the exhaustive comparison has not caught this bound wrong).
        """
        waves = node.waves()
        calls, sizes, profile = self.calls, self.sizes, self.profile
        timing, relaxed = simulate_prefix(
            waves, calls, sizes, profile, release=True, resident=self.resident
        )
        if node.stage == len(self.demand):
            return timing.makespan_s, (), ()
        k = node.stage
        loads_end, ends, free = _frontier(timing)
        before = ends.get(k - 1, 0.0)
        end = ends.get(k, 0.0)  # stage k ends no sooner than its calls placed, nor the others
        for i in bits(self.demand[k] & ~node.done):
            start = before if node.resident >> i & 1 else max(loads_end + self.load_s[i], before)
            end = max(end, start + self.work[i][k])
        heads = {k: before}
        for s in range(k + 1, len(self.demand)):
            heads[s] = end if s == k + 1 else heads[s - 1] + self.stage_lb[s - 1]
        bound = max(
            self.quick_bound(node),
            timing.makespan_s,
            end + self.tail[k],
            self._reloads(node, loads_end, heads),
        )
        early = self._mark(node, loads_end, ends, free)
        if not relaxed:
            return bound, early, early
        held, _ = simulate_prefix(
            waves, calls, sizes, profile, release=False, resident=self.resident
        )
        return bound, early, self._mark(node, *_frontier(held))

    def _mark(
        self, node: PartialPlan, loads_end: float, ends: Mapping[int, float], free: Sequence[float]
    ) -> tuple[float, ...]:
        """When each thing the rest of the run waits for is free. What is free before the rest
        could use it makes no difference: memory is wanted from the next load on, a resident
        model from its stage's start at the earliest."""
        before = ends.get(node.stage - 1, 0.0)
        marks = [
            max(t, min(loads_end, before) if node.resident >> i & 1 else loads_end)
            for i, t in enumerate(free)
        ]
        return (loads_end, before, max(ends.get(node.stage, 0.0), before), *marks)

    def _reloads(self, node: PartialPlan, loads_end: float, heads: Mapping[int, float]) -> float:
        """The bound from the models a later call needs that are not resident: each loads after
        ``loads_end``, the last after all of them, and its calls start no sooner than
        ``heads[stage]``."""
        k = node.stage
        todo = self.demand[k] & ~node.done
        missing = (todo | self.after[k]) & ~node.resident
        if not missing:
            return 0.0
        total = loads_end + sum(self.load_s[i] for i in bits(missing))
        each, last = 0.0, math.inf
        for i in bits(missing):
            stages = [s for s in range(k + 1, len(self.demand)) if self.demand[s] >> i & 1]
            if todo >> i & 1:
                stages.append(k)
            ready = loads_end + self.load_s[i]
            each = max(
                each,
                min(max(ready, heads[s]) + self.work[i][s] + self.tail[s] for s in stages),
            )
            last = min(
                last, *(max(total, heads[s]) + self.work[i][s] + self.tail[s] for s in stages)
            )
        return max(each, last)


def _frontier(timing: Timing) -> tuple[float, dict[int, float], list[float]]:
    """From a prefix's spans: when its last load ends, when each stage's calls placed so far
    end, and when each model is last busy (by first appearance)."""
    ends: dict[int, float] = {}
    free: dict[str, float] = {}
    loads_end = 0.0
    for span in timing.spans:
        if span.kind == "unload":
            continue
        free[span.model] = max(free.get(span.model, 0.0), span.end_s)
        if span.kind == "load":
            loads_end = max(loads_end, span.end_s)
        else:
            ends[span.stage] = max(ends.get(span.stage, 0.0), span.end_s)
    return loads_end, ends, list(free.values())


def _le(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y + 1e-9 for x, y in zip(a, b, strict=True))
