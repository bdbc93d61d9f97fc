"""What ``localmoa eval`` compares, and its judge, as systems of the batch engine.

A :class:`~localmoa.batch.runner.System` is what answers each prompt of a batch. An evaluation
compares the ensemble (``moa/NAME``), each of its distinct models alone (``model/NAME``: one
call at the ensemble's settings, the single-model baseline the MoA paper compares with) and any
system the user names; the judge is one more system, one greedy call per judgement, so grading
is a batch like the answers and the judge loads once per phase.

Every name is checked before anything loads: an unknown ``--system`` or ``--judge``, or judged
questions with no judge, is a :class:`~localmoa.errors.UserError` listing what exists.
"""

from __future__ import annotations

from collections.abc import Sequence

from localmoa.backends.base import ResponseFormat
from localmoa.batch.runner import System, ensemble_system, model_system, one_call_system
from localmoa.config import Agent, Config
from localmoa.errors import UserError
from localmoa.evaluation.questions import Question

__all__ = ["JUDGE_MAX_TOKENS", "check_judge", "eval_systems", "judge_system", "members"]

JUDGE_MAX_TOKENS = 1024
"""Room for a judgement: a few sentences of reasons, then the verdict. Generous, since a
verdict cut off by ``max_tokens`` is lost (MT-Bench asks its GPT-4 judge at temperature 0
with max_tokens 2048, FastChat ``fastchat/llm_judge/common.py``); a judge that follows the
format stops long before. Each judge call's prompt must fit the judge's context with this
much room left; one that does not fails alone, and the evaluation says so in a note."""


def members(config: Config, ensemble: str) -> list[str]:
    """The distinct models of ``ensemble`` (its proposers, then its aggregator), in order."""
    table = config.ensemble(ensemble)
    names = [agent.model for layer in table.layers for agent in layer] + [table.aggregator.model]
    return list(dict.fromkeys(names))


def eval_systems(config: Config, ensemble: str, extra: Sequence[str] = ()) -> list[System]:
    """The systems compared: ``moa/ENSEMBLE``, ``model/M`` for each member, then each of
    ``extra`` (``moa/NAME``, ``model/NAME``, or a bare name: an ensemble first, else a
    model), each once; a name that is neither is a UserError listing what exists."""
    systems = [ensemble_system(config, ensemble, label=f"moa/{ensemble}")]
    systems += [model_system(config, ensemble, model) for model in members(config, ensemble)]
    for name in extra:
        system = _named_system(config, ensemble, name)
        if system.name not in {s.name for s in systems}:
            systems.append(system)
    return systems


def _named_system(config: Config, ensemble: str, name: str) -> System:
    kind, _, rest = name.partition("/")
    if kind == "moa" and rest in config.ensembles:
        return ensemble_system(config, rest, label=f"moa/{rest}")
    if kind == "model" and rest in config.models:
        return model_system(config, ensemble, rest)
    if name in config.ensembles:
        return ensemble_system(config, name, label=f"moa/{name}")
    if name in config.models:
        return model_system(config, ensemble, name)
    ensembles = ", ".join(f"moa/{n}" for n in sorted(config.ensembles)) or "none"
    models = ", ".join(f"model/{n}" for n in sorted(config.models)) or "none"
    where = f" in {config.source}" if config.source else ""
    raise UserError(
        f"--system {name}: no such ensemble or model{where}; name an ensemble ({ensembles}) "
        f"or a model ({models})"
    )


def check_judge(config: Config, questions: Sequence[Question], judge: str | None) -> None:
    """Refuse, before anything loads, a judge that is not a model of the config, and a set
    with judged questions but no judge (a UserError saying how many and what to do)."""
    models = ", ".join(sorted(config.models)) or "none"
    where = f" in {config.source}" if config.source else ""
    if judge is not None and judge not in config.models:
        raise UserError(
            f'--judge {judge}: no model "{judge}"{where}; name one of its models ({models})'
        )
    judged = [q.id for q in questions if q.kind == "judged"]
    if judged and judge is None:
        shown = ", ".join(judged[:4]) + (f" and {len(judged) - 4} more" if len(judged) > 4 else "")
        raise UserError(
            f"{len(judged)} of the {len(questions)} questions are judged ({shown}), and no "
            f"judge was named: add --judge MODEL with one of the models{where} ({models}), "
            "best a strong one outside the ensemble, or leave the judged questions out of the "
            "set"
        )


def judge_system(model: str, response_format: ResponseFormat | None) -> System:
    """One call of the judge ``model`` at temperature 0 (a verdict is not a dice roll), with
    room for its reasons (:data:`JUDGE_MAX_TOKENS`) and ``response_format`` when its backend
    honours one; recorded under ``judge/MODEL``."""
    agent = Agent(
        model=model,
        temperature=0.0,
        max_tokens=JUDGE_MAX_TOKENS,
        response_format=response_format,
    )
    name = f"judge/{model}"
    return one_call_system(name, name, agent, temperature=0.0, max_tokens=JUDGE_MAX_TOKENS)
