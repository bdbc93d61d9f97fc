"""Turn the fewest-loads plan into a fast one, with the cost model and what is known before a run.

The planner minimises loads: that is exact and needs no speeds, but plans with equal loads can
differ in time, and a plan with one load more can finish sooner (a model loaded while another
computes costs nothing). :func:`refine` searches for a faster plan in the cost model
(:func:`localmoa.planning.search.search`, branch and bound, started from the planner's plan)
and keeps it only when it is faster *on paper*: by more than ``SLACK`` with as many loads, and
by at least ``min_gain`` (``settings.min_gain``) with more. An extra load is a cost the estimate
can understate (``scripts/bench_fidelity.py`` measures how far the estimated ratio of two plans
strays from the measured one), and a plan with fewer loads also fails less: it is the safer
bet when the two are close.

What it knows is an estimate, never the run itself:

- the machine: :func:`localmoa.planning.profiles.profile_for` picks the cost model's profile of
  the same kind (an NVIDIA GPU by its memory, Apple unified memory, or a CPU), and the plan's
  budget is its memory;
- the calls: every call writes its ``max_tokens`` (answer lengths are unknown before the run), a
  later layer reads the references of those lengths, and text is 4 characters per token.

Effort follows what is at stake: the search may simulate ``NODES_PER_SECOND`` partial plans per
second the plan is estimated to take (about 1 ms of planning each, so about 2 % of the run), at
most ``MAX_NODES``; a run estimated at 50 s gets about a second of search. Beyond
``MAX_MODELS`` distinct models there is no search (it branches on every subset of them).
``scripts/bench_scheduler.py`` measures the result against the clairvoyant optimum and against
Ollama's scheduler.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from localmoa.planning.fewest_loads import Plan, Wave
from localmoa.planning.profiles import Profile
from localmoa.planning.search import search
from localmoa.planning.timing import CallSpec, WaveSpec, simulate_waves, wave_specs
from localmoa.runtime.moa import Call

__all__ = ["CHARS_PER_TOKEN", "calls_as_planned", "refine", "timed"]

CHARS_PER_TOKEN = 4
"""English text in BPE vocabularies averages about 4 characters per token (OpenAI's tokenizer
guide: "one token generally corresponds to ~4 characters of text")."""

NOMINAL_PROMPT_CHARS = 800
"""The prompt assumed when planning without one (``localmoa plan``): 200 tokens."""

NODES_PER_SECOND = 20
"""Partial plans the search may simulate per second of estimated run (see the module doc)."""
MAX_NODES = 10_000
MAX_MODELS = 10
SLACK = 0.002
"""A plan with as many loads must be estimated this much faster (a fraction) to replace the
planner's: with guessed answer lengths, a plan a hair faster on paper is as likely slower in
fact (in the benchmark, a tie broken by rounding cost 6.7 %). A plan with more loads must also
pay ``min_gain``."""


def calls_as_planned(stages: Sequence[Sequence[Call]], prompt: str | None) -> list[list[CallSpec]]:
    """Each call as known before the run: its prompt tokens (the prompt, its system prompt,
    and for a later layer the references at full length) and ``max_tokens`` to write. Calls
    made together (``Call.group``: an agent's samples, a batch's calls of one model) are one
    spec of that many sequences, as they decode. A batch's stage holds every prompt's calls:
    the references a call reads are its own prompt's (``Call.job``)."""
    base = len(prompt if prompt is not None else "x" * NOMINAL_PROMPT_CHARS) // CHARS_PER_TOKEN
    out: list[list[CallSpec]] = []
    references: dict[int, int] = {}  # job -> the tokens its previous stage wrote
    for stage in stages:
        specs = []
        together: dict[int, list[CallSpec]] = {}
        for call in stage:
            system = len(call.system_prompt or "") // CHARS_PER_TOKEN
            read = references.get(call.job, 0)
            if read:
                instruction = call.aggregate_prompt.replace("{responses}", "").rstrip()
                system += len(instruction) // CHARS_PER_TOKEN
            spec = CallSpec(call.model, base + system + read, call.max_tokens)
            if call.group is None:
                specs.append(spec)
            else:
                together.setdefault(call.group, []).append(spec)
        for group in together.values():
            specs.append(
                CallSpec(
                    group[0].model,
                    max(s.prompt_tokens for s in group),
                    max(s.output_tokens for s in group),
                    sequences=len(group),
                    total_output_tokens=sum(s.output_tokens for s in group),
                )
            )
        out.append(specs)
        references = {}
        for call in stage:
            references[call.job] = references.get(call.job, 0) + call.max_tokens
    return out


def timed(
    plan: Plan,
    stages: Sequence[Sequence[Call]],
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    prompt: str | None = None,
    resident: Sequence[str] = (),
    devices: Mapping[str, Profile] | None = None,
) -> Plan:
    """``plan`` as it is, with the cost model's estimate of it on ``profile`` (within the plan's
    budget, whatever ``profile`` holds), or on each of several ``devices``' own profiles."""
    profile = dataclasses.replace(profile, memory_bytes=plan.budget_bytes)
    calls = calls_as_planned(stages, prompt)
    estimate = simulate_waves(
        wave_specs(plan), calls, sizes, profile, resident=resident, devices=devices
    )
    named = profile.name
    if devices:
        named = ", ".join(dict.fromkeys(p.name for p in devices.values()))
    return plan.model_copy(update={"estimated_seconds": estimate.makespan_s, "timed_for": named})


def refine(
    plan: Plan,
    stages: Sequence[Sequence[Call]],
    sizes: Mapping[str, int],
    profile: Profile,
    *,
    prompt: str | None = None,
    resident: Sequence[str] = (),
    min_gain: float = 0.0,
) -> Plan:
    """``plan``, or a plan estimated faster on ``profile``; either way with its estimate.

    ``stages`` are the calls ``plan`` was made from, ``sizes`` the bytes it was made with, and
    ``resident`` what was loaded when it was made (a re-plan mid-run). The result is a plan for
    the same calls within the same budget (``plan``'s, whatever ``profile`` holds): with as many
    loads, estimated faster by more than ``SLACK``, or with more loads, estimated at least
    ``min_gain`` faster than the fastest plan with as many (``fewest_loads_seconds``).
    """
    kept = timed(plan, stages, sizes, profile, prompt=prompt, resident=resident)
    assert kept.estimated_seconds is not None
    profile = dataclasses.replace(profile, memory_bytes=plan.budget_bytes)
    models = {c.model for stage in stages for c in stage}
    nodes = min(MAX_NODES, int(NODES_PER_SECOND * kept.estimated_seconds))
    if len(models) > MAX_MODELS or nodes <= 0 or not models.issuperset(resident):
        return kept  # (a model resident but no longer needed: the search starts without it)
    seed = wave_specs(plan)
    found = search(
        calls_as_planned(stages, prompt),
        sizes,
        profile,
        seed,
        max_nodes=nodes,
        slack=SLACK,
        min_gain=min_gain,
        resident=tuple(resident),
    )
    if found.waves == seed:
        return kept
    better = _as_plan(found.waves, stages, sizes, plan)
    update: dict[str, object] = {"estimated_seconds": found.makespan_s, "timed_for": profile.name}
    if better.loads > plan.loads:
        update["fewest_loads_seconds"] = found.fewest_s
    return better.model_copy(update=update)


def _as_plan(
    waves: Sequence[WaveSpec], stages: Sequence[Sequence[Call]], sizes: Mapping[str, int], was: Plan
) -> Plan:
    order = list(dict.fromkeys(c.model for stage in stages for c in stage))

    def ranked(models: frozenset[str] | tuple[str, ...]) -> list[str]:
        return sorted(models, key=order.index)

    (device,) = was.devices or {"device": was.budget_bytes}  # the search knows one device
    out = [
        Wave(
            layer=w.stage + 1,
            resident=ranked(w.resident),
            runs=[c.model for c in stages[w.stage] if c.model in w.runs],
            load=list(w.load),
            unload=ranked(w.unload),
            bytes=sum(sizes[m] for m in w.resident),
            devices={device: ranked(w.resident)} if w.resident else {},
        )
        for w in waves
    ]
    loads = sum(len(w.load) for w in out)
    return Plan(
        budget_bytes=was.budget_bytes,
        devices=was.devices,
        loads=loads,
        lower_bound=was.lower_bound,
        optimal=was.optimal and loads == was.loads,
        bytes_loaded=sum(sizes[m] for w in out for m in w.load),
        waves=out,
        fewest_loads=was.loads if loads > was.loads else None,
    )
