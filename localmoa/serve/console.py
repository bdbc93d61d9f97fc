"""The web console ``localmoa serve`` answers ``GET /`` with (being built: see issue 12)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import BaseRoute

if TYPE_CHECKING:
    from localmoa.serve.app import MoaServer

__all__ = ["console_routes"]


def console_routes(server: MoaServer) -> list[BaseRoute]:
    """The console's page, assets and endpoints, mounted beside the API."""
    return []
