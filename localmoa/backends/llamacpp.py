"""llama.cpp in process, through llama-cpp-python.

One worker thread per loaded model: a ``Llama`` object is not thread-safe
(abetlen/llama-cpp-python#471, #1367), and ctypes releases the GIL, so two models decode in
parallel on two cores while each model's calls stay on its own thread. Tokens cross to the event
loop through ``call_soon_threadsafe``; a cancelled stream sets a flag the worker checks at every
token, so generation stops within one token.

Two things llama-cpp-python does by default are unsafe in a concurrent program and are avoided:

- ``verbose=False`` silences loading by ``dup2``-ing file descriptors 1 and 2 to /dev/null for
  the whole process. Two loads doing this at once can leave stdout pointing at /dev/null for good.
  We construct with ``verbose=True`` instead, route llama.cpp's log to :mod:`logging` (DEBUG,
  logger ``localmoa.llama_cpp``) with our own log callback, and swallow the few Python-level
  prints of the constructor under a lock.
- ``Llama.from_pretrained`` downloads from a hub. It is never called: models are local paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import io
import logging
import re
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from localmoa.backends.base import Backend, ChatDelta, ChatRequest
from localmoa.config import LlamaCppModel
from localmoa.errors import BackendError, ModelFileError
from localmoa.memory import Footprint, estimate, read_gguf

__all__ = ["LlamaCppBackend"]

log = logging.getLogger(__name__)
llama_log = logging.getLogger("localmoa.llama_cpp")

_construct_lock = threading.Lock()
_capture: list[str] | None = None  # log lines of the model being constructed (under the lock)
_BUFFER = re.compile(r"(\w+) (?:model|KV|compute|output) buffer size\s*=\s*([\d.]+) MiB")
_log_callback: Any = None


def _install_log_callback() -> None:
    """Send llama.cpp's log to logging instead of stderr; keep the model's buffer sizes."""
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        line = text.decode("utf-8", errors="replace")
        if _capture is not None:
            _capture.append(line)
        llama_log.debug(line.rstrip())

    _log_callback = callback  # ctypes callbacks must outlive every call into llama.cpp
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def _measured_bytes(lines: list[str]) -> int | None:
    sizes = [float(m.group(2)) for line in lines for m in _BUFFER.finditer(line)]
    return int(sum(sizes) * (1 << 20)) if sizes else None


def _construct(config: LlamaCppModel) -> tuple[Any, int | None]:
    global _capture
    from llama_cpp import LLAMA_DEFAULT_SEED, Llama

    _install_log_callback()
    with _construct_lock:
        lines: list[str] = []
        _capture = lines
        try:
            with _quiet_this_thread() as chatter:
                llama = Llama(
                    model_path=str(config.path),
                    n_ctx=config.n_ctx,
                    n_batch=config.n_batch,
                    n_gpu_layers=config.n_gpu_layers,
                    n_threads=config.n_threads,
                    use_mmap=config.use_mmap,
                    seed=LLAMA_DEFAULT_SEED if config.seed is None else config.seed,
                    verbose=True,
                )
        except ValueError as exc:
            # llama-cpp-python says only "Failed to load model"; the reason is in the log.
            reasons = [line.strip() for line in lines if "error" in line.lower()]
            raise ValueError(f"{exc}: {reasons[-1]}" if reasons else str(exc)) from None
        finally:
            _capture = None
    llama.verbose = False  # no per-call timing prints from Python
    log.debug("llama-cpp-python said: %s", chatter.getvalue()[:2000])
    return llama, _measured_bytes(lines)


class _ThreadFilter(io.TextIOBase):
    """Stands in for ``sys.stderr`` while a model loads: what the loading thread writes
    (llama-cpp-python's own prints) is kept aside, what any other thread writes passes through.

    ``contextlib.redirect_stderr`` would swallow every thread's output for the length of the
    load: the progress of calls already running on other models, in a dataflow run."""

    def __init__(self, target: Any, thread: int) -> None:
        super().__init__()
        self.target = target
        self.thread = thread
        self.kept = io.StringIO()

    def write(self, text: str) -> int:
        if threading.get_ident() == self.thread:
            return self.kept.write(text)
        return int(self.target.write(text))

    def flush(self) -> None:
        self.target.flush()

    def getvalue(self) -> str:
        return self.kept.getvalue()

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, isatty... of the real stream
        return getattr(self.target, name)


@contextlib.contextmanager
def _quiet_this_thread() -> Iterator[_ThreadFilter]:
    original = sys.stderr
    quiet = _ThreadFilter(original, threading.get_ident())
    sys.stderr = quiet
    try:
        yield quiet
    finally:
        if sys.stderr is quiet:
            sys.stderr = original


def _close(llama: Any) -> None:
    """Free the model, then hand glibc's freed heap back to the system: without ``malloc_trim``
    ~40 MiB per load/close cycle stays resident (measured), which the budget cannot see."""
    llama.close()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class _Loaded:
    llama: Any
    worker: ThreadPoolExecutor
    measured: int | None
    busy: list[threading.Event] = field(default_factory=list)


class LlamaCppBackend(Backend):
    """Models from GGUF files, run in this process by llama.cpp."""

    def __init__(self) -> None:
        self._models: dict[str, _Loaded] = {}

    async def footprint(self, name: str, config: Any) -> Footprint:
        if config.memory is not None:
            return Footprint.override(config.memory)
        facts = await asyncio.to_thread(read_gguf, config.path)
        return estimate(facts, n_ctx=config.n_ctx, n_batch=config.n_batch)

    async def load(self, name: str, config: Any) -> None:
        if not isinstance(config, LlamaCppModel):
            raise TypeError(f"LlamaCppBackend cannot load {type(config).__name__}")
        if name in self._models:
            raise BackendError(name, "already loaded")
        if not config.path.is_file():
            raise ModelFileError(f"{config.path}: file not found (model {name})")
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"localmoa-{name}")
        loading = asyncio.get_running_loop().run_in_executor(worker, _construct, config)
        try:
            llama, measured = await asyncio.shield(loading)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                # Cancelled mid-load (Ctrl-C): a load cannot be interrupted, so let it finish
                # and free it rather than leave a model in memory that nobody will close.
                with contextlib.suppress(Exception):
                    _close((await loading)[0])
            worker.shutdown(wait=True)
            if isinstance(exc, ValueError | RuntimeError | OSError):
                raise BackendError(name, f"llama.cpp could not load {config.path}: {exc}") from exc
            raise
        self._models[name] = _Loaded(llama, worker, measured)

    async def unload(self, name: str) -> None:
        loaded = self._models.pop(name, None)
        if loaded is None:
            return
        for stop in loaded.busy:
            stop.set()
        loop = asyncio.get_running_loop()
        # close() runs on the model's own thread, after any call still finishing there.
        await asyncio.shield(loop.run_in_executor(loaded.worker, _close, loaded.llama))
        loaded.worker.shutdown(wait=True)

    async def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        loaded = self._models.get(name)
        if loaded is None:
            raise BackendError(name, "called while not loaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        stop = threading.Event()
        loaded.busy.append(stop)

        def emit(kind: str, value: Any) -> None:
            if not stop.is_set():
                loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work() -> None:
            generated = counted = prompt = 0
            eos = loaded.llama.token_eos()

            def each_token(input_ids: Any, scores: Any) -> Any:
                # llama.cpp's loop calls this once per sampled token: the place to count tokens
                # (random or multibyte output may yield no text for many) and to stop within a
                # token once the stream is closed. It runs as a ctypes callback, where raising
                # is ignored, so stopping means forcing end-of-sequence.
                nonlocal generated, prompt
                if not generated:
                    prompt = len(input_ids)  # the context before the first sampled token
                generated += 1
                if stop.is_set():
                    scores = scores.copy()
                    scores[:] = -float("inf")
                    scores[eos] = 0.0
                return scores

            try:
                for text in _stream(loaded.llama, request, each_token):
                    if stop.is_set():
                        return
                    emit("delta", ChatDelta(text, generated - counted))
                    counted = generated
                # The loop samples one token past max_tokens before it notices the limit.
                emit("done", ChatDelta("", min(generated, request.max_tokens) - counted, prompt))
            except Exception as exc:
                emit("error", exc)

        future = loop.run_in_executor(loaded.worker, work)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "error":
                    hint = ""
                    if "exceed context window" in str(value):
                        hint = f"; raise n_ctx of [models.{name}] or lower max_tokens"
                    raise BackendError(name, f"generation failed: {value}{hint}") from value
                if kind == "done":
                    if value.tokens or value.prompt_tokens:
                        yield value
                    return
                yield value
        finally:
            stop.set()
            loaded.busy.remove(stop)
            await asyncio.shield(future)

    def resident_bytes(self, name: str) -> int | None:
        loaded = self._models.get(name)
        return loaded.measured if loaded else None

    def loaded(self) -> list[str]:
        return list(self._models)


def _stream(llama: Any, request: ChatRequest, each_token: Any) -> Iterator[str]:
    from llama_cpp import LogitsProcessorList

    chunks = llama.create_chat_completion(
        messages=[m.model_dump() for m in request.messages],
        temperature=request.temperature,
        max_tokens=request.max_tokens,
        logits_processor=LogitsProcessorList([each_token]),
        stream=True,
    )
    for chunk in chunks:
        text = chunk["choices"][0]["delta"].get("content")
        if text:
            yield text
