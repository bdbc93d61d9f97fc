"""One run's state, in one object the engine and its callers can read: the calls still to
make, what each call did, what each stage passes on, and the models that could not load.

Stages and layers. A run is a list of stages (0-based): the roles call, each proposer layer, a
judge after a layer, the aggregator's step(s). People, plans and records count MoA layers from 1
(the aggregator is layer L+1); :func:`stage_of` and :func:`layer_of` convert the planner's
1-based stage numbers (a plan's ``Wave.layer``), so an off-by-one has one home.

What a stage passes on is its *output*: a proposer layer's usable answers, in agent order; a
judge's selection of the layer before it, best first (*ranked*, so a cut drops the last first);
an aggregator step's answer. A call reads the output of the nearest stage before its own that
ran (a roles call's output is the roles, read by the proposers instead; a stage an early stop
skipped is not read).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from localmoa.backends.base import ChatMessage
from localmoa.errors import LayerFailedError
from localmoa.planning.fewest_loads import Plan
from localmoa.runtime.events import CallRecord, RunResult
from localmoa.runtime.judge import Verdict, parse_verdict
from localmoa.runtime.moa import Call
from localmoa.runtime.roles import parse_roles

__all__ = ["Answer", "JobState", "RunState", "layer_of", "stage_of", "usable_answers"]


def stage_of(layer: int) -> int:
    """The 0-based stage of a 1-based stage number (a plan Wave's ``layer``)."""
    return layer - 1


def layer_of(stage: int) -> int:
    """The 1-based number of a 0-based stage."""
    return stage + 1


@dataclass(frozen=True)
class Answer:
    """An answer a later call may read, and where it came from (``references`` in --json)."""

    layer: int
    index: int
    text: str


def usable_answers(
    records: Sequence[CallRecord], stage: Sequence[Call], *, what: str
) -> list[Answer]:
    """The answers of ``stage``'s calls that later stages may read, in call order: the calls
    that succeeded with some text. None at all ends the run (LayerFailedError), naming every
    reason."""
    keys = {(c.layer, c.index) for c in stage}
    done = sorted(
        (r for r in records if (r.layer, r.index) in keys and r.role == stage[0].role),
        key=lambda r: r.index,
    )
    usable = [Answer(r.layer, r.index, r.text) for r in done if r.ok and r.text.strip()]
    if not usable:
        why = "; ".join(r.error or f'model "{r.model}": empty answer' for r in done)
        raise LayerFailedError(f"{what} failed ({why})")
    return usable


@dataclass
class JobState:
    """Everything one conversation of a run has done and has still to do (a run answers one
    conversation; a batch chunk several, each its own job): the engine mutates it through
    :class:`RunState` only, so what it means stays in one place."""

    stages: Sequence[Sequence[Call]]
    conversation: list[ChatMessage]
    tolerant: bool = False
    """True in a batch: a stage with no usable answer fails this job (``error``) and the
    others go on; False: it ends the run (LayerFailedError)."""
    pending: list[list[Call]] = field(init=False)
    """Calls not made yet, by stage (0-based)."""
    records: list[CallRecord] = field(default_factory=list)
    """Every call made, in the order they finished."""
    outputs: dict[int, list[Answer]] = field(default_factory=dict)
    """Stage -> what it passes on, once every call of the stage is done."""
    skipped: set[int] = field(default_factory=set)
    """Stages an early stop skipped."""
    roles: list[str] | None = None
    """The proposers' roles, once a roles call wrote them (cached ones travel on the calls)."""
    shown: dict[int, list[Answer]] = field(default_factory=dict)
    """Judge stage -> the answers it was shown, as sent (cut to fit), numbered from 1."""
    verdicts: dict[int, Verdict] = field(default_factory=dict)
    """Judge stage -> its verdict, as used."""
    error: str | None = None
    """Why this job failed (``tolerant`` only); its calls not made yet are dropped."""
    finished: float | None = None
    """perf_counter when its last stage closed or it failed."""

    def __post_init__(self) -> None:
        self.pending = [list(stage) for stage in self.stages]

    @property
    def last_stage(self) -> int:
        return len(self.stages) - 1

    def has_pending(self) -> bool:
        return any(self.pending)

    def first_pending_stage(self) -> int:
        return next(k for k, calls in enumerate(self.pending) if calls)

    def live_stages(self) -> list[int]:
        """Stages with calls still to make, in order: what a re-plan plans."""
        return [k for k, calls in enumerate(self.pending) if calls]

    def done(self, stage: int) -> bool:
        return (
            stage in self.outputs
            or stage in self.skipped
            or stage >= len(self.stages)
            or self.error is not None
        )

    def may_start(self, stage: int) -> bool:
        """Are the answers a call of ``stage`` reads all in?"""
        return all(self.done(k) for k in range(stage))

    def source(self, stage: int) -> int | None:
        """The stage whose output ``stage`` reads: the nearest earlier one that ran and is not
        the roles call; None for the first proposer layer (it reads the conversation alone)."""
        for k in range(stage - 1, -1, -1):
            if k not in self.skipped and self.stages[k][0].role != "roles":
                return k
        return None

    def references_for(self, call: Call) -> tuple[list[Answer], bool] | None:
        """What ``call`` reads, and whether it is ranked best first (a judge's selection);
        None when it reads the conversation alone."""
        if call.role == "roles":
            return None
        source = self.source(call.stage)
        if source is None:
            return None
        if call.window is not None:
            start, end = call.window
            pool = self.source(self._first_step(call.stage))
            assert pool is not None
            earlier = self.outputs[source] if start else []
            return [*earlier, *self.outputs[pool][start:end]], False
        ranked = self.stages[source][0].role == "judge"
        return list(self.outputs[source]), ranked

    def _first_step(self, stage: int) -> int:
        while stage > 0 and self.stages[stage - 1][0].window is not None:
            stage -= 1
        return stage

    def record(self, call: Call, record: CallRecord) -> bool:
        """Account for a finished call; True when it was its stage's last. A stage with no
        usable answer raises LayerFailedError, or fails the job when ``tolerant``."""
        try:
            closed = self._record(call, record)
        except LayerFailedError as exc:
            if not self.tolerant:
                raise
            self.error = str(exc)
            self.pending = [[] for _ in self.stages]
            closed = True
        if closed and (self.error is not None or not self.has_pending()):
            self.finished = time.perf_counter()
        return closed

    def _record(self, call: Call, record: CallRecord) -> bool:
        stage = call.stage
        self.pending[stage].remove(call)
        if call.role == "judge":
            record = self._judged(call, record)
        elif call.role == "roles":
            self.roles = parse_roles(record.text, call.roles) if record.ok else None
            record = record.model_copy(update={"parsed": self.roles is not None})
        self.records.append(record)
        if self.pending[stage]:
            return False
        if call.role in ("roles", "judge"):
            self.outputs.setdefault(stage, [])
            return True
        what = (
            "the aggregator" if call.role == "aggregator" else f"every agent of layer {call.layer}"
        )
        self.outputs[stage] = usable_answers(self.records, self.stages[stage], what=what)
        return True

    def _judged(self, call: Call, record: CallRecord) -> CallRecord:
        """The judge's verdict: its selection becomes the stage's output; ``stop`` skips the
        proposer layers (and their judges) left before the aggregator."""
        read = self.references_for(call)
        shown = self.shown.get(call.stage, read[0] if read else [])
        if record.ok:
            verdict = parse_verdict(
                record.text, len(shown), top_k=call.top_k, early_stop=call.early_stop
            )
        else:
            verdict = Verdict(
                selected=tuple(range(1, len(shown) + 1)),
                stop=False,
                reason=f"the judge failed ({record.error})",
                parsed=False,
            )
        self.verdicts[call.stage] = verdict
        self.outputs[call.stage] = [shown[n - 1] for n in verdict.selected]
        if verdict.stop:
            for k in range(call.stage + 1, len(self.stages)):
                if self.stages[k][0].role in ("proposer", "judge"):
                    self.skipped.add(k)
                    self.pending[k] = []
        return record.model_copy(
            update={
                "selected": list(verdict.selected),
                "stop": verdict.stop,
                "parsed": verdict.parsed,
                "reason": verdict.reason,
            }
        )

    def answer(self) -> str:
        for stage in range(self.last_stage, -1, -1):
            if self.outputs.get(stage):
                return self.outputs[stage][0].text
        return ""

    def result(self, run: RunState, plan: Plan, seconds: float) -> RunResult:
        """This job's result; loads and re-plans are the run's (shared by its jobs)."""
        return RunResult(
            answer=self.answer(),
            calls=sorted(self.records, key=lambda r: (r.layer, _ROLE_ORDER[r.role], r.index)),
            loads=run.loads,
            load_seconds=run.load_seconds,
            replans=run.replans,
            plan=plan,
            seconds=seconds,
            skipped_layers=sorted(
                {
                    self.stages[k][0].layer
                    for k in self.skipped
                    if self.stages[k][0].role == "proposer"
                }
            ),
        )


@dataclass
class RunState:
    """Everything a run has done and has still to do, as the engine sees it: the stages of all
    its jobs together (stage k of the run is stage k of every job: the calls a plan's wave
    runs), and what the run shares (loads, failed loads, re-plans).

    A run answers one conversation (``localmoa run``, a ``serve`` request) or, in a batch,
    several (:meth:`of_jobs`): then every job is ``tolerant`` (one failing job does not end the
    others) and the calls of all jobs are made stage by stage together."""

    jobs: list[JobState]
    stages: list[list[Call]] = field(init=False)
    """Stage -> the calls of every job in that stage."""
    failed_loads: dict[str, str] = field(default_factory=dict)
    """Model -> why its last load failed; its calls fail with that reason until a load works."""
    loads: int = 0
    load_seconds: float = 0.0
    """Seconds the run's loads took, added up."""
    replans: int = 0
    waves_started: int = 0

    def __post_init__(self) -> None:
        depth = max(len(job.stages) for job in self.jobs)
        self.stages = [
            [c for job in self.jobs if k < len(job.stages) for c in job.stages[k]]
            for k in range(depth)
        ]

    @classmethod
    def of(cls, stages: Sequence[Sequence[Call]], conversation: list[ChatMessage]) -> RunState:
        """One conversation's run."""
        return cls([JobState(stages, conversation)])

    @classmethod
    def of_jobs(
        cls, jobs: Sequence[tuple[Sequence[Sequence[Call]], list[ChatMessage]]]
    ) -> RunState:
        """A batch's run: each job's stages (their calls tagged with the job's position, see
        :func:`localmoa.runtime.moa.batched`) and conversation."""
        return cls([JobState(stages, conv, tolerant=True) for stages, conv in jobs])

    @property
    def pending(self) -> list[list[Call]]:
        """Calls not made yet, by stage."""
        return [
            [c for job in self.jobs if k < len(job.pending) for c in job.pending[k]]
            for k in range(len(self.stages))
        ]

    def job(self, call: Call) -> JobState:
        return self.jobs[call.job]

    def has_pending(self) -> bool:
        return any(job.has_pending() for job in self.jobs)

    def live_stages(self) -> list[int]:
        """Stages with calls still to make, in order: what a re-plan plans."""
        return [k for k, calls in enumerate(self.pending) if calls]

    def done(self, stage: int) -> bool:
        return all(job.done(stage) for job in self.jobs)

    def may_start(self, stage: int) -> bool:
        """Are the answers every call of ``stage`` reads all in?"""
        return all(job.may_start(stage) for job in self.jobs)

    def record(self, call: Call, record: CallRecord) -> tuple[bool, bool]:
        """Account for a finished call: (its job's stage closed, the run's stage closed)."""
        closed = self.job(call).record(call, record)
        return closed, closed and self.done(call.stage)

    def result(self, plan: Plan, seconds: float) -> RunResult:
        """The one job's result (raises what ended it)."""
        return self.jobs[0].result(self, plan, seconds)

    def results(self, plan: Plan, started: float) -> list[tuple[RunResult, str | None]]:
        """Each job's result and why it failed (None: it answered); its seconds run from
        ``started`` (perf_counter) to when it finished."""
        now = time.perf_counter()
        return [
            (job.result(self, plan, (job.finished or now) - started), job.error)
            for job in self.jobs
        ]


_ROLE_ORDER = {"roles": 0, "proposer": 1, "judge": 2, "aggregator": 3}
