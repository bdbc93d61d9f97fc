"""Mixture-of-Agents semantics: who sees what in each layer (Wang et al. 2024, arXiv 2406.04692).

Layer 1 agents answer the conversation alone. Every agent of a later layer, and the final
aggregator, gets a system message with the aggregate-and-synthesize instruction followed by the
previous layer's answers, numbered; the conversation follows unchanged. This is the reference
implementation's shape (togethercomputer/MoA ``utils.generate_with_references``), in our own
words, and it repeats the references once only (a bug of some local ports).

The instruction can be replaced (``aggregate_prompt`` on an ensemble or an agent, with
``{responses}`` where the numbered answers go), and ``cycles`` repeats the layer list: layers are
numbered through the repeats (``layers = [A, B]``, ``cycles = 2``: layers 1-4, then the
aggregator as layer 5).

Only usable answers become references: a failed call is left out and its error text never
reaches another model (another local port's bug), and an empty answer is left out too.

The variants add stages of their own, each a call the planner sees like any other:

- Sparse MoA (arXiv 2411.03284): a *judge* call after each proposer layer reads the layer's
  answers and passes on only its ``top_k``, best first (:mod:`localmoa.runtime.judge`); with
  ``early_stop`` it may end the proposer layers early. ``final = "select"`` makes the last
  judge's first choice the answer, with no aggregator (the MoA paper's LLM-Ranker baseline).
- Roles: with ``roles = "auto"`` and no cached roles, a *roles* call before layer 1 writes one
  role per proposer slot for the ensemble's ``task`` (:mod:`localmoa.runtime.roles`); each
  proposer sends its role merged into its one system message.
- Self-MoA (arXiv 2502.00674): an agent with ``samples = k`` is k calls of one layer, one per
  answer, each with its own seed, made together (``Call.group``). When the k answers cannot fit
  the aggregator's context, the aggregator reads them in a sliding window (Self-MoA-Seq): each
  step reads the previous step's synthesis and the next answers (``Call.window``).

Layers stay as people count them (the aggregator is layer L+1; a judge carries the layer it
judges; the roles call is layer 0); ``Call.stage`` is the call's position in the run.

An agent's ``stop``, ``seed`` and ``response_format`` travel with its calls unchanged, so
``localmoa serve`` honours a client's for the aggregator by setting them on the aggregator's
call (``dataclasses.replace``); the backend honours each or refuses it before generating.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from localmoa.backends.base import ChatMessage, ChatRequest, ResponseFormat
from localmoa.config import Agent, Ensemble
from localmoa.runtime.judge import JUDGE_FORMAT, judge_system_prompt
from localmoa.runtime.roles import roles_format, roles_prompt, with_role

__all__ = [
    "AGGREGATE_PROMPT",
    "DEFAULT_AGGREGATE_PROMPT",
    "ROLE_TOKENS",
    "Call",
    "Role",
    "batched",
    "build_request",
    "calls_for",
    "conditional_stages",
    "proposer_slots",
    "stage_label",
    "stages_of",
    "window_steps",
]

AGGREGATE_PROMPT = """\
Below are responses from several models to the latest user message. Some may be biased, \
incomplete or simply wrong. Evaluate them critically, keep what is accurate, resolve where they \
disagree, and write one refined, accurate and well-structured answer of your own. Do not copy \
them verbatim and do not mention that other responses exist.

Responses:"""

DEFAULT_AGGREGATE_PROMPT = AGGREGATE_PROMPT + "\n\n{responses}"
"""The built-in instruction as a template: the numbered answers follow it."""


Role = Literal["proposer", "judge", "roles", "aggregator"]

ROLE_TOKENS = 160
"""Room per role description the roles call is given (a short paragraph each)."""


@dataclass(frozen=True)
class Call:
    """One call of the run: its layer (1-based; the aggregator is layer L+1), its position in
    that layer, its settings, and what kind of call it is."""

    layer: int
    index: int
    """Position within the layer's answers, 0-based (each sample its own)."""
    model: str
    system_prompt: str | None
    temperature: float
    max_tokens: int
    is_aggregator: bool
    """True for the call whose answer is the run's answer (a windowed aggregator's last step)."""
    stop: tuple[str, ...] | None = None
    """Strings that end the answer (not included in it)."""
    seed: int | None = None
    response_format: ResponseFormat | None = None
    aggregate_prompt: str = DEFAULT_AGGREGATE_PROMPT
    """The instruction this call reads references under; ``{responses}`` marks where."""
    stage: int = -1
    """Position of the call's stage in the run, 0-based; -1: the layer's (``layer - 1``)."""
    role: Role = "proposer"
    agent: int = 0
    """The agent's position in its layer: its role slot (samples of one agent share it)."""
    group: int | None = None
    """Samples of one agent share this (the first sample's index): they are made together."""
    top_k: int = 0
    """A judge's: how many answers it passes on."""
    early_stop: bool = False
    """A judge's: may its verdict end the proposer layers?"""
    task: str | None = None
    """A roles call's: what the roles are written for."""
    roles: int = 0
    """A roles call's: how many roles it writes."""
    persona: str | None = None
    """A proposer's role (from the cache), merged into its system message."""
    window: tuple[int, int] | None = None
    """A windowed aggregator step's slice of the answers it aggregates (Self-MoA-Seq); each
    step after the first also reads the previous step's synthesis."""
    job: int = 0
    """Which conversation of a batch the call answers (:func:`batched`); 0 in a single run."""

    def __post_init__(self) -> None:
        if self.stage < 0:
            object.__setattr__(self, "stage", self.layer - 1)
        if self.role == "proposer" and self.is_aggregator:
            object.__setattr__(self, "role", "aggregator")


def proposer_slots(ensemble: Ensemble) -> int:
    """How many roles ``roles = "auto"`` writes: one per agent position of the widest layer."""
    return max(len(layer) for layer in ensemble.layers)


def window_steps(answers: int, window: int) -> list[tuple[int, int]]:
    """The slices a sliding-window aggregation reads (Self-MoA-Seq): the first step ``window``
    answers, each later step the previous synthesis and ``window - 1`` new ones."""
    steps = [(0, min(window, answers))]
    while steps[-1][1] < answers:
        start = steps[-1][1]
        steps.append((start, min(start + window - 1, answers)))
    return steps


def calls_for(
    ensemble: Ensemble,
    *,
    roles: Sequence[str] | None = None,
    window: int | None = None,
) -> list[list[Call]]:
    """Every call of the run, by stage, with the ensemble's defaults filled in.

    ``roles``: the proposers' roles when already known (cached); with ``roles = "auto"`` and
    none given, a roles call comes first. ``window``: at most this many answers per
    aggregator call (Self-MoA-Seq, see :func:`window_steps`); None = all at once.
    """
    stages: list[list[Call]] = []

    def call(who: Agent, layer: int, index: int, **more: object) -> Call:
        made = Call(
            layer=layer,
            index=index,
            model=who.model,
            system_prompt=who.system_prompt,
            temperature=ensemble.temperature if who.temperature is None else who.temperature,
            max_tokens=ensemble.max_tokens if who.max_tokens is None else who.max_tokens,
            is_aggregator=False,
            stop=None if who.stop is None else tuple(who.stop),
            seed=who.seed,
            response_format=who.response_format,
            aggregate_prompt=who.aggregate_prompt
            or ensemble.aggregate_prompt
            or DEFAULT_AGGREGATE_PROMPT,
            stage=len(stages),
        )
        return replace(made, **more)  # type: ignore[arg-type]

    if ensemble.roles == "auto" and roles is None:
        count = proposer_slots(ensemble)
        writer = Agent(model=ensemble.roles_model or ensemble.aggregator.model)
        stages.append(
            [
                call(
                    writer,
                    0,
                    0,
                    role="roles",
                    task=ensemble.task,
                    roles=count,
                    max_tokens=ROLE_TOKENS * count,
                    response_format=roles_format(count),
                    system_prompt=None,
                )
            ]
        )
    judge = ensemble.judge
    judge_agent = Agent(
        model=(judge.model if judge else None) or ensemble.aggregator.model,
        temperature=judge.temperature if judge else 0.0,
        max_tokens=judge.max_tokens if judge else 256,
    )
    layers = ensemble.layers * ensemble.cycles
    answers = 0
    for number, layer in enumerate(layers, start=1):
        stage: list[Call] = []
        for slot, agent in enumerate(layer):
            first = len(stage)
            for sample in range(agent.samples):
                seed = agent.seed
                if agent.samples > 1 and seed is not None:
                    seed = (seed + sample) % (1 << 63)
                stage.append(
                    call(
                        agent,
                        number,
                        len(stage),
                        agent=slot,
                        seed=seed,
                        group=first if agent.samples > 1 else None,
                        persona=roles[slot % len(roles)] if roles else None,
                    )
                )
        stages.append(stage)
        answers = len(stage)
        last = number == len(layers)
        if judge is not None or (last and ensemble.final == "select"):
            stages.append(
                [
                    call(
                        judge_agent,
                        number,
                        0,
                        role="judge",
                        top_k=judge.top_k if judge else 1,
                        early_stop=bool(judge and judge.early_stop and not last),
                        response_format=JUDGE_FORMAT,
                        seed=None,
                        stop=None,
                        system_prompt=None,
                    )
                ]
            )
            answers = min(answers, judge.top_k if judge else 1)
    if ensemble.final == "select":
        return stages
    aggregator = len(layers) + 1
    steps = [None] if window is None or answers <= window else window_steps(answers, window)
    for step, span in enumerate(steps):
        final = step == len(steps) - 1
        stages.append(
            [
                call(
                    ensemble.aggregator,
                    aggregator,
                    step,
                    is_aggregator=final,
                    role="aggregator",
                    window=span,
                )
            ]
        )
    return stages


def batched(jobs: Sequence[Sequence[Sequence[Call]]]) -> list[list[list[Call]]]:
    """The stages of several conversations made as one run (a batch chunk): each call tagged
    with its job's position, and every call of one model in one stage, whatever its job or
    agent, in one group, so they are made together (llama.cpp decodes them as sequences of
    one context; a server gets them as concurrent requests within its slots). Stage k of the
    run is stage k of every job."""
    models: dict[tuple[int, str], int] = {}  # (stage, model) -> its group in that stage
    out: list[list[list[Call]]] = []
    for number, stages in enumerate(jobs):
        tagged = []
        for stage in stages:
            calls = []
            for call in stage:
                group = models.setdefault((call.stage, call.model), len(models))
                calls.append(replace(call, job=number, group=group))
            tagged.append(calls)
        out.append(tagged)
    return out


def stage_label(stage: Sequence[Call]) -> str:
    """What a stage is called where a person reads it: "roles", "layer 2", "judge 2",
    "aggregator" (or "aggregator step 2" of a sliding window)."""
    first = stage[0]
    if first.role == "roles":
        return "roles"
    if first.role == "judge":
        return f"judge {first.layer}"
    if first.role == "aggregator":
        return "aggregator" if first.window is None else f"aggregator step {first.index + 1}"
    return f"layer {first.layer}"


def conditional_stages(stages: Sequence[Sequence[Call]]) -> set[int]:
    """Stages an early stop may skip: the proposer layers and judges after the first judge
    with ``early_stop``."""
    first = next(
        (k for k, stage in enumerate(stages) if stage[0].role == "judge" and stage[0].early_stop),
        None,
    )
    if first is None:
        return set()
    return {k for k in range(first + 1, len(stages)) if stages[k][0].role in ("proposer", "judge")}


def stages_of(ensemble: Ensemble) -> list[list[str]]:
    """Model names per stage, one per call: the planner's input."""
    return [[c.model for c in stage] for stage in calls_for(ensemble)]


def build_request(
    call: Call,
    conversation: list[ChatMessage],
    references: list[str] | None,
    *,
    persona: str | None = None,
) -> ChatRequest:
    """The messages ``call`` sends: its system prompt, the references if any, the conversation.

    An agent's own ``system_prompt`` comes first (after its role, if it plays one); a system
    message already in the conversation is merged into the same leading system message, since
    many chat templates accept only one. A judge reads the references numbered under its own
    instruction; a roles call sends its own prompt and nothing of the conversation.
    """
    if call.role == "roles":
        return _request(call, roles_prompt(call.task or "", call.roles))
    role = call.persona or persona
    own = with_role(call.system_prompt, role) if role else call.system_prompt
    system_parts = [own] if own else []
    turns = list(conversation)
    if turns and turns[0].role == "system":
        system_parts.append(turns.pop(0).content)
    if call.role == "judge":
        answers = references or []
        system_parts.append(
            judge_system_prompt(answers, top_k=call.top_k, early_stop=call.early_stop)
        )
    elif references is not None:
        numbered = "\n\n".join(f"{i}. {text.strip()}" for i, text in enumerate(references, 1))
        # replace, not format: the prompt and the answers may hold other braces
        system_parts.append(call.aggregate_prompt.replace("{responses}", numbered, 1))
    messages = (
        [ChatMessage(role="system", content="\n\n".join(system_parts))] if system_parts else []
    )
    return _request(call, [*messages, *turns])


def _request(call: Call, messages: list[ChatMessage]) -> ChatRequest:
    return ChatRequest(
        messages=messages,
        temperature=call.temperature,
        max_tokens=call.max_tokens,
        stop=None if call.stop is None else list(call.stop),
        seed=call.seed,
        response_format=call.response_format,
    )
