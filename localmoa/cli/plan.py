"""``localmoa plan``: which models will be resident together, in which order, before any load.

The plan is the one ``run`` would make (both ask localmoa.cli.session.plan_run); it is shown as
tables, or with ``--json`` as the :class:`~localmoa.cli.reports.PlanReport`.
"""

from __future__ import annotations

from pathlib import Path

import click

from localmoa.cli.options import budget_option, config_option, ensemble_option, json_option
from localmoa.cli.render import print_json, print_plan, stdout
from localmoa.cli.reports import ModelCost, ModelParts, PlanReport, StageRow
from localmoa.cli.session import open_session, plan_run
from localmoa.cli.signals import arun
from localmoa.runtime.moa import conditional_stages, stage_label
from localmoa.runtime.prepare import Prepared

__all__ = ["plan_command", "plan_report"]


@click.command(name="plan")
@config_option
@ensemble_option
@budget_option
@json_option
@click.option(
    "--timeline",
    "timeline",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also draw the plan as the cost model times it (FILE.svg or FILE.png; the plot extra).",
)
def plan_command(
    config_path: Path | None,
    ensemble: str,
    memory_budget: str | None,
    as_json: bool,
    timeline: Path | None,
) -> None:
    """Show which models will be resident together, without loading anything."""
    if timeline is not None:
        from localmoa.records.timeline import check_path

        check_path(timeline)

    async def go() -> PlanReport:
        async with open_session(config_path, memory_budget) as session:
            prepared = await plan_run(session, ensemble, memory_budget)
            if timeline is not None:
                from localmoa.records.timeline import draw_plan

                draw_plan(prepared, timeline)
            return plan_report(prepared, session.reasons)

    report = arun(go)
    if as_json:
        print_json(report)
    else:
        print_plan(stdout(), report)


def plan_report(prepared: Prepared, zero_config: list[str]) -> PlanReport:
    """What ``plan --json`` prints: the plan's fields as they are, and what it was made from."""
    footprints = prepared.footprints
    conditional = conditional_stages(prepared.stages)
    return PlanReport.model_validate(
        {
            **dict(prepared.plan),
            "ensemble": prepared.ensemble,
            "models": {
                name: ModelCost(bytes=fp.total, source=fp.source) for name, fp in footprints.items()
            },
            "footprints": {
                name: ModelParts(weights=fp.weights, kv_cache=fp.kv_cache, compute=fp.compute)
                for name, fp in footprints.items()
            },
            "budget_source": prepared.budget.detail,
            "stages": [
                StageRow(
                    stage=k + 1,
                    label=stage_label(stage),
                    role=stage[0].role,
                    layer=stage[0].layer,
                    models=[c.model for c in stage],
                    conditional=k in conditional,
                )
                for k, stage in enumerate(prepared.stages)
            ],
            "roles": prepared.roles,
            "zero_config": zero_config or None,
            "notes": prepared.notes,
        }
    )
