"""An ensemble on a local Ray cluster of two nodes, and one node stopped mid-run.

    python scripts/bench_cluster.py [--workdir DIR]

Starts a local cluster (``ray.cluster_utils.Cluster``, CPU only, token authentication on,
loopback only, no usage statistics) of two nodes that each declare enough RAM for the largest two
of the three tiny random-weight models (n_ctx 2048) but not all three, so the plan must use both
nodes. Then, timed:

- the cluster's start, and reading both nodes' devices (``cluster_devices``);
- ``localmoa run --json`` as a user runs it, with calls on both nodes;
- the same run with the second node removed as soon as the first call finishes: its calls fail,
  the rest is planned on the node that remains, and the run answers.

Prints each figure and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args()
    os.environ.update(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        RAY_USAGE_STATS_ENABLED="0",
    )
    from ray.cluster_utils import Cluster

    from localmoa.cluster.ray_engine import cluster_devices, disconnect
    from localmoa.config import Settings
    from localmoa.footprint.estimate import estimate, read_gguf
    from localmoa.tinymodels import PRESETS, write_tiny_model

    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.workdir or Path(tmp)
        paths = {
            n: write_tiny_model(folder / f"{n}.gguf", PRESETS[n])
            for n in PRESETS
            if n.startswith("tiny-")
        }
        sizes = sorted(
            estimate(read_gguf(p), n_ctx=2048, n_batch=512).total for p in paths.values()
        )
        node_mib = (sizes[-1] + sizes[-2]) // (1 << 20) + 1  # the largest two, not all three
        began = time.perf_counter()
        cluster: Any = Cluster()
        cluster.add_node(
            num_cpus=1,
            node_name="box-a",
            include_dashboard=False,
            resources={"localmoa_mib_ram": node_mib},
        )
        second = cluster.add_node(
            num_cpus=1, node_name="box-b", resources={"localmoa_mib_ram": node_mib}
        )
        figures["cluster_start_s"] = round(time.perf_counter() - began, 2)
        try:
            settings = Settings.model_validate(
                {"cluster": {"engine": "ray", "address": cluster.address}}
            )
            began = time.perf_counter()
            devices = cluster_devices(settings)
            figures["devices_s"] = round(time.perf_counter() - began, 2)
            figures["devices"] = [d.name for d in devices]
            disconnect()
            tables = "\n".join(
                f'[models.{n}]\nbackend = "llamacpp"\npath = "{p}"\nn_ctx = 2048\nseed = 7\n'
                for n, p in paths.items()
            )
            config = folder / "models.toml"
            config.write_text(
                f'[settings.cluster]\nengine = "ray"\naddress = "{cluster.address}"\n\n{tables}\n'
                "[ensembles.default]\n"
                f"layers = [{list(paths)}, {list(paths)}]\n".replace("'", '"')
                + 'aggregator = "tiny-a"\nmax_tokens = 48\n'
            )
            command = [sys.executable, "-m", "localmoa", "run", "--json", "hello", "--config"]
            figures["run"] = run([*command, str(config)], None, None)
            figures["node_stopped"] = run([*command, str(config)], cluster, second)
        finally:
            cluster.shutdown()
    for key, value in figures.items():
        print(f"{key}: {value}")
    print(json.dumps(figures))


def run(command: list[str], cluster: Any, node: Any) -> dict[str, Any]:
    """One run; with ``node``, removed once the first call has answered."""
    began = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None and process.stdout is not None
    if node is not None:
        for line in process.stderr:
            if "layer 1 ·" in line and ": ok" in line:
                cluster.remove_node(node)
                break
    out, err = process.communicate(timeout=600)
    seconds = round(time.perf_counter() - began, 2)
    if process.returncode != 0:
        return {"rc": process.returncode, "error": err[-500:], "seconds": seconds}
    result = json.loads(out)
    calls = result["calls"]
    return {
        "seconds": seconds,
        "loads": result["loads"],
        "replans": result["replans"],
        "calls": len(calls),
        "failed": sum(not c["ok"] for c in calls),
        "nodes": sorted({c["node"] for c in calls if c["ok"]}),
    }


if __name__ == "__main__":
    main()
