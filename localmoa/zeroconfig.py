"""An ensemble built from the models Ollama has, for users with no models.toml at all.

The rules, in order, each leaving a reason a person can read in ``localmoa plan``:

1. only chat models: Ollama's ``capabilities`` must include "completion" (embedding models out);
2. only models whose footprint (measured, else estimated) fits the memory budget;
3. proposers: the largest fitting model of each family (``details.family``), largest families
   first, at most ``MAX_PROPOSERS``: different families make different mistakes, which is what
   Mixture-of-Agents feeds on, and several sizes of one family mostly repeat each other;
4. aggregator: the largest fitting instruct model (tags naming "base" or "text" variants are
   not instruct-tuned), since synthesis is the hardest call of the run;
5. ``LAYERS`` layers of those proposers (the paper's MoA-Lite shape), then the aggregator.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from localmoa.backends.ollama import InstalledModel, OllamaBackend
from localmoa.config import Agent, Config, Ensemble, OllamaModel, Settings
from localmoa.errors import ConfigNotFoundError, ServerUnavailableError
from localmoa.hardware import Budget
from localmoa.sizes import format_bytes

__all__ = ["LAYERS", "MAX_PROPOSERS", "ZeroConfig", "from_ollama"]

MAX_PROPOSERS = 3
LAYERS = 2
_NOT_INSTRUCT = re.compile(r"(^|[-:_.])(base|text)([-:_.]|$)")


@dataclass(frozen=True)
class ZeroConfig:
    """The config built, and why each model was or was not chosen."""

    config: Config
    reasons: list[str]


async def from_ollama(
    backend: OllamaBackend, budget: Budget, settings: Settings, missing: ConfigNotFoundError
) -> ZeroConfig:
    """Build the ``default`` ensemble from Ollama's models, or explain why there is none."""
    try:
        installed = await backend.installed()
    except ServerUnavailableError as exc:
        raise ConfigNotFoundError(f"{missing}; nor could one be built from Ollama: {exc}") from None
    reasons: list[str] = []
    fitting: list[tuple[int, InstalledModel]] = []
    for model in sorted(installed.values(), key=lambda m: m.tag):
        if "completion" not in model.capabilities:
            reasons.append(
                f"skipped {model.tag}: not a chat model ({', '.join(model.capabilities)})"
            )
            continue
        default = OllamaModel(backend="ollama", model=model.tag)
        size = (backend.measurement(model, default) or backend.estimate(model, default)).total
        if size > budget.bytes:
            reasons.append(
                f"skipped {model.tag}: needs {format_bytes(size)}, over the "
                f"{format_bytes(budget.bytes)} budget"
            )
            continue
        fitting.append((size, model))
    if not fitting:
        found = ", ".join(sorted(installed)) or "none"
        raise ConfigNotFoundError(
            f"{missing}; Ollama at {backend.host} has no chat model that fits the "
            f"{format_bytes(budget.bytes)} budget (installed: {found}); pull a smaller one, "
            "e.g. `ollama pull qwen2.5:3b`, or write a models.toml"
        )
    largest_first = sorted(fitting, key=lambda pair: (-pair[0], pair[1].tag))
    by_family: dict[str, tuple[int, InstalledModel]] = {}
    for size, model in largest_first:
        by_family.setdefault(model.family, (size, model))
    proposers = [model for _, model in list(by_family.values())[:MAX_PROPOSERS]]
    for size, model in list(by_family.values())[:MAX_PROPOSERS]:
        reasons.append(
            f"proposer {model.tag}: largest {model.family} model that fits ({format_bytes(size)})"
        )
    for _, model in list(by_family.values())[MAX_PROPOSERS:]:
        reasons.append(f"not a proposer {model.tag}: at most {MAX_PROPOSERS} families are used")
    instruct = [(s, m) for s, m in largest_first if not _NOT_INSTRUCT.search(m.tag)]
    size, aggregator = (instruct or largest_first)[0]
    reasons.append(
        f"aggregator {aggregator.tag}: largest instruct model that fits ({format_bytes(size)})"
    )
    chosen = {m.tag: m for m in [*proposers, aggregator]}
    config = Config(
        settings=settings,
        models={tag: OllamaModel(backend="ollama", model=tag) for tag in chosen},
        ensembles={
            "default": Ensemble(
                layers=[[Agent(model=m.tag) for m in proposers] for _ in range(LAYERS)],
                aggregator=Agent(model=aggregator.tag),
            )
        },
    )
    return ZeroConfig(config, reasons)
