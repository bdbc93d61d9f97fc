"""What a person sees on stderr while a run goes: executor events rendered with rich.

On a terminal, a live table with one row per call (state, tokens, seconds) and a line per swap;
elsewhere (CI, pipes, files), one plain line per event, so logs stay readable. The answer itself
never goes through here: the CLI streams it to stdout.
"""

from __future__ import annotations

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from localmoa.runtime.engine import (
    CallFinished,
    CallPiece,
    CallStarted,
    Event,
    Judged,
    LoadFailed,
    ModelLoaded,
    ModelUnloaded,
    WaveStarted,
)
from localmoa.runtime.moa import Call

__all__ = ["Progress"]


class Progress:
    """Turns executor events into stderr output; call :meth:`close` when the run ends."""

    def __init__(
        self, console: Console, *, show_layers: bool, n_waves: int, labels: list[str]
    ) -> None:
        self.console = console
        self.show_layers = show_layers
        self.n_waves = n_waves
        self.labels = labels
        """Each stage's name (localmoa.runtime.moa.stage_label), by 0-based stage."""
        self.rows: dict[tuple[int, int], list[str]] = {}
        self.swaps: list[str] = []
        self.live: Live | None = None
        if console.is_terminal:
            self.live = Live(self._render(), console=console, auto_refresh=False, transient=False)
            self.live.start()

    def __call__(self, event: Event) -> None:
        match event:
            case WaveStarted(number=n, wave=wave):
                k = wave.layer - 1
                stage = self.labels[k] if 0 <= k < len(self.labels) else f"stage {wave.layer}"
                runs = ", ".join(dict.fromkeys(wave.runs))
                # A re-plan (a measurement, a device lost) can add waves the first plan had not.
                of = f"/{self.n_waves}" if n < self.n_waves else " (re-planned)"
                self._say(f"wave {n + 1}{of} · {stage}: {runs}")
            case ModelLoaded(model=model, seconds=seconds):
                self._say(f"  loaded {model} in {seconds:.2f}s")
            case LoadFailed(error=error):
                self._say(f"  load failed: {error}; its agents fail, the others go on")
            case ModelUnloaded(model=model):
                self._say(f"  unloaded {model}")
            case Judged(call=call, verdict=verdict, skipped=skipped):
                self._say(_verdict_line(call, verdict.selected, verdict.parsed, verdict.reason))
                if skipped:
                    layers = ", ".join(str(n) for n in skipped)
                    self._say(f"  early stop: the answers agree; layers {layers} skipped")
            case CallStarted(call=call):
                self.rows[(call.stage, call.index)] = [self._who(call), "running", "", ""]
                self._refresh()
            case CallPiece():
                pass
            case CallFinished(call=call, record=record):
                state = "ok" if record.ok else f"failed: {record.error}"
                self.rows[(call.stage, call.index)] = [
                    self._who(call),
                    state,
                    str(record.tokens),
                    f"{record.seconds:.2f}s",
                ]
                if self.live is None:
                    self.console.print(
                        f"  {self._who(call)}: {state}, {record.tokens} tokens, "
                        f"{record.seconds:.2f}s",
                        markup=False,
                        highlight=False,
                        soft_wrap=True,
                    )
                else:
                    self._refresh()
                if self.show_layers and call.role == "proposer":
                    body = record.text if record.ok else f"failed: {record.error}"
                    self.console.print(
                        Panel(
                            escape(body or "(empty answer)"),
                            title=escape(self._who(call)),
                            border_style="default" if record.ok else "red",
                        )
                    )

    def pause(self) -> None:
        """Stop redrawing before the answer streams to the same terminal."""
        if self.live is not None:
            self.live.refresh()
            self.live.stop()
            self.live = None

    close = pause

    def _who(self, call: Call) -> str:
        stage = self.labels[call.stage] if call.stage < len(self.labels) else call.role
        sample = f" #{call.index + 1}" if call.group is not None else ""
        return f"{stage}{sample} · {call.model}"

    def _say(self, line: str) -> None:
        self.swaps.append(line)
        if self.live is None:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        else:
            self._refresh()

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._render(), refresh=True)

    def _render(self) -> Group:
        table = Table(box=None, pad_edge=False, show_header=bool(self.rows))
        for column in ("call", "state", "tokens", "time"):
            table.add_column(column)
        for who, state, tokens, seconds in self.rows.values():
            style = "green" if state == "ok" else "red" if state.startswith("failed") else "yellow"
            table.add_row(who, Text(state, style=style), tokens, seconds)
        return Group(Text("\n".join(self.swaps[-3:]), style="dim"), table)


REASON_CHARS = 120
"""A judge's reason is the model's own text: on stderr, its first line, at most this long."""


def _verdict_line(call: Call, selected: tuple[int, ...], parsed: bool, reason: str) -> str:
    """How a judge's choice reads on stderr: its numbers and a short, printable reason."""
    chose = ", ".join(str(n) for n in selected)
    lines = reason.strip().splitlines()
    reason = "".join(ch for ch in (lines[0] if lines else "") if ch.isprintable())
    if len(reason) > REASON_CHARS:
        reason = reason[: REASON_CHARS - 1] + "…"
    if not parsed:
        return f"  judge {call.layer}: fell back to every answer ({chose}): {reason}"
    said = f": {reason}" if reason else ""
    return f"  judge {call.layer} chose {chose}{said}"
