"""The report models: their key lists as README writes them, and their dumps."""

from __future__ import annotations

from pydantic import BaseModel

from localmoa.cli.reports import (
    PLAN,
    ModelCost,
    ModelRow,
    ModelsReport,
    PlanReport,
    RunReport,
    key_list,
)
from localmoa.planning.fewest_loads import Plan, Wave
from localmoa.runtime.engine import CallRecord


class Leaf(BaseModel):
    x: int
    y: str | None


class Tree(BaseModel):
    name: str
    leaves: list[Leaf]
    by_name: dict[str, Leaf]
    maybe: Leaf | None
    plan: Plan
    tags: list[str]


def test_key_lists_spell_out_nested_models_and_name_the_plan() -> None:
    assert key_list(Leaf) == '{"x", "y"}'
    assert key_list(Tree) == (
        '{"name", "leaves": [{"x", "y"}], "by_name": {NAME: {"x", "y"}}, "maybe": {"x", "y"}, '
        f'"plan": {PLAN}, "tags"}}'
    )


def test_a_report_that_extends_the_plan_lists_the_plan_once() -> None:
    keys = key_list(PlanReport)
    assert keys.startswith("{...PLAN, ")
    for name in Plan.model_fields:
        assert f'"{name}"' not in keys
    assert key_list(Plan).count('"waves": [{') == 1
    assert all(f'"{name}"' in key_list(Wave) for name in Wave.model_fields)


def test_every_field_of_every_report_is_in_its_key_list() -> None:
    for model in (RunReport, ModelsReport, ModelRow, ModelCost, CallRecord, Plan):
        keys = key_list(model)
        assert all(f'"{name}"' in keys for name in model.model_fields), model


def test_every_report_field_is_documented() -> None:
    for model in (RunReport, PlanReport, ModelsReport, ModelRow, ModelCost):
        own = set(model.model_fields) - set(Plan.model_fields if model is PlanReport else ())
        for name in own:
            assert model.model_fields[name].description, f"{model.__name__}.{name}"
