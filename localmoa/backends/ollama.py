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

**Several GPUs.** Ollama places models itself and cannot be told which GPU to use
(ollama/ollama#8874: "No."), so the way to pin models is one ``ollama serve`` per GPU, each with
its own ``CUDA_VISIBLE_DEVICES`` and port (#9637), and a model's ``ollama_host`` naming its
server. Everything done for a model then goes to that server: /api/show and /api/tags for its
footprint and the "not installed" error, the preload, the chat, the unload and the /api/ps reads
that measure it; its measurement is remembered per server, since each is its own GPU. One client
per server, made on first use; a model's own host passes the egress rule (loopback, or listed in
``settings.allowed_hosts``) each time it is used, before anything is sent, so a refusal names
that model's key. A model without ``ollama_host`` is on the run's server, as before.

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
    EgressError,
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
    return _url(raw, origin), origin


def _url(raw: str, setting: str) -> str:
    """``raw`` (a host, ``host:port`` or a URL) as Ollama's URL; a listen-everywhere address
    means this machine. EgressError naming ``setting`` when it is no URL at all."""
    try:
        url = httpx.URL(normalize_url(raw, default_port=11434))
    except httpx.InvalidURL as exc:
        raise EgressError(
            f'{setting}: not a URL: "{raw}" ({exc}); write e.g. "127.0.0.1:11435"'
        ) from None
    if url.host in ("0.0.0.0", "::"):
        url = url.copy_with(host="127.0.0.1")
    return str(url).rstrip("/")


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
    host: str
    """The server that has it: a measurement holds for one server, which is one GPU when
    each GPU has its own."""


class _Server:
    """One Ollama server: its client, made once its URL passes the egress rule, and the models
    it has, listed (/api/tags) and each described (/api/show) once per backend.

    ``setting`` is the key that gave the URL, which its errors blame; ``per_model`` says the key
    is a model's ``ollama_host`` (one server per GPU), whose messages then spell out the
    ``OLLAMA_HOST=...`` that points the ``ollama`` command at this server rather than the usual
    one."""

    def __init__(
        self, host: str, *, allowed_hosts: list[str], setting: str, per_model: bool = False
    ) -> None:
        self.host = host
        self.setting = setting
        self.per_model = per_model
        self.allowed_hosts = allowed_hosts
        self._client: ollama.AsyncClient | None = None
        self._listed: dict[str, Any] | None = None
        self._listing = asyncio.Lock()
        self._described: dict[str, InstalledModel] = {}

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

    async def installed(self) -> dict[str, InstalledModel]:
        listed = await self.listing()
        described = await asyncio.gather(*(self.describe(tag) for tag in listed))
        return dict(zip(listed, described, strict=True))

    async def find(self, tag: str, *, setting: str) -> InstalledModel:
        """The installed model ``tag``, or ModelNotInstalledError with the pull line."""
        listed = await self.listing()
        found = tag if tag in listed else f"{tag}:latest" if f"{tag}:latest" in listed else None
        if found is None:
            raise ModelNotInstalledError(
                f'Ollama at {self.host} has no model "{tag}" ({setting}); run '
                f"`{self._command('pull ' + tag)}` (localmoa never downloads models itself)"
            )
        return await self.describe(found)

    async def listing(self) -> dict[str, Any]:
        """/api/tags, read once: tag -> its listing."""
        async with self._listing:
            if self._listed is None:
                tags = await self.call(self.client.list())
                self._listed = {m.model or "": m for m in tags.models}
        return self._listed

    async def describe(self, tag: str) -> InstalledModel:
        """/api/show for one listed model, read once."""
        if tag not in self._described:
            listed = (await self.listing())[tag]
            show = await self.call(self.client.show(tag))
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
                host=self.host,
            )
        return self._described[tag]

    async def running(self, tag: str) -> Any:
        """``tag``'s entry in this server's /api/ps, or None."""
        ps = await self.call(self.client.ps())
        return next((m for m in ps.models if tag in (m.model, m.name)), None)

    async def call(self, awaitable: Any, name: str | None = None) -> Any:
        try:
            return await awaitable
        except (ollama.ResponseError, httpx.TransportError, ConnectionError) as exc:
            raise self.translate(exc, name) from None

    def translate(self, exc: Exception, name: str | None) -> LocalMoaError:
        if isinstance(exc, ollama.ResponseError):
            if exc.status_code == 404:
                return ModelNotInstalledError(f"Ollama at {self.host}: {exc.error}")
            return BackendError(name or "ollama", f"Ollama at {self.host} answered: {exc.error}")
        where = "this machine" if is_loopback(httpx.URL(self.host).host) else "that host"
        serve = f"`{self._command('serve')}`"
        if self.per_model:
            serve += " (one per GPU, each with its CUDA_VISIBLE_DEVICES)"
            point = self.setting
        else:
            serve += " (or open the Ollama app)"
            point = "OLLAMA_HOST"
            if self.setting != FROM_ENVIRONMENT:
                point = f"{self.setting} or {point}"
        return ServerUnavailableError(
            f"Ollama is not reachable at {self.host}: start it on {where} with {serve}, "
            f"or point {point} at it"
        )

    def _command(self, args: str) -> str:
        """The ``ollama`` command line for this server: a model's own server is not the one
        ``ollama`` reaches by default, so OLLAMA_HOST names it (host:port, as Ollama writes
        it; the whole URL for https)."""
        if not self.per_model:
            return f"ollama {args}"
        url = httpx.URL(self.host)
        where = self.host if url.scheme == "https" else url.netloc.decode()
        return f"OLLAMA_HOST={where} ollama {args}"

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()  # type: ignore[no-untyped-call]
            self._client = None


class OllamaBackend(Backend):
    """Models served by Ollama, loaded and unloaded when the plan says: each on the server its
    ``ollama_host`` names, else on the run's (``host``)."""

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
        self._default = _Server(host, allowed_hosts=self.allowed_hosts, setting=setting)
        self._servers: dict[str, _Server] = {host: self._default}  # by URL, made when first named
        self._configs: dict[str, OllamaModel] = {}  # loaded and ready for chat
        self._tags: dict[str, str] = {}  # preload sent and not undone -> the installed tag
        self._where: dict[str, _Server] = {}  # preload sent and not undone -> its server
        self._measured: dict[str, int] = {}
        self._undone: list[str] = []  # unloaded after their load was interrupted

    @classmethod
    def from_settings(
        cls, settings: Settings, *, cache: MeasurementCache | None = None
    ) -> OllamaBackend:
        """The backend ``settings`` ask for: Ollama at ``settings.ollama_host``, else at
        ``$OLLAMA_HOST``, else at 127.0.0.1:11434; its errors name the one used."""
        host, origin = _host_and_origin(settings.ollama_host)
        return cls(host, allowed_hosts=settings.allowed_hosts, cache=cache, setting=origin)

    def _server(self, name: str, config: OllamaModel) -> _Server:
        """The server model ``name`` is on. A host of its own passes the egress rule here, on
        every use and before any request, so a refusal names this model's key even when
        another model named the same host first."""
        if config.ollama_host is None:
            return self._default
        setting = f"models.{name}.ollama_host"
        host = _url(config.ollama_host, setting)
        check_url(host, allowed_hosts=self.allowed_hosts, setting=setting)
        server = self._servers.get(host)
        if server is None:
            server = _Server(
                host, allowed_hosts=self.allowed_hosts, setting=setting, per_model=True
            )
            self._servers[host] = server
        return server

    # --- what is installed, and what it will cost -------------------------------------------

    async def installed(self) -> dict[str, InstalledModel]:
        """Every model the run's Ollama (``host``) has, by tag (each described once per
        backend). A model with its own ``ollama_host`` is looked up there when it is used."""
        return await self._default.installed()

    async def find(self, tag: str, *, setting: str) -> InstalledModel:
        """The installed model ``tag`` of the run's Ollama, or ModelNotInstalledError with the
        pull line. Only this model is described (/api/show), not every model Ollama has."""
        return await self._default.find(tag, setting=setting)

    async def footprint(self, name: str, config: Any) -> Footprint:
        assert isinstance(config, OllamaModel)
        server = self._server(name, config)
        model = await server.find(config.model, setting=f"models.{name}.model")
        if config.memory is not None:
            return Footprint.override(config.memory)
        measured = self.measurement(model, config)
        return measured or self.estimate(model, config)

    def measurement(self, model: InstalledModel, config: OllamaModel) -> Footprint | None:
        """What this model held when last loaded with these options on its server, if it
        ever was."""
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
        """Preload ``name`` on its server. ``placement`` is not acted on: Ollama picks the GPU
        itself (ollama/ollama#8874); a model is pinned by its server's CUDA_VISIBLE_DEVICES."""
        assert isinstance(config, OllamaModel)
        server = self._server(name, config)
        model = await server.find(config.model, setting=f"models.{name}.model")
        began = time.perf_counter()
        # From here on Ollama may hold it, whatever happens here.
        self._tags[name], self._where[name] = model.tag, server
        try:
            await server.call(
                server.client.generate(
                    model=model.tag, keep_alive=-1, options=self._options(config)
                ),
                name,
            )
            running = await self._running(name)
            if running is None:
                raise BackendError(
                    name, f"Ollama at {server.host} says it loaded {model.tag} but does not list it"
                )
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
        log.debug(
            "loaded %s on %s in %.2fs: %d bytes",
            model.tag,
            server.host,
            time.perf_counter() - began,
            size,
        )

    async def unload(self, name: str) -> None:
        """Unload ``name``, loaded or with its preload sent; it leaves :meth:`loaded` only once
        its server's /api/ps no longer lists it, so a failed unload is tried again by
        :meth:`aclose`."""
        self._configs.pop(name, None)
        self._measured.pop(name, None)
        tag, server = self._tags.get(name), self._where.get(name)
        if tag is None or server is None:
            return
        try:
            async with asyncio.timeout(UNLOAD_TIMEOUT):
                await server.call(server.client.generate(model=tag, keep_alive=0), name)
                while await self._running(name) is not None:  # freed only once ps forgets it
                    await asyncio.sleep(POLL_INTERVAL)
        except TimeoutError:
            raise BackendError(
                name, f"Ollama at {server.host} did not unload {tag} within {UNLOAD_TIMEOUT:g} s"
            ) from None
        self._tags.pop(name, None)
        self._where.pop(name, None)

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
        server = self._where[name]
        options: dict[str, Any] = {
            **self._options(config),
            "temperature": request.temperature,
            "num_predict": request.max_tokens,
        }
        if request.stop is not None:
            options["stop"] = request.stop
        if request.seed is not None:
            options["seed"] = request.seed
        stream = await server.call(
            server.client.chat(
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
            raise server.translate(exc, name) from None
        finally:
            await stream.aclose()

    def resident_bytes(self, name: str) -> int | None:
        return self._measured.get(name)

    def load_peak_bytes(self, name: str) -> int | None:
        """What the load took: the ``/api/ps`` size its server reported after it (the runner's
        whole footprint, GPU and CPU parts together)."""
        return self._measured.get(name)

    def loaded(self) -> list[str]:
        """Every model any of this backend's servers may hold because of it: loaded, loading,
        or whose unload failed."""
        return list(self._tags)

    async def aclose(self) -> list[str]:
        """Unload what is loaded, on every server (see :meth:`Backend.aclose`); the names
        returned include the models unloaded after their load was interrupted, which happened
        on the way out too."""
        try:
            unloaded = await super().aclose()
            undone, self._undone = self._undone, []
            return [*dict.fromkeys([*undone, *unloaded])]
        finally:
            for server in self._servers.values():
                await server.aclose()

    # --- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _options(config: OllamaModel) -> dict[str, Any]:
        """The runner options pinned for this model: identical on every request."""
        return {"num_ctx": config.num_ctx}

    @staticmethod
    def _cache_key(model: InstalledModel, config: OllamaModel) -> str:
        """A measurement holds for one model on one server (each its own GPU), context and
        number of slots (each slot holds its own KV cache). One slot keeps the key it had
        before slots were declared."""
        slots = f"|parallel={config.parallel}" if config.parallel > 1 else ""
        return f"ollama|{model.host}|{model.digest or model.tag}|num_ctx={config.num_ctx}{slots}"

    async def _running(self, name: str) -> Any:
        """Model ``name``'s entry in its server's /api/ps, or None."""
        return await self._where[name].running(self._tags[name])


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
