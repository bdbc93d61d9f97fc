"""What a run reports: an event per step as it happens, and the account when it ends.

The engine prints nothing. It calls ``on_event`` with the dataclasses below, in the order things
happen (the CLI renders them with rich, a server streams the aggregator's pieces), and returns a
:class:`RunResult`, whose ``calls`` are the ``calls`` entries of ``run --json``.

Layers in events and records are 1-based, as people count them and as plans print them (the
aggregator is layer L+1); the engine indexes stages from 0 (see :mod:`localmoa.runtime.state`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from localmoa.planning.fewest_loads import Plan, Wave
from localmoa.runtime.moa import Call

__all__ = [
    "CallFinished",
    "CallPiece",
    "CallRecord",
    "CallStarted",
    "Event",
    "LoadFailed",
    "ModelLoaded",
    "ModelUnloaded",
    "RunResult",
    "WaveStarted",
]


class CallRecord(BaseModel):
    """What one call did: the ``calls`` entries of ``run --json``."""

    layer: int
    index: int
    model: str
    ok: bool
    error: str | None
    seconds: float
    tokens: int
    prompt_tokens: int = 0
    text: str


class RunResult(BaseModel):
    """The answer and the account of how it was made."""

    answer: str
    calls: list[CallRecord]
    loads: int
    replans: int = 0
    """Times the rest of the run was planned again after a measurement (see Executor.run)."""
    plan: Plan
    seconds: float


@dataclass(frozen=True)
class WaveStarted:
    """The run reached a wave of its plan: its loads start now (or it loads nothing)."""

    number: int
    wave: Wave


@dataclass(frozen=True)
class ModelLoaded:
    model: str
    seconds: float
    measured_bytes: int | None


@dataclass(frozen=True)
class LoadFailed:
    """A model could not load; its agents fail with ``error``, the run goes on on quorum."""

    model: str
    error: str


@dataclass(frozen=True)
class ModelUnloaded:
    """A model that was loaded has been unloaded (never sent for one that failed to load)."""

    model: str


@dataclass(frozen=True)
class CallStarted:
    call: Call


@dataclass(frozen=True)
class CallPiece:
    call: Call
    text: str


@dataclass(frozen=True)
class CallFinished:
    call: Call
    record: CallRecord


Event = (
    WaveStarted | ModelLoaded | LoadFailed | ModelUnloaded | CallStarted | CallPiece | CallFinished
)
