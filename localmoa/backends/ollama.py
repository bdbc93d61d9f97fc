"""Ollama, driven so that residency stays localmoa's decision, never Ollama's.

Ollama loads a model on the first request for it, keeps it ``keep_alive`` (5 minutes by
default), reloads it whenever runner options such as ``num_ctx`` differ from the loaded ones, and
evicts idle models when the next one does not fit (server/sched.go). Each of those would break a
plan, so this backend:

- **preloads** with an empty request and ``keep_alive: -1`` (resident until told otherwise);
- **pins one set of runner options** per model (``num_ctx``) and sends it with every request,
  the preload included, so Ollama never reloads a model because options changed
  (ollama/ollama#8903 and its kin);
- **unloads** with an empty request and ``keep_alive: 0``, then polls ``/api/ps`` until the model
  is gone before the next wave loads, so Ollama never needs to evict anything itself;
- **undoes a preload it did not see through.** Once the preload is sent, Ollama may load the
  model, forever, whether or not its answer is ever read: a load cancelled (Ctrl-C, a signal) or
  failed after that point is followed by an unload that the cancellation cannot interrupt,
  bounded by ``UNLOAD_TIMEOUT``, and until that unload succeeds the model stays in
  :meth:`OllamaBackend.loaded`, so :meth:`~OllamaBackend.aclose` tries again. (Ollama itself
  drops a load whose client left while the runner was still starting, but not one that had
  finished, nor one whose answer was in flight.)
- after each load reads ``/api/ps``: the measured ``size`` replaces the estimate for the rest of
  the run (the executor re-plans when it differs) and is remembered in the measurement cache;
  ``size_vram < size`` means Ollama put part of the model on the CPU, which is warned about.

Ollama times each answer itself: its last chunk has ``prompt_eval_count`` and
``prompt_eval_duration``, ``eval_count`` and ``eval_duration`` (nanoseconds), which become the
last delta's prefill and decode rates (its own figures beat the engine's timing of the stream,
which would include HTTP and the client). What a load took is the ``/api/ps`` size measured
after it.

A request's options are Ollama's own: ``stop`` and ``seed`` go in ``options`` (sampling options,
which never make Ollama reload a model), and ``response_format`` becomes ``format``: ``"json"``
for a JSON object, the schema itself for a JSON schema (Ollama turns it into a grammar).

**An agent's samples** (Self-MoA) are concurrent requests, at most the model's ``parallel`` at
a time (the base :meth:`~localmoa.backends.base.Backend.chat_samples`): Ollama answers up to
``OLLAMA_NUM_PARALLEL`` requests for one model at once and queues the rest, and localmoa cannot
read that server setting, so the user declares it as ``parallel``. Each sample is a request of
its own through the one shared client, with its own ``seed`` and the same pinned ``num_ctx``
and ``keep_alive``, so concurrent samples never make Ollama reload the model; ``chat`` only
reads the backend's bookkeeping, which only load and unload change (never while the model's
calls run). Ollama gives every slot its own ``num_ctx`` of KV cache (it starts llama-server with
``-c num_ctx·np -np np``), so the estimate counts ``num_ctx × parallel`` of context; a
measurement from ``/api/ps`` includes the slots already, and is remembered per ``parallel``.

Before a load, a model's footprint is estimated like a GGUF file's
(localmoa.footprint.estimate), from ``/api/show`` ``model_info`` and the ``/api/tags`` file
size. localmoa never pulls, pushes or deletes models: a missing one is an error that gives the
``ollama pull`` line to run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import ollama

from localmoa.backends.base import REQUEST_OPTIONS, Backend, ChatDelta, ChatRequest, ResponseFormat
from localmoa.backends.configs import OllamaModel
from localmoa.egress import check_url, client_options, is_loopback, normalize_url
from localmoa.errors import (
    BackendError,
    LocalMoaError,
    ModelNotInstalledError,
    ServerUnavailableError,
)
from localmoa.footprint.estimate import Footprint, GGUFFacts, estimate, facts_from_metadata
from localmoa.footprint.measurements import MeasurementCache
from localmoa.hardware import Placement

if TYPE_CHECKING:
    from localmoa.config import Settings

__all__ = ["DEFAULT_HOST", "InstalledModel", "OllamaBackend", "ollama_host"]

log = logging.getLogger(__name__)

DEFAULT_HOST = "http://127.0.0.1:11434"
ASSUMED_VOCAB = 152_064  # /api/show omits the token list; Qwen2's vocabulary, among the largest
UNLOAD_TIMEOUT = 60.0
"""Longest an unload may take, the request and the wait for /api/ps to forget the model."""
POLL_INTERVAL = 0.05
FROM_SETTINGS = "settings.ollama_host"
FROM_ENVIRONMENT = "the OLLAMA_HOST environment variable"


def ollama_host(setting: str | None) -> str:
    """``settings.ollama_host``, else ``$OLLAMA_HOST``, else 127.0.0.1:11434, as a URL.

    A listen-everywhere address (``OLLAMA_HOST=0.0.0.0`` is a common server setting) means this
    machine to a client.
    """
    return _host_and_origin(setting)[0]


def _host_and_origin(setting: str | None) -> tuple[str, str]:
    """Ollama's URL (see :func:`ollama_host`) and where it came from, as messages name it: a
    refused or unreachable URL must be blamed on the place the user can change."""
    env = os.environ.get("OLLAMA_HOST")
    raw, origin = (
        (setting, FROM_SETTINGS)
        if setting
        else (env, FROM_ENVIRONMENT)
        if env
        else (DEFAULT_HOST, FROM_SETTINGS)
    )
    url = httpx.URL(normalize_url(raw, default_port=11434))
    if url.host in ("0.0.0.0", "::"):
        url = url.copy_with(host="127.0.0.1")
    return str(url).rstrip("/"), origin


@dataclass(frozen=True)
class InstalledModel:
    """A model Ollama has, as ``/api/tags`` and ``/api/show`` describe it."""

    tag: str
    digest: str
    size: int
    family: str
    parameter_size: str
    capabilities: tuple[str, ...]
    facts: GGUFFacts | None


class OllamaBackend(Backend):
    """Models served by a local Ollama, loaded and unloaded when the plan says."""

    measures_footprint = True
    supports = frozenset(REQUEST_OPTIONS)

    def __init__(
        self,
        host: str,
        *,
        allowed_hosts: Sequence[str] = (),
        cache: MeasurementCache | None = None,
        setting: str = FROM_SETTINGS,
    ) -> None:
        self.host = host
        self.setting = setting
        self.allowed_hosts = list(allowed_hosts)
        self.cache = cache or MeasurementCache()
        self._client: ollama.AsyncClient | None = None
        self._configs: dict[str, OllamaModel] = {}  # loaded and ready for chat
        self._tags: dict[str, str] = {}  # preload sent and not undone -> the installed tag
        self._measured: dict[str, int] = {}
        self._listed: dict[str, Any] | None = None
        self._listing = asyncio.Lock()
        self._described: dict[str, InstalledModel] = {}
        self._undone: list[str] = []  # unloaded after their load was interrupted

    @classmethod
    def from_settings(
        cls, settings: Settings, *, cache: MeasurementCache | None = None
    ) -> OllamaBackend:
        """The backend ``settings`` ask for: Ollama at ``settings.ollama_host``, else at
        ``$OLLAMA_HOST``, else at 127.0.0.1:11434; its errors name the one used."""
        host, origin = _host_and_origin(settings.ollama_host)
        return cls(host, allowed_hosts=settings.allowed_hosts, cache=cache, setting=origin)

    @property
    def client(self) -> ollama.AsyncClient:
        if self._client is None:
            check_url(self.host, allowed_hosts=self.allowed_hosts, setting=self.setting)
            self._client = ollama.AsyncClient(
                host=self.host,
                timeout=httpx.Timeout(None, connect=5.0),  # generation may take minutes
                **client_options(self.allowed_hosts, setting=self.setting),
            )
        return self._client

    # --- what is installed, and what it will cost -------------------------------------------

    async def installed(self) -> dict[str, InstalledModel]:
        """Every model Ollama has, by tag (each described once per backend)."""
        listed = await self._list()
        described = await asyncio.gather(*(self._describe(tag) for tag in listed))
        return dict(zip(listed, described, strict=True))

    async def find(self, tag: str, *, setting: str) -> InstalledModel:
        """The installed model ``tag``, or ModelNotInstalledError with the pull line.

        Only this model is described (/api/show), not every model Ollama has."""
        listed = await self._list()
        found = tag if tag in listed else f"{tag}:latest" if f"{tag}:latest" in listed else None
        if found is None:
            raise ModelNotInstalledError(
                f'Ollama at {self.host} has no model "{tag}" ({setting}); run `ollama pull {tag}` '
                "(localmoa never downloads models itself)"
            )
        return await self._describe(found)

    async def _list(self) -> dict[str, Any]:
        """/api/tags, read once per backend: tag -> its listing."""
        async with self._listing:
            if self._listed is None:
                tags = await self._call(self.client.list())
                self._listed = {m.model or "": m for m in tags.models}
        return self._listed

    async def _describe(self, tag: str) -> InstalledModel:
        """/api/show for one listed model, read once per backend."""
        if tag not in self._described:
            listed = (await self._list())[tag]
            show = await self._show(tag)
            details = listed.details
            size = max(0, int(listed.size or 0))  # a broken server's negative stays out
            self._described[tag] = InstalledModel(
                tag=tag,
                digest=listed.digest or "",
                size=size,
                family=(details.family if details else None) or "unknown",
                parameter_size=(details.parameter_size if details else None) or "",
                capabilities=tuple(show.capabilities or ("completion",)),
                facts=_facts(tag, dict(show.modelinfo or {}), size),
            )
        return self._described[tag]

    async def footprint(self, name: str, config: Any) -> Footprint:
        assert isinstance(config, OllamaModel)
        model = await self.find(config.model, setting=f"models.{name}.model")
        if config.memory is not None:
            return Footprint.override(config.memory)
        measured = self.measurement(model, config)
        return measured or self.estimate(model, config)

    def measurement(self, model: InstalledModel, config: OllamaModel) -> Footprint | None:
        """What this model held when last loaded with these options, if it ever was."""
        found = self.cache.get(self._cache_key(model, config))
        if found is None:
            return None
        return Footprint(
            weights=found.bytes,
            kv_cache=0,
            compute=0,
            source="measured",
            note=f"measured {found.measured_at}",
        )

    def estimate(self, model: InstalledModel, config: OllamaModel) -> Footprint:
        """The GGUF formula over Ollama's model facts, or the file size when Ollama gave none.

        The context is ``num_ctx × parallel``: Ollama runs one context of that many cells that
        its slots share, so beside every slot's KV cache its attention buffers span all of
        them too, unlike llama.cpp's separate sequences (``n_seq``, whose buffers do not
        grow); the same KV cache, and an upper bound of the rest."""
        if model.facts is None:
            return Footprint(
                weights=model.size,
                kv_cache=0,
                compute=0,
                source="ollama",
                note="file size only: Ollama gave no architecture facts",
            )
        guess = estimate(model.facts, n_ctx=config.num_ctx * config.parallel, n_batch=512)
        slots = f", {config.parallel} slots of num_ctx" if config.parallel > 1 else ""
        return Footprint(
            weights=guess.weights,
            kv_cache=guess.kv_cache,
            compute=guess.compute,
            source="ollama",
            note=f"estimate from /api/show{slots}",
        )

    # --- the seam ------------------------------------------------------------------------------

    async def load(self, name: str, config: Any, placement: Placement | None = None) -> None:
        assert isinstance(config, OllamaModel)
        model = await self.find(config.model, setting=f"models.{name}.model")
        began = time.perf_counter()
        self._tags[name] = model.tag  # from here on Ollama may hold it, whatever happens here
        try:
            await self._call(
                self.client.generate(model=model.tag, keep_alive=-1, options=self._options(config)),
                name,
            )
            running = await self._running(model.tag)
            if running is None:
                raise BackendError(name, f"Ollama says it loaded {model.tag} but does not list it")
        except BaseException as exc:
            await self._undo_load(name, interrupted=not isinstance(exc, Exception))
            raise
        self._configs[name] = config
        size, vram = max(0, int(running.size or 0)), max(0, int(running.size_vram or 0))
        self._measured[name] = size
        self.cache.put(self._cache_key(model, config), size, vram)
        if 0 < vram < size:
            log.warning(
                'Ollama put part of "%s" on the CPU (%.0f%% in GPU memory): it will be slow; '
                "a smaller num_ctx or a smaller quantization would fit entirely",
                name,
                100 * vram / size,
            )
        log.debug("loaded %s in %.2fs: %d bytes", model.tag, time.perf_counter() - began, size)

    async def unload(self, name: str) -> None:
        """Unload ``name``, loaded or with its preload sent; it leaves :meth:`loaded` only once
        /api/ps no longer lists it, so a failed unload is tried again by :meth:`aclose`."""
        self._configs.pop(name, None)
        self._measured.pop(name, None)
        tag = self._tags.get(name)
        if tag is None:
            return
        try:
            async with asyncio.timeout(UNLOAD_TIMEOUT):
                await self._call(self.client.generate(model=tag, keep_alive=0), name)
                while await self._running(tag) is not None:  # freed only once ps forgets it
                    await asyncio.sleep(POLL_INTERVAL)
        except TimeoutError:
            raise BackendError(
                name, f"Ollama did not unload {tag} within {UNLOAD_TIMEOUT:g} s"
            ) from None
        self._tags.pop(name, None)

    async def _undo_load(self, name: str, *, interrupted: bool) -> None:
        """Unload ``name`` after its load failed or was ``interrupted`` (cancelled), to the end
        even if cancelled again meanwhile (the cancellation is raised once it is done). A
        failure is logged, since the load's own error is the one to report; an interrupted load
        undone is reported by :meth:`aclose`, as Ollama may well have loaded it by then."""
        undo = asyncio.ensure_future(self.unload(name))
        cancelled = False
        while not undo.done():
            try:
                await asyncio.wait([undo])  # unlike await, wait never cancels what it waits for
            except asyncio.CancelledError:
                cancelled = True
        if undo.cancelled():
            log.warning('"%s": its load was interrupted and the unload after it cancelled', name)
        elif (error := undo.exception()) is not None:
            log.warning(
                '"%s": its load was interrupted and Ollama may still hold it: %s', name, error
            )
        elif interrupted:
            self._undone.append(name)
        if cancelled:
            raise asyncio.CancelledError

    async def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        config = self._configs.get(name)
        if config is None:
            raise BackendError(name, "called while not loaded")
        self.refuse_unsupported(name, request)
        options: dict[str, Any] = {
            **self._options(config),
            "temperature": request.temperature,
            "num_predict": request.max_tokens,
        }
        if request.stop is not None:
            options["stop"] = request.stop
        if request.seed is not None:
            options["seed"] = request.seed
        stream = await self._call(
            self.client.chat(
                model=self._tags[name],
                messages=[m.model_dump() for m in request.messages],
                options=options,
                format=_format(request.response_format),
                keep_alive=-1,
                stream=True,
            ),
            name,
        )
        counted = 0
        try:
            async for part in stream:
                text = part.message.content or ""
                if part.done:
                    total = part.eval_count or counted + (1 if text else 0)
                    yield ChatDelta(
                        text,
                        max(total - counted, 0),
                        part.prompt_eval_count or 0,
                        prefill_tok_s=_rate(part.prompt_eval_count, part.prompt_eval_duration),
                        decode_tok_s=_rate(part.eval_count, part.eval_duration),
                    )
                    return
                counted += 1
                yield ChatDelta(text, 1)
        except (ollama.ResponseError, httpx.TransportError, ConnectionError) as exc:
            raise self._translate(exc, name) from None
        finally:
            await stream.aclose()

    def resident_bytes(self, name: str) -> int | None:
        return self._measured.get(name)

    def load_peak_bytes(self, name: str) -> int | None:
        """What the load took: the ``/api/ps`` size read after it (the runner's whole
        footprint, GPU and CPU parts together)."""
        return self._measured.get(name)

    def loaded(self) -> list[str]:
        """Every model Ollama may hold because of this backend: loaded, loading, or whose
        unload failed."""
        return list(self._tags)

    async def aclose(self) -> list[str]:
        """Unload what is loaded (see :meth:`Backend.aclose`); the names returned include the
        models unloaded after their load was interrupted, which happened on the way out too."""
        try:
            unloaded = await super().aclose()
            undone, self._undone = self._undone, []
            return [*dict.fromkeys([*undone, *unloaded])]
        finally:
            if self._client is not None:
                await self._client.close()  # type: ignore[no-untyped-call]
                self._client = None

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _options(config: OllamaModel) -> dict[str, Any]:
        """The runner options pinned for this model: identical on every request."""
        return {"num_ctx": config.num_ctx}

    def _cache_key(self, model: InstalledModel, config: OllamaModel) -> str:
        """A measurement holds for one model, context and number of slots (each slot holds
        its own KV cache). One slot keeps the key it had before slots were declared."""
        slots = f"|parallel={config.parallel}" if config.parallel > 1 else ""
        return f"ollama|{self.host}|{model.digest or model.tag}|num_ctx={config.num_ctx}{slots}"

    async def _show(self, tag: str) -> Any:
        return await self._call(self.client.show(tag))

    async def _running(self, tag: str) -> Any:
        ps = await self._call(self.client.ps())
        return next((m for m in ps.models if tag in (m.model, m.name)), None)

    async def _call(self, awaitable: Any, name: str | None = None) -> Any:
        try:
            return await awaitable
        except (ollama.ResponseError, httpx.TransportError, ConnectionError) as exc:
            raise self._translate(exc, name) from None

    def _translate(self, exc: Exception, name: str | None) -> LocalMoaError:
        if isinstance(exc, ollama.ResponseError):
            if exc.status_code == 404:
                return ModelNotInstalledError(f"Ollama at {self.host}: {exc.error}")
            return BackendError(name or "ollama", f"Ollama answered: {exc.error}")
        where = "this machine" if is_loopback(httpx.URL(self.host).host) else "that host"
        point = "OLLAMA_HOST"
        if self.setting != FROM_ENVIRONMENT:
            point = f"{self.setting} or {point}"
        return ServerUnavailableError(
            f"Ollama is not reachable at {self.host}: start it on {where} with `ollama serve` "
            f"(or open the Ollama app), or point {point} at it"
        )


def _rate(count: int | None, nanoseconds: int | None) -> float | None:
    """Tokens per second from Ollama's count and duration; None when either is missing or
    zero (a prompt Ollama found all in its cache evaluates nothing)."""
    if not count or not nanoseconds or count < 0 or nanoseconds < 0:
        return None
    return count * 1e9 / nanoseconds


def _format(response_format: ResponseFormat | None) -> Literal["json"] | dict[str, Any] | None:
    """Ollama's ``format``: "json" for any JSON object, the schema for a JSON schema."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.json_schema is None:
        return "json"
    return response_format.json_schema.schema_


def _facts(tag: str, info: dict[str, Any], size: int) -> GGUFFacts | None:
    """GGUF-style facts from /api/show's model_info; None when it lacks the architecture."""
    tokens = info.get("tokenizer.ggml.tokens")
    # Without verbose, Ollama blanks the token list: assume a large vocabulary (an upper bound).
    vocab = len(tokens) if isinstance(tokens, list) and len(tokens) > 1000 else ASSUMED_VOCAB
    try:
        return facts_from_metadata(info, path=Path(tag), weights=size, vocab=vocab)
    except (KeyError, TypeError, ValueError):
        return None
