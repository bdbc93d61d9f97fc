"""A local Ray cluster of two nodes on this machine, CPU only, with declared devices.

One cluster per test module (starting one takes seconds): a head "box-a" that declares a RAM
device and a node "box-b" that declares a GPU, each with one CPU, as ``ray start --resources``
would declare them on real machines. Everything listens on 127.0.0.1 only, and the cluster
runs with Ray's token authentication on (a random token for the module), as localmoa asks of a
real cluster; no usage statistics are sent.

Why each setting takes two steps: Ray reads them when it is imported (and localmoa's cluster
modules import it), so the variables reach the cluster's processes, and this process gets its
copy refreshed: the constant by which Ray replaces a loopback address by the machine's own
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` off: it does not), and its authentication config and
token cache (Ray's own test helper, ``reset_auth_token_state``).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

MIB = 1 << 20
HEAD_RAM_MIB = 1024
NODE_GPU_MIB = 2048


@dataclass
class LocalCluster:
    cluster: Any
    """ray.cluster_utils.Cluster."""
    head: Any
    node: Any
    """box-b, a node that is not the head (the driver stays connected to the head)."""

    @property
    def address(self) -> str:
        return str(self.cluster.address)

    def add_node(self, name: str, resources: dict[str, float]) -> Any:
        return self.cluster.add_node(num_cpus=1, node_name=name, resources=resources)


@contextmanager
def local_cluster(nodes: Sequence[tuple[str, dict[str, float]]]) -> Iterator[LocalCluster]:
    """A local cluster of ``nodes`` (name, declared resources), the first the head; the second
    is the ``node`` of the result."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        patch.setenv("RAY_AUTH_MODE", "token")
        patch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
        patch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        from ray._private import ray_constants
        from ray._private.authentication_test_utils import reset_auth_token_state
        from ray.cluster_utils import Cluster

        patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
        reset_auth_token_state()
        from localmoa.cluster import ray_engine

        cluster: Any = Cluster()
        added = []
        try:
            (head_name, head_resources), *rest = nodes
            cluster.add_node(
                num_cpus=1, node_name=head_name, include_dashboard=False, resources=head_resources
            )
            for name, resources in rest:
                added.append(cluster.add_node(num_cpus=1, node_name=name, resources=resources))
        except Exception as exc:
            cluster.shutdown()
            pytest.fail(f"could not start a local Ray cluster of {len(nodes)} nodes: {exc!r}")
        try:
            yield LocalCluster(cluster, cluster.head_node, added[0] if added else None)
        finally:
            ray_engine.disconnect()
            cluster.shutdown()
    reset_auth_token_state()  # as this process's environment is again


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalCluster]:
    nodes = [
        ("box-a", {"localmoa_mib_ram": HEAD_RAM_MIB}),
        ("box-b", {"localmoa_mib_gpu0": NODE_GPU_MIB}),
    ]
    with local_cluster(nodes) as cluster:
        yield cluster
