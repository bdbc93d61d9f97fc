"""
title: localmoa
author: localmoa
description: Chat with the ensembles of a running `localmoa serve`, one model per ensemble.
version: 0.1.0
license: MIT
"""

# An Open WebUI Pipe function (Admin Panel → Functions → +). It forwards each chat to localmoa's
# OpenAI-compatible endpoint and keeps the orchestration out of Open WebUI: the plan, the swaps
# and the memory budget stay in the one process that owns the hardware.
#
# Why it is async: Open WebUI awaits an async `pipe` but calls a sync one, and iterates a sync
# generator, on its own event loop (`execute_pipe` in backend/open_webui/functions.py), so a
# blocking request would freeze the whole UI for the minutes an ensemble takes. The docstring
# above is Open WebUI's frontmatter and must stay first, with no `requirements` line: httpx and
# pydantic ship with Open WebUI. Settings live in the valves only, read per request: no
# environment at import, no state between requests, the key never logged or echoed.

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from pydantic import BaseModel, Field

PREFIX = "moa/"  # how `localmoa serve` names an ensemble
CONNECT_SECONDS = 5.0  # localmoa runs on this machine or the LAN: a slow connect means it is not up


class Pipe:
    class Valves(BaseModel):
        LOCALMOA_URL: str = Field(
            default="http://127.0.0.1:8000/v1",
            description="localmoa serve's base URL, /v1 included (from Docker: "
            "http://host.docker.internal:8000/v1)",
        )
        LOCALMOA_API_KEY: str = Field(
            default="", description="The --api-key localmoa serve was started with, if any"
        )
        ENSEMBLES: str = Field(
            default="", description="Comma-separated ensembles to offer; empty: all the server has"
        )
        TIMEOUT_SECONDS: float = Field(
            default=600.0, gt=0, description="Longest wait for the server between two pieces"
        )

    def __init__(self) -> None:
        self.valves = self.Valves()

    async def pipes(self) -> list[dict[str, str]]:
        """One model per ensemble; never raises, so Open WebUI's model list still loads."""
        names = [n.strip() for n in self.valves.ENSEMBLES.split(",") if n.strip()]
        if not names:
            try:
                async with self._client(CONNECT_SECONDS) as client:
                    response = (await client.get("/models")).raise_for_status()
                ids = [str(m["id"]) for m in response.json()["data"]]
                names = [i.removeprefix(PREFIX) for i in ids if i.startswith(PREFIX)]
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                unauthorized = getattr(getattr(exc, "response", None), "status_code", 0) == 401
                why = "check LOCALMOA_API_KEY" if unauthorized else "not reachable: LOCALMOA_URL?"
                return [{"id": "default", "name": f"localmoa default ({why})"}]
        return [{"id": name, "name": f"localmoa {name}"} for name in names]

    async def pipe(self, body: dict[str, Any]) -> str | AsyncIterator[str]:
        """The answer, or its pieces when streamed; a problem comes back as the chat's text."""
        # Open WebUI names a manifold's model "<function id>.<pipe id>"; function ids hold no dot.
        model = str(body.get("model", ""))
        request: dict[str, Any] = {
            "model": PREFIX + (model.partition(".")[2] or model),
            "messages": body.get("messages", []),
            "stream": bool(body.get("stream")),
        } | {k: body[k] for k in ("temperature", "max_tokens") if body.get(k) is not None}
        if request["stream"]:
            return self._stream(request)
        try:
            async with self._client() as client:
                response = await client.post("/chat/completions", json=request)
            if response.is_error:
                return self._refused(response)
            return str(response.json()["choices"][0]["message"]["content"] or "")
        except httpx.HTTPError as exc:
            return self._unreachable(exc)
        except (ValueError, KeyError, IndexError, TypeError):
            return f"localmoa at {self.valves.LOCALMOA_URL} answered something other than a chat."

    async def _stream(self, request: dict[str, Any]) -> AsyncIterator[str]:
        """The aggregator's text from the server-sent events, up to ``data: [DONE]``."""
        started = False
        try:
            async with (
                self._client() as client,
                client.stream("POST", "/chat/completions", json=request) as response,
            ):
                if response.is_error:
                    await response.aread()
                    yield self._refused(response)
                    return
                async for line in response.aiter_lines():
                    data = line.removeprefix("data:").strip()
                    if not line.startswith("data:") or not data:
                        continue  # sse comments (keep-alive pings) and blank separators
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        yield ("\n\n" if started else "") + _problem(event)
                        return
                    for choice in event.get("choices") or []:
                        if text := (choice.get("delta") or {}).get("content"):
                            started = True
                            yield text
        except httpx.HTTPError as exc:
            yield ("\n\n" if started else "") + self._unreachable(exc)
        except (ValueError, TypeError, AttributeError):
            yield f"\n\nlocalmoa at {self.valves.LOCALMOA_URL} sent an event that is not JSON."

    def _client(self, timeout: float | None = None) -> httpx.AsyncClient:
        key = self.valves.LOCALMOA_API_KEY.strip()
        return httpx.AsyncClient(
            base_url=self.valves.LOCALMOA_URL.strip().rstrip("/"),
            headers={"Authorization": f"Bearer {key}"} if key else {},
            timeout=httpx.Timeout(timeout or self.valves.TIMEOUT_SECONDS, connect=CONNECT_SECONDS),
            trust_env=False,  # a proxy from the environment would carry private chats off the box
        )

    def _refused(self, response: httpx.Response) -> str:
        url = self.valves.LOCALMOA_URL
        if response.status_code == 401:
            return (
                f"localmoa at {url} refused the API key: set this function's LOCALMOA_API_KEY "
                "valve to the --api-key that `localmoa serve` was started with."
            )
        hint = " (check the ENSEMBLES valve)" if response.status_code == 404 else ""
        try:
            return f"localmoa ({response.status_code}): {_problem(response.json())}{hint}"
        except ValueError:
            return f"localmoa at {url} answered HTTP {response.status_code}: is LOCALMOA_URL right?"

    def _unreachable(self, exc: httpx.HTTPError) -> str:
        url = self.valves.LOCALMOA_URL
        if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
            return (
                f"localmoa at {url} sent nothing for {self.valves.TIMEOUT_SECONDS:g} s: "
                "raise the TIMEOUT_SECONDS valve, or try a smaller ensemble."
            )
        return (
            f"Could not reach localmoa at {url} ({type(exc).__name__}): start `localmoa serve`, "
            "or fix this function's LOCALMOA_URL valve (from Docker: "
            "http://host.docker.internal:8000/v1, with localmoa serve --host 0.0.0.0 --api-key)."
        )


def _problem(payload: Any) -> str:
    """The message of an OpenAI-shaped ``{"error": {"message": ...}}``, whatever else it holds."""
    error = payload.get("error") if isinstance(payload, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return str(message or payload)
