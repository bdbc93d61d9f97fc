"""What a run reports: an event per step as it happens, and the account when it ends.

The engine prints nothing. It calls ``on_event`` with the dataclasses below, in the order things
happen (the CLI renders them with rich, a server streams the aggregator's pieces), and returns a
:class:`RunResult`, whose ``calls`` are the ``calls`` entries of ``run --json``.

Layers in events and records are 1-based, as people count them and as plans print them (the
aggregator is layer L+1); the engine indexes stages from 0 (see :mod:`localmoa.runtime.state`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from localmoa.backends.base import ChatRequest
from localmoa.planning.fewest_loads import Plan, Wave
from localmoa.runtime.judge import Verdict
from localmoa.runtime.moa import Call

__all__ = [
    "CallFinished",
    "CallPiece",
    "CallRecord",
    "CallStarted",
    "Event",
    "Judged",
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
    device: str | None = None
    """The device its model was placed on, as the plan names it ("gpu1"; a cluster node's
    device as its bin is named, e.g. "nodeA/gpu0"); None when the plan placed nothing (a
    backend that places models itself, such as Ollama)."""
    node: str | None = None
    """The Ray node the call ran on (the node's label, as its devices carry it); None on this
    machine."""
    ok: bool
    error: str | None
    seconds: float
    tokens: int
    prompt_tokens: int = 0
    text: str
    role: Literal["proposer", "judge", "roles", "aggregator"] = "proposer"
    references: list[tuple[int, int]] = Field(default_factory=list)
    """The ``[layer, index]`` of every answer the call saw, in the order it was given them."""
    reference_tokens: int = 0
    """Tokens those answers took in the call's prompt (the model's tokenizer where the backend
    has it, else the documented estimate)."""
    truncated: bool = False
    """True when references were cut or left out to fit the model's context."""
    selected: list[int] | None = None
    """A judge's: the 1-based numbers of the answers it was shown that go on, best first."""
    stop: bool | None = None
    """A judge's: did it end the proposer layers early?"""
    parsed: bool | None = None
    """A judge's or a roles call's: False when its answer could not be read and the
    deterministic fallback was used (a judge: every answer kept, no stop; roles: none)."""
    reason: str | None = None
    """A judge's: its reason, or why the fallback was used."""
    queued_at: float | None = None
    """Unix time the call was ready to run (its model in, its references in)."""
    started_at: float | None = None
    """Unix time its request went to the backend (after waiting for its model's turn)."""
    first_token_at: float | None = None
    """Unix time its first token arrived; None when none did."""
    ended_at: float | None = None
    """Unix time it ended."""
    ttft_s: float | None = None
    """Seconds from the request to the first token (prompt evaluation, mostly)."""
    prefill_tok_s: float | None = None
    """Prompt tokens evaluated per second, where the backend times it (Ollama, llama-server)
    or the stream shows it (llama.cpp: prompt tokens / time to first token)."""
    decode_tok_s: float | None = None
    """Generated tokens per second after the first."""


class RunResult(BaseModel):
    """The answer and the account of how it was made."""

    answer: str
    calls: list[CallRecord]
    loads: int
    load_seconds: float = 0.0
    """Seconds the run's loads took, added up (they may overlap calls)."""
    replans: int = 0
    """Times the rest of the run was planned again: after a measurement, or after a judge that
    may stop early decided (see Executor.run)."""
    plan: Plan
    seconds: float
    skipped_layers: list[int] = Field(default_factory=list)
    """Proposer layers a judge's early stop skipped."""


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
    estimated_bytes: int | None = None
    """What the plan counted for it."""
    peak_bytes: int | None = None
    """Memory the load really took, where measurable: RSS growth for in-process llama.cpp,
    NVML per-process memory where present, Ollama's /api/ps size."""
    device: str | None = None
    """The device it was loaded on (a split model: its main device), as the plan names it;
    None when the plan placed nothing (see :attr:`CallRecord.device`)."""
    node: str | None = None
    """The Ray node it was loaded on; None on this machine."""


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
    request: ChatRequest | None = None
    """What the call sent (None when it failed before sending: its model did not load)."""


@dataclass(frozen=True)
class Judged:
    """A judge's verdict, as used: what goes on, and the proposer layers an early stop skips."""

    call: Call
    verdict: Verdict
    skipped: tuple[int, ...]


Event = (
    WaveStarted
    | ModelLoaded
    | LoadFailed
    | ModelUnloaded
    | CallStarted
    | CallPiece
    | CallFinished
    | Judged
)
