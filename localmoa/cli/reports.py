"""What ``--json`` prints: one pydantic model per command, each field documented in place.

Every ``--json`` output is ``json.dumps(report.model_dump(mode="json"))`` of these models, and the
tables (localmoa.cli.render) read the same objects, so what a script parses and what a person
reads cannot disagree. README's key lists are generated from these classes by
``scripts/readme_keys.py`` (checked by tests/cli/test_readme_keys.py): a field added here shows
up there, or the test fails.

The engine's and the planner's own models are embedded rather than copied: ``calls`` are
:class:`~localmoa.runtime.engine.CallRecord`, and :class:`PlanReport` *is* a
:class:`~localmoa.planning.fewest_loads.Plan` with the command's extras beside its fields (the
object stays flat, as it always was), so a field the planner adds reaches ``plan --json`` without
a change here.

Keys are always present: a figure that does not apply is ``null``, never a missing key.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from localmoa.planning.fewest_loads import Plan
from localmoa.runtime.engine import CallRecord

__all__ = [
    "PLAN",
    "SOURCE_LABELS",
    "BatchPlanReport",
    "InitModel",
    "InitReport",
    "ModelCost",
    "ModelParts",
    "ModelRow",
    "ModelsReport",
    "PlanReport",
    "RunReport",
    "StageRow",
    "key_list",
]

SOURCE_LABELS = {
    "gguf": "GGUF header",
    "override": "memory override",
    "ollama": "Ollama model facts",
    "measured": "measured",
    "server": "server-managed, not counted",
}
"""What each footprint source (``Footprint.source``) is called where a person reads it."""


class RunReport(BaseModel):
    """``localmoa run --json``: the answer and the account of how it was made."""

    model_config = ConfigDict(extra="forbid")

    answer: str = Field(description="the aggregator's answer: what run prints without --json")
    calls: list[CallRecord] = Field(
        description="one record per call, by layer then agent index; the aggregator's is last"
    )
    loads: int = Field(description="model loads the run really made")
    load_seconds: float = Field(description="seconds those loads took, added up")
    replans: int = Field(
        description="times the rest of the run was planned again: after a load was measured, "
        "or after a judge that may stop early decided"
    )
    seconds: float = Field(description="wall-clock seconds of the run, to 0.1 ms")
    skipped_layers: list[int] = Field(
        description="proposer layers a judge's early stop skipped (never loaded for)"
    )
    plan: Plan = Field(description="the plan as last made (after any re-plan)")


class ModelCost(BaseModel):
    """What the planner counted for one model of the plan."""

    model_config = ConfigDict(extra="forbid")

    bytes: int = Field(description="bytes the model holds once loaded, as planned")
    source: str = Field(
        description="where the figure comes from: gguf, override, ollama, measured or server "
        "(an OpenAI-compatible server's own model, 0 bytes)"
    )


class ModelParts(BaseModel):
    """One model's planned bytes by part; all in ``weights`` when the figure is not an
    estimate (a ``memory`` override, a measurement, a server's model)."""

    model_config = ConfigDict(extra="forbid")

    weights: int = Field(description="bytes of the weights")
    kv_cache: int = Field(description="bytes of the KV cache at the model's context length")
    compute: int = Field(description="bytes of the compute buffers")


class StageRow(BaseModel):
    """One stage of the run as the plan sees it."""

    model_config = ConfigDict(extra="forbid")

    stage: int = Field(description="1-based, as the waves' layer field numbers stages")
    label: str = Field(
        description='what it is, in words: "roles", "layer 2", "judge 2", "aggregator"'
    )
    role: str = Field(description='"roles", "proposer", "judge" or "aggregator"')
    layer: int = Field(description="the MoA layer (a judge's: the layer it judges; roles: 0)")
    models: list[str] = Field(description="the model of each call, in call order")
    conditional: bool = Field(description="true when a judge's early stop may skip it")


class PlanReport(Plan):
    """``localmoa plan --json``: the plan's own fields, then what it was made from."""

    model_config = ConfigDict(extra="forbid")

    ensemble: str = Field(description="the ensemble planned")
    models: dict[str, ModelCost] = Field(description="every model of the ensemble, by name")
    footprints: dict[str, ModelParts] = Field(
        description="every model's bytes by part (the table's weights, KV cache, compute)"
    )
    budget_source: str = Field(description="where the budget came from, in words")
    stages: list[StageRow] = Field(description="every stage of the run, in order")
    roles: list[str] | None = Field(
        description='roles = "auto": the proposers\' roles, from the cache; null when not '
        "written yet (a roles call then comes first) or not asked for"
    )
    zero_config: list[str] | None = Field(
        description="with no models.toml: how the ensemble was built from Ollama's models, one "
        "line per choice; null when a models.toml was used"
    )
    notes: list[str] = Field(
        default_factory=list,
        description="what to know about how the run was planned (e.g. models a server places "
        "itself, planned against the devices' sum); also printed as warnings",
    )


class BatchPlanReport(BaseModel):
    """``localmoa batch --plan --json``: how the prompts will be chunked, the loads expected,
    and one full chunk's plan."""

    model_config = ConfigDict(extra="forbid")

    prompts: int = Field(description="prompts in the input file")
    chunk: int = Field(description="prompts planned together")
    chunks: int = Field(description="chunks the prompts make")
    loads: int = Field(
        description="model loads expected for the whole batch (models stay loaded from one "
        "chunk to the next when the next plan starts with them)"
    )
    loads_by_chunk: dict[str, int | None] = Field(
        description="each chunk size compared -> the loads the batch would make with it; null "
        "when a chunk that large does not fit the budget"
    )
    chunk_plan: PlanReport = Field(
        description="the first chunk's plan, as `plan --json` shows one (its stages hold every "
        "prompt's calls)"
    )


class ModelRow(BaseModel):
    """One model localmoa knows: from the config, or installed in Ollama and not configured."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="the config's name, or the Ollama tag")
    backend: str = Field(
        description='the config\'s backend, or "ollama (installed)" for a model only Ollama has'
    )
    bytes: int | None = Field(description="what the planner uses; null when unusable")
    source: str | None = Field(
        description="where that figure comes from, in words; null when unusable"
    )
    estimate_bytes: int | None = Field(
        description="the estimate from the model's header or Ollama's facts, where one is made"
    )
    measured_bytes: int | None = Field(
        description="what a previous load really held, where measured"
    )
    error: str | None = Field(description="why the model cannot be used; null when it can")


class ModelsReport(BaseModel):
    """``localmoa models --json``: every model localmoa knows and what each costs in memory."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelRow] = Field(description="configured models first, then Ollama's others")
    notes: list[str] = Field(description="what could not be listed, e.g. an unreachable Ollama")


class InitModel(BaseModel):
    """One model of the file ``localmoa init`` wrote."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="its [models.NAME]")
    backend: str = Field(description='"llamacpp" or "ollama"')
    source: str = Field(description="the GGUF path as the file has it, or the Ollama tag")
    n_ctx: int = Field(description="the context it was sized for (n_ctx, or Ollama's num_ctx)")
    samples: int = Field(description="answers each of its agents gives (Self-MoA, Sparse MoA)")
    bytes: int = Field(description="its footprint at n_ctx, its samples decoding at once")
    roles: list[str] = Field(description='"proposer", "aggregator", "judge"')


class InitReport(BaseModel):
    """``localmoa init --json``: what was written, and why."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="the file written, absolute")
    preset: str = Field(description='"moa", "moa-lite", "self-moa" or "sparse"')
    ensemble: str = Field(description="the ensemble's name in the file (run's default)")
    models: list[InitModel] = Field(description="the models of the file, in its order")
    budget_bytes: int = Field(description="the memory budget the models were sized for")
    budget_source: str = Field(description="where the budget came from")
    reasons: list[str] = Field(
        description="why each candidate was used or not, and each file or server skipped"
    )


PLAN = "PLAN"
"""How key lists name a :class:`Plan`'s keys, which ``run --json`` and ``plan --json`` share."""


def key_list(model: type[BaseModel]) -> str:
    """The keys of ``model``'s JSON dump written as README lists them, nested models inline and
    a plan's keys as ``PLAN`` (``...PLAN`` where a report extends the plan).

    >>> key_list(ModelCost)
    '{"bytes", "source"}'
    """
    fields = model.model_fields.items()
    keys = [_key(name, info.annotation) for name, info in fields]
    if model is not Plan and issubclass(model, Plan):
        keys = [f"...{PLAN}"] + [
            _key(name, info.annotation) for name, info in fields if name not in Plan.model_fields
        ]
    return "{" + ", ".join(keys) + "}"


def _key(name: str, annotation: Any) -> str:
    nested = _shape(annotation)
    return f'"{name}"' if nested is None else f'"{name}": {nested}'


def _shape(annotation: Any) -> str | None:
    """How a field's value is written: a model is spelled out (inside ``[...]`` for a list,
    ``{NAME: ...}`` for a dict by name), a plan is ``PLAN``; a plain value is None: just the
    key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        shapes = [_shape(a) for a in args if a is not type(None)]
        return shapes[0] if len(shapes) == 1 else None
    if origin is list and args:
        inner = _shape(args[0])
        return None if inner is None else f"[{inner}]"
    if origin is dict and len(args) == 2:
        inner = _shape(args[1])
        return None if inner is None else "{NAME: " + inner + "}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return PLAN if issubclass(annotation, Plan) else key_list(annotation)
    return None
