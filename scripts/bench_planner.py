"""Planning time: how long `make_plan` takes, for the sizes of ensembles people run.

    python scripts/bench_planner.py [--repeat 200]

Each case is planned ``--repeat`` times; the median and the 95th percentile are reported in
milliseconds, with the plan's loads, lower bound and whether the search was exact. Sizes are
popular 4-bit footprints (GiB); budgets range from "two models fit" to "all fit".
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from localmoa.planning.fewest_loads import make_plan

GiB = 1 << 30
FOOTPRINTS = {
    "qwen7b": 5.4,
    "llama8b": 5.8,
    "gemma9b": 6.9,
    "mistral7b": 5.1,
    "phi4": 9.1,
    "qwen3b": 2.4,
    "llama3b": 2.6,
    "qwen14b": 9.6,
}


def cases() -> list[tuple[str, list[list[str]], dict[str, int], int]]:
    six = list(FOOTPRINTS)[:6]
    sizes = {name: int(gib * GiB) for name, gib in FOOTPRINTS.items()}
    out = []
    for budget in (12, 16, 24, 40):
        stages = [six, six, six, ["qwen7b"]]
        out.append((f"6 models x 3 layers, {budget} GiB", stages, sizes, budget * GiB))
    rng = random.Random(0)
    many = {f"m{i:02}": rng.randint(2, 9) * GiB for i in range(16)}
    stages = [rng.sample(sorted(many), 12) for _ in range(3)] + [["m00"]]
    out.append(("16 models x 3 layers, 24 GiB (heuristic)", stages, many, 24 * GiB))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    print(f"{'case':44} {'median ms':>9} {'p95 ms':>8} {'loads':>5} {'bound':>5}  exact")
    for name, stages, sizes, budget in cases():
        times = []
        for _ in range(args.repeat):
            began = time.perf_counter()
            plan = make_plan(stages, sizes, budget)
            times.append((time.perf_counter() - began) * 1000)
        p95 = statistics.quantiles(times, n=20)[-1]
        print(
            f"{name:44} {statistics.median(times):9.2f} {p95:8.2f} {plan.loads:5} "
            f"{plan.lower_bound:5}  {plan.optimal}"
        )


if __name__ == "__main__":
    main()
