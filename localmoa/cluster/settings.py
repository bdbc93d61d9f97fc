"""``[settings.cluster]``: which engine runs the models, and where the cluster is."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

__all__ = ["ClusterSettings"]


class ClusterSettings(BaseModel):
    """``[settings.cluster]``: "local" runs every model in this process or its servers; "ray"
    places llama.cpp models on the nodes of the Ray cluster at ``address``."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["local", "ray"] = "local"
    address: str | None = None
    """The Ray cluster's GCS address, "HOST:PORT"; HOST must be loopback or in allowed_hosts."""
