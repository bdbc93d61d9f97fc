"""What ``localmoa serve`` checks before a request reaches an ensemble, and how it says no.

A server on 127.0.0.1 is not private from the browser on the same machine: any web page the user
opens can send it requests. Browsers let a page send a cross-origin POST without asking first
when its ``Content-Type`` is a "simple" one (``text/plain``, form data), and DNS rebinding makes a
foreign name resolve to 127.0.0.1 so that the page's requests even count as same-origin. So,
before any route runs (:class:`RequestGuard`):

- **Host**: while the server listens on loopback, the ``Host`` header must name loopback
  (``localhost``, ``*.localhost``, 127.0.0.0/8, ``[::1]``). A rebound name is refused (403).
- **Origin**: a request that carries ``Origin`` (browsers send it on cross-origin requests and on
  every POST) must come from the server's own origin, or one the user listed with
  ``--allow-origin``; others are refused (403). Clients that are not browsers send no Origin.
  Listed origins also get CORS headers, so a page there can read the answers.
- **Content-Type**: a POST must be ``application/json``, which a page cannot send cross-origin
  without a CORS preflight (415 otherwise).
- **Body size**: a ``Content-Length`` over ``max_body`` is refused (413) before the body is read;
  the route counts a chunked body as it reads it (:func:`read_body`).

Open WebUI needs no listed origin: it calls OpenAI-compatible connections from its own backend
(Python, no ``Origin`` header), never from the page in the browser.

Every refusal here and in the server is an OpenAI-shaped error (:class:`ErrorBody`), so clients
show the message instead of failing to parse a plain-text body.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from pydantic import BaseModel
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from localmoa.egress import is_loopback

__all__ = [
    "DEFAULT_MAX_BODY",
    "ErrorBody",
    "ErrorDetail",
    "Refused",
    "RequestGuard",
    "error_response",
    "http_error",
    "read_body",
    "server_error",
]

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY = 4 << 20
"""4 MiB: about a million characters of text, more than the largest context holds, far less
than what would let one request hold the server's memory."""


class ErrorDetail(BaseModel):
    """OpenAI's error object: what went wrong, its kind, the field at fault, a stable code."""

    message: str
    type: str
    param: str | None = None
    code: str


class ErrorBody(BaseModel):
    """Every error answer of ``localmoa serve``: ``{"error": {...}}``."""

    error: ErrorDetail


def error_response(
    status: int,
    message: str,
    kind: str,
    code: str,
    *,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=dict(headers or {}))


class Refused(Exception):
    """An HTTP error answer, raised inside a route and rendered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str,
        code: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.response = error_response(status, message, kind, code, param=param, headers=headers)


async def read_body(request: Request, max_body: int) -> bytes:
    """The request's body, or 413 as soon as it grows past ``max_body`` bytes (chunked bodies
    carry no Content-Length to check up front)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise _too_large(max_body)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_body: int) -> Refused:
    return Refused(
        413,
        f"the request body is larger than {max_body} bytes, this server's limit; send less, "
        "or start localmoa serve with a larger --max-body",
        "invalid_request_error",
        "body_too_large",
    )


class RequestGuard:
    """ASGI middleware: the Host, Origin, Content-Type and size checks of the module docstring."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        loopback_only: bool,
        allowed_origins: Iterable[str] = (),
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        self.allowed = {origin.rstrip("/").lower() for origin in allowed_origins}
        self.loopback_only = loopback_only
        self.max_body = max_body
        self.app: ASGIApp = (
            CORSMiddleware(
                app,
                allow_origins=sorted(self.allowed),
                allow_methods=["GET", "POST"],
                allow_headers=["authorization", "content-type"],
            )
            if self.allowed
            else app
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refused = self._check(scope, Headers(scope=scope))
        if refused is not None:
            await refused.response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _check(self, scope: Scope, headers: Headers) -> Refused | None:
        host = headers.get("host")
        if self.loopback_only and host is not None and not is_loopback(_hostname(host)):
            return Refused(
                403,
                f'refused: Host "{host}" is not this machine\'s loopback name; this server '
                "listens on loopback and answers only requests addressed to localhost or "
                "127.0.0.1 (a foreign name here is how DNS rebinding reaches local servers)",
                "invalid_request_error",
                "host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is not None and not self._same_origin(origin, host, scope):
            return Refused(
                403,
                f'refused: a web page from "{origin}" may not use this server; if you trust it, '
                f"start localmoa serve with --allow-origin {origin}",
                "invalid_request_error",
                "origin_not_allowed",
            )
        if scope["method"] == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return Refused(
                    415,
                    f"the body must be JSON sent as Content-Type: application/json (got "
                    f'"{kind or "none"}"); with curl, add -H "Content-Type: application/json"',
                    "invalid_request_error",
                    "unsupported_media_type",
                    param="Content-Type",
                )
            length = headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return _too_large(self.max_body)
        return None

    def _same_origin(self, origin: str, host: str | None, scope: Scope) -> bool:
        origin = origin.rstrip("/").lower()
        if origin in self.allowed:
            return True
        scheme = scope.get("scheme", "http")
        return host is not None and origin == f"{scheme}://{host}".lower()


def _hostname(host: str) -> str:
    """``Host`` without its port: ``[::1]:8000`` -> ``::1``, ``localhost:8000`` -> ``localhost``."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


async def http_error(request: Request, exc: Exception) -> Response:
    """404 and 405 (and any other HTTPException) in OpenAI's shape, not plain text."""
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    message = {
        404: f"no route {request.url.path}; this server has /v1/models, /v1/chat/completions, "
        "/health and the console at /",
        405: f"{request.method} is not allowed on {request.url.path}",
    }.get(exc.status_code, str(exc.detail))
    return error_response(
        exc.status_code,
        message,
        "invalid_request_error",
        codes.get(exc.status_code, "http_error"),
        headers=exc.headers,
    )


async def server_error(request: Request, exc: Exception) -> Response:
    """A bug: logged with its traceback, answered as a 500 in OpenAI's shape."""
    log.error("request %s failed", request.url.path, exc_info=exc)
    return error_response(
        500,
        f"internal error ({type(exc).__name__}); the server log has the details",
        "server_error",
        "internal_error",
    )
