"""From the models a machine has and its memory budget to a commented models.toml for a preset.

``localmoa init --preset NAME`` (localmoa.cli.init) finds the candidates (GGUF headers, Ollama's
listing) and writes the file; everything between is here, pure: no I/O, no clock, no backend,
so each rule below is tested on made-up candidates.

**What fits.** A model fits when its footprint, as the planner will count it, is within the
budget on its own: the planner can always run a layer one model at a time, so that is what makes
the file plan and run as written (``localmoa plan`` then shows which models share memory). The
footprint is :func:`localmoa.footprint.estimate.estimate` at the model's context, with the
context tried from :data:`CONTEXTS` (4096 first: room for a prompt, three 512-token references
and an answer) down to 1024, capped at the context the model was trained for. Ollama's
measurement of a model, when it has one at that context, counts when larger.

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
together.

**The ensemble's name.** ``localmoa run`` and ``plan`` use the ensemble named ``default`` unless
given ``--ensemble``, so the file has exactly one, named so: it runs as written. The preset's
name is in the comments and in ``localmoa init --json``.

The text is rendered here (tomllib reads TOML but cannot write it) and read back through
:func:`localmoa.config.parse_config` before it is returned: a file init writes that localmoa
itself would refuse is a bug, raised as such.
"""

from __future__ import annotations

import math
import re
import textwrap
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Literal

from localmoa.backends.configs import LlamaCppModel
from localmoa.config import Config, Judge, parse_config
from localmoa.errors import BudgetError, ConfigError
from localmoa.footprint.estimate import CTX_PAD, GGUFFacts, estimate, kv_cache_bytes
from localmoa.hardware import Budget
from localmoa.sizes import format_bytes

__all__ = [
    "CONTEXTS",
    "ENSEMBLE",
    "MAX_TOKENS",
    "PRESETS",
    "SELF_SAMPLES",
    "TOP_K",
    "Candidate",
    "Chosen",
    "Preset",
    "Selection",
    "Written",
    "choose",
    "render",
    "write_preset",
]

CONTEXTS = (4096, 2048, 1024)
"""Contexts tried for each model, largest first."""
SELF_SAMPLES = 4
"""Self-MoA's samples when they fit together (the paper's gains hold from a handful of samples)."""
TOP_K = 2
"""Sparse MoA's answers passed on per layer (the SMoA code's default, k = 2)."""
MAX_TOKENS = 512
"""The longest answer of an agent: the MoA code's default (togethercomputer/MoA bot.py), and
less when the contexts are small (:func:`max_tokens`)."""
TEMPERATURE = 0.7
"""Sampling temperature of every agent: the MoA code's default; Self-MoA needs it above 0."""
ENSEMBLE = "default"
"""The ensemble's name: the one ``run`` and ``plan`` use without ``--ensemble``."""
JUDGE_MAX_TOKENS: int = Judge.model_fields["max_tokens"].default
"""The judge's verdict length the file leaves at its default."""
WIDTH = 96
"""Longest comment line of the file."""
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
            "6.6 points over a mixed MoA on AlpacaEval 2.0 in the paper, and only one model in",
            "memory. On llama.cpp the samples decode together, as parallel sequences.",
        ),
    ),
    "sparse": Preset(
        name="sparse",
        title="Sparse MoA (SMoA)",
        paper="arXiv 2411.03284",
        layers=2,
        proposers=4,
        about=(
            "2 layers of proposers; after each, a judge passes on only the best top_k answers",
            "and, with early_stop, ends the layers when the answers agree: MoA's quality at",
            "fewer calls and shorter prompts (the paper's own comparison).",
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


@dataclass(frozen=True)
class Written:
    """The file's text, the config it reads back as, and what went into it."""

    selection: Selection
    text: str
    config: Config
    budget: Budget
    reasons: list[str]
    """The header's lines on each candidate: the caller's skips, then the selection's."""
    sources: dict[str, str]
    """Each model's GGUF path as the file has it, or its Ollama tag, by key."""


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


# --- the text ---------------------------------------------------------------------------------


def write_preset(
    preset: Preset,
    candidates: Sequence[Candidate],
    budget: Budget,
    *,
    written_budget: str,
    made: date,
    output: Path,
    skipped: Sequence[str] = (),
) -> Written:
    """Choose, render, and read back: what ``localmoa init`` writes to ``output``.

    ``written_budget`` is the ``settings.memory_budget`` the file gets ("auto", or the size the
    user gave); ``skipped`` are the lines about files and servers the caller could not use.
    Raises BudgetError when nothing fits, RuntimeError when the text would not read back.
    """
    selection = choose(preset, candidates, budget.bytes)
    text = render(
        selection,
        budget=budget,
        written_budget=written_budget,
        made=made,
        base=output.parent,
        skipped=skipped,
    )
    try:
        config = parse_config(tomllib.loads(text), source=output)
    except (tomllib.TOMLDecodeError, ConfigError) as exc:
        raise RuntimeError(
            f"internal error: the models.toml written for --preset {preset.name} does not read "
            f"back ({exc}); please report it with the file:\n{text}"
        ) from exc
    sources = {c.key: _source_text(c.candidate, output.parent) for c in selection.models}
    return Written(selection, text, config, budget, [*skipped, *selection.reasons], sources)


def render(
    selection: Selection,
    *,
    budget: Budget,
    written_budget: str,
    made: date,
    base: Path,
    skipped: Sequence[str] = (),
) -> str:
    """The commented models.toml of ``selection``; GGUF paths under ``base`` (the file's
    folder, which relative paths are read against) are written ``./...``, others absolute."""
    preset = selection.preset
    out: list[str] = []
    add = out.append
    add(f"# localmoa models.toml: the {preset.name} preset, written by")
    add(f"# `localmoa init --preset {preset.name}` on {made.isoformat()}.")
    out.extend(
        _wrapped(
            f"Sized for a memory budget of {format_bytes(budget.bytes)}, from {budget.detail}."
        )
    )
    add("# Each model fits that budget on its own at the n_ctx below; `localmoa plan` shows which")
    add("# of them share memory, and in what order they load.")
    add("#")
    add(f"# {preset.title} ({preset.paper}):")
    out.extend(f"#   {line}" for line in preset.about)
    add("#")
    add("# Why these models (init's rules: strength is size; proposers from different families")
    add("# first, since they make different mistakes; the largest model aggregates):")
    for line in [*skipped, *selection.reasons]:
        out.extend(_wrapped(line, indent="  "))
    add("#")
    add('# How to edit it (then check with `localmoa plan`, and ask with `localmoa run "..."`):')
    add('#   memory_budget  "auto" = detected when run, or a size such as "12GiB"')
    add("#   n_ctx          tokens a model reads and writes; its KV cache grows with it")
    add("#   parallel       llamacpp: samples decoded at once, each holding n_ctx of KV cache")
    add("#   layers         one list of proposers per layer; each later layer reads the answers")
    add("#                  of the one before")
    add("#   aggregator     the model that writes the answer: the strongest you have")
    add('#   samples        answers one agent gives, e.g. { model = "x", samples = 4 } (Self-MoA)')
    add("#   judge          { top_k = 2, early_stop = true }: keep the best top_k answers of each")
    add("#                  layer, stop early when they agree (Sparse MoA)")
    add("#   temperature    0 = the same answer every time; MoA wants some variety (0.7)")
    add("#   max_tokens     the longest answer of each agent; (answers per layer + 2) x max_tokens")
    add("#                  within the smallest n_ctx leaves room for the references and a prompt")
    add("# Every key is described in the commented example models.toml of the localmoa repository.")
    add("#")
    add("# The presets of `localmoa init --preset NAME`:")
    for other in PRESETS.values():
        add(f"#   {other.name:<9} {other.title}, {other.paper}")
    add("")
    add("[settings]")
    if written_budget == "auto":
        add(f'memory_budget = "auto"   # detected; {format_bytes(budget.bytes)} when written')
    else:
        add(f"memory_budget = {_string(written_budget)}   # as given to --memory-budget")
    for chosen in selection.models:
        add("")
        out.extend(_model_table(chosen, base))
    add("")
    out.extend(_ensemble_table(selection))
    return "\n".join(out) + "\n"


def _model_table(chosen: Chosen, base: Path) -> list[str]:
    candidate = chosen.candidate
    lines = [f"[models.{chosen.key}]"]
    lines.extend(_wrapped(f"{_roles(chosen.roles)}: {chosen.why}"))
    held = f"{format_bytes(chosen.bytes)} when loaded"
    if chosen.together > 1 and candidate.backend == "llamacpp":
        held += f" with {chosen.together} samples decoding at once"
    kv = candidate.kv_per_token()
    if kv is not None:
        held += f"; its KV cache takes {format_bytes(kv)} per token of n_ctx"
    lines.extend(_wrapped(held))
    if isinstance(candidate.source, Path):
        lines.append('backend = "llamacpp"')
        lines.append(f"path = {_string(_source_text(candidate, base))}")
        lines.append(f"n_ctx = {chosen.n_ctx}")
        if chosen.together < chosen.samples:
            lines.append(
                f"parallel = {chosen.together}   # the {chosen.samples} samples take turns: "
                "more at once would not fit the budget"
            )
    else:
        lines.append('backend = "ollama"')
        lines.append(f"model = {_string(candidate.source)}")
        lines.append(f"num_ctx = {chosen.n_ctx}")
        if chosen.samples > 1:
            lines.append(
                f"# parallel = {chosen.samples}   # samples at once: set it to the server's "
                "OLLAMA_NUM_PARALLEL"
            )
    return lines


def _ensemble_table(selection: Selection) -> list[str]:
    preset = selection.preset
    samples = {c.key: c.samples for c in selection.models}
    agents = ", ".join(_agent(key, samples[key]) for key in selection.proposers)
    lines = [f"[ensembles.{ENSEMBLE}]"]
    lines.append(f"# The {preset.name} preset: {preset.title}, {preset.paper}.")
    if selection.layers == 1:
        lines.append(f"layers = [[{agents}]]")
    else:
        lines.append("layers = [")
        for number in range(1, selection.layers + 1):
            what = "answers the prompt" if number == 1 else f"reads layer {number - 1}'s answers"
            lines.append(f"  [{agents}],   # layer {number}: {what}")
        lines.append("]")
    lines.append(
        f"aggregator = {_string(selection.aggregator)}   # writes the answer from the last "
        "layer's answers"
    )
    if selection.top_k is not None:
        lines.append(
            f"judge = {{ top_k = {selection.top_k}, early_stop = true }}   # the aggregator "
            'judges; model = "..." picks another'
        )
    lines.append(f"temperature = {TEMPERATURE}")
    lines.append(f"max_tokens = {selection.max_tokens}")
    return lines


def _agent(key: str, samples: int) -> str:
    if samples == 1:
        return _string(key)
    return f"{{ model = {_string(key)}, samples = {samples} }}"


def _source_text(candidate: Candidate, base: Path) -> str:
    """The Ollama tag; or the GGUF path, ``./relative`` when under ``base`` (the file's folder,
    which relative paths are read against), else absolute (both are absolute)."""
    if not isinstance(candidate.source, Path):
        return candidate.source
    try:
        return "./" + candidate.source.relative_to(base).as_posix()
    except ValueError:
        return str(candidate.source)


def _string(text: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = ['"']
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def _roles(roles: Sequence[str]) -> str:
    """("proposer", "aggregator", "judge") -> "proposer, aggregator and judge"."""
    return roles[0] if len(roles) == 1 else f"{', '.join(roles[:-1])} and {roles[-1]}"


def _wrapped(text: str, *, indent: str = "") -> list[str]:
    """``text`` as comment lines within :data:`WIDTH`, control characters (which a name from a
    file or a server may hold) made spaces, so no line ends the comment early."""
    clean = "".join(" " if ord(c) < 0x20 or ord(c) == 0x7F else c for c in text)
    lines = textwrap.wrap(
        clean,
        width=WIDTH,
        initial_indent=f"# {indent}",
        subsequent_indent=f"# {indent}    ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    return lines or ["#"]
