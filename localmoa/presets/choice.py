"""Which models of a machine go into a preset's ensemble, at what context, for a budget.

Pure: no I/O, no clock, no backend, so each rule is tested on made-up candidates
(localmoa.cli.init finds the real ones: GGUF headers, Ollama's listing).

**What fits.** A model fits when its footprint, as the planner will count it, is within the
budget on its own: the planner can always run a layer one model at a time, so that is what makes
the file plan and run as written (``localmoa plan`` then shows which models share memory). The
footprint is :func:`localmoa.footprint.estimate.estimate` at the model's context, tried from
:data:`CONTEXTS` (4096 first: room for a prompt, three 512-token references and an answer) down
to 1024, capped at the context the model was trained for. Ollama's measurement of a model, when
it has one at that context, counts when larger, as it does for the planner.

**Samples decoded together.** On llama.cpp an agent's ``samples`` decode as parallel sequences
of one context, each holding its own ``n_ctx`` of KV cache: the estimate with ``n_seq`` of them,
as the llama.cpp backend counts a model whose ``parallel`` is that many (unset, the run sets it
to the most samples an agent asks). Ollama's samples go one after another unless the table's
``parallel`` is raised to the server's ``OLLAMA_NUM_PARALLEL``, which init cannot read, so they
cost nothing extra here (a comment in the file says how to raise it).

**Which models.** Strength is taken as size (bytes of weights): among models a laptop holds, the
larger one of a family is the better one. Proposers are the largest fitting model of each family
first (different families make different mistakes, which Mixture-of-Agents feeds on, as in
localmoa.zeroconfig), then the next largest models to fill the preset's proposer count; the
aggregator, and Sparse MoA's judge, is the largest fitting model, since synthesis is the hardest
call. Self-MoA is the largest model whose ``SELF_SAMPLES`` samples (or fewer, at least two) fit
together; Sparse MoA's judge must leave an answer out, so with fewer than three proposers each
gives more samples (config.py's ``_variant_problems`` states the rule).

**Answer length.** ``max_tokens`` is :data:`MAX_TOKENS`, or less where contexts are small, so
that a call reading a layer's answers still has room for its own and a prompt
(:attr:`Selection.max_tokens`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from localmoa.backends.configs import LlamaCppModel
from localmoa.config import Judge
from localmoa.errors import BudgetError
from localmoa.footprint.estimate import CTX_PAD, GGUFFacts, estimate, kv_cache_bytes
from localmoa.sizes import format_bytes

__all__ = [
    "CONTEXTS",
    "JUDGE_MAX_TOKENS",
    "MAX_TOKENS",
    "PRESETS",
    "SELF_SAMPLES",
    "TOP_K",
    "Candidate",
    "Chosen",
    "Preset",
    "Selection",
    "choose",
]

CONTEXTS = (4096, 2048, 1024)
"""Contexts tried for each model, largest first."""
SELF_SAMPLES = 4
"""Self-MoA's samples when they fit together: four 512-token answers and the aggregator's own
still leave room for a prompt in a 4096 context."""
TOP_K = 2
"""Sparse MoA's answers passed on per layer (the SMoA code's default, k = 2)."""
MAX_TOKENS = 512
"""The longest answer of an agent: the MoA code's default (togethercomputer/MoA bot.py), and
less when the contexts are small (:attr:`Selection.max_tokens`)."""
JUDGE_MAX_TOKENS: int = Judge.model_fields["max_tokens"].default
"""The judge's verdict length the file leaves at its default."""
N_BATCH: int = LlamaCppModel.model_fields["n_batch"].default
"""The batch size the written llamacpp tables leave at its default, as the estimate needs it."""


@dataclass(frozen=True)
class Preset:
    """One shape of ensemble ``localmoa init`` writes."""

    name: str
    title: str
    """The paper's name for it."""
    paper: str
    layers: int
    proposers: int
    """The most distinct proposers per layer."""
    about: tuple[str, ...]
    """What it is and when to use it, one comment line each."""


PRESETS: dict[str, Preset] = {
    "moa": Preset(
        name="moa",
        title="MoA, Mixture-of-Agents",
        paper="arXiv 2406.04692",
        layers=3,
        proposers=3,
        about=(
            "3 layers of proposers, each layer after the first reading the previous layer's",
            "answers, then an aggregator writes the answer. The paper's full MoA: 65.1 % on",
            "AlpacaEval 2.0 (LC win rate) against GPT-4o's 57.5 %. The most calls: 3 per",
            "proposer, + 1.",
        ),
    ),
    "moa-lite": Preset(
        name="moa-lite",
        title="MoA-Lite",
        paper="arXiv 2406.04692",
        layers=2,
        proposers=3,
        about=(
            "2 layers of proposers, then the aggregator: the same paper's cheaper MoA (59.3 % on",
            "AlpacaEval 2.0 LC), a third fewer proposer calls than moa.",
        ),
    ),
    "self-moa": Preset(
        name="self-moa",
        title="Self-MoA",
        paper="arXiv 2502.00674",
        layers=1,
        proposers=1,
        about=(
            "One strong model sampled several times (samples), its answers aggregated by itself:",
            "6.6 % better than a MoA of mixed models on AlpacaEval 2.0 (the paper's abstract),",
            "with one model in memory. On llama.cpp the samples decode together.",
        ),
    ),
    "sparse": Preset(
        name="sparse",
        title="Sparse MoA, SMoA",
        paper="arXiv 2411.03284",
        layers=2,
        proposers=4,
        about=(
            "2 layers of proposers; after each, a judge passes on only the best top_k answers",
            "and, with early_stop, ends the layers when the answers agree: MoA's quality at a",
            "lower cost (the paper's abstract), from shorter prompts and fewer layers.",
        ),
    ),
}
"""Every preset, by the name ``--preset`` takes."""


@dataclass(frozen=True, eq=False)
class Candidate:
    """A model that could go in the file: a GGUF file, or a model Ollama has (each one object,
    told apart by identity)."""

    backend: Literal["llamacpp", "ollama"]
    source: Path | str
    """The GGUF file (absolute), or the Ollama tag."""
    family: str
    """Models of one family mostly repeat each other: proposers come from distinct ones first."""
    weights: int
    """Bytes of weights: the measure of strength."""
    facts: GGUFFacts | None
    """The header facts the estimate needs; None when Ollama gave none (then ``weights``)."""
    measured: Mapping[int, int] = field(default_factory=dict)
    """Ollama: what it held when loaded at a context (n_ctx -> bytes), where it ever was."""

    @property
    def label(self) -> str:
        """How messages name it: the file's name, or the tag."""
        return self.source.name if isinstance(self.source, Path) else self.source

    def footprint(self, n_ctx: int, together: int = 1) -> int:
        """Bytes when loaded at ``n_ctx`` with ``together`` sequences decoding at once (see the
        module docstring: on Ollama, samples take turns)."""
        if self.backend != "llamacpp":
            together = 1
        guessed = self.weights
        if self.facts is not None:
            guessed = estimate(self.facts, n_ctx=n_ctx, n_batch=N_BATCH, n_seq=together).total
        return max(guessed, self.measured.get(n_ctx, 0))

    def contexts(self) -> list[int]:
        """:data:`CONTEXTS`, capped at the context the model was trained for (when known)."""
        trained = self.facts.n_ctx_train if self.facts is not None else 0
        return sorted({min(c, trained) if trained else c for c in CONTEXTS}, reverse=True)

    def kv_per_token(self) -> int | None:
        """KV cache bytes per position of one sequence, for the comments; None without facts."""
        return kv_cache_bytes(self.facts, CTX_PAD) // CTX_PAD if self.facts is not None else None


@dataclass(frozen=True)
class Chosen:
    """A model of the file, with the context and samples it was sized for."""

    key: str
    """Its ``[models.KEY]``."""
    candidate: Candidate
    n_ctx: int
    samples: int
    """Answers each of its agents gives (1 but for Self-MoA, and Sparse MoA short of models)."""
    together: int
    """Of those, decoded at once (its footprint counts them); below ``samples`` the table sets
    ``parallel``, and the samples take turns."""
    bytes: int
    roles: tuple[str, ...]
    why: str

    @property
    def role_text(self) -> str:
        """Its roles as a comment says them: "proposer, aggregator and judge"."""
        return _roles(self.roles)


@dataclass(frozen=True)
class Selection:
    """What the preset became on this machine: the models, the layers, the reasons."""

    preset: Preset
    models: list[Chosen]
    layers: int
    proposers: list[str]
    """Keys of each layer's proposers (every layer has the same)."""
    aggregator: str
    top_k: int | None
    """Sparse MoA's judge keeps this many answers; None without a judge."""
    budget: int
    reasons: list[str]
    """Why each candidate was used or not, one line each."""

    @property
    def answers(self) -> int:
        """Answers per layer: the references every later call reads."""
        samples = {c.key: c.samples for c in self.models}
        return sum(samples[key] for key in self.proposers)

    @property
    def max_tokens(self) -> int:
        """:data:`MAX_TOKENS`, or less, so that in the smallest context of the file a call can
        read a layer's answers and write its own (the judge: its verdict) with as much again
        left for the prompt: ``answers · m + max(m, judge's) + m ≤ n_ctx``. (Longer references
        are cut to fit at run time; this keeps an ordinary prompt's from being cut.)"""
        smallest = min(c.n_ctx for c in self.models)
        most = min(MAX_TOKENS, smallest // (self.answers + 2))
        if self.top_k is not None:
            most = min(most, (smallest - JUDGE_MAX_TOKENS) // (self.answers + 1))
        return max(1, most)


def choose(preset: Preset, candidates: Sequence[Candidate], budget: int) -> Selection:
    """The preset's models for ``budget``; BudgetError naming the smallest model when none fits.

    ``candidates`` must not be empty (the caller says where it looked)."""
    if not candidates:
        raise ValueError("choose() needs at least one candidate")
    reasons: list[str] = []
    fitting: list[Candidate] = []
    for candidate in sorted(candidates, key=_strongest_first):
        if _place(candidate, budget, want=1, least=1) is None:
            need = candidate.footprint(min(candidate.contexts()))
            reasons.append(
                f"skipped {candidate.label}: needs {format_bytes(need)} even at n_ctx "
                f"{min(candidate.contexts())}, over the {format_bytes(budget)} budget"
            )
        else:
            fitting.append(candidate)
    if not fitting:
        smallest = min(candidates, key=lambda c: (c.footprint(min(c.contexts())), c.label))
        n_ctx = min(smallest.contexts())
        raise BudgetError(
            f"no model fits the {format_bytes(budget)} budget: the smallest, {smallest.label}, "
            f"needs {format_bytes(smallest.footprint(n_ctx))} at n_ctx {n_ctx}; free memory, "
            "pass a larger --memory-budget, or add a smaller model (a smaller quantization)"
        )
    keys = _keys(fitting)
    if preset.name == "self-moa":
        return _self_moa(preset, fitting, keys, budget, reasons)
    return _layered(preset, fitting, keys, budget, reasons)


def _strongest_first(candidate: Candidate) -> tuple[int, str]:
    return (-candidate.weights, candidate.label)


def _place(candidate: Candidate, budget: int, *, want: int, least: int) -> tuple[int, int] | None:
    """(n_ctx, together): the largest context at which ``want`` sequences fit together, or fewer
    down to ``least``; None when ``least`` fit at no context."""
    for n_ctx in candidate.contexts():
        for together in range(want, least - 1, -1):
            if candidate.footprint(n_ctx, together) <= budget:
                return n_ctx, together
    return None


def _self_moa(
    preset: Preset,
    fitting: list[Candidate],
    keys: dict[Candidate, str],
    budget: int,
    reasons: list[str],
) -> Selection:
    """The largest model whose samples fit together (at least two); else the largest, with two
    samples taking turns."""
    too_big: list[Candidate] = []
    for candidate in fitting:
        placed = _place(candidate, budget, want=SELF_SAMPLES, least=2)
        if placed is not None:
            n_ctx, together = placed
            samples, why = together, "the largest model whose samples fit together"
            if together < SELF_SAMPLES:
                why += f" ({SELF_SAMPLES} would not)"
            break
        too_big.append(candidate)
    else:
        candidate, too_big = fitting[0], []
        placed = _place(candidate, budget, want=1, least=1)
        assert placed is not None  # it is in fitting
        n_ctx, together = placed
        samples, why = 2, "the largest model; two samples at once would not fit, so they take turns"
    if candidate.backend == "ollama":
        why = "the largest model that fits (Ollama answers its samples in turn)"
    key = keys[candidate]
    chosen = Chosen(
        key=key,
        candidate=candidate,
        n_ctx=n_ctx,
        samples=samples,
        together=together,
        bytes=candidate.footprint(n_ctx, together),
        roles=("proposer", "aggregator"),
        why=why,
    )
    reasons.append(
        f"proposer and aggregator {candidate.label}: {why}; {samples} samples, n_ctx {n_ctx}"
    )
    for other in fitting:
        if other in too_big:
            reasons.append(f"not {other.label}: two samples of it at once do not fit the budget")
        elif other is not candidate:
            reasons.append(f"not used {other.label}: Self-MoA samples one model")
    return Selection(preset, [chosen], 1, [key], key, None, budget, reasons)


def _layered(
    preset: Preset,
    fitting: list[Candidate],
    keys: dict[Candidate, str],
    budget: int,
    reasons: list[str],
) -> Selection:
    """MoA, MoA-Lite and Sparse MoA: proposers from distinct families first, the largest model
    aggregating (and judging)."""
    first_of_family: dict[str, Candidate] = {}
    for candidate in fitting:
        first_of_family.setdefault(candidate.family, candidate)
    primary = list(first_of_family.values())
    proposers = (primary + [c for c in fitting if c not in primary])[: preset.proposers]
    aggregator = fitting[0]  # the largest: always the first proposer too
    samples = _samples(preset, proposers)
    top_k = TOP_K if preset.name == "sparse" else None
    models: list[Chosen] = []
    for candidate in proposers:
        placed = _place(candidate, budget, want=samples, least=1)
        assert placed is not None  # it is in fitting
        n_ctx, together = placed
        roles: tuple[str, ...] = ("proposer",)
        if candidate is aggregator:
            roles += ("aggregator", "judge") if top_k is not None else ("aggregator",)
        why = _why(candidate, roles, candidate in primary, len(first_of_family))
        models.append(
            Chosen(
                key=keys[candidate],
                candidate=candidate,
                n_ctx=n_ctx,
                samples=samples,
                together=together,
                bytes=candidate.footprint(n_ctx, together),
                roles=roles,
                why=why,
            )
        )
        detail = f", {samples} samples" if samples > 1 else ""
        reasons.append(f"{_roles(roles)} {candidate.label}: {why}; n_ctx {n_ctx}{detail}")
    for candidate in fitting:
        if candidate not in proposers:
            reasons.append(
                f"not used {candidate.label}: the {preset.name} preset takes at most "
                f"{preset.proposers} proposers, larger models or other families first"
            )
    return Selection(
        preset=preset,
        models=models,
        layers=preset.layers,
        proposers=[keys[c] for c in proposers],
        aggregator=keys[aggregator],
        top_k=top_k,
        budget=budget,
        reasons=reasons,
    )


def _samples(preset: Preset, proposers: list[Candidate]) -> int:
    """Samples per proposer: 1, but Sparse MoA's judge must leave out at least one of a layer's
    answers, so with fewer than ``TOP_K + 1`` proposers each gives more
    (config.py's ``_variant_problems`` states the rule)."""
    if preset.name != "sparse" or len(proposers) > TOP_K:
        return 1
    return math.ceil((TOP_K + 1) / len(proposers))


def _why(candidate: Candidate, roles: tuple[str, ...], primary: bool, families: int) -> str:
    size = format_bytes(candidate.weights)
    if "aggregator" in roles:
        return f"the largest model that fits ({size} of weights)"
    if primary:
        return f"the largest {candidate.family} model that fits ({size} of weights)"
    kinds = "family fits" if families == 1 else "families fit"
    return f"the next largest ({size} of weights): only {families} model {kinds}"


_NOT_KEY = re.compile(r"[^A-Za-z0-9_-]+")


def _keys(candidates: Sequence[Candidate]) -> dict[Candidate, str]:
    """A ``[models.KEY]`` per candidate, from its file name or tag: bare TOML keys, unique."""
    keys: dict[Candidate, str] = {}
    taken: set[str] = set()
    for candidate in candidates:
        if isinstance(candidate.source, Path):
            base = candidate.source.name.removesuffix(candidate.source.suffix)
        else:
            base = candidate.source.removesuffix(":latest")
        base = _NOT_KEY.sub("-", base).strip("-") or "model"
        key, n = base, 2
        while key.lower() in taken:
            key, n = f"{base}-{n}", n + 1
        taken.add(key.lower())
        keys[candidate] = key
    return keys


def _roles(roles: Sequence[str]) -> str:
    """("proposer", "aggregator", "judge") -> "proposer, aggregator and judge"."""
    return roles[0] if len(roles) == 1 else f"{', '.join(roles[:-1])} and {roles[-1]}"
