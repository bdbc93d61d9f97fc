"""Devices benchmark: the scheduler suite on 2 × 24 GiB, against 1 × 24 GiB and 1 × 48 GiB.

    python scripts/bench_devices.py [--json] [--per-profile N] [--plan-for time|loads]

The question: what does a second 24 GiB card buy, and how close does it come to one card with
its memory? Every ensemble of the scheduler benchmark's suite (``scripts/bench_scheduler.py``:
a fixed seed, 1-3 layers of 2-6 proposers and an aggregator, real 4-bit footprints with an f16
KV cache at 4096 tokens, ``--per-profile`` runs drawn for each hardware profile) is planned by
:func:`localmoa.planning.plan_run` as ``localmoa run`` plans it (from ``max_tokens``; ``--plan-for``
as ``settings.plan_for``), on three machines:

- ``1x24``: one 24 GiB GPU;
- ``2x24``: two of them (:class:`localmoa.hardware.Device` ``gpu0`` and ``gpu1``);
- ``1x48``: one 48 GiB GPU.

Each device's budget is its memory less localmoa's margin (:func:`localmoa.hardware.margin`: 10 %
here), 21.6 and 43.2 GiB. Every card is timed with ``desktop-24g``'s speeds (an RTX 4090): the
48 GiB card is assumed as fast as the 24 GiB one, so that only memory and the number of devices
differ. Every model may split across devices (``split = true``): llama3.3:70b (44.3 GB with its
cache) fits the 48 GiB card alone and two 24 GiB cards only split; on one 24 GiB card an ensemble
that holds it cannot run at all ("—", left out of the ratios to 1x24).

Each plan is then timed in the cost model (:mod:`localmoa.planning.timing`, "Several devices":
one bandwidth per device, a load waits for room on its own device, one load at a time) with the
answer lengths the suite drew, as the scheduler benchmark times localmoa's plans.

The table gives each run's loads and seconds per machine and whether the 2x24 plan split a
model; the summary, the median, best (smallest) and worst (largest) ratio of makespans (2x24
over 1x24, also among the runs that swap on 1x24, where some model loads twice; 2x24 over 1x48;
1x48 over 1x24), the loads per machine (median and most), and how many runs load no more on
2x24 than on 1x24, and exactly as often as on 1x48. The last line is the summary as one JSON
object (``--json``: every run's figures instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_scheduler.py, beside this file

from bench_scheduler import MIN_GAIN, PER_PROFILE, SIZES, Instance, shipped_plan, suite

from localmoa.errors import BudgetError
from localmoa.hardware import Device, margin
from localmoa.planning.profiles import PROFILES
from localmoa.planning.timing import simulate_plan

GiB = 1 << 30
SPEEDS = PROFILES["desktop-24g"]
"""Every card's speeds: only memory and the number of devices differ between machines."""


def card(name: str, gib: int) -> Device:
    """A GPU of ``gib`` GiB, with localmoa's margin taken off as detection takes it."""
    memory = gib * GiB
    return Device(name=name, memory=memory - margin(memory), detail=f"{gib} GiB, on paper")


MACHINES: dict[str, tuple[Device, ...]] = {
    "1x24": (card("gpu0", 24),),
    "2x24": (card("gpu0", 24), card("gpu1", 24)),
    "1x48": (card("gpu0", 48),),
}


@dataclass(frozen=True)
class Result:
    """One ensemble on one machine: the simulated run of localmoa's plan."""

    makespan_s: float
    loads: int
    split: bool
    """The plan spans a model over several devices."""


def on_machine(
    instance: Instance,
    devices: Sequence[Device],
    *,
    plan_for: Literal["time", "loads"],
    min_gain: float = MIN_GAIN,
) -> Result | None:
    """``instance`` planned on ``devices`` and timed there; None when a model fits nowhere."""
    profile = dataclasses.replace(instance.profile, memory_bytes=sum(d.memory for d in devices))
    at = dataclasses.replace(instance, profile=profile)
    try:
        plan = shipped_plan(at, SPEEDS, min_gain=min_gain, devices=devices, plan_for=plan_for)
    except BudgetError:
        return None
    profiles = {d.name: dataclasses.replace(SPEEDS, memory_bytes=d.memory) for d in devices}
    timing = simulate_plan(plan, instance.calls, SIZES, SPEEDS, devices=profiles)
    return Result(timing.makespan_s, timing.loads, any(w.shares for w in plan.waves))


Row = tuple[Instance, dict[str, Result | None]]


def pairs(rows: Sequence[Row], a: str, b: str) -> list[tuple[Result, Result]]:
    """Machine ``a``'s and ``b``'s results, for every run both could make."""
    out = []
    for _, results in rows:
        mine, other = results[a], results[b]
        if mine is not None and other is not None:
            out.append((mine, other))
    return out


def swaps(instance: Instance, result: Result | None) -> bool:
    """The run loads some model more than once: memory binds."""
    models = {c.model for stage in instance.calls for c in stage}
    return result is not None and result.loads > len(models)


def summary(rows: Sequence[Row]) -> dict[str, Any]:
    """Ratios of makespans (median and worst), loads per machine, and the loads compared."""
    doc: dict[str, Any] = {"runs": len(rows), "ratios": {}, "loads": {}}
    tight = [row for row in rows if swaps(row[0], row[1]["1x24"])]
    for a, b, among, where in (
        ("2x24", "1x24", rows, ""),
        ("2x24", "1x24", tight, " where 1x24 swaps"),
        ("2x24", "1x48", rows, ""),
        ("1x48", "1x24", rows, ""),
    ):
        found = [mine.makespan_s / other.makespan_s for mine, other in pairs(among, a, b)]
        doc["ratios"][f"{a}/{b}{where}"] = {
            "median": round(statistics.median(found), 3),
            "best": round(min(found), 3),
            "worst": round(max(found), 3),
            "runs": len(found),
        }
    for machine in MACHINES:
        loads = [r.loads for _, results in rows if (r := results[machine]) is not None]
        doc["loads"][machine] = {"median": statistics.median(loads), "most": max(loads)}
    both = pairs(rows, "2x24", "1x24")
    doc["2x24_loads_le_1x24"] = f"{sum(a.loads <= b.loads for a, b in both)}/{len(both)}"
    big = pairs(rows, "2x24", "1x48")
    doc["2x24_loads_eq_1x48"] = f"{sum(a.loads == b.loads for a, b in big)}/{len(big)}"
    doc["2x24_split"] = sum(bool((r := results["2x24"]) and r.split) for _, results in rows)
    return doc


def report(rows: Sequence[Row]) -> None:
    def cell(result: Result | None) -> str:
        return "—" if result is None else f"{result.makespan_s:8.1f} {result.loads:3}"

    print(f"{'instance':24} " + " ".join(f"{m:>12}" for m in MACHINES) + "  split")
    print(f"{'':24} " + " ".join(f"{'seconds loads':>12}" for _ in MACHINES))
    for instance, results in rows:
        pair = results["2x24"]
        print(
            f"{instance.name:24} "
            + " ".join(f"{cell(results[m]):>12}" for m in MACHINES)
            + ("  yes" if pair is not None and pair.split else "")
        )
    doc = summary(rows)
    print("\nmakespan ratios over the runs both machines could make: median, best, worst")
    for name, r in doc["ratios"].items():
        print(
            f"  {name:27} {r['median']:6.3f} {r['best']:6.3f} {r['worst']:6.3f}  ({r['runs']} runs)"
        )
    print("loads: median and most")
    for machine, r in doc["loads"].items():
        print(f"  {machine:10} {r['median']:6g} {r['most']:6}")
    print(
        f"2x24 loads no more than 1x24 in {doc['2x24_loads_le_1x24']} runs, as many as 1x48 in "
        f"{doc['2x24_loads_eq_1x48']}; {doc['2x24_split']} 2x24 plans split a model"
    )
    print(json.dumps(doc))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print every run as one JSON object")
    parser.add_argument("--per-profile", type=int, default=PER_PROFILE, help="runs per profile")
    parser.add_argument(
        "--plan-for",
        choices=("time", "loads"),
        default="time",
        help="settings.plan_for of the plans (default %(default)s)",
    )
    args = parser.parse_args()
    rows: list[Row] = [
        (
            instance,
            {
                machine: on_machine(instance, devices, plan_for=args.plan_for)
                for machine, devices in MACHINES.items()
            },
        )
        for instance in suite(per_profile=args.per_profile)
    ]
    if args.json:
        doc = {
            "plan_for": args.plan_for,
            "instances": [
                {
                    "name": instance.name,
                    "machines": {
                        m: None if r is None else dataclasses.asdict(r) for m, r in results.items()
                    },
                }
                for instance, results in rows
            ],
            "summary": summary(rows),
        }
        print(json.dumps(doc, indent=2))
        return
    report(rows)


if __name__ == "__main__":
    main()
