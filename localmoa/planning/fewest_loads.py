"""Plan, before anything loads, which models are resident together and in which order.

Pure and deterministic: an ensemble's stages, each model's bytes and the budget go in; an ordered
list of waves comes out. No I/O, no clock, no backend.

The problem. A run is a sequence of stages: layers 1..L, then the aggregator as stage L+1. Stage
k calls a multiset of models; let D_k be its distinct set. Stage k+1 needs every answer of stage
k, so stages run in order. A *wave* is a set of models resident together (its bytes within the
budget) and the calls run in it. The cost to minimise is the number of loads.

Why a search over stage boundaries is exact. Within a stage we may assume, without raising the
number of loads (the exhaustive comparison in tests/planning/test_fewest_loads.py checks this):

1. models of D_k already resident when the stage starts run in its first wave, for free;
2. every other model of D_k is loaded exactly once in the stage (each fits alone, checked first),
   so stage k costs exactly |D_k \\ R| loads, where R is what was resident when it started;
3. what the stage leaves resident for later is C ∪ E: C ⊆ R carried through the whole stage
   (idle or not), E ⊆ D_k \\ R loaded in the stage's last wave. Evicting a model and reloading
   it in the same stage never beats reloading it in the next one.

So the total is Σ_k |D_k \\ R_{k-1}| and the only choice that matters is R_k = C ∪ E at each
boundary, subject to: bytes(C ∪ E) ≤ budget, and every other model loaded in the stage fits beside
C. A dynamic programme over boundary states R_k finds the minimum. Ties are broken by fewer bytes
loaded (load time is proportional to bytes), then by fewer waves (more concurrency); waves within a
stage come from an exact bin packing of the stage's loads around C, P (resident models that run
first and then leave) and E.

Several devices change one thing: "within the budget" becomes "packs onto the devices" (each
model on one device whose remaining memory holds it; :mod:`~localmoa.planning.placement`), so
every test above of bytes against the budget asks the packer instead, and the waves within a
stage are packed first-fit. The same argument holds (a subset of a feasible set is feasible, a
model that fits no device beside C is loaded in a wave of its own beside C). Once the plan is
made, devices are assigned wave by wave, each model kept where it is while it stays resident.

Beyond small ensembles the enumeration is capped: a stage whose choices number more than
``MAX_WORK`` in all (2 to the power of the models that could stay, summed over states) tries a few
greedy choices per state instead (soonest next use first, as Belady's rule, then smallest first),
and at most ``MAX_FRONTIER`` boundary states are kept. Whatever is pruned, a stage never
costs more than |D_k| loads, so a plan always has ``loads ≤ Σ_k |D_k|``; ``Plan.optimal`` says
whether nothing was pruned, in which case ``loads`` is the proven minimum.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

from pydantic import BaseModel, Field

from localmoa.errors import BudgetError
from localmoa.planning.bitsets import bits, mask_of, submasks
from localmoa.planning.placement import Assignment, Packer
from localmoa.sizes import format_bytes

__all__ = ["Plan", "Wave", "make_plan"]

MAX_WORK = 1 << 15
MAX_FRONTIER = 256
MAX_EXACT_PACK = 10
DEVICE = "device"
"""The name of the one device of a plan made for a budget alone."""


class Wave(BaseModel):
    """Models resident together, the calls run while they are, and the swaps before it."""

    layer: int = Field(description="1-based stage; the aggregator is layer L+1")
    resident: list[str] = Field(description="every model resident during this wave")
    runs: list[str] = Field(description="one entry per call run in this wave")
    load: list[str] = Field(description="models loaded before this wave")
    unload: list[str] = Field(description="models unloaded before this wave (before the loads)")
    bytes: int = Field(description="sum of the resident models' bytes")
    devices: dict[str, list[str]] = Field(
        default_factory=dict,
        description="device -> the models resident on it during this wave (a split model is "
        "listed under each device it spans)",
    )
    shares: dict[str, dict[str, int]] = Field(
        default_factory=dict,
        description="split models only: model -> device -> the bytes it holds there",
    )


class Plan(BaseModel):
    """An ordered list of waves that covers every call of every stage once."""

    budget_bytes: int
    devices: dict[str, int] = Field(
        default_factory=dict,
        description="device -> the bytes a plan may use on it, in order; the budget is their sum",
    )
    loads: int
    lower_bound: int = Field(description="distinct models: no plan can load fewer")
    optimal: bool = Field(
        description="loads is the proven minimum (the search was not pruned); a plan refined "
        "for time (localmoa.planning.refine) may load more, and then says False"
    )
    bytes_loaded: int
    waves: list[Wave]
    fewest_loads: int | None = Field(
        default=None,
        description="the planner's fewest loads, when a plan refined for time loads more",
    )
    fewest_loads_seconds: float | None = Field(
        default=None,
        description="when a plan refined for time loads more than the fewest: the estimate of "
        "the fastest plan with the fewest loads, which the extra loads beat by at least "
        "settings.min_gain",
    )
    estimated_seconds: float | None = Field(
        default=None,
        description="the cost model's estimate of the run (every call writing max_tokens) on "
        "the profile named by timed_for; None when the plan was not timed",
    )
    timed_for: str | None = Field(
        default=None, description="the cost-model profile whose speeds timed the plan"
    )


@dataclass(frozen=True)
class _Step:
    """One stage's choice: what was resident at its start, carried set C, loads kept E."""

    start: int
    carry: int
    keep: int


Cost = tuple[int, int, int]  # (loads, bytes loaded, waves)


def make_plan(
    stages: Sequence[Sequence[str]],
    sizes: Mapping[str, int],
    budget: int,
    *,
    resident: Sequence[str] = (),
    devices: Mapping[str, int] | None = None,
    splittable: Collection[str] = (),
    where: Mapping[str, str] | None = None,
    pinned: Mapping[str, str] | None = None,
    nodes: Mapping[str, str | None] | None = None,
) -> Plan:
    """Plan ``stages`` (model names per call, in call order) under ``budget`` bytes.

    ``resident`` models are loaded already (a plan made mid-run): the ones the run still needs
    are free to use, the others are unloaded by the first wave. Should they not fit the budget
    together (a measurement came out larger than its estimate), the ones needed latest go first.

    ``devices`` (name -> bytes, in order) are the bins models are placed in; then ``budget`` is
    ignored for their sum, a resident set must pack onto them (:mod:`~localmoa.planning.
    placement`), ``where`` says which device each resident model is on, and the models in
    ``splittable`` may span several devices when none holds them alone, and ``pinned`` models
    go on the device named for them only; ``nodes`` says which cluster node each device is on
    (a split stays on one). None: one device of ``budget`` bytes. Raises
    BudgetError when a device is not positive or a model fits nowhere, and ValueError for a
    size that is not a whole number of bytes ≥ 0.
    """
    bins = dict(devices) if devices else {DEVICE: budget}
    budget = sum(bins.values())
    if any(size <= 0 for size in bins.values()):
        if devices is None or len(bins) == 1:
            raise BudgetError(f"the memory budget must be positive, got {budget} bytes")
        empty = next(name for name, size in bins.items() if size <= 0)
        raise BudgetError(f'device "{empty}" has no memory to plan with ({bins[empty]} bytes)')
    if not stages or any(not stage for stage in stages):
        raise ValueError("every stage must call at least one model")
    names = list(dict.fromkeys(model for stage in stages for model in stage))
    for name in names:
        # Footprint refuses negative parts; a negative size here would be a bug upstream, and
        # one once sent the cost model searching forever.
        if isinstance(sizes[name], bool) or not isinstance(sizes[name], int) or sizes[name] < 0:
            raise ValueError(f'model "{name}": {sizes[name]!r} is not a size in bytes')
        pin = (pinned or {}).get(name)
        if pin is not None and pin not in bins:
            raise BudgetError(f'model "{name}" is pinned to device "{pin}", which is not planned')
        if pin is not None and sizes[name] > bins[pin]:
            raise BudgetError(
                f'model "{name}" needs {format_bytes(sizes[name])} but device "{pin}", which '
                f"[models.{name}] pins it to, has {format_bytes(bins[pin])}; pin it to a larger "
                "device, remove its device key, lower its n_ctx, or use a smaller quantization"
            )
        _check_fits(name, sizes[name], bins, name in splittable, nodes or {})
    split = mask_of(i for i, n in enumerate(names) if n in splittable)
    pins = {i: (pinned or {})[n] for i, n in enumerate(names) if n in (pinned or {})}
    packer = Packer(bins, [sizes[n] for n in names], split, pins, nodes)
    planner = _Planner(stages, names, [sizes[n] for n in names], budget, resident, packer)
    return planner.solve(where or {})


def _check_fits(
    name: str,
    size: int,
    bins: Mapping[str, int],
    splittable: bool,
    nodes: Mapping[str, str | None],
) -> None:
    """A model that fits no device alone (nor all of them together, when it may be split)
    can never be loaded: say so before planning, with what to do."""
    largest = max(bins.values())
    if size <= largest:
        return
    if len(bins) == 1:
        raise BudgetError(
            f'model "{name}" needs {format_bytes(size)} but the memory budget is '
            f"{format_bytes(largest)}, so it can never be loaded; raise the budget "
            "(--memory-budget or settings.memory_budget), lower the model's n_ctx, "
            "or use a smaller quantization"
        )
    biggest = max(bins, key=lambda n: bins[n])
    if not splittable:
        raise BudgetError(
            f'model "{name}" needs {format_bytes(size)} but the largest device, "{biggest}", '
            f"has {format_bytes(largest)}; lower its n_ctx, use a smaller quantization, or, for "
            f"a llama.cpp model, set split = true on [models.{name}] to spread it over several "
            "devices"
        )
    together: dict[str | None, int] = {}
    for device, memory in bins.items():
        together[nodes.get(device)] = together.get(nodes.get(device), 0) + memory
    most = max(together.values())
    if size > most:
        where = f"all {len(bins)} devices" if len(together) == 1 else "any one node's devices"
        raise BudgetError(
            f'model "{name}" needs {format_bytes(size)}, more than {where} together '
            f"({format_bytes(most)}); lower its n_ctx or use a smaller quantization"
        )


class _Planner:
    def __init__(
        self,
        stages: Sequence[Sequence[str]],
        names: list[str],
        size: list[int],
        budget: int,
        resident: Sequence[str],
        packer: Packer,
    ) -> None:
        self.stages = stages
        self.packer = packer
        self.fits = packer.fits
        self.names = names
        self.size = size
        self.budget = budget
        index = {name: i for i, name in enumerate(names)}
        self.demand = [mask_of(index[m] for m in stage) for stage in stages]
        self.future = [0] * len(stages)
        for k in range(len(stages) - 2, -1, -1):
            self.future[k] = self.future[k + 1] | self.demand[k + 1]
        self.next_use = [
            [
                next((j for j in range(k + 1, len(stages)) if self.demand[j] >> i & 1), len(stages))
                for i in range(len(names))
            ]
            for k in range(len(stages))
        ]
        self.pruned = False
        self.bytes_of = cache(self._bytes)
        # Already loaded: kept if needed again and they fit (soonest needed first), else they
        # leave in the first wave.
        self.start = 0
        self.leaving = [r for r in resident if r not in index]
        for i in sorted((index[r] for r in resident if r in index), key=self._first_use):
            if self.fits(self.start | 1 << i):
                self.start |= 1 << i
            else:
                self.leaving.append(names[i])
        self.largest = cache(lambda mask: max((self.size[i] for i in bits(mask)), default=0))
        self.pack = cache(self._pack)

    def _first_use(self, i: int) -> int:
        return next(k for k, demand in enumerate(self.demand) if demand >> i & 1)

    def _bytes(self, mask: int) -> int:
        return sum(self.size[i] for i in bits(mask))

    def solve(self, where: Mapping[str, str]) -> Plan:
        frontier: dict[int, tuple[Cost, tuple[_Step, ...]]] = {self.start: ((0, 0, 0), ())}
        for k in range(len(self.demand)):
            nxt: dict[int, tuple[Cost, tuple[_Step, ...]]] = {}
            reach = self.demand[k] | self.future[k]
            work = sum(1 << ((s | self.demand[k]) & self.future[k]).bit_count() for s in frontier)
            exact = work <= MAX_WORK and reach.bit_count() <= 20
            self.pruned |= not exact
            for start, (cost, steps) in frontier.items():
                for step, (loads, loaded, waves) in self._choices(k, start, exact):
                    total = (cost[0] + loads, cost[1] + loaded, cost[2] + waves)
                    end = step.carry | step.keep
                    if end not in nxt or total < nxt[end][0]:
                        nxt[end] = (total, (*steps, step))
            frontier = self._prune(nxt)
        cost, steps = min(frontier.values(), key=lambda v: v[0])
        return self._placed(self._render(cost, steps), where)

    def _prune(
        self, states: dict[int, tuple[Cost, tuple[_Step, ...]]]
    ) -> dict[int, tuple[Cost, tuple[_Step, ...]]]:
        """Drop states a superset matches or beats on loads and bytes: from a superset every
        later choice is still open (drop the extras at once), so it is never worse."""
        kept: list[tuple[int, tuple[Cost, tuple[_Step, ...]]]] = []
        for mask, (cost, steps) in sorted(states.items(), key=lambda kv: (kv[1][0], -kv[0])):
            if not any(
                other & mask == mask and c[0] <= cost[0] and c[1] <= cost[1]
                for other, (c, _) in kept
            ):
                kept.append((mask, (cost, steps)))
        if len(kept) > MAX_FRONTIER:
            self.pruned = True
            del kept[MAX_FRONTIER:]
        return dict(kept)

    def _choices(self, k: int, start: int, exact: bool) -> Iterator[tuple[_Step, Cost]]:
        new = self.demand[k] & ~start
        loads, loaded = new.bit_count(), self.bytes_of(new)
        for carry, keep in self._candidates(k, start, new, exact):
            step = _Step(start, carry, keep)
            # First-fit decreasing ranks the choices; the chosen path is packed exactly later.
            yield step, (loads, loaded, len(self._bins(k, step, exact=False)))

    def _feasible(self, new: int, carry: int, keep: int) -> bool:
        """C ∪ E fits, and every other model loaded in the stage fits beside C."""
        if not self.packer.single:
            return self.fits(carry | keep) and all(
                self.fits(carry | 1 << i) for i in bits(new & ~keep)
            )
        held = self.bytes_of(carry)
        if held + self.bytes_of(keep) > self.budget:
            return False
        return held + self.largest(new & ~keep) <= self.budget

    def _candidates(self, k: int, start: int, new: int, exact: bool) -> Iterator[tuple[int, int]]:
        """Maximal feasible (C, E) choices: a superset end state is never worse, so a choice
        that could take one more model without breaking feasibility is skipped."""
        keepable, loadable = start & self.future[k], new & self.future[k]
        feasible = self._feasible
        if exact:
            for carry in submasks(keepable):
                for keep in submasks(loadable):
                    if (
                        feasible(new, carry, keep)
                        and not any(
                            feasible(new, carry | 1 << i, keep) for i in bits(keepable & ~carry)
                        )
                        and not any(
                            feasible(new, carry, keep | 1 << i) for i in bits(loadable & ~keep)
                        )
                    ):
                        yield carry, keep
            return
        # Too many to enumerate: greedy picks, soonest next use first (Belady), then smallest.
        yield 0, 0
        for order in (
            lambda i: (self.next_use[k][i], self.size[i], i),
            lambda i: (self.size[i], self.next_use[k][i], i),
        ):
            carry = keep = 0
            for i in sorted(bits(keepable | loadable), key=order):
                if keepable >> i & 1 and feasible(new, carry | 1 << i, keep):
                    carry |= 1 << i
                elif loadable >> i & 1 and feasible(new, carry, keep | 1 << i):
                    keep |= 1 << i
            yield carry, keep

    def _bins(self, k: int, step: _Step, *, exact: bool) -> tuple[tuple[str, tuple[int, ...]], ...]:
        first = self.demand[k] & step.start
        rest = self.demand[k] & ~step.start & ~step.keep
        if not self.packer.single:
            return self._pack_devices(step.carry, first, step.keep, rest)
        return self.pack(
            self.budget - self.bytes_of(step.carry),
            self.bytes_of(first & ~step.carry),
            first != 0,
            self.bytes_of(step.keep),
            step.keep != 0,
            rest,
            exact,
        )

    def _pack(
        self,
        cap: int,
        first_fill: int,
        has_first: bool,
        last_fill: int,
        has_last: bool,
        rest: int,
        exact: bool,
    ) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Fewest waves for the stage: bins of ``cap`` bytes, the first holding the resident
        runners (``first_fill``), the last the models kept for later (``last_fill``)."""
        items = sorted(bits(rest), key=lambda i: (-self.size[i], i))
        layouts: list[list[tuple[str, int]]] = []
        if has_first and has_last and first_fill + last_fill <= cap:
            layouts.append([("both", first_fill + last_fill)])
        specials = [("first", first_fill)] if has_first else []
        if has_last:
            specials.append(("last", last_fill))
        layouts.append(specials)
        best: tuple[tuple[str, tuple[int, ...]], ...] = ()
        for layout in layouts:
            bins = self._fill(cap, layout, items, exact)
            if bins[0][0] == "both" and len(bins) > 1:
                continue  # the one bin both first and last cannot have company
            if not best or len(bins) < len(best):
                best = bins
        return best

    def _pack_devices(
        self, carry: int, first: int, keep: int, rest: int
    ) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """:meth:`_pack` on several devices: the stage's waves, each of which must pack onto
        them with the carried models. First-fit decreasing: fewer waves is concurrency, not
        loads, so an exact packing is not worth its cost here."""
        fits = self.fits
        specials: list[tuple[str, int]] = []
        # ``first``: the stage's models resident at its start (carried ones too): when there
        # are any, the stage's first wave runs them, even with nothing else in it.
        if first and keep and fits(carry | first | keep):
            specials.append(("both", first | keep))
        else:
            if first:
                specials.append(("first", first))
            if keep:
                specials.append(("last", keep))
        kinds = [kind for kind, _ in specials]
        masks = [mask for _, mask in specials]
        members: list[list[int]] = [[] for _ in specials]
        for i in sorted(bits(rest), key=lambda i: (-self.size[i], i)):
            slot = next(
                (b for b, m in enumerate(masks) if kinds[b] != "both" and fits(carry | m | 1 << i)),
                None,
            )
            if slot is None:
                kinds.append("plain")
                masks.append(0)
                members.append([])
                slot = len(masks) - 1
            masks[slot] |= 1 << i
            members[slot].append(i)
        if kinds and kinds[0] == "both" and len(kinds) > 1:  # the one bin cannot have company
            kinds[0:1], members[0:1] = ["first", "last"], [[], []]
        return _ordered(kinds, members)

    def _fill(
        self, cap: int, layout: list[tuple[str, int]], items: list[int], exact: bool
    ) -> tuple[tuple[str, tuple[int, ...]], ...]:
        size = self.size
        kinds = [kind for kind, _ in layout]
        fills = [fill for _, fill in layout]
        members: list[list[int]] = [[] for _ in layout]
        if not exact or len(items) > MAX_EXACT_PACK:  # first-fit decreasing
            for i in items:
                slot = next((b for b, f in enumerate(fills) if f + size[i] <= cap), None)
                if slot is None:
                    kinds.append("plain")
                    fills.append(0)
                    members.append([])
                    slot = len(fills) - 1
                fills[slot] += size[i]
                members[slot].append(i)
            return _ordered(kinds, members)
        best: list[tuple[list[str], list[list[int]]]] = []
        limit = [len(layout) + len(items) + 1]

        def place(n: int) -> None:
            if len(fills) >= limit[0]:
                return
            if n == len(items):
                limit[0] = len(fills)
                best[:] = [(list(kinds), [list(m) for m in members])]
                return
            i, tried = items[n], set()
            for b in range(len(fills)):
                key = (kinds[b], fills[b]) if kinds[b] == "plain" else (kinds[b], b)
                if fills[b] + size[i] <= cap and key not in tried:
                    tried.add(key)
                    fills[b] += size[i]
                    members[b].append(i)
                    place(n + 1)
                    members[b].pop()
                    fills[b] -= size[i]
            kinds.append("plain")
            fills.append(size[i])
            members.append([i])
            place(n + 1)
            kinds.pop()
            fills.pop()
            members.pop()

        place(0)
        return _ordered(*best[0])

    def _render(self, cost: Cost, steps: tuple[_Step, ...]) -> Plan:
        waves: list[Wave] = []
        resident = self.start
        leaving = self.leaving
        for k, step in enumerate(steps):
            demand = self.demand[k]
            first = demand & step.start
            for kind, items in self._bins(k, step, exact=True):
                mask = step.carry | mask_of(items)
                runs = mask_of(items)
                if kind in ("first", "both"):
                    mask |= step.start & demand
                    runs |= first
                if kind in ("last", "both"):
                    mask |= step.keep
                    runs |= step.keep
                waves.append(
                    Wave(
                        layer=k + 1,
                        resident=self._names(mask),
                        runs=[m for m in self.stages[k] if runs >> self.names.index(m) & 1],
                        load=self._names(mask & ~resident),
                        unload=leaving + self._names(resident & ~mask),
                        bytes=self.bytes_of(mask),
                    )
                )
                resident, leaving = mask, []
        return Plan(
            budget_bytes=self.budget,
            loads=cost[0],
            lower_bound=len(self.names) - self.start.bit_count(),
            optimal=not self.pruned,
            bytes_loaded=cost[1],
            waves=waves,
        )

    def _names(self, mask: int) -> list[str]:
        return [self.names[i] for i in bits(mask)]

    def _placed(self, plan: Plan, where: Mapping[str, str]) -> Plan:
        """``plan`` with each wave's devices: a model keeps its device while it stays resident
        (``where`` for those resident before the plan); the ones loaded go around them. When
        they cannot (the set fits, but not around what stays), the wave is packed afresh and a
        model that must change device is unloaded and loaded again there: counted as a load,
        and the plan no longer claims the fewest."""
        packer, devices = self.packer, self.packer.names
        index = {name: i for i, name in enumerate(self.names)}
        on: dict[int, int] = {
            index[m]: devices.index(d) for m, d in where.items() if m in index and d in devices
        }
        waves: list[Wave] = []
        moved: list[str] = []
        for wave in plan.waves:
            mask = mask_of(index[m] for m in wave.resident)
            kept = {i: d for i, d in on.items() if mask >> i & 1 and self.names[i] not in wave.load}
            got = packer.pack(mask, kept)
            move: list[str] = []
            if got is None:
                got = packer.pack(mask)
                if got is None:  # fits() said it packs: only a search cut short gets here
                    raise AssertionError(f"wave {wave.resident} does not pack onto {devices}")
                move = [self.names[i] for i, d in kept.items() if got[i][0][0] != d]
            # A split model's main device (most of its bytes) is the one it keeps.
            on = {i: max(spans, key=lambda s: s[1])[0] for i, spans in got.items()}
            waves.append(_with_devices(wave, got, self.names, devices, move))
            moved += move
        update: dict[str, object] = {
            "waves": waves,
            "devices": dict(zip(devices, packer.caps, strict=True)),
        }
        if moved:
            update["loads"] = plan.loads + len(moved)
            update["optimal"] = False
            update["bytes_loaded"] = plan.bytes_loaded + sum(self.size[index[m]] for m in moved)
        return plan.model_copy(update=update)


def _with_devices(
    wave: Wave, got: Assignment, names: list[str], devices: list[str], move: list[str]
) -> Wave:
    """``wave`` with its placement: device -> models, split models' shares, and the models that
    had to move (unloaded and loaded again in this wave)."""
    order = {name: i for i, name in enumerate(wave.resident)}
    placed: dict[str, list[str]] = {d: [] for d in devices}
    shares: dict[str, dict[str, int]] = {}
    for i, spans in sorted(got.items(), key=lambda kv: order[names[kv[0]]]):
        for d, _ in spans:
            placed[devices[d]].append(names[i])
        if len(spans) > 1:
            shares[names[i]] = {devices[d]: size for d, size in spans}
    update: dict[str, object] = {
        "devices": {d: models for d, models in placed.items() if models},
        "shares": shares,
    }
    if move:
        update["unload"] = [*wave.unload, *move]
        update["load"] = [*move, *wave.load]
    return wave.model_copy(update=update)


def _ordered(kinds: list[str], members: list[list[int]]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Special first bin first, the kept-for-later bin last, plain bins between."""
    rank = {"first": 0, "both": 0, "plain": 1, "last": 2}
    pairs = sorted(zip(kinds, members, strict=True), key=lambda p: rank[p[0]])
    return tuple((kind, tuple(sorted(m))) for kind, m in pairs)
