"""A picture of a run: one row per model, and memory in use against the budget under it.

Where did the time go: loading, one slow model, waiting for a layer? Each row is a model: its
loads (hatched grey), its calls coloured by layer and labelled with their stage ("layer 2",
"judge 1", "aggregator"), a tick where the first token came, and a thin band while it is
resident; where the band shows, the model was loaded and idle. Under the rows, a step plot of
the bytes resident against the budget line.

Two sources, one picture, so a user can put plan and reality side by side:

- :func:`from_run` reads a recorded run (``localmoa logs show ID --timeline``): calls from
  their start to their end, loads from their start for their seconds, memory from each load's
  bytes, measured where the backend measured them, else their peak, else the plan's estimate,
  held from the load's start to its unload (or the run's end);
- :func:`from_plan` runs the cost model's simulation of a plan
  (:func:`localmoa.planning.timing.simulate_plan`, every call writing its ``max_tokens``) before
  anything loads (``localmoa plan --timeline``): the same spans, at the cost model's estimate,
  with each model's footprint as its bytes.

Both build a :class:`Timeline`, a neutral model with no drawing in it; :func:`draw` renders
one. Colours follow the layer (a judge takes the lighter shade of its layer's colour), not the
order of appearance, so the same stage has the same colour in the plan and in the run.

Why matplotlib (the ``plot`` extra): it writes SVG and PNG from one figure with no browser, no
server and no network; it ships its own font (DejaVu Sans), so the picture is the same on every
machine; and its SVG can be made byte-for-byte reproducible (``svg.hashsalt`` fixes the ids it
would otherwise draw at random, and the date is left out of the metadata), so a picture
committed to the README changes only when the run does. Plotly would need a headless browser
(kaleido) for static files; Pillow alone would mean writing axes and text layout by hand. It is
imported only when drawing, so the core install never needs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field

from localmoa.errors import MissingExtraError, UserError
from localmoa.planning.profiles import PROFILES, Profile
from localmoa.planning.refine import calls_as_planned
from localmoa.planning.timing import simulate_plan
from localmoa.records.models import LoggedCall, RunDetail
from localmoa.runtime.moa import stage_label
from localmoa.sizes import format_bytes

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from localmoa.runtime.prepare import Prepared

__all__ = [
    "SUFFIXES",
    "UNTIMED_PROFILE",
    "MemoryStep",
    "MissingExtraError",
    "Residency",
    "Timeline",
    "TimelineSpan",
    "check_path",
    "draw",
    "draw_plan",
    "draw_run",
    "from_plan",
    "from_run",
    "memory_steps",
]

SUFFIXES = (".svg", ".png")
"""The picture formats :func:`draw` writes, chosen by the file's suffix."""

UNTIMED_PROFILE = "cpu-16g"
"""The cost-model profile a plan is pictured on when its backends are not timed (a fake, an
OpenAI-compatible server) and so it has none of its own: the picture says it is nominal."""

_SALT = "localmoa"
"""``svg.hashsalt``: the SVG's element ids come from it, not from a random draw."""


class TimelineSpan(BaseModel):
    """One load or one call on a model's row, in seconds from the timeline's start."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    kind: Literal["load", "call"]
    start_s: float
    end_s: float
    label: str = Field(description='"load", or the call\'s stage: "layer 1", "judge 1"...')
    layer: int | None = Field(
        default=None, description="the call's layer (0: roles; the aggregator L+1)"
    )
    role: str | None = Field(default=None, description="the call's role; None for a load")
    first_token_s: float | None = Field(default=None, description="when its first token came")
    ok: bool = True


class Residency(BaseModel):
    """One stay of a model in memory: from its load's start to its unload (or the end)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    start_s: float
    end_s: float
    bytes: int | None = Field(description="what it held; None when nothing says")
    bytes_source: Literal["measured", "peak", "estimated"] | None


class MemoryStep(BaseModel):
    """From ``at_s`` on (until the next step), ``bytes`` are resident."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    at_s: float
    bytes: int


class Timeline(BaseModel):
    """What a timeline picture shows, whatever it came from; :func:`draw` renders it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    title: str
    source: Literal["planned", "measured"]
    note: str = Field(default="", description="a line under the title: where figures came from")
    models: list[str] = Field(description="one row each, top to bottom")
    spans: list[TimelineSpan] = Field(description="by start, then row")
    residencies: list[Residency]
    memory: list[MemoryStep] = Field(description="bytes resident over time (memory_steps)")
    budget_bytes: int | None
    end_s: float = Field(description="the timeline's length in seconds")


# --- builders -------------------------------------------------------------------------------


def from_run(detail: RunDetail) -> Timeline:
    """The timeline of a recorded run, measured: see the module docstring.

    Time 0 is the run's first load or call (its ``started`` stamp when nothing started): the
    stamp may be coarser than the events' times, and before the first event there is nothing
    to show.
    A call that never started is left out; one that never ended (an interrupted run) ends with
    the run; a load never unloaded stays to the end.
    """
    times = [load.started_at for load in detail.loads]
    times += [c.started_at for c in detail.calls if c.started_at is not None]
    begun = _unix(detail.started)
    t0 = min(times, default=begun if begun is not None else 0.0)
    ends = [load.started_at + load.seconds for load in detail.loads]
    ends += [load.unloaded_at for load in detail.loads if load.unloaded_at is not None]
    ends += [c.ended_at for c in detail.calls if c.ended_at is not None]
    if begun is not None and detail.seconds is not None:
        ends.append(begun + detail.seconds)
    end = max([t - t0 for t in ends], default=0.0)

    spans: list[TimelineSpan] = []
    residencies: list[Residency] = []
    for load in detail.loads:
        start = load.started_at - t0
        spans.append(
            TimelineSpan(
                model=load.model,
                kind="load",
                start_s=start,
                end_s=start + load.seconds,
                label="load",
            )
        )
        size, source = _load_bytes(load.bytes_measured, load.bytes_peak, load.bytes_estimated)
        until = end if load.unloaded_at is None else max(load.unloaded_at - t0, start)
        residencies.append(
            Residency(model=load.model, start_s=start, end_s=until, bytes=size, bytes_source=source)
        )
    aggregator_steps = len({c.index for c in detail.calls if c.role == "aggregator"}) > 1
    for call in detail.calls:
        if call.started_at is None:
            continue
        start = call.started_at - t0
        stop = end if call.ended_at is None else max(call.ended_at - t0, start)
        first = None if call.first_token_at is None else call.first_token_at - t0
        spans.append(
            TimelineSpan(
                model=call.model,
                kind="call",
                start_s=start,
                end_s=stop,
                label=_call_label(call, aggregator_steps),
                layer=call.layer,
                role=call.role,
                first_token_s=first,
                ok=call.ok,
            )
        )
    sources = [r.bytes_source for r in residencies]
    measured = sum(s in ("measured", "peak") for s in sources)
    if not residencies:
        note = "no loads recorded: memory in use is not known"
    elif measured == len(sources):
        note = "memory as measured at each load"
    else:
        note = f"memory measured for {measured} of {len(sources)} loads, the rest as estimated"
    status = "" if detail.status == "ok" else f" ({detail.status})"
    return _timeline(
        title=f"run {detail.id}: {detail.ensemble}{status}, measured",
        source="measured",
        note=note,
        spans=spans,
        residencies=residencies,
        budget=detail.budget_bytes,
        end=end,
    )


def from_plan(
    prepared: Prepared, *, prompt: str | None = None, profile: Profile | None = None
) -> Timeline:
    """The timeline the cost model expects for ``prepared``'s plan, before anything runs.

    ``profile`` defaults to the one the plan was timed on (``Prepared.timing``, else its
    policy's), and for untimed backends to :data:`UNTIMED_PROFILE`, said in the picture's
    note; either way within the plan's budget. ``prompt`` sizes the first layer's calls as
    the planner does (a nominal prompt when not given). Every call writes its ``max_tokens``.
    """
    plan = prepared.plan
    nominal = profile is None and prepared.timing is None and prepared.policy.profile is None
    chosen = profile or prepared.timing or prepared.policy.profile or PROFILES[UNTIMED_PROFILE]
    chosen = dataclasses.replace(chosen, memory_bytes=plan.budget_bytes)
    sizes = {name: fp.total for name, fp in prepared.footprints.items()}
    timing = simulate_plan(plan, calls_as_planned(prepared.stages, prompt), sizes, chosen)

    spans: list[TimelineSpan] = []
    residencies: list[Residency] = []
    unloads: dict[str, list[float]] = {}
    for span in timing.spans:
        if span.kind == "unload":
            unloads.setdefault(span.model, []).append(span.start_s)
    for span in timing.spans:
        if span.kind == "load":
            spans.append(
                TimelineSpan(
                    model=span.model,
                    kind="load",
                    start_s=span.start_s,
                    end_s=span.end_s,
                    label="load",
                )
            )
            later = [t for t in unloads.get(span.model, []) if t >= span.start_s]
            until = min(later, default=timing.makespan_s)
            if later:
                unloads[span.model].remove(until)
            residencies.append(
                Residency(
                    model=span.model,
                    start_s=span.start_s,
                    end_s=until,
                    bytes=sizes[span.model],
                    bytes_source="estimated",
                )
            )
        elif span.kind == "call":
            stage = prepared.stages[span.stage]
            spans.append(
                TimelineSpan(
                    model=span.model,
                    kind="call",
                    start_s=span.start_s,
                    end_s=span.end_s,
                    label=stage_label(stage),
                    layer=stage[0].layer,
                    role=stage[0].role,
                )
            )
    how = "a nominal profile: these backends are not timed" if nominal else "this machine's kind"
    return _timeline(
        title=f"plan: {prepared.ensemble}, estimated by the cost model ({chosen.name})",
        source="planned",
        note=f"{plan.loads} loads; {how}; every call writes max_tokens; memory as estimated",
        spans=spans,
        residencies=residencies,
        budget=plan.budget_bytes,
        end=timing.makespan_s,
    )


def memory_steps(residencies: Iterable[Residency]) -> list[MemoryStep]:
    """Bytes resident over time, a step at each change (the first at 0 s).

    A model unloaded at the moment another starts loading has left first, as in the engine and
    the cost model (unloads come before the loads they make room for). A residency whose bytes
    are unknown adds nothing.
    """
    changes: list[tuple[float, int]] = []
    for stay in residencies:
        if stay.bytes is not None:
            changes += [(stay.start_s, stay.bytes), (stay.end_s, -stay.bytes)]
    changes.sort(key=lambda change: (change[0], change[1]))  # at one time, unloads first
    steps = [MemoryStep(at_s=0.0, bytes=0)]
    used = 0
    for at, delta in changes:
        used += delta
        if steps[-1].at_s == at:
            steps[-1] = MemoryStep(at_s=at, bytes=used)
        else:
            steps.append(MemoryStep(at_s=at, bytes=used))
    return steps


def _timeline(
    *,
    title: str,
    source: Literal["planned", "measured"],
    note: str,
    spans: list[TimelineSpan],
    residencies: list[Residency],
    budget: int | None,
    end: float,
) -> Timeline:
    """A Timeline with rows in order of each model's first appearance, spans sorted."""
    spans.sort(key=lambda s: (s.start_s, s.kind != "load", s.model, s.end_s))
    firsts: dict[str, float] = {}
    starts = [(s.model, s.start_s) for s in spans] + [(r.model, r.start_s) for r in residencies]
    for model, start in starts:
        firsts[model] = min(firsts.get(model, start), start)
    models = sorted(firsts, key=lambda name: (firsts[name], name))
    return Timeline(
        title=title,
        source=source,
        note=note,
        models=models,
        spans=spans,
        residencies=sorted(residencies, key=lambda r: (r.start_s, r.model)),
        memory=memory_steps(residencies),
        budget_bytes=budget,
        end_s=end,
    )


def _unix(iso: str) -> float | None:
    """An ISO 8601 time as unix seconds (UTC when it names no zone); None if unreadable."""
    try:
        when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()


def _load_bytes(
    measured: int | None, peak: int | None, estimated: int | None
) -> tuple[int | None, Literal["measured", "peak", "estimated"] | None]:
    """What a load held: measured where the backend measured it, else its peak, else the
    plan's estimate (the order the run log trusts them in)."""
    if measured is not None:
        return measured, "measured"
    if peak is not None:
        return peak, "peak"
    if estimated is not None:
        return estimated, "estimated"
    return None, None


def _call_label(call: LoggedCall, aggregator_steps: bool) -> str:
    """A recorded call's stage as :func:`~localmoa.runtime.moa.stage_label` names it (a
    sliding-window aggregator shows as several aggregator calls, one per step)."""
    if call.role == "roles":
        return "roles"
    if call.role == "judge":
        return f"judge {call.layer}"
    if call.role == "aggregator":
        return f"aggregator step {call.index + 1}" if aggregator_steps else "aggregator"
    return f"layer {call.layer}"


# --- drawing --------------------------------------------------------------------------------


def draw_run(detail: RunDetail, path: Path) -> None:
    """Draw a recorded run's timeline to ``path`` (.svg or .png): ``logs show ID --timeline``."""
    draw(from_run(detail), path)


def draw_plan(prepared: Prepared, path: Path) -> None:
    """Draw the cost model's timeline of ``prepared``'s plan to ``path`` (.svg or .png):
    ``localmoa plan --timeline``."""
    draw(from_plan(prepared), path)


_GIB = 1 << 30
_MIB = 1 << 20
_LOAD_COLOUR = "#bdbdbd"
_LOAD_EDGE = "#636363"
_RESIDENT_COLOUR = "#e0e0e0"
_FAILED_EDGE = "#b2182b"
_BUDGET_COLOUR = "#b2182b"
_MEMORY_COLOUR = "#2166ac"
_BAR = 0.62
"""A row's bar height (rows are 1 apart)."""
_ROLE_RANK = {"roles": 0, "proposer": 1, "judge": 2, "aggregator": 3}


def check_path(path: Path) -> Path:
    """``path`` when a timeline can be drawn there (a .svg or .png in an existing folder), else
    UserError saying what to change: the CLI checks before planning or loading anything."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(
            f"{path}: cannot draw a timeline as {suffix or 'a file without a suffix'}; "
            f"name the file {' or '.join(SUFFIXES)}"
        )
    if not path.parent.is_dir():
        raise UserError(f"{path}: the folder {path.parent} does not exist; create it first")
    return path


def draw(timeline: Timeline, path: Path) -> None:
    """Render ``timeline`` to ``path``, SVG or PNG by its suffix; the same timeline always
    gives the same bytes.

    Raises UserError for another suffix or a folder that does not exist, and
    MissingExtraError when matplotlib (the ``plot`` extra) is not installed.
    """
    path = check_path(path)
    suffix = path.suffix.lower()
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError(
            "drawing a timeline needs matplotlib, which comes with the plot extra: "
            "pip install 'localmoa[plot]'"
        ) from None
    with matplotlib.rc_context(
        {"svg.hashsalt": _SALT, "svg.fonttype": "path", "font.family": "DejaVu Sans"}
    ):
        figure = Figure(figsize=(10.0, 2.9 + 0.45 * max(len(timeline.models), 1)), dpi=100)
        _compose(figure, timeline)
        metadata = {"Date": None} if suffix == ".svg" else {}
        try:
            figure.savefig(path, format=suffix[1:], metadata=metadata, dpi=150)
        except OSError as exc:
            raise UserError(f"{path}: cannot write the picture ({exc.strerror or exc})") from None


def _compose(figure: Figure, timeline: Timeline) -> None:
    """Lay the rows and the memory panel out on ``figure``."""
    rows_n = max(len(timeline.models), 1)
    figure.set_layout_engine("constrained")
    rows, memory = figure.subplots(2, 1, sharex=True, height_ratios=[0.45 * rows_n + 0.4, 1.5])
    figure.suptitle(timeline.title, fontsize=11, x=0.01, ha="left")
    rows.set_title(timeline.note, fontsize=8, loc="left", color="#444444")
    end = timeline.end_s if timeline.end_s > 0 else 1.0
    _draw_rows(rows, timeline, end)
    _draw_memory(memory, timeline, end)
    memory.set_xlim(0.0, end * 1.01)
    memory.set_xlabel("seconds from the start")


def _colour(layer: int, role: str | None) -> str:
    """A call's colour: one hue per layer (tab20's pairs, grey left to the loads), a judge in
    the lighter shade of the layer it judges, so plan and run colour a stage alike."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    pairs = [p for p in range(10) if p != 7]  # tab20's pair 7 is grey: the loads' colour
    pair = pairs[layer % len(pairs)]
    return to_hex(colormaps["tab20"](2 * pair + (1 if role == "judge" else 0)))


def _lanes(spans: Sequence[TimelineSpan]) -> tuple[list[int], int]:
    """Lanes for one row's calls, so that calls running at once (an agent's samples in
    parallel slots) sit one above the other: each call in the first lane free at its start."""
    ends: list[float] = []
    lanes = []
    for span in spans:
        lane = next((k for k, end in enumerate(ends) if end <= span.start_s), len(ends))
        if lane == len(ends):
            ends.append(span.end_s)
        else:
            ends[lane] = span.end_s
        lanes.append(lane)
    return lanes, max(len(ends), 1)


def _draw_rows(ax: Axes, timeline: Timeline, end: float) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    row = {name: k for k, name in enumerate(timeline.models)}
    for stay in timeline.residencies:
        ax.barh(
            row[stay.model],
            stay.end_s - stay.start_s,
            left=stay.start_s,
            height=0.14,
            color=_RESIDENT_COLOUR,
            zorder=1,
        )
    for span in timeline.spans:
        if span.kind == "load":
            ax.barh(
                row[span.model],
                span.end_s - span.start_s,
                left=span.start_s,
                height=_BAR,
                color=_LOAD_COLOUR,
                hatch="////",
                edgecolor=_LOAD_EDGE,
                linewidth=0.5,
                zorder=2,
            )
    stages: dict[str, tuple[tuple[int, int], str]] = {}
    failed = False
    for model in timeline.models:
        calls = [s for s in timeline.spans if s.kind == "call" and s.model == model]
        lanes, n_lanes = _lanes(calls)
        height = _BAR / n_lanes
        for span, lane in zip(calls, lanes, strict=True):
            layer = span.layer if span.layer is not None else 0
            colour = _colour(layer, span.role)
            stages.setdefault(span.label, ((layer, _ROLE_RANK.get(span.role or "", 9)), colour))
            y = row[model] - _BAR / 2 + height * (lane + 0.5)
            failed |= not span.ok
            ax.barh(
                y,
                max(span.end_s - span.start_s, end * 0.002),
                left=span.start_s,
                height=height,
                color=colour,
                edgecolor=_FAILED_EDGE if not span.ok else "white",
                hatch=None if span.ok else "xx",
                linewidth=0.6,
                zorder=3,
            )
            if span.first_token_s is not None:
                ax.plot(
                    [span.first_token_s] * 2,
                    [y - height / 2, y + height / 2],
                    color="black",
                    linewidth=0.9,
                    zorder=4,
                )
            if n_lanes == 1 and span.end_s - span.start_s > 0.08 * end:
                ax.text(
                    (span.start_s + span.end_s) / 2,
                    y,
                    span.label,
                    ha="center",
                    va="center",
                    fontsize=7,
                    zorder=5,
                )
    ax.set_yticks(range(len(timeline.models)), timeline.models)
    ax.set_ylim(max(len(timeline.models), 1) - 0.5, -0.5)  # the first model on top
    ax.grid(axis="x", color="#eeeeee", linewidth=0.6)
    ax.set_axisbelow(True)
    if not timeline.models:
        ax.text(0.5, 0.5, "nothing ran", transform=ax.transAxes, ha="center", va="center")
    handles: list[Patch | Line2D] = [
        Patch(facecolor=_LOAD_COLOUR, hatch="////", edgecolor=_LOAD_EDGE, label="load"),
        Patch(facecolor=_RESIDENT_COLOUR, label="loaded, idle"),
    ]
    for label, (_, colour) in sorted(stages.items(), key=lambda item: (item[1][0], item[0])):
        handles.append(Patch(facecolor=colour, label=label))
    if any(s.first_token_s is not None for s in timeline.spans):
        handles.append(Line2D([], [], color="black", linewidth=0.9, label="first token"))
    if failed:
        handles.append(Patch(facecolor="white", hatch="xx", edgecolor=_FAILED_EDGE, label="failed"))
    ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False
    )


def _draw_memory(ax: Axes, timeline: Timeline, end: float) -> None:
    steps = timeline.memory
    peak = max((s.bytes for s in steps), default=0)
    top = max(peak, timeline.budget_bytes or 0)
    unit, unit_name = (_GIB, "GiB") if top >= _GIB else (_MIB, "MiB")
    xs = [s.at_s for s in steps] + [end]
    ys = [s.bytes / unit for s in steps] + [steps[-1].bytes / unit if steps else 0.0]
    ax.step(
        xs,
        ys,
        where="post",
        color=_MEMORY_COLOUR,
        linewidth=1.2,
        label=f"in use (peak {format_bytes(peak)})",
    )
    ax.fill_between(xs, ys, step="post", color=_MEMORY_COLOUR, alpha=0.18, linewidth=0)
    if timeline.budget_bytes is not None:
        ax.axhline(
            timeline.budget_bytes / unit,
            color=_BUDGET_COLOUR,
            linestyle="--",
            linewidth=1.0,
            label=f"budget {format_bytes(timeline.budget_bytes)}",
        )
    ax.set_ylim(0.0, max(top / unit, 1e-9) * 1.18)
    ax.set_ylabel(f"memory ({unit_name})")
    ax.grid(axis="both", color="#eeeeee", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
