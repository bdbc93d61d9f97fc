"""The offline promise for network backends: loopback only, unless the user lists a host.

Every network backend builds its HTTP client with :func:`client_options`, so one place decides
where localmoa may connect, and how. Three rules, before any socket opens:

1. at plan time, :func:`check_url` refuses a configured URL whose host is not loopback
   (127.0.0.0/8, ::1, ``localhost`` and names under it) and not listed in
   ``settings.allowed_hosts``;
2. at request time, an httpx ``request`` event hook repeats the check on every request, redirects
   included, so nothing configured or returned by a server can lead elsewhere;
3. ``localhost`` and every ``*.localhost`` name are never looked up: the client's transport
   connects them to 127.0.0.1 (then ::1, when nothing answers there) itself.

Host names other than loopback ones are never resolved to decide: a name is allowed only when it
is listed, because resolving it is itself traffic. For the same reason the loopback names are not
handed to the resolver either: RFC 6761 (section 6.3) makes them loopback by definition, but the
system resolver may still ask the network's DNS server about ``x.localhost``. Rewriting happens
in the transport, not in the hook, so the request keeps its name everywhere else: in the Host
header, in redirects, cookies and logs, and in TLS's server name. Proxy environment variables
are ignored (``trust_env=False``): a proxy would carry loopback requests off the machine.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpx

from localmoa.errors import EgressError

__all__ = [
    "LOOPBACK_ADDRESSES",
    "LoopbackNameTransport",
    "check_url",
    "client_options",
    "is_localhost_name",
    "is_loopback",
    "normalize_url",
]

LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")
"""Where a ``localhost`` name is connected, in order: IPv4 first, as most local servers (Ollama,
llama-server) listen there; IPv6 for a server that bound ``localhost`` and got only ::1."""


def is_localhost_name(host: str) -> bool:
    """True for ``localhost`` and names under it (``x.localhost``): loopback by RFC 6761."""
    host = host.lower()
    return host == "localhost" or host.endswith(".localhost")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost`` names (no name resolution)."""
    host = host.strip("[]")
    if is_localhost_name(host):
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
    the egress rule on every request and reach ``localhost`` names without a lookup."""
    allowed = list(allowed_hosts)

    async def guard(request: httpx.Request) -> None:
        check_url(str(request.url), allowed_hosts=allowed, setting=setting)

    hooks: dict[str, list[Callable[[httpx.Request], Awaitable[None]]]] = {"request": [guard]}
    return {"event_hooks": hooks, "trust_env": False, "transport": LoopbackNameTransport()}


class LoopbackNameTransport(httpx.AsyncBaseTransport):
    """httpx's own transport, except that ``localhost`` names connect to a loopback address.

    Given ``x.localhost``, httpcore would ask ``getaddrinfo``, and a system resolver may forward
    the question to the network's DNS server. Here the connection goes to each of
    :data:`LOOPBACK_ADDRESSES` in turn instead; the next one is tried only on a refused
    connection, when nothing was sent. Only this call sees the address: the request's URL is
    restored afterwards (httpx builds redirects and cookies from it), its Host header was fixed
    when the request was built, and for https the name is kept as the TLS server name.
    """

    def __init__(self) -> None:
        self._transport = httpx.AsyncHTTPTransport(trust_env=False)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        named = request.url
        if not is_localhost_name(named.host):
            return await self._transport.handle_async_request(request)
        if named.scheme == "https":
            request.extensions = {**request.extensions, "sni_hostname": named.host}
        refused: httpx.ConnectError | None = None
        try:
            for address in LOOPBACK_ADDRESSES:
                request.url = named.copy_with(host=address)
                try:
                    return await self._transport.handle_async_request(request)
                except httpx.ConnectError as exc:
                    refused = refused or exc
        finally:
            request.url = named
        assert refused is not None
        raise refused

    async def aclose(self) -> None:
        await self._transport.aclose()
