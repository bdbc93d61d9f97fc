"""One run's state, in one object the engine and its callers can read: the calls still to
make, what each call did, each stage's usable answers, and the models that could not load.

Layers and stages. People, plans and records count layers from 1, and the aggregator is layer
L+1; the engine indexes its list of stages from 0. :func:`stage_of` and :func:`layer_of` are
the only places the two meet, so an off-by-one has one home.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from localmoa.backends.base import ChatMessage
from localmoa.errors import LayerFailedError
from localmoa.planning.fewest_loads import Plan
from localmoa.runtime.events import CallRecord, RunResult
from localmoa.runtime.moa import Call

__all__ = ["RunState", "layer_of", "stage_of", "usable_answers"]


def stage_of(layer: int) -> int:
    """The 0-based stage of a 1-based layer (a Call's, a Wave's or a CallRecord's)."""
    return layer - 1


def layer_of(stage: int) -> int:
    """The 1-based layer of a 0-based stage."""
    return stage + 1


def usable_answers(records: Sequence[CallRecord], layer: int, *, final: bool) -> list[str]:
    """The answers of ``layer`` that later layers may read, in agent order: the calls that
    succeeded with some text. None at all ends the run (LayerFailedError), naming every reason."""
    done = sorted((r for r in records if r.layer == layer), key=lambda r: r.index)
    usable = [r.text for r in done if r.ok and r.text.strip()]
    if not usable:
        why = "; ".join(r.error or f'model "{r.model}": empty answer' for r in done)
        what = "the aggregator" if final else f"every agent of layer {layer}"
        raise LayerFailedError(f"{what} failed ({why})")
    return usable


@dataclass
class RunState:
    """Everything one run has done and has still to do; the engine mutates it through these
    methods only, so what it means stays in one place."""

    stages: Sequence[Sequence[Call]]
    conversation: list[ChatMessage]
    pending: list[list[Call]] = field(init=False)
    """Calls not made yet, by stage (0-based)."""
    records: list[CallRecord] = field(default_factory=list)
    """Every call made, in the order they finished."""
    references: dict[int, list[str]] = field(default_factory=dict)
    """Stage -> its usable answers, once every call of the stage is done."""
    failed_loads: dict[str, str] = field(default_factory=dict)
    """Model -> why its last load failed; its calls fail with that reason until a load works."""
    loads: int = 0
    replans: int = 0
    waves_started: int = 0

    def __post_init__(self) -> None:
        self.pending = [list(stage) for stage in self.stages]

    @property
    def last_stage(self) -> int:
        return len(self.stages) - 1

    def has_pending(self) -> bool:
        return any(self.pending)

    def first_pending_stage(self) -> int:
        return next(k for k, calls in enumerate(self.pending) if calls)

    def may_start(self, stage: int) -> bool:
        """Are the answers a call of ``stage`` reads all in?"""
        return stage == 0 or stage - 1 in self.references

    def references_for(self, stage: int) -> list[str] | None:
        """What a call of ``stage`` reads: the previous stage's usable answers (None for the
        first layer, which reads the conversation alone)."""
        return self.references.get(stage - 1)

    def record(self, call: Call, record: CallRecord) -> bool:
        """Account for a finished call; True when it was its stage's last. A stage with no
        usable answer raises LayerFailedError."""
        stage = stage_of(call.layer)
        self.records.append(record)
        self.pending[stage].remove(call)
        if self.pending[stage]:
            return False
        final = stage == self.last_stage
        self.references[stage] = usable_answers(self.records, call.layer, final=final)
        return True

    def answer(self) -> str:
        final = self.references.get(self.last_stage)
        return final[0] if final else ""

    def result(self, plan: Plan, seconds: float) -> RunResult:
        return RunResult(
            answer=self.answer(),
            calls=sorted(self.records, key=lambda r: (r.layer, r.index)),
            loads=self.loads,
            replans=self.replans,
            plan=plan,
            seconds=seconds,
        )
