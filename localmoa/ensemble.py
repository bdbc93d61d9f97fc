"""From a config and an ensemble name to everything a run needs, before anything loads.

This is where the pure parts meet the facts of the machine: each model's footprint (from its
backend: GGUF header, Ollama's model facts or an earlier measurement, or the ``memory``
override), the device budget, and the plan. ``localmoa plan`` stops here; ``localmoa run`` hands
the result to the executor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from localmoa.backends.base import Backend
from localmoa.config import Config
from localmoa.costmodel import Profile
from localmoa.errors import BudgetError, UserError
from localmoa.hardware import Budget, resolve_budget
from localmoa.memory import Footprint
from localmoa.moa import Call, calls_for
from localmoa.planner import Plan, make_plan
from localmoa.refine import profile_for, refine

__all__ = ["TIMED_BACKENDS", "Prepared", "footprints", "prepare"]

TIMED_BACKENDS = frozenset({"llamacpp", "ollama"})
"""Backends whose loads read weights as the cost model assumes; a plan that uses any other (a
fake, an always-resident OpenAI-compatible server) keeps the fewest-loads plan."""


@dataclass(frozen=True)
class Prepared:
    """A run fully decided: its calls by stage, what each model costs, the budget, the plan."""

    ensemble: str
    stages: list[list[Call]]
    footprints: dict[str, Footprint]
    budget: Budget
    plan: Plan
    timing: Profile | None = None
    """The cost-model profile the plan was refined on; None when it was not."""


async def footprints(
    config: Config, names: list[str], backends: Mapping[str, Backend]
) -> dict[str, Footprint]:
    """Every named model's footprint; all problems at once when several models are unusable."""
    found = await asyncio.gather(
        *(backends[config.models[n].backend].footprint(n, config.models[n]) for n in names),
        return_exceptions=True,
    )
    problems = [f for f in found if isinstance(f, BaseException)]
    if not problems:
        return {n: f for n, f in zip(names, found, strict=True) if isinstance(f, Footprint)}
    for problem in problems:
        if not isinstance(problem, UserError):
            raise problem
    if len(problems) == 1:
        raise problems[0]
    raise UserError(
        f"{len(problems)} models cannot be used:\n" + "\n".join(f"  {p}" for p in problems)
    )


async def prepare(
    config: Config,
    ensemble: str,
    backends: Mapping[str, Backend],
    *,
    memory_budget: str | None = None,
    prompt: str | None = None,
) -> Prepared:
    """Resolve ``ensemble`` of ``config`` into calls, footprints, budget and plan.

    Reads model headers or asks model servers (never loads weights); raises UserError
    subclasses for what the user must fix. With ``settings.plan_for = "time"`` and only
    ``TIMED_BACKENDS``, the plan is refined for time on this machine's kind of hardware
    (``prompt``, when known, sizes the first layer's prompt).
    """
    stages = calls_for(config.ensemble(ensemble))
    used = list(dict.fromkeys(c.model for stage in stages for c in stage))
    sizes = await footprints(config, used, backends)
    budget = resolve_budget(memory_budget, config.settings.memory_budget)
    totals = {name: fp.total for name, fp in sizes.items()}
    try:
        plan = make_plan([[c.model for c in stage] for stage in stages], totals, budget.bytes)
    except BudgetError as exc:
        raise BudgetError(f"{exc} (budget from {budget.detail})") from None
    timing = None
    if config.settings.plan_for == "time" and all(
        config.models[name].backend in TIMED_BACKENDS for name in used
    ):
        timing = profile_for(budget, name=config.settings.timing_profile)
        plan = refine(plan, stages, totals, timing, prompt=prompt)
    return Prepared(ensemble, stages, sizes, budget, plan, timing)
