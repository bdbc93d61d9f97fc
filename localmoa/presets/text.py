"""A preset's :class:`~localmoa.presets.choice.Selection` as a commented models.toml, read back.

The file explains itself, since a person edits it next: a header says how it was made (preset,
date, budget and where that came from), why each model is there and each other was not, how to
edit it (one line per key that matters) and what each preset is, with its paper. Each model's
table repeats why it was chosen and what it holds in memory.

The text is rendered here (tomllib reads TOML but cannot write it): keys are made bare by
:mod:`~localmoa.presets.choice`, strings are escaped as TOML basic strings, and names from files
and servers that go into comments have their control characters made spaces, so no name can end
a comment or a string early. The text is then read back through
:func:`localmoa.config.parse_config`: a file init writes that localmoa itself would refuse is a
bug, raised as such.

**The ensemble's name.** ``localmoa run`` and ``plan`` use the ensemble named ``default`` unless
given ``--ensemble``, so the file has exactly one, named so: it runs as written. The preset's
name is in the comments and in ``localmoa init --json``.

**Paths.** A GGUF file under the file's folder is written ``./relative`` (relative paths are read
against the file's folder, so the pair can move together), any other absolute.
"""

from __future__ import annotations

import textwrap
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from localmoa.config import Config, parse_config
from localmoa.errors import ConfigError
from localmoa.hardware import Budget
from localmoa.presets.choice import PRESETS, Candidate, Chosen, Preset, Selection, choose
from localmoa.sizes import format_bytes

__all__ = ["ENSEMBLE", "TEMPERATURE", "WIDTH", "Written", "render", "write_preset"]

ENSEMBLE = "default"
"""The ensemble's name: the one ``run`` and ``plan`` use without ``--ensemble``."""
TEMPERATURE = 0.7
"""Sampling temperature of every agent: the MoA code's default; Self-MoA needs it above 0."""
WIDTH = 96
"""Longest comment line of the file."""


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
    lines.extend(_wrapped(f"{chosen.role_text}: {chosen.why}"))
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
