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

An agent's ``stop``, ``seed`` and ``response_format`` travel with its calls unchanged, so
``localmoa serve`` honours a client's for the aggregator by setting them on the aggregator's
call (``dataclasses.replace``); the backend honours each or refuses it before generating.
"""

from __future__ import annotations

from dataclasses import dataclass

from localmoa.backends.base import ChatMessage, ChatRequest, ResponseFormat
from localmoa.config import Agent, Ensemble

__all__ = [
    "AGGREGATE_PROMPT",
    "DEFAULT_AGGREGATE_PROMPT",
    "Call",
    "build_request",
    "calls_for",
    "stages_of",
]

AGGREGATE_PROMPT = """\
Below are responses from several models to the latest user message. Some may be biased, \
incomplete or simply wrong. Evaluate them critically, keep what is accurate, resolve where they \
disagree, and write one refined, accurate and well-structured answer of your own. Do not copy \
them verbatim and do not mention that other responses exist.

Responses:"""

DEFAULT_AGGREGATE_PROMPT = AGGREGATE_PROMPT + "\n\n{responses}"
"""The built-in instruction as a template: the numbered answers follow it."""


@dataclass(frozen=True)
class Call:
    """One agent's call: its layer (1-based; the aggregator is layer L+1) and settings."""

    layer: int
    index: int
    """Position within the layer, 0-based."""
    model: str
    system_prompt: str | None
    temperature: float
    max_tokens: int
    is_aggregator: bool
    stop: tuple[str, ...] | None = None
    """Strings that end the answer (not included in it)."""
    seed: int | None = None
    response_format: ResponseFormat | None = None
    aggregate_prompt: str = DEFAULT_AGGREGATE_PROMPT
    """The instruction this call reads references under; ``{responses}`` marks where."""


def calls_for(ensemble: Ensemble) -> list[list[Call]]:
    """Every call of the run, by stage, with the ensemble's defaults filled in."""

    def call(agent: Agent, layer: int, index: int, aggregator: bool) -> Call:
        return Call(
            layer=layer,
            index=index,
            model=agent.model,
            system_prompt=agent.system_prompt,
            temperature=ensemble.temperature if agent.temperature is None else agent.temperature,
            max_tokens=ensemble.max_tokens if agent.max_tokens is None else agent.max_tokens,
            is_aggregator=aggregator,
            stop=None if agent.stop is None else tuple(agent.stop),
            seed=agent.seed,
            response_format=agent.response_format,
            aggregate_prompt=agent.aggregate_prompt
            or ensemble.aggregate_prompt
            or DEFAULT_AGGREGATE_PROMPT,
        )

    layers = ensemble.layers * ensemble.cycles
    stages = [
        [call(agent, k, i, False) for i, agent in enumerate(layer)]
        for k, layer in enumerate(layers, start=1)
    ]
    stages.append([call(ensemble.aggregator, len(layers) + 1, 0, True)])
    return stages


def stages_of(ensemble: Ensemble) -> list[list[str]]:
    """Model names per stage, one per call: the planner's input."""
    return [[c.model for c in stage] for stage in calls_for(ensemble)]


def build_request(
    call: Call, conversation: list[ChatMessage], references: list[str] | None
) -> ChatRequest:
    """The messages ``call`` sends: its system prompt, the references if any, the conversation.

    An agent's own ``system_prompt`` comes first; a system message already in the conversation
    is merged into the same leading system message, since many chat templates accept only one.
    """
    system_parts = [call.system_prompt] if call.system_prompt else []
    turns = list(conversation)
    if turns and turns[0].role == "system":
        system_parts.append(turns.pop(0).content)
    if references is not None:
        numbered = "\n\n".join(f"{i}. {text.strip()}" for i, text in enumerate(references, 1))
        # replace, not format: the prompt and the answers may hold other braces
        system_parts.append(call.aggregate_prompt.replace("{responses}", numbered, 1))
    messages = (
        [ChatMessage(role="system", content="\n\n".join(system_parts))] if system_parts else []
    )
    return ChatRequest(
        messages=[*messages, *turns],
        temperature=call.temperature,
        max_tokens=call.max_tokens,
        stop=None if call.stop is None else list(call.stop),
        seed=call.seed,
        response_format=call.response_format,
    )
