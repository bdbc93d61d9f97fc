"""The offline promise for network backends: loopback only, unless the user lists a host.

Every network backend builds its HTTP client with :func:`client_options`, so one place decides
where localmoa may connect. Two checks, before any socket opens:

1. at plan time, :func:`check_url` refuses a configured URL whose host is not loopback
   (127.0.0.0/8, ::1, ``localhost``) and not listed in ``settings.allowed_hosts``;
2. at request time, an httpx ``request`` event hook repeats the check on every request, redirects
   included, so nothing configured or returned by a server can lead elsewhere.

Host names other than ``localhost`` are never resolved to decide: a name is allowed only when it
is listed, because resolving it is itself traffic. Proxy environment variables are ignored
(``trust_env=False``): a proxy would carry loopback requests off the machine.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpx

from localmoa.errors import EgressError

__all__ = ["check_url", "client_options", "is_loopback", "normalize_url"]


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost`` (no name resolution)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalize_url(url: str, *, default_port: int | None = None) -> str:
    """``host``, ``host:port`` or a full URL, as a full URL without a trailing slash."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + (f"127.0.0.1{text}" if text.startswith(":") else text)
    parsed = httpx.URL(text)
    if default_port is not None and parsed.port is None and "://" not in url.strip():
        parsed = parsed.copy_with(port=default_port)
    return str(parsed).rstrip("/")


def check_url(url: str, *, allowed_hosts: Iterable[str], setting: str) -> None:
    """EgressError unless ``url``'s host is loopback or listed; ``setting`` names its source."""
    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL as exc:
        raise EgressError(f"{setting}: not a URL: {url!r} ({exc})") from None
    if not host:
        raise EgressError(f'{setting}: "{url}" has no host; write e.g. "http://127.0.0.1:8080/v1"')
    if is_loopback(host) or host.lower() in {h.lower() for h in allowed_hosts}:
        return
    raise EgressError(
        f'{setting}: "{host}" is not on this machine, and localmoa only connects to loopback '
        f"unless told otherwise; if {host} is a server you trust (on-prem), add it to "
        f'settings.allowed_hosts, e.g. allowed_hosts = ["{host}"]'
    )


def client_options(allowed_hosts: Iterable[str], *, setting: str) -> dict[str, Any]:
    """Keyword arguments for ``httpx.AsyncClient`` (or ``ollama.AsyncClient``) that enforce
    the egress rule on every request."""
    allowed = list(allowed_hosts)

    async def guard(request: httpx.Request) -> None:
        check_url(str(request.url), allowed_hosts=allowed, setting=setting)

    hooks: dict[str, list[Callable[[httpx.Request], Awaitable[None]]]] = {"request": [guard]}
    return {"event_hooks": hooks, "trust_env": False}
