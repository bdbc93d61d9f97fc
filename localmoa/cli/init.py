"""``localmoa init --preset NAME``: a commented models.toml from the models this machine has.

The choice is :mod:`localmoa.presets`' (pure); this command does the I/O around it:

- **candidates**: the ``.gguf`` files under ``--models-dir`` (searched recursively, hidden folders
  left out), each sized from its header alone (localmoa.footprint), never loaded; and the chat
  models a local Ollama has, through the Ollama backend's own listing (``settings.ollama_host``'s
  rules: ``$OLLAMA_HOST``, else 127.0.0.1:11434, loopback unless allowed). A file that is not a
  usable GGUF, a split model and an Ollama that does not answer are each one line of the
  file's header, not an error, as long as some model is left. Nothing is downloaded, nothing
  pulled.
- **budget**: ``--memory-budget``, else the detected one (localmoa.hardware), as ``plan`` has it.
- **check**: the text reads back through localmoa.config, and the ensemble is planned, the
  way ``localmoa plan`` would, against the budget it was sized for, before a byte is written.
  Either failing is a bug in init (an internal error), since the file must run as written.
- **write**: never over an existing file without ``--force``.
"""

from __future__ import annotations

import os
import re
from datetime import date
from pathlib import Path

import click

from localmoa.backends import OllamaBackend, make_backends
from localmoa.backends.registry import Backends
from localmoa.cli.options import budget_option, json_option
from localmoa.cli.render import print_json, stderr
from localmoa.cli.reports import InitModel, InitReport
from localmoa.cli.session import Session, plan_run
from localmoa.cli.signals import arun, close_backends
from localmoa.config import CONFIG_NAME, OllamaModel, Settings
from localmoa.errors import BudgetError, ModelFileError, PromptTooLongError, UserError
from localmoa.footprint.estimate import read_gguf
from localmoa.footprint.gguf import GGUFError, read_header
from localmoa.hardware import resolve_budget
from localmoa.presets import CONTEXTS, ENSEMBLE, PRESETS, Candidate, Written, write_preset

__all__ = ["InitModel", "InitReport", "init_command"]

PROBE = "hi"
"""The prompt the written file is checked with: the shortest a user could ask."""
_SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@click.command(name="init")
@click.option(
    "--preset",
    required=True,
    type=click.Choice(list(PRESETS)),
    help="moa: 3 layers (MoA); moa-lite: 2 layers; self-moa: one model sampled several times; "
    "sparse: 2 layers and a judge that keeps the best answers and may stop early.",
)
@click.option(
    "--models-dir",
    type=click.Path(path_type=Path),
    help="A folder of .gguf files (subfolders too); Ollama's models are added unless --no-ollama.",
)
@click.option("--no-ollama", is_flag=True, help="Leave out the models a local Ollama has.")
@click.option(
    "--output",
    "-o",
    type=click.Path(path_type=Path),
    default=Path(CONFIG_NAME),
    show_default=True,
    help="Where to write the file.",
)
@click.option("--force", is_flag=True, help="Overwrite the output file if it exists.")
@budget_option
@json_option
def init_command(
    preset: str,
    models_dir: Path | None,
    no_ollama: bool,
    output: Path,
    force: bool,
    memory_budget: str | None,
    as_json: bool,
) -> None:
    """Write a commented models.toml for a preset, from your GGUF files and Ollama's models."""
    target = output.expanduser().absolute()
    if target.exists() and not force:
        raise _exists(output)
    if not target.parent.is_dir():
        raise UserError(
            f"cannot write {output}: there is no folder {target.parent}; create it, or choose "
            "another file with --output"
        )
    written = arun(lambda: _build(preset, models_dir, not no_ollama, target, memory_budget))
    mode = "w" if force else "x"
    try:
        with target.open(mode, encoding="utf-8") as file:
            file.write(written.text)
    except FileExistsError:  # created meanwhile
        raise _exists(output) from None
    except OSError as exc:
        raise UserError(
            f"cannot write {output}: {exc.strerror}; choose another file with --output"
        ) from None
    report = _report(written, target)
    if as_json:
        print_json(report)
        return
    for reason in report.reasons:
        stderr().print(f"init: {reason}", markup=False, soft_wrap=True)
    check = (
        "localmoa plan"
        if target == Path.cwd() / CONFIG_NAME
        else f"localmoa plan --config {output}"
    )
    click.echo(
        f"wrote {output}: the {preset} preset, {len(report.models)} "
        f"model{'s' if len(report.models) != 1 else ''}; check it with `{check}`"
    )


def _exists(output: Path) -> UserError:
    return UserError(f"{output} already exists; pass --force to overwrite it")


async def _build(
    preset: str, models_dir: Path | None, use_ollama: bool, target: Path, memory_budget: str | None
) -> Written:
    """Find the candidates, choose, render, and plan the result before it is written."""
    budget = resolve_budget(memory_budget, "auto")
    backends = make_backends(Settings())
    try:
        candidates: list[Candidate] = []
        skipped: list[str] = []
        looked: list[str] = []
        if models_dir is not None:
            found, notes = _gguf_candidates(models_dir)
            candidates += found
            skipped += notes
            looked.append(f"{models_dir}: {_count(found, '.gguf file')} usable")
        if use_ollama:
            found, notes, where = await _ollama_candidates(backends)
            candidates += found
            skipped += notes
            looked.append(where)
        else:
            looked.append("Ollama: left out (--no-ollama)")
        if not candidates:
            if models_dir is None:
                looked.insert(0, "no --models-dir given")
            raise UserError(
                f"no models to choose from ({'; '.join(looked)}); pass --models-dir with a "
                "folder of .gguf files, or start Ollama and `ollama pull` a chat model"
            )
        if use_ollama and not any(c.backend == "ollama" for c in candidates):
            skipped.append(looked[-1])
        flag = memory_budget if memory_budget not in (None, "auto") else None
        written = write_preset(
            PRESETS[preset],
            candidates,
            budget,
            written_budget=flag or "auto",
            made=date.today(),
            output=target,
            skipped=skipped,
        )
        await _check_plan(written, backends, budget.bytes)
        return written
    finally:
        await close_backends(backends)


async def _check_plan(written: Written, backends: Backends, budget: int) -> None:
    """Plan the ensemble as ``localmoa run`` would for a one-word prompt, against the budget it
    was sized for. Over budget is init's own mistake; a prompt that cannot fit is the models'
    (a context too short for the preset's instructions), which no choice of init could mend."""
    preset = written.selection.preset.name
    try:
        await plan_run(Session(written.config, backends, []), ENSEMBLE, str(budget), PROBE)
    except BudgetError as exc:
        raise RuntimeError(
            f"internal error: the models.toml written for --preset {preset} does not plan "
            f"({exc}); please report it with the file:\n{written.text}"
        ) from exc
    except PromptTooLongError as exc:
        raise UserError(
            f"--preset {preset} does not suit these models: even a one-word prompt would not "
            f"fit ({exc}); choose models with a longer context, or another preset"
        ) from None


def _gguf_candidates(folder: Path) -> tuple[list[Candidate], list[str]]:
    """Every usable ``.gguf`` under ``folder``, and a line for each one that is not."""
    root = folder.expanduser().absolute()
    if not root.is_dir():
        what = "not a folder" if root.exists() else "no such folder"
        raise ModelFileError(
            f"--models-dir {folder}: {what}; pass the folder that holds your .gguf files"
        )
    try:
        with os.scandir(root):
            pass
    except OSError as exc:
        raise ModelFileError(f"--models-dir {folder}: cannot read it: {exc.strerror}") from None
    notes: list[str] = []

    def unreadable(exc: OSError) -> None:
        notes.append(f"skipped {exc.filename}: cannot read it ({exc.strerror})")

    files: list[Path] = []
    for here, dirs, names in os.walk(root, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(here, n) for n in sorted(names) if n.lower().endswith(".gguf")]
    found: list[Candidate] = []
    for path in files:
        shown = path.relative_to(root)
        try:
            str(path).encode("utf-8")
        except UnicodeEncodeError:
            notes.append(f"skipped {str(shown)!a}: its name is not UTF-8, which TOML needs")
            continue
        if shard := _SHARD.search(path.name):
            notes.append(
                f"skipped {shown}: part {int(shard[1])} of a model split in {int(shard[2])} "
                "files; merge them with `llama-gguf-split --merge` to use it"
            )
            continue
        try:
            facts = read_gguf(path)
            basename = read_header(path).metadata.get("general.basename")
        except (ModelFileError, GGUFError, OSError) as exc:
            notes.append(f"skipped {shown}: {str(exc).removeprefix(f'{path}: ')}")
            continue
        family = basename.lower() if isinstance(basename, str) and basename else facts.architecture
        found.append(Candidate("llamacpp", path, family, facts.weights_bytes, facts))
    return found, notes


async def _ollama_candidates(backends: Backends) -> tuple[list[Candidate], list[str], str]:
    """The chat models Ollama has, a line for each other one, and what was found there (an
    Ollama that does not answer, or that localmoa may not reach, is no models, not an error)."""
    ollama = backends["ollama"]
    assert isinstance(ollama, OllamaBackend)
    try:
        installed = await ollama.installed()
    except UserError as exc:  # unreachable, or a host localmoa may not reach
        message = str(exc)
        return [], [], message if message.startswith("Ollama") else f"Ollama: {message}"
    found: list[Candidate] = []
    notes: list[str] = []
    for tag, model in sorted(installed.items()):
        if "completion" not in model.capabilities:
            notes.append(f"skipped {tag}: not a chat model ({', '.join(model.capabilities)})")
            continue
        measured = {}
        for n_ctx in CONTEXTS:
            table = OllamaModel(backend="ollama", model=tag, num_ctx=n_ctx)
            if (measurement := ollama.measurement(model, table)) is not None:
                measured[n_ctx] = measurement.total
        weights = model.facts.weights_bytes if model.facts is not None else model.size
        found.append(Candidate("ollama", tag, model.family, weights, model.facts, measured))
    return found, notes, f"Ollama at {ollama.host}: {_count(found, 'chat model')}"


def _count(items: list[Candidate], noun: str) -> str:
    return f"{len(items) or 'no'} {noun}{'' if len(items) == 1 else 's'}"


def _report(written: Written, target: Path) -> InitReport:
    return InitReport(
        path=str(target),
        preset=written.selection.preset.name,
        ensemble=ENSEMBLE,
        models=[
            InitModel(
                name=chosen.key,
                backend=chosen.candidate.backend,
                source=written.sources[chosen.key],
                n_ctx=chosen.n_ctx,
                samples=chosen.samples,
                bytes=chosen.bytes,
                roles=list(chosen.roles),
            )
            for chosen in written.selection.models
        ],
        budget_bytes=written.budget.bytes,
        budget_source=written.budget.detail,
        reasons=written.reasons,
    )
