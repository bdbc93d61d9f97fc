"""The egress seam: loopback names are reached without any lookup, other names never looked up.

Every test records ``socket.getaddrinfo`` (where asyncio, and so httpx, asks the resolver) and
lets through only numeric loopback addresses: a name would otherwise go to the system resolver
and, for ``x.localhost``, possibly to the network's DNS server, which is the very thing tested.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_ollama import FakeOllama, FakeOllamaModel
from servers import Recorded, Reply, free_port, stub_server

from localmoa.backends.base import ChatMessage, ChatRequest
from localmoa.backends.ollama import OllamaBackend
from localmoa.backends.openai import OpenAIBackend
from localmoa.config import OllamaModel, OpenAIModel
from localmoa.egress import LoopbackNameTransport, client_options, is_localhost_name, is_loopback
from localmoa.errors import EgressError
from localmoa.footprint.measurements import MeasurementCache

REQUEST = ChatRequest(
    messages=[ChatMessage(role="user", content="Is this private?")], temperature=0.0, max_tokens=4
)


@pytest.fixture
def lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every host name given to getaddrinfo; names are refused, numeric loopback passes."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def recording(host: Any, *args: Any, **kwargs: Any) -> Any:
        text = host.decode() if isinstance(host, bytes) else str(host)
        asked.append(text)
        if host is not None and text not in ("127.0.0.1", "::1"):
            raise socket.gaierror(socket.EAI_NONAME, f"lookup of {text} refused by the test")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    return asked


def port_of(url: str) -> int:
    return int(httpx.URL(url).port or 0)


def client(*, allowed: tuple[str, ...] = ()) -> httpx.AsyncClient:
    return httpx.AsyncClient(follow_redirects=True, **client_options(allowed, setting="test.url"))


def models_listing(request: Recorded) -> Reply:
    return 200, "application/json", '{"object": "list", "data": [{"id": "m"}]}'


def test_localhost_names_are_loopback_by_name() -> None:
    for host in ("localhost", "LOCALHOST", "x.localhost", "a.b.localhost", "[::1]", "127.9.9.9"):
        assert is_loopback(host), host
    for host in ("localhost.example.com", "xlocalhost", "example.com", "10.0.0.1", "::"):
        assert not is_loopback(host), host
    assert is_localhost_name("ollama.localhost") and not is_localhost_name("127.0.0.1")


@pytest.mark.parametrize("name", ["localhost", "x.localhost", "deep.name.localhost"])
async def test_a_localhost_name_is_reached_without_a_lookup(lookups: list[str], name: str) -> None:
    with stub_server(models_listing) as (root, received):
        port = port_of(root)
        async with client() as http:
            response = await http.get(f"http://{name}:{port}/v1/models")
        assert response.status_code == 200
        assert response.url == f"http://{name}:{port}/v1/models"  # the name, outside the transport
    assert [r.headers["host"] for r in received] == [f"{name}:{port}"]
    assert not [host for host in lookups if is_localhost_name(host)]


async def test_a_redirect_to_another_localhost_name_is_reached_without_a_lookup(
    lookups: list[str],
) -> None:
    def answer(request: Recorded) -> Reply:
        if request.path == "/start":
            return 307, "text/plain", ""
        return 200, "text/plain", "arrived"

    with stub_server(answer) as (root, received):
        port = port_of(root)

        # The stub cannot put a Location in its reply, so a response hook adds it.
        async def redirect(response: httpx.Response) -> None:
            if response.status_code == 307:
                response.headers["Location"] = f"http://other.localhost:{port}/end"

        async with client() as http:
            http.event_hooks["response"].append(redirect)
            response = await http.get(f"http://first.localhost:{port}/start")
        assert response.text == "arrived"
    hosts = [(r.path, r.headers["host"]) for r in received]
    assert hosts == [("/start", f"first.localhost:{port}"), ("/end", f"other.localhost:{port}")]
    assert not [host for host in lookups if is_localhost_name(host)]


async def test_a_redirect_off_the_machine_is_refused_before_any_lookup(
    lookups: list[str],
) -> None:
    async def redirect(response: httpx.Response) -> None:
        response.headers["Location"] = "http://dns-leak.example.com/models"

    with stub_server(lambda request: (302, "text/plain", "")) as (root, received):
        async with client() as http:
            http.event_hooks["response"].append(redirect)
            with pytest.raises(EgressError, match=r'test.url: "dns-leak.example.com" is not on'):
                await http.get(f"http://x.localhost:{port_of(root)}/v1/models")
    assert len(received) == 1
    assert lookups == [h for h in lookups if h in ("127.0.0.1", "::1")]  # no name at all


async def test_a_listed_host_is_still_resolved(lookups: list[str]) -> None:
    """allowed_hosts is the user's choice to reach a name, lookup included (here refused)."""
    async with client(allowed=("gpu-box.lan",)) as http:
        with pytest.raises(httpx.ConnectError):
            await http.get("http://gpu-box.lan:8080/v1/models")
    assert "gpu-box.lan" in lookups


@contextlib.contextmanager
def ipv6_only_server() -> Iterator[int]:
    """An HTTP server on [::1] alone, as one started with ``--host localhost`` may be."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = self.headers["host"].encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6

    server = Server(("::1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


async def test_a_server_on_ipv6_loopback_alone_is_reached_second(lookups: list[str]) -> None:
    with ipv6_only_server() as port:
        async with client() as http:
            response = await http.get(f"http://v6.localhost:{port}/")
    assert response.text == f"v6.localhost:{port}"
    assert not [host for host in lookups if is_localhost_name(host)]


async def test_nothing_listening_on_either_address_is_a_connect_error(
    lookups: list[str],
) -> None:
    port = free_port()
    async with client() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://x.localhost:{port}/")
    assert not [host for host in lookups if is_localhost_name(host)]


# --- the backends, through that seam ------------------------------------------------------------


async def test_ollama_on_a_localhost_name_needs_no_lookup(
    lookups: list[str], tmp_path: Path
) -> None:
    with FakeOllama([FakeOllamaModel(name="qwen2.5:7b", family="qwen2")]) as fake:
        host = f"http://ollama.localhost:{port_of(fake.url)}"
        backend = OllamaBackend(host, cache=MeasurementCache(tmp_path / "measured.json"))
        config = OllamaModel(backend="ollama", model="qwen2.5:7b")
        await backend.load("qwen", config)
        text = "".join([d.text async for d in backend.chat("qwen", REQUEST)])
        assert await backend.aclose() == ["qwen"]
        assert text == "a fake answer from"
        assert fake.resident() == {}
    assert not [host for host in lookups if is_localhost_name(host)]


async def test_an_openai_server_on_a_localhost_name_needs_no_lookup(
    lookups: list[str],
) -> None:
    with stub_server(models_listing) as (root, received):
        base = f"http://api.localhost:{port_of(root)}/v1"
        backend = OpenAIBackend()
        config = OpenAIModel(backend="openai", base_url=base, model="m")
        assert (await backend.footprint("m", config)).source == "server"
        await backend.aclose()
    assert [r.headers["host"] for r in received] == [f"api.localhost:{port_of(root)}"]
    assert not [host for host in lookups if is_localhost_name(host)]


async def test_https_to_a_localhost_name_keeps_the_name_for_tls() -> None:
    """The address is what is dialled; the certificate is checked against the name (SNI)."""
    seen: list[tuple[str, object]] = []

    def inner(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.extensions.get("sni_hostname")))
        return httpx.Response(200)

    transport = LoopbackNameTransport()
    transport._transport = httpx.MockTransport(inner)  # type: ignore[assignment]
    request = httpx.Request("GET", "https://secure.localhost:8443/v1/models")
    assert (await transport.handle_async_request(request)).status_code == 200
    assert seen == [("https://127.0.0.1:8443/v1/models", "secure.localhost")]
    assert request.url == "https://secure.localhost:8443/v1/models"
    assert request.headers["host"] == "secure.localhost:8443"
