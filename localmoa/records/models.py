"""The run log's shapes, as ``localmoa logs --json`` prints them and the console reads them.

A run is one ``localmoa run``, one ``serve`` request, one ``chat`` turn or one item of a batch.
Text fields (``prompt``, ``answer``, ``conversation``, a call's ``messages`` and ``text``) are
None when the run was recorded with ``record = "metadata"``: then no prompt, message or answer
text exists anywhere in the file.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from localmoa.backends.base import ChatMessage

__all__ = ["LoggedCall", "LoggedLoad", "LoggedRun", "RunDetail", "RunSource", "RunStatus"]

RunStatus = Literal["running", "ok", "failed", "interrupted"]
RunSource = Literal["run", "serve", "chat", "batch"]


class LoggedRun(BaseModel):
    """One run in the list ``localmoa logs --json`` prints."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="the run's id (a ULID: sortable by time)")
    status: RunStatus = Field(
        description='"ok", "failed", "interrupted", or "running" while it goes (or if the '
        "process died mid-run)"
    )
    source: RunSource = Field(description='what made it: "run", "serve", "chat" or "batch"')
    chat_id: str | None = Field(description="the chat session a chat turn belongs to")
    ensemble: str = Field(description="the ensemble that ran")
    started: str = Field(description="when it started, ISO 8601 UTC")
    seconds: float | None = Field(description="wall-clock seconds; null while running")
    calls: int = Field(description="calls recorded")
    loads: int = Field(description="model loads recorded")
    devices: list[str] = Field(
        default_factory=list,
        description="the devices its calls and loads were placed on, sorted; empty when the "
        "plan placed nothing",
    )
    nodes: list[str] = Field(
        default_factory=list,
        description="the Ray nodes its calls and loads ran on, sorted; empty on this machine",
    )
    prompt: str | None = Field(description='the last user message; null with record = "metadata"')
    answer: str | None = Field(description='the answer; null if none, or with "metadata"')
    error: str | None = Field(description="why it failed or was interrupted")


class LoggedCall(BaseModel):
    """One call of a recorded run."""

    model_config = ConfigDict(extra="forbid")

    layer: int
    index: int
    role: str = Field(description='"proposer", "judge", "roles" or "aggregator"')
    model: str
    backend: str
    device: str | None = Field(
        default=None,
        description='the device its model was placed on ("gpu1", "nodeA/gpu0"); null when '
        "the plan placed nothing (Ollama) or for runs recorded before devices were",
    )
    node: str | None = Field(default=None, description="the Ray node it ran on; null here")
    ok: bool
    error: str | None
    tokens_in: int = Field(description="prompt tokens")
    tokens_out: int = Field(description="generated tokens")
    ttft_s: float | None = Field(description="seconds to the first token")
    prefill_tok_s: float | None
    decode_tok_s: float | None
    seconds: float
    queued_at: float | None = Field(description="unix time it was ready to run")
    started_at: float | None
    first_token_at: float | None
    ended_at: float | None
    references: list[tuple[int, int]] = Field(description="[layer, index] of each answer read")
    truncated: bool
    selected: list[int] | None = Field(description="a judge's choice (1-based)")
    stop: bool | None
    parsed: bool | None
    messages: list[ChatMessage] | None = Field(description='what it sent; null with "metadata"')
    text: str | None = Field(description='what it wrote; null with "metadata"')


class LoggedLoad(BaseModel):
    """One model load of a recorded run."""

    model_config = ConfigDict(extra="forbid")

    model: str
    device: str | None = Field(
        default=None,
        description="the device it was loaded on (a split model: its main one); null when the "
        "plan placed nothing",
    )
    node: str | None = Field(default=None, description="the Ray node it was loaded on; null here")
    started_at: float = Field(description="unix time the load began")
    seconds: float
    bytes_estimated: int | None
    bytes_measured: int | None
    bytes_peak: int | None = Field(description="memory the load really took, where measurable")
    unloaded_at: float | None = Field(description="unix time it was unloaded; null if it stayed")


class RunDetail(BaseModel):
    """One run with everything recorded: ``localmoa logs show ID --json``."""

    model_config = ConfigDict(extra="forbid")

    id: str
    status: RunStatus
    source: RunSource
    chat_id: str | None
    ensemble: str
    started: str
    seconds: float | None
    error: str | None
    config: dict[str, Any] = Field(description="the ensemble's config as it ran (JSON)")
    plan: dict[str, Any] | None = Field(description="the plan as it was made (JSON)")
    budget_bytes: int | None
    budget_source: str | None
    device: dict[str, Any] | None = Field(description="a snapshot of the device at the start")
    versions: dict[str, str] = Field(description="localmoa's and the backends' versions")
    conversation: list[ChatMessage] | None
    answer: str | None
    calls: list[LoggedCall]
    loads: list[LoggedLoad]
