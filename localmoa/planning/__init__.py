"""Planning: footprints and a budget in, waves out. Pure and deterministic: no I/O, no clock,
no backend; the caller reads the device and passes what it found.

:func:`plan_run` is the one way a plan is made: ``localmoa run`` and ``localmoa plan`` (through
:mod:`localmoa.runtime.prepare`), the engine's re-plan mid-run, and each ``serve`` request. It
takes the fewest-loads plan (:mod:`~localmoa.planning.fewest_loads`, exact), times it on the
machine's cost-model profile when the backends are timed, and with ``plan_for = "time"`` looks
for a faster one (:mod:`~localmoa.planning.refine`). A plan with more loads than the fewest is
taken only when estimated at least ``min_gain`` faster: the estimate has an error of its own
(``scripts/bench_fidelity.py`` measures it), and a smaller gain on paper may be a loss in fact.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from localmoa.hardware import Budget, Device
from localmoa.planning.fewest_loads import Plan, make_plan
from localmoa.planning.profiles import Profile, device_profiles, profile_for
from localmoa.planning.refine import refine, timed
from localmoa.runtime.moa import Call

if TYPE_CHECKING:
    from localmoa.config import Settings

__all__ = ["PlanPolicy", "Profile", "plan_run"]


@dataclass(frozen=True)
class PlanPolicy:
    """How plans are made on this machine: the same for a run's first plan, its re-plans and
    every request a server answers."""

    profile: Profile | None
    """The cost-model profile of this machine; None for untimed backends (a fake, an
    always-resident OpenAI-compatible server): the fewest loads, with no estimate."""
    plan_for: Literal["time", "loads"] = "time"
    """"time": refine the fewest-loads plan for time; "loads": keep it (but still time it)."""
    min_gain: float = 0.05
    """The estimated gain (a fraction) a plan with extra loads must bring (settings.min_gain)."""
    timing_profile: str = "auto"
    """settings.timing_profile: with several devices, each is timed on its own profile
    (:func:`~localmoa.planning.profiles.device_profiles`) named by it or by its kind."""

    @classmethod
    def from_settings(cls, settings: Settings, device: Budget | None, *, timed: bool) -> PlanPolicy:
        """The policy ``settings`` ask for. ``timed``: every backend of the plan loads weights
        as the cost model assumes (else there is no profile). ``device`` is the device's own
        budget as read by the caller (:func:`localmoa.hardware.device_budget`); it is needed
        only when ``timed`` and ``settings.timing_profile`` is "auto"."""
        profile = None
        if timed:
            if device is None and settings.timing_profile == "auto":
                raise ValueError("a timed policy with timing_profile 'auto' needs the device")
            profile = profile_for(device, name=settings.timing_profile)
        return cls(profile, settings.plan_for, settings.min_gain, settings.timing_profile)


def plan_run(
    stages: Sequence[Sequence[Call]],
    sizes: Mapping[str, int],
    budget: int,
    policy: PlanPolicy,
    *,
    resident: Sequence[str] = (),
    prompt: str | None = None,
    devices: Sequence[Device] | None = None,
    splittable: Collection[str] = (),
    where: Mapping[str, str] | None = None,
    pinned: Mapping[str, str] | None = None,
) -> Plan:
    """The plan for ``stages`` within ``budget`` bytes, made as ``policy`` says.

    ``devices``: the bins models are placed in (then their sum is the budget, and ``budget`` is
    not read); ``where`` the device of each ``resident`` model, ``pinned`` the models that go
    on one named device only, ``splittable`` the models that may span several devices (see
    :func:`~localmoa.planning.fewest_loads.make_plan`). With several devices the plan is the
    fewest loads, timed but not refined: the search for a faster plan
    (:mod:`~localmoa.planning.refine`) knows one device.

    ``sizes`` are the models' bytes, ``resident`` the models loaded already (a plan made
    mid-run or for a request to a warm server), ``prompt`` the prompt when known (it sizes the
    first layer's calls in the estimate). Always the fewest loads first; with a profile, the
    plan carries ``estimated_seconds`` and ``timed_for`` (also with ``plan_for = "loads"``),
    and with ``plan_for = "time"`` it may be a faster plan: the same loads reordered, estimated
    faster at all, or more loads, estimated at least ``min_gain`` faster than the fastest plan
    with the fewest (then ``fewest_loads`` and ``fewest_loads_seconds`` say what was traded).
    Raises BudgetError as :func:`~localmoa.planning.fewest_loads.make_plan` does.
    """
    bins = {d.name: d.memory for d in devices} if devices else None
    plan = make_plan(
        [[c.model for c in stage] for stage in stages],
        sizes,
        budget,
        resident=resident,
        devices=bins,
        splittable=splittable,
        where=where,
        pinned=pinned,
        nodes={d.name: d.node for d in devices} if devices else None,
    )
    if policy.profile is None:
        return plan
    if devices and len(plan.devices) > 1:
        profiles = device_profiles(devices, name=policy.timing_profile)
        return timed(
            plan, stages, sizes, policy.profile, prompt=prompt, resident=resident, devices=profiles
        )
    if policy.plan_for == "loads":
        return timed(plan, stages, sizes, policy.profile, prompt=prompt, resident=resident)
    return refine(
        plan,
        stages,
        sizes,
        policy.profile,
        prompt=prompt,
        resident=resident,
        min_gain=policy.min_gain,
    )
