"""An ensemble on a local Ray cluster of two nodes, end to end: planned on both nodes' devices,
calls made on both, and a node stopped mid-run: its calls fail, its devices leave the plan, and
the rest of the run is planned on the node that remains (the issue's done-when)."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from localmoa.backends import make_backends
from localmoa.backends.base import ChatMessage
from localmoa.config import parse_config
from localmoa.runtime.engine import CallFinished, Event, Executor
from localmoa.runtime.prepare import prepare

from .conftest import LocalCluster, local_cluster

NODE_MIB = 40
"""Each node holds two of the three tiny models (~20 MiB each with n_ctx 512), not three: the
plan must use both nodes."""


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[LocalCluster]:
    nodes = [
        ("box-a", {"localmoa_mib_ram": NODE_MIB}),
        ("box-b", {"localmoa_mib_ram": NODE_MIB}),
    ]
    with local_cluster(nodes) as cluster:
        yield cluster


def config_text(cluster: LocalCluster, models: dict[str, Path]) -> str:
    tables = "\n".join(
        f'[models.{name}]\nbackend = "llamacpp"\npath = "{path}"\nn_ctx = 512\nseed = 7\n'
        for name, path in models.items()
    )
    return f"""
[settings.cluster]
engine = "ray"
address = "{cluster.address}"

{tables}
[ensembles.default]
layers = [["tiny-a", "tiny-b", "tiny-c"], ["tiny-a", "tiny-b", "tiny-c"]]
aggregator = "tiny-a"
max_tokens = 24
"""


def test_plan_and_run_place_models_on_both_nodes(
    two_nodes: LocalCluster, tiny_models: dict[str, Path], tmp_path: Path
) -> None:
    """`localmoa plan` and `run --json`, as a user runs them, against the cluster."""
    path = tmp_path / "models.toml"
    path.write_text(config_text(two_nodes, tiny_models))
    plan = subprocess.run(
        [sys.executable, "-m", "localmoa", "plan", "--json", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert set(planned["devices"]) == {"box-a/ram", "box-b/ram"}
    used = {d for w in planned["waves"] for d in w["devices"]}
    assert used == {"box-a/ram", "box-b/ram"}
    run = subprocess.run(
        [sys.executable, "-m", "localmoa", "run", "--json", "hello", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    calls = json.loads(run.stdout)["calls"]
    assert all(c["ok"] for c in calls)
    assert {c["node"] for c in calls} == {"box-a", "box-b"}
    assert all(c["device"].startswith(c["node"] + "/") for c in calls)


async def test_a_node_stopped_mid_run_fails_its_calls_and_the_rest_runs_on_the_other(
    two_nodes: LocalCluster, tiny_models: dict[str, Path]
) -> None:
    doomed_name = "box-c"
    doomed = two_nodes.add_node(doomed_name, {"localmoa_mib_ram": NODE_MIB})
    config = parse_config(tomllib.loads(config_text(two_nodes, tiny_models)))
    backends = make_backends(config.settings)
    prepared = await prepare(config, "default", backends)
    assert doomed_name in {d.node_label for d in prepared.devices}
    stopped: list[str] = []

    def stop_a_node(event: Event) -> None:
        # The first answer made on a node: stop the node of another model's stay, mid-run.
        if isinstance(event, CallFinished) and not stopped and event.record.ok:
            first = prepared.plan.waves[0].devices  # every model is needed again in layer 2
            placed = {device.split("/")[0] for device in first} - {event.record.node, "box-a"}
            if not placed:
                return  # the head stays (stopping it would end the cluster): wait for another
            victim = doomed_name if doomed_name in placed else sorted(placed)[0]
            stopped.append(victim)
            node: Any = doomed if victim == doomed_name else two_nodes.node
            two_nodes.cluster.remove_node(node)

    executor = Executor(
        prepared.models,
        backends,
        sizes={name: fp.total for name, fp in prepared.footprints.items()},
        policy=prepared.policy,
        devices=prepared.devices,
        on_event=stop_a_node,
    )
    try:
        result = await executor.run(
            prepared.stages, prepared.plan, [ChatMessage(role="user", content="hello")]
        )
    finally:
        await backends["llamacpp"].aclose()
    (victim,) = stopped
    assert result.replans >= 1
    assert result.answer is not None
    ran_on = {c.node for c in result.calls if c.ok}
    assert len(ran_on) >= 2  # calls were made on more than one node
    failed = [c for c in result.calls if not c.ok]
    assert all(c.node == victim and "is gone" in (c.error or "") for c in failed)
    # Once the node was gone nothing was placed there again: the aggregator ran elsewhere.
    (aggregator,) = [c for c in result.calls if c.role == "aggregator"]
    assert aggregator.ok and aggregator.node != victim
