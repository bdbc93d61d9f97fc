"""From a config and an ensemble name to everything a run needs, before anything loads.

This is where the pure parts meet the facts of the machine: each model's footprint (from its
backend: GGUF header, Ollama's model facts or an earlier measurement, or the ``memory``
override), the device budget, and the plan. ``localmoa plan`` stops here; ``localmoa run`` hands
the result to the executor.

The prompt is checked here too, before anything loads (:func:`check_prompt`): a prompt that no
model of a stage can read would otherwise be found only after every model had loaded, and a
hostile one (megabytes of text) would keep a tokenizer busy for minutes first. So its length in
characters is bounded by the largest context of the ensemble (:data:`CHARS_PER_TOKEN_MAX`)
before any tokenizer sees it, and then its tokens are counted exactly for llama.cpp models.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from localmoa.backends import TIMED_BACKENDS
from localmoa.backends.base import (
    CHARS_PER_TOKEN_ESTIMATE,
    MESSAGE_TOKENS_ESTIMATE,
    Backend,
    ChatMessage,
    estimate_tokens,
)
from localmoa.backends.configs import MAX_PARALLEL, context_tokens, pinned_models, split_models
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.config import Config, Ensemble, LlamaCppModel, ModelConfig
from localmoa.errors import (
    BackendError,
    BudgetError,
    ConfigError,
    PromptTooLongError,
    UsageRefused,
    UserError,
)
from localmoa.footprint.estimate import Footprint
from localmoa.hardware import Budget, Device, budget_of, device_budget, resolve_devices
from localmoa.planning import PlanPolicy, plan_run
from localmoa.planning.fewest_loads import Plan
from localmoa.planning.profiles import Profile
from localmoa.runtime.moa import Call, build_request, calls_for, proposer_slots, stage_label
from localmoa.runtime.roles import RolesCache

__all__ = [
    "CHARS_PER_TOKEN_MAX",
    "TIMED_BACKENDS",
    "Prepared",
    "check_prompt",
    "context_tokens",
    "footprints",
    "placeable",
    "plan_policy",
    "prepare",
    "prompt_char_limit",
    "run_devices",
    "run_models",
    "seq_window",
    "stages_for",
]

log = logging.getLogger(__name__)


CHARS_PER_TOKEN_MAX = 8
"""Characters per token that no real tokenizer's average exceeds on ordinary text (English
prose averages about 4 with today's vocabularies; code, numbers and most other scripts fewer).
A prompt longer than the largest context of the ensemble times this cannot fit any of its
models, so it is refused before a tokenizer ever sees it: tokenizing is native code that
cannot be interrupted, and slow on hostile text (megabytes of one repeated character kept
llama.cpp's tokenizer busy for minutes)."""


@dataclass(frozen=True)
class Prepared:
    """A run fully decided: its calls by stage, what each model costs, the budget, the plan."""

    ensemble: str
    stages: list[list[Call]]
    footprints: dict[str, Footprint]
    budget: Budget
    plan: Plan
    timing: Profile | None = None
    """The cost-model profile the plan was refined on; None when it was not (untimed backends,
    or ``plan_for = "loads"``)."""
    policy: PlanPolicy = field(default_factory=lambda: PlanPolicy(None))
    """How the plan was made: a re-plan mid-run is made the same way (``plan_run``)."""
    models: dict[str, ModelConfig] = field(default_factory=dict)
    """The model tables as this run loads them (:func:`run_models`)."""
    roles: list[str] | None = None
    """The proposers' roles from the cache, when ``roles = "auto"`` found them there."""
    devices: list[Device] = field(default_factory=list)
    """The devices the plan placed models on (:func:`run_devices`, :func:`placeable`)."""
    notes: list[str] = field(default_factory=list)
    """What the user should know about how the run was planned (shown as warnings)."""


def stages_for(
    config: Config,
    ensemble: Ensemble,
    *,
    prompt: str | None = None,
    cache: RolesCache | None = None,
) -> list[list[Call]]:
    """The one place a run's calls are made from an ensemble (``run``, ``plan``, each ``serve``
    request): roles from the cache when ``roles = "auto"`` wrote them before (else a roles call
    comes first), and a sliding-window aggregator when Self-MoA's samples cannot fit its
    context (:func:`seq_window`)."""
    roles = None
    if ensemble.roles == "auto" and ensemble.task:
        writer = ensemble.roles_model or ensemble.aggregator.model
        roles = (cache or RolesCache()).get(ensemble.task, writer, proposer_slots(ensemble))
    return calls_for(ensemble, roles=roles, window=seq_window(config, ensemble, prompt))


def seq_window(config: Config, ensemble: Ensemble, prompt: str | None = None) -> int | None:
    """How many answers each aggregator call reads when a Self-MoA layer's samples cannot all
    fit the aggregator's context (Self-MoA-Seq, arXiv 2502.00674); None when they fit, when the
    last layer has no samples, or when no window of two fits either (then references are cut).

    Decided before the run from the worst case: every answer ``max_tokens`` long, the prompt as
    the documented estimate (0 when not known yet), the instruction as the estimate too."""
    last = ensemble.layers[-1]
    if ensemble.final == "select" or not any(agent.samples > 1 for agent in last):
        return None
    n_ctx = context_tokens(config.models[ensemble.aggregator.model])
    if n_ctx is None:
        return None
    answers = sum(agent.samples for agent in last)
    if ensemble.judge is not None:
        answers = min(answers, ensemble.judge.top_k)
    per_answer = MESSAGE_TOKENS_ESTIMATE + max(
        agent.max_tokens or ensemble.max_tokens for agent in last
    )
    instruction = ensemble.aggregator.aggregate_prompt or ensemble.aggregate_prompt or ""
    reserve = estimate_tokens([ChatMessage(role="system", content=instruction or "x" * 400)])
    if prompt:
        reserve += -(-len(prompt) // CHARS_PER_TOKEN_ESTIMATE) + MESSAGE_TOKENS_ESTIMATE
    room = n_ctx - (ensemble.aggregator.max_tokens or ensemble.max_tokens) - reserve
    if answers * per_answer <= room:
        return None
    window = room // per_answer
    return window if window >= 2 else None


def run_models(
    models: Mapping[str, ModelConfig], stages: Sequence[Sequence[Call]]
) -> dict[str, ModelConfig]:
    """The model tables as a run loads them: a llama.cpp model whose ``parallel`` is unset
    holds as many sequences as the most samples one agent asks of it (each its own n_ctx of
    KV cache, which its footprint then counts)."""
    most: dict[str, int] = {}
    for stage in stages:
        groups: dict[int | None, int] = {}
        for call in stage:
            if call.group is not None:
                groups[call.group] = groups.get(call.group, 0) + 1
                most[call.model] = max(most.get(call.model, 1), groups[call.group])
    out: dict[str, ModelConfig] = {}
    for name, model in models.items():
        if isinstance(model, LlamaCppModel) and model.parallel is None and name in most:
            # llama.cpp holds at most MAX_PARALLEL sequences; a larger group decodes in rounds
            model = model.model_copy(update={"parallel": min(most[name], MAX_PARALLEL)})
        out[name] = model
    return out


def plan_policy(config: Config, models: Sequence[str], budget: Budget) -> PlanPolicy:
    """How plans of ``models`` are made on this machine (``settings.plan_for``, ``min_gain``,
    ``timing_profile``): timed when every model's backend is one of ``TIMED_BACKENDS`` (the
    registry's: backends whose loads read weights as the cost model assumes), on the
    profile of the device (read here when ``budget`` did not come from it and the profile is
    "auto"), untimed otherwise."""
    timed = all(config.models[name].backend in TIMED_BACKENDS for name in models)
    device = None
    if timed and config.settings.timing_profile == "auto":
        device = device_budget(budget)
    return PlanPolicy.from_settings(config.settings, device, timed=timed)


def run_devices(config: Config, memory_budget: str | None) -> list[Device]:
    """The devices a run is planned on: the Ray cluster's nodes' when ``[settings.cluster]``
    says so, else this machine's (:func:`localmoa.hardware.resolve_devices`)."""
    if config.settings.cluster.engine == "ray":
        if memory_budget not in (None, "auto"):
            raise UsageRefused(
                '--memory-budget plans one device, but [settings.cluster] engine = "ray" '
                "plans the cluster's devices; leave --memory-budget out, or declare devices"
            )
        from localmoa.cluster.ray_engine import cluster_devices

        return cluster_devices(config.settings)
    return resolve_devices(memory_budget, config.settings)


def placeable(
    config: Config,
    used: Sequence[str],
    backends: Mapping[str, Backend],
    devices: list[Device],
) -> tuple[list[Device], list[str]]:
    """The devices to place ``used`` models on, and notes for the user; a pin (``device =
    ...``) to a device not there is refused. Several devices with a model whose backend places
    models itself (Ollama, an OpenAI-compatible server) and that is not pinned: planned against
    their sum, as one device, since nothing could keep a model where the plan put it (and the
    pins then no longer hold: :func:`~localmoa.backends.configs.pinned_models`)."""
    names = [d.name for d in devices]
    pinned = {m: pin for m in used if (pin := config.models[m].device) is not None}
    for model, pin in pinned.items():
        if pin not in names:
            raise ConfigError(
                f'models.{model}.device: "{pin}" is not a device here ({", ".join(names)}); '
                "name one of those, or declare it in [[settings.devices]]"
            )
    loose = [
        m for m in used if m not in pinned and not backends[config.models[m].backend].places_models
    ]
    if len(devices) <= 1 or not loose:
        return devices, []
    total = sum(d.memory for d in devices)
    kinds = sorted({config.models[m].backend for m in loose})
    note = (
        f"{' and '.join(kinds)} place models themselves ({', '.join(loose)} not pinned): "
        f"planned against the sum of {', '.join(names)} as one device; to plan per GPU, run "
        'one server per GPU and pin each model to its GPU with device = "..." '
        "(README: several GPUs)"
    )
    one = Device(
        name="+".join(names),
        memory=total,
        kind=devices[0].kind,
        detail=f"sum of {', '.join(names)}",
    )
    return [one], [note]


async def footprints(
    config: Config,
    names: list[str],
    backends: Mapping[str, Backend],
    models: Mapping[str, ModelConfig] | None = None,
) -> dict[str, Footprint]:
    """Every named model's footprint (``models``: the tables as the run loads them, default
    the config's); all problems at once when several models are unusable."""
    tables = config.models if models is None else models
    found = await asyncio.gather(
        *(backends[tables[n].backend].footprint(n, tables[n]) for n in names),
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
    subclasses for what the user must fix, PromptTooLongError included when ``prompt`` is
    given and cannot fit (see :func:`check_prompt`). The plan is made by
    :func:`localmoa.planning.plan_run` with :func:`plan_policy`: with only ``TIMED_BACKENDS``
    it is timed on this machine's kind of hardware, and with ``settings.plan_for = "time"``
    refined for time (``prompt``, when known, sizes the first layer's prompt).
    """
    stages = stages_for(config, config.ensemble(ensemble), prompt=prompt)
    used = list(dict.fromkeys(c.model for stage in stages for c in stage))
    models = run_models(config.models, stages)
    sizes = await footprints(config, used, backends, models)
    if prompt is not None:
        await check_prompt(config, stages, backends, [ChatMessage(role="user", content=prompt)])
    devices, notes = placeable(config, used, backends, run_devices(config, memory_budget))
    budget = budget_of(devices)
    totals = {name: fp.total for name, fp in sizes.items()}
    policy = plan_policy(config, used, budget)
    try:
        plan = plan_run(
            stages,
            totals,
            budget.bytes,
            policy,
            prompt=prompt,
            devices=devices,
            splittable=split_models(models),
            pinned=pinned_models(models, [d.name for d in devices]),
        )
    except BudgetError as exc:
        raise BudgetError(f"{exc} (budget from {budget.detail})") from None
    refined_on = policy.profile if policy.plan_for == "time" else None
    personas = {c.agent: c.persona for st in stages for c in st if c.persona is not None}
    roles = [personas[slot] for slot in sorted(personas)] or None
    return Prepared(
        ensemble,
        stages,
        sizes,
        budget,
        plan,
        refined_on,
        policy,
        models,
        roles,
        devices,
        notes,
    )


def prompt_char_limit(config: Config, stages: Sequence[Sequence[Call]]) -> int | None:
    """The most characters a prompt may have: the largest known context among the models the
    stages use, times CHARS_PER_TOKEN_MAX; None when no context is known."""
    known = [context_tokens(config.models[name]) for name in _used(stages)]
    contexts = [n for n in known if n is not None]
    return max(contexts) * CHARS_PER_TOKEN_MAX if contexts else None


async def check_prompt(
    config: Config,
    stages: Sequence[Sequence[Call]],
    backends: Mapping[str, Backend],
    messages: list[ChatMessage],
) -> None:
    """Refuse, before anything loads, a prompt that cannot fit (PromptTooLongError).

    First its length: text longer than :func:`prompt_char_limit` is refused at once, without
    tokenizing. Then, for llama.cpp models, its tokens, counted exactly (the model's chat
    template and tokenizer, from a vocabulary-only read of the file) for each call as the call
    would send it; a later stage's references are not known yet, so its count is a lower bound.
    A model whose n_ctx cannot hold the prompt fails all its calls: when no call of some stage
    (a layer, or the aggregator) could take it, the run could not give an answer, and this
    raises; when only some agents of a stage cannot, it logs a warning and the run goes on on
    quorum. Ollama truncates an over-long prompt itself, so its models never fail here;
    OpenAI-compatible and fake models are not checked.
    """
    limit = prompt_char_limit(config, stages)
    chars = sum(len(m.content) for m in messages)
    if limit is not None and chars > limit:
        widest = max(_used(stages), key=lambda name: context_tokens(config.models[name]) or 0)
        raise PromptTooLongError(
            f"the prompt has {chars:,} characters, more than any model of this ensemble can "
            f"read: the largest context is {limit // CHARS_PER_TOKEN_MAX} tokens "
            f"([models.{widest}]), at most {limit:,} characters; shorten the prompt"
        )
    tokens = await _count_tokens(config, stages, backends, messages)
    for number, stage in enumerate(stages):
        over: dict[str, tuple[int, int, int]] = {}  # model -> (n_ctx, tokens, room for answers)
        failing = 0
        for call in stage:
            counted = tokens.get(_request_key(call, messages, number))
            n_ctx = context_tokens(config.models[call.model])
            if counted is None or n_ctx is None or counted < n_ctx:
                continue
            failing += 1
            _, most, room = over.get(call.model, (n_ctx, 0, 0))
            over[call.model] = (n_ctx, max(most, counted), max(room, counted + call.max_tokens))
        if not over:
            continue
        what = "the aggregator" if stage[0].is_aggregator else stage_label(stage)
        read = "; ".join(
            f'model "{name}" reads it as {t} tokens, its n_ctx is {n}'
            for name, (n, t, _) in over.items()
        )
        raise_to = " or ".join(
            f"raise n_ctx of [models.{name}] to at least {room}"
            for name, (_, _, room) in over.items()
        )
        if failing == len(stage):
            raise PromptTooLongError(
                f"the prompt does not fit {what}: {read}; {raise_to}, or shorten the prompt"
            )
        log.warning(
            "the prompt does not fit %d of %d agents of %s, which will fail: %s; %s",
            failing,
            len(stage),
            what,
            read,
            raise_to,
        )


def _used(stages: Sequence[Sequence[Call]]) -> list[str]:
    return list(dict.fromkeys(c.model for stage in stages for c in stage))


def _request_key(
    call: Call, messages: list[ChatMessage], stage: int
) -> tuple[str, tuple[tuple[str, str], ...]]:
    """What ``call`` sends, without the references of later stages (unknown before the run)."""
    reads = call.role in ("judge", "aggregator") or (call.role == "proposer" and call.layer > 1)
    request = build_request(call, messages, [] if reads else None)
    return call.model, tuple((m.role, m.content) for m in request.messages)


async def _count_tokens(
    config: Config,
    stages: Sequence[Sequence[Call]],
    backends: Mapping[str, Backend],
    messages: list[ChatMessage],
) -> dict[tuple[str, tuple[tuple[str, str], ...]], int]:
    """The prompt's tokens for every distinct request a llama.cpp model will get; a model whose
    vocabulary cannot be read is left unchecked (its load will say why)."""
    keys = {
        _request_key(call, messages, number)
        for number, stage in enumerate(stages)
        for call in stage
        if isinstance(config.models[call.model], LlamaCppModel)
    }
    jobs = []
    for key in keys:
        name, sent = key
        backend = backends[config.models[name].backend]
        if not isinstance(backend, LlamaCppBackend):  # a stand-in for llama.cpp, in tests
            continue
        request = [ChatMessage.model_validate({"role": r, "content": c}) for r, c in sent]
        jobs.append((key, backend.prompt_tokens(name, config.models[name], request)))
    counts = await asyncio.gather(*(job for _, job in jobs), return_exceptions=True)
    tokens = {}
    for (key, _), counted in zip(jobs, counts, strict=True):
        if isinstance(counted, BackendError):
            log.warning("the prompt is not checked against %s: %s", key[0], counted)
        elif isinstance(counted, BaseException):
            raise counted
        else:
            tokens[key] = counted
    return tokens
