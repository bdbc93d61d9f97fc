"""Telemetry of a call: when it was queued, sent, first answered and ended, and how fast its
prompt and its answer went.

Times are read from the monotonic clock and turned into unix times through one anchor
(:class:`Clock`), so intervals stay exact whatever the wall clock does. A runtime's own rates
(Ollama's ``prompt_eval_*``/``eval_*``, llama-server's ``timings``, llama.cpp's timed prompt
evaluation) win over rates timed from the stream (:class:`Timing`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TypedDict

from localmoa.backends.base import ChatDelta

__all__ = ["Clock", "Times", "Timing"]


class Clock:
    """Unix times read from the monotonic clock, anchored once: intervals between them are
    monotonic-clock intervals, whatever happens to the wall clock meanwhile."""

    def __init__(self) -> None:
        self._wall = time.time()
        self._monotonic = time.perf_counter()

    def unix(self, moment: float) -> float:
        """The unix time of ``moment``, a ``time.perf_counter()`` reading."""
        return self._wall + (moment - self._monotonic)


class Times(TypedDict):
    """A record's timing fields (see :class:`CallRecord`)."""

    queued_at: float
    started_at: float | None
    first_token_at: float | None
    ended_at: float
    ttft_s: float | None
    prefill_tok_s: float | None
    decode_tok_s: float | None


@dataclass
class Timing:
    """One call's stream as it arrived (``time.perf_counter()`` readings): its first token, its
    last delta, and the rates the runtime stated itself (see the module docstring)."""

    first: float | None = None
    first_tokens: int = 0
    """Tokens the first delta with any carried (more than 1 when text was held back)."""
    last: float | None = None
    prefill: float | None = None
    decode: float | None = None

    def saw(self, delta: ChatDelta, now: float) -> None:
        if delta.tokens and self.first is None:
            self.first, self.first_tokens = now, delta.tokens
        self.last = now
        if delta.prefill_tok_s is not None:
            self.prefill = delta.prefill_tok_s
        if delta.decode_tok_s is not None:
            self.decode = delta.decode_tok_s

    def fields(
        self,
        clock: Clock,
        *,
        queued: float,
        started: float | None,
        ended: float,
        ok: bool,
        tokens: int,
        prompt_tokens: int,
    ) -> Times:
        """The record's timing fields; ``started`` None when nothing was sent."""
        first = self.first
        end = self.last if ok and self.last is not None else ended
        ttft = None if first is None or started is None else first - started
        prefill = self.prefill
        if prefill is None and ttft and prompt_tokens:
            prefill = prompt_tokens / ttft
        decode = self.decode
        after_first = tokens - self.first_tokens
        if decode is None and first is not None and after_first > 0 and end > first:
            decode = after_first / (end - first)
        return {
            "queued_at": queued,
            "started_at": None if started is None else clock.unix(started),
            "first_token_at": None if first is None else clock.unix(first),
            "ended_at": clock.unix(end),
            "ttft_s": ttft,
            "prefill_tok_s": prefill,
            "decode_tok_s": decode,
        }
