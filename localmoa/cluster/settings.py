"""``[settings.cluster]``: which engine runs the models, and where the cluster is.

Only the shape of the table is checked here (pydantic, as every table of models.toml); whether
the cluster may be reached at all (the address in ``allowed_hosts``, Ray installed, token
authentication configured) is :func:`localmoa.cluster.checks.check_cluster`'s, which needs the
rest of ``[settings]`` and the environment.
"""

from __future__ import annotations

import re
from pathlib import PurePath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

__all__ = ["DEFAULT_RAY_PORT", "ClusterSettings", "split_address"]

DEFAULT_RAY_PORT = 6379
"""The GCS port ``ray start --head`` listens on unless told otherwise."""

_HOST_PORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d+)$")


def split_address(address: str) -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:6379"`` for IPv6) as host and port; ValueError saying how to
    write it otherwise.

    >>> split_address("10.0.0.5:6379")
    ('10.0.0.5', 6379)
    >>> split_address("[fd00::5]:6379")
    ('fd00::5', 6379)
    """
    if address.startswith("ray://"):
        raise ValueError(
            f'"{address}" is a Ray Client address; localmoa connects to the head\'s GCS '
            f'directly: write "HOST:PORT", e.g. "10.0.0.5:{DEFAULT_RAY_PORT}"'
        )
    match = _HOST_PORT.match(address.strip())
    port = int(match["port"]) if match else 0
    if match is None or not 0 < port < 65536:
        raise ValueError(
            f'"{address}" is not "HOST:PORT"; write the head node\'s address as '
            f'`ray start --head` prints it, e.g. "10.0.0.5:{DEFAULT_RAY_PORT}"'
        )
    return match["v6"] or match["host"], port


def _address(value: str) -> str:
    split_address(value)
    return value.strip()


def _folders(value: dict[str, str]) -> dict[str, str]:
    for node, folder in value.items():
        if not PurePath(folder).is_absolute():
            raise ValueError(
                f'"{folder}" (node {node}) is not an absolute path: it is read on that node, '
                'where this machine\'s working directory and "~" mean nothing; write the full '
                'path, e.g. "/srv/models"'
            )
    return value


class ClusterSettings(BaseModel):
    """``[settings.cluster]``: "local" runs every model in this process or its servers; "ray"
    places llama.cpp models on the nodes of the Ray cluster at ``address``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["local", "ray"] = "local"
    """"ray": llama.cpp models run in Ray actors on the cluster's nodes, each node's devices
    planned as bins (``pip install 'localmoa[ray]'``)."""
    address: Annotated[str, AfterValidator(_address)] | None = None
    """The Ray cluster's GCS address, "HOST:PORT" (what ``ray start --head`` prints; port
    6379 by default). HOST must be loopback or listed in ``settings.allowed_hosts``, and a
    HOST off this machine needs Ray's token authentication (README: several machines)."""
    models_dir: Annotated[dict[str, str], AfterValidator(_folders)] = Field(default_factory=dict)
    """Node name or IP → the folder its GGUF files are in, so a model's ``path`` becomes
    ``models_dir[node] / path.name`` there. A node not listed reads the same path as here."""
    connect_timeout: float = Field(default=10.0, gt=0, le=600)
    """Seconds to wait for the head's port to answer before saying it does not."""
    node_timeout: float = Field(default=30.0, gt=0, le=3600)
    """Seconds a node may go unanswered (its inventory, a model's actor) before its devices
    are counted lost: long enough for Ray's own health checks to declare a node that went
    silent (powered off, unplugged) dead."""
