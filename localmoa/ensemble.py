"""From a config and an ensemble name to everything a run needs, before anything loads.

This is where the pure parts meet the facts of the machine: each model's footprint (GGUF header
or ``memory`` override), the device budget, and the plan. ``localmoa plan`` stops here;
``localmoa run`` hands the result to the executor.
"""

from __future__ import annotations

from dataclasses import dataclass

from localmoa.config import Config, FakeModel, LlamaCppModel
from localmoa.errors import BudgetError
from localmoa.hardware import Budget, resolve_budget
from localmoa.memory import Footprint, estimate, read_gguf
from localmoa.moa import Call, calls_for
from localmoa.planner import Plan, make_plan

__all__ = ["Prepared", "footprint", "prepare"]


@dataclass(frozen=True)
class Prepared:
    """A run fully decided: its calls by stage, what each model costs, the budget, the plan."""

    ensemble: str
    stages: list[list[Call]]
    footprints: dict[str, Footprint]
    budget: Budget
    plan: Plan


def footprint(model: LlamaCppModel | FakeModel) -> Footprint:
    """The bytes ``model`` will hold once loaded: its ``memory`` override, else the estimate."""
    if model.memory is not None:
        return Footprint.override(int(model.memory))
    assert isinstance(model, LlamaCppModel)  # a fake model always declares memory
    return estimate(read_gguf(model.path), n_ctx=model.n_ctx, n_batch=model.n_batch)


def prepare(
    config: Config,
    ensemble: str = "default",
    *,
    memory_budget: str | None = None,
) -> Prepared:
    """Resolve ``ensemble`` of ``config`` into calls, footprints, budget and plan.

    Reads GGUF headers (never weights); raises ConfigError, ModelFileError or BudgetError.
    """
    stages = calls_for(config.ensemble(ensemble))
    used = list(dict.fromkeys(c.model for stage in stages for c in stage))
    footprints = {name: footprint(config.models[name]) for name in used}
    budget = resolve_budget(memory_budget, config.settings.memory_budget)
    try:
        plan = make_plan(
            [[c.model for c in stage] for stage in stages],
            {name: fp.total for name, fp in footprints.items()},
            budget.bytes,
        )
    except BudgetError as exc:
        raise BudgetError(f"{exc} (budget from {budget.detail})") from None
    return Prepared(ensemble, stages, footprints, budget, plan)
