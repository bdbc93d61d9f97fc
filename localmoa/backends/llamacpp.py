"""llama.cpp in process, through llama-cpp-python.

One worker thread per loaded model: a ``Llama`` object is not thread-safe
(abetlen/llama-cpp-python#471, #1367), and ctypes releases the GIL, so two models decode in
parallel on two cores while each model's calls stay on its own thread. Tokens cross to the event
loop through ``call_soon_threadsafe``.

A cancelled stream (Ctrl-C, SIGTERM, a client gone) sets a flag that stops the worker promptly
at every step: while the prompt is evaluated (``llama_decode`` over possibly thousands of tokens,
seconds on a CPU), llama.cpp's abort callback reads the flag between graph nodes and the decode
ends early (see :class:`_Abort`); while tokens are sampled, a logits processor forces
end-of-sequence within one token. Either way the worker is free again at once, so ``unload``
never waits for a prompt nobody will read. Only tokenizing (native, uninterruptible) cannot be
stopped: prompts are bounded before they get here (``localmoa.runtime.prepare.check_prompt``), and
:meth:`LlamaCppBackend.prompt_tokens` tokenizes in a thread a cancelled caller abandons.

Two things llama-cpp-python does by default are unsafe in a concurrent program and are avoided:

- ``verbose=False`` silences loading by ``dup2``-ing file descriptors 1 and 2 to /dev/null for
  the whole process. Two loads doing this at once can leave stdout pointing at /dev/null for good.
  We construct with ``verbose=True`` instead, route llama.cpp's log to :mod:`logging` (DEBUG,
  logger ``localmoa.llama_cpp``) with our own log callback, and swallow the few Python-level
  prints of the constructor under a lock.
- ``Llama.from_pretrained`` downloads from a hub. It is never called: models are local paths.

A request's options go to ``create_chat_completion`` as llama.cpp's own: ``stop`` strings,
``seed`` (taken modulo 2^32 − 1, since llama.cpp reads 2^32 − 1 as "random" and a caller who
sets a seed wants the same answer back), and ``response_format`` as a grammar built here from
the JSON schema (``json_object``: llama.cpp's JSON grammar). The grammar is built by us rather
than through llama-cpp-python's ``response_format``, which silently falls back to any JSON when
it cannot convert a schema: here such a schema fails the call, before generating, naming it.

Several calls of one model decode together, as sequences of the model's one context
(:meth:`LlamaCppBackend.chat_samples`), not as calls in a row: an agent's samples (Self-MoA: one
prompt, k seeds), one model's calls for the prompts of a batch, or concurrent ``serve``
requests. On a CPU a decode step reads every weight once whatever the number of tokens in it,
so k tokens a step cost little more than one. Each prompt is formatted, tokenized, checked and
seeded exactly as a chat call does it (``create_chat_completion`` runs with a stand-in that
takes over where generation would begin, :class:`Capture`) and evaluated into a sequence of its
own; requests with the same prompt share that evaluation, copied to their sequences
(``llama_memory_seq_cp``). Then each step decodes one token of every live sequence in one
``llama_decode``, and each sequence samples with its own chain (its seed, temperature, grammar:
the chain a chat call would build). Such a context holds ``parallel`` sequences, each with its
own n_ctx (see :func:`_sequences` for why the cache is not unified); more calls than that
decode in rounds (:mod:`localmoa.backends.llamacpp_batch`). Afterwards the context is emptied,
so the next ``chat`` starts as after a load.

What a call took is timed by the engine from the stream (time to first token, decode rate),
except the prompt's evaluation rate, which the backend states itself: llama-cpp-python keeps
the previous call's tokens and evaluates only the part of a prompt they do not begin (an
aggregator after a proposer on the same model may evaluate a tenth of its prompt), so prompt
tokens over the time to the first token could overstate it tenfold. A chat call times its one
``Llama.eval`` of the prompt (:class:`_PromptTimer`); calls decoded together time the
evaluation of their own prompt. What a load took is this process's growth over it
(:class:`~localmoa.footprint.measurements.ProcessMemory`: RSS, and GPU memory where NVML tells),
measured on the model's thread around the construction alone.

llama-cpp-python is the optional ``llamacpp`` extra: this module imports it only inside
functions, and the registry (:mod:`localmoa.backends.registry`) makes this backend only after
importing it, so a missing library is one line naming the extra, never an ImportError.
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
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localmoa.backends.base import (
    REQUEST_OPTIONS,
    Backend,
    ChatDelta,
    ChatMessage,
    ChatRequest,
)
from localmoa.backends.configs import LlamaCppModel
from localmoa.backends.llamacpp_batch import Capture, Sample, decode_together, grammar_for
from localmoa.errors import BackendError, ModelFileError
from localmoa.footprint.estimate import Footprint, estimate, read_gguf
from localmoa.footprint.measurements import ProcessMemory
from localmoa.hardware import Placement

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


def placement_params(config: LlamaCppModel, placement: Placement | None) -> dict[str, Any]:
    """llama.cpp's device parameters for ``placement``. One GPU: ``split_mode = NONE`` with
    ``main_gpu`` (in llama.cpp's default LAYER mode ``main_gpu`` is ignored and every GPU gets
    layers). Several: LAYER mode with ``tensor_split`` in proportion to the planned bytes, by
    CUDA ordinal. RAM: no layers offloaded. None, or unified memory: llama.cpp's defaults."""
    params: dict[str, Any] = {"n_gpu_layers": config.n_gpu_layers}
    if placement is None:
        return params
    gpus = [d for d in placement.devices if d.kind == "gpu" and d.index is not None]
    if placement.device.kind == "cpu":
        params["n_gpu_layers"] = 0
    elif len(gpus) == 1 and len(placement.devices) == 1:
        params.update(split_mode=0, main_gpu=gpus[0].index)  # LLAMA_SPLIT_MODE_NONE
    elif len(gpus) > 1:
        shares = dict(zip(placement.devices, placement.shares or [1] * len(gpus), strict=True))
        split = [0.0] * (max(d.index or 0 for d in gpus) + 1)
        for gpu in gpus:
            split[gpu.index or 0] = float(shares[gpu])
        params.update(split_mode=1, main_gpu=placement.device.index or 0, tensor_split=split)
    return params


def _construct(config: LlamaCppModel, placement: Placement | None = None) -> tuple[Any, int | None]:
    import llama_cpp

    n_seq = config.parallel or 1
    llama, measured = _new_llama(
        n_seq=n_seq,
        model_path=str(config.path),
        n_ctx=config.n_ctx * n_seq,
        n_batch=config.n_batch,
        n_threads=config.n_threads,
        use_mmap=config.use_mmap,
        seed=llama_cpp.LLAMA_DEFAULT_SEED if config.seed is None else config.seed,
        **placement_params(config, placement),
    )
    # llama-cpp-python checks a prompt against the whole context (every sequence's cells), but
    # a chat call has sequence 0's alone: with one sequence the two are the same number.
    llama._n_ctx = llama_cpp.llama_n_ctx_seq(llama.ctx)
    return llama, measured


def _construct_measured(
    config: LlamaCppModel, placement: Placement | None = None
) -> tuple[Any, int | None, int]:
    """:func:`_construct`, and this process's growth over it (see the module docstring)."""
    before = ProcessMemory.now()
    llama, measured = _construct(config, placement)
    return llama, measured, ProcessMemory.now().growth_since(before)


def _new_llama(n_seq: int = 1, **params: Any) -> tuple[Any, int | None]:
    """A ``Llama`` built without touching stdio (see the module docstring), with a context of
    ``n_seq`` sequences, and the buffer bytes llama.cpp logged while building it."""
    global _capture
    from llama_cpp import Llama

    _install_log_callback()
    with _construct_lock:
        lines: list[str] = []
        _capture = lines
        try:
            with _quiet_this_thread() as chatter, _sequences(n_seq):
                llama = Llama(**params, verbose=True)
        except ValueError as exc:
            # llama-cpp-python says only "Failed to load model"; the reason is in the log.
            reasons = [line.strip() for line in lines if "error" in line.lower()]
            raise ValueError(f"{exc}: {reasons[-1]}" if reasons else str(exc)) from None
        finally:
            _capture = None
    llama.verbose = False  # no per-call timing prints from Python
    log.debug("llama-cpp-python said: %s", chatter.getvalue()[:2000])
    return llama, _measured_bytes(lines)


@contextlib.contextmanager
def _sequences(n_seq: int) -> Iterator[None]:
    """Contexts made meanwhile hold ``n_seq`` sequences in a KV cache that is not unified.

    ``Llama(...)`` takes no ``n_seq_max`` (0.3.36 sets it only for embeddings): it fills the
    context's parameters from ``llama_context_default_params()``, looked up on the module at each
    call, so for the length of one construction (under ``_construct_lock``, which every ``Llama``
    localmoa makes is built under) that function returns them with our sequences.

    Not unified (llama.cpp's default, set here explicitly): the n_ctx × n_seq cells are split
    into one stream of n_ctx cells per sequence, so each sample has exactly the n_ctx the plan
    and the reference cut counted, whatever the others do, and attention in a step reads only
    each sequence's own cells. A unified cache would let one sequence take the others' room and
    makes llama.cpp reserve its attention buffers for n_ctx × n_seq positions: measured on a
    tiny model at n_ctx 4096, the compute buffer is 73.5 MiB for 1 or 4 separate sequences and
    289 MiB for 4 unified ones. The price is the prompt's copy to each sequence, a copy of the
    whole stream (n_ctx cells, every layer) rather than shared cells: memory bandwidth, once per
    call, against decoding the prompt k times.
    """
    if n_seq == 1:
        yield
        return
    from llama_cpp import llama_cpp as library

    default = library.llama_context_default_params

    def with_sequences() -> Any:
        params = default()
        params.n_seq_max = n_seq
        params.kv_unified = False
        return params

    library.llama_context_default_params = with_sequences
    try:
        yield
    finally:
        library.llama_context_default_params = default


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


class _Abort:
    """llama.cpp's abort callback on one context: ends a ``llama_decode`` early once the
    current call's stop flag is set.

    The CPU backend asks the callback after every node of the compute graph, and the decode then
    returns 2 ("aborted"; llama-cpp-python raises ``RuntimeError("llama_decode returned 2")``),
    keeping the batches done so far in the KV cache; the next call's ``eval`` removes anything
    past the tokens it knows, so the context stays usable. The callback is armed only while the
    prompt is evaluated: each call into it takes the GIL, negligible beside a node of a
    many-token batch but not beside the tiny nodes of a one-token step, where the logits
    processor already stops a cancelled stream within a token.
    """

    def __init__(self, ctx: Any) -> None:
        import llama_cpp

        self._set = llama_cpp.llama_set_abort_callback
        self.ctx = ctx
        self.stop: threading.Event | None = None
        # Both ctypes objects live as long as the model: llama.cpp keeps the pointer.
        self._callback = llama_cpp.ggml_abort_callback(self._asked)
        self._none = llama_cpp.ggml_abort_callback()  # NULL: no callback

    def _asked(self, data: Any) -> bool:
        stop = self.stop
        return stop is not None and stop.is_set()

    def arm(self, stop: threading.Event) -> None:
        """From the model's worker thread, before a call's prompt is evaluated."""
        self.stop = stop
        self._set(self.ctx, self._callback, None)

    def disarm(self) -> None:
        """From the model's worker thread, between decodes."""
        if self.stop is not None:
            self.stop = None
            self._set(self.ctx, self._none, None)


class _PromptTimer:
    """Times a chat call's evaluation of its prompt: stands in for the model's ``Llama.eval``,
    whose first call after :meth:`arm` is the prompt's (the tokens the kept context does not
    already hold; every later one is a sampled token's). Runs on the model's worker thread."""

    def __init__(self, llama: Any) -> None:
        self._evaluate = llama.eval
        self._armed = False
        self.rate: float | None = None
        """The last armed call's prompt tokens evaluated per second; None when it evaluated
        none (the whole prompt was kept) or failed."""
        llama.eval = self

    def arm(self) -> None:
        self._armed, self.rate = True, None

    def __call__(self, tokens: Sequence[int]) -> None:
        if not self._armed:
            self._evaluate(tokens)
            return
        self._armed = False
        began = time.perf_counter()
        self._evaluate(tokens)
        took = time.perf_counter() - began
        self.rate = len(tokens) / took if tokens and took > 0 else None


@dataclass
class _Loaded:
    llama: Any
    worker: ThreadPoolExecutor
    measured: int | None
    n_ctx: int
    abort: _Abort
    prompt: _PromptTimer
    peak: int
    """This process's growth over the load (RSS, and GPU memory where NVML tells)."""
    busy: list[threading.Event] = field(default_factory=list)


class LlamaCppBackend(Backend):
    """Models from GGUF files, run in this process by llama.cpp."""

    places_models = True

    supports = frozenset(REQUEST_OPTIONS)

    def __init__(self) -> None:
        self._models: dict[str, _Loaded] = {}
        self._vocabs: dict[tuple[str, int, int], Any] = {}  # (path, size, mtime) -> vocab
        self._vocabs_lock = threading.Lock()

    async def footprint(self, name: str, config: Any) -> Footprint:
        if config.memory is not None:
            return Footprint.override(config.memory)
        facts = await asyncio.to_thread(read_gguf, config.path)
        n_seq = config.parallel or 1
        return estimate(facts, n_ctx=config.n_ctx, n_batch=config.n_batch, n_seq=n_seq)

    async def load(self, name: str, config: Any, placement: Placement | None = None) -> None:
        if not isinstance(config, LlamaCppModel):
            raise TypeError(f"LlamaCppBackend cannot load {type(config).__name__}")
        if name in self._models:
            raise BackendError(name, "already loaded")
        if not config.path.is_file():
            raise ModelFileError(f"{config.path}: file not found (model {name})")
        worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"localmoa-{name}")
        loading = asyncio.get_running_loop().run_in_executor(
            worker, _construct_measured, config, placement
        )
        try:
            llama, measured, peak = await asyncio.shield(loading)
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
        abort = _Abort(llama._ctx.ctx)  # llama-cpp-python's context handle
        prompt = _PromptTimer(llama)
        self._models[name] = _Loaded(llama, worker, measured, config.n_ctx, abort, prompt, peak)

    async def unload(self, name: str) -> None:
        loaded = self._models.pop(name, None)
        if loaded is None:
            return
        for stop in loaded.busy:
            stop.set()
        loop = asyncio.get_running_loop()
        # close() runs on the model's own thread, after any call still finishing there (which
        # the stop flags end within a graph node or a token).
        await asyncio.shield(loop.run_in_executor(loaded.worker, _close, loaded.llama))
        loaded.worker.shutdown(wait=True)

    async def chat(self, name: str, request: ChatRequest) -> AsyncIterator[ChatDelta]:
        loaded = self._models.get(name)
        if loaded is None:
            raise BackendError(name, "called while not loaded")
        self.refuse_unsupported(name, request)

        def work(emit: Callable[[Any], None], stop: threading.Event) -> None:
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
                    loaded.abort.disarm()  # the prompt is in: from here this stops the stream
                generated += 1
                # Past max_tokens, or closed: end here. llama-cpp-python's stream ignores
                # max_tokens while its text ends inside a UTF-8 character (random weights can
                # then run to the end of the context), so the limit is enforced here too.
                if stop.is_set() or generated > request.max_tokens:
                    scores = scores.copy()
                    scores[:] = -float("inf")
                    scores[eos] = 0.0
                return scores

            loaded.abort.arm(stop)
            loaded.prompt.arm()
            try:
                for text in _stream(name, loaded.llama, request, each_token):
                    if stop.is_set():
                        return
                    emit(ChatDelta(text, generated - counted))
                    counted = generated
                # The loop samples one token past max_tokens before it notices the limit.
                tokens = min(generated, request.max_tokens) - counted
                if tokens or prompt:
                    emit(ChatDelta("", tokens, prompt, prefill_tok_s=loaded.prompt.rate))
            except BackendError:
                raise
            except Exception as exc:
                raise _failure(name, loaded.n_ctx, request, exc, prompt, generated) from exc
            finally:
                loaded.abort.disarm()

        async for delta in _on_worker(loaded, work):
            yield delta

    async def chat_samples(
        self, name: str, requests: Sequence[ChatRequest], parallel: int
    ) -> AsyncIterator[tuple[int, ChatDelta]]:
        """Stream the answers to ``requests`` (one agent's samples, several prompts' calls, or
        a mix; each request its own messages, seed, temperature, max_tokens, stop and
        response_format) decoded together as sequences of the model's context (see the module
        docstring).

        At most ``parallel`` sequences, and at most the context's, decode at once; more
        requests decode in rounds. Requests with the same messages share one evaluation of
        their prompt. A failure ends them all (a prompt that does not fit the context fails
        the call before anything is decoded); closing the iterator stops them within a token,
        or within a graph node while a prompt is evaluated.
        """
        loaded = self._models.get(name)
        if loaded is None:
            raise BackendError(name, "called while not loaded")
        if not requests:
            return
        for request in requests:
            self.refuse_unsupported(name, request)

        def work(emit: Callable[[Any], None], stop: threading.Event) -> None:
            samples: list[Sample] = []
            try:
                capture = Capture(loaded.llama)
                unfit: list[tuple[int, int, Exception]] = []  # tokens, request, error
                for index, request in enumerate(requests):
                    try:
                        samples.append(Sample.prepare(name, capture, index, request))
                    except ValueError as exc:
                        asked = _ASKED.search(str(exc))
                        if asked is None:
                            raise
                        unfit.append((int(asked[1]), index, exc))
                if unfit:
                    raise _unfit(name, loaded.n_ctx, requests, samples, unfit)
                decode_together(
                    loaded,
                    samples,
                    parallel,
                    stop,
                    lambda i, d: emit((i, d)),
                    self._crowded(loaded),
                )
            except BackendError:
                raise
            except Exception as exc:
                fullest = max(samples, key=lambda s: s.prompt_tokens + s.generated, default=None)
                request = requests[fullest.index if fullest else 0]
                prompt, generated = (
                    (fullest.prompt_tokens, fullest.generated) if fullest else (0, 0)
                )
                raise _failure(name, loaded.n_ctx, request, exc, prompt, generated) from exc
            finally:
                for sample in samples:
                    sample.sampler.close()

        async for piece in _on_worker(loaded, work):
            yield piece

    def _crowded(self, loaded: _Loaded) -> Callable[[], bool]:
        """Whether another loaded model is computing now (read from ``loaded``'s worker: a
        list's truth, racy by a token at worst)."""
        return lambda: any(
            other.busy for other in list(self._models.values()) if other is not loaded
        )

    async def count_tokens(self, name: str, config: Any, messages: list[ChatMessage]) -> int:
        """Exact: the model's chat template and tokenizer (:meth:`prompt_tokens`)."""
        return await self.prompt_tokens(name, config, messages)

    async def prompt_tokens(self, name: str, config: Any, messages: list[ChatMessage]) -> int:
        """The tokens ``messages`` take in model ``name``'s context, counted as a chat call
        counts them (the model's chat template, then its tokenizer), from the file's vocabulary
        alone: no weights are loaded. BackendError when the vocabulary cannot be read.

        Tokenizing is native code that cannot be interrupted and is slow on some text (it grows
        faster than the length: 160,000 repeated characters take seconds). It runs in a daemon
        thread, not in the event loop's pool: a cancelled caller (a client gone, a signal)
        stops waiting at once and leaves the thread to end on its own, and the process never
        waits for it on exit.
        """
        if not isinstance(config, LlamaCppModel):
            raise TypeError(f"LlamaCppBackend cannot count tokens for {type(config).__name__}")
        loop = asyncio.get_running_loop()
        counted: asyncio.Future[int] = loop.create_future()

        def give(tokens: int) -> None:
            if not counted.done():  # done: the caller gave up
                counted.set_result(tokens)

        def fail(error: BaseException) -> None:
            if not counted.done():
                counted.set_exception(error)

        def work() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
                try:
                    tokens = _count(self._vocab(config.path), messages)
                except Exception as exc:
                    error = BackendError(name, f"cannot count the prompt's tokens: {exc}")
                    error.__cause__ = exc
                    loop.call_soon_threadsafe(fail, error)
                else:
                    loop.call_soon_threadsafe(give, tokens)

        threading.Thread(target=work, name=f"tokenize-{name}", daemon=True).start()
        return await counted

    def _vocab(self, path: Path) -> Any:
        """The vocabulary-only ``Llama`` of ``path`` (tokenizer and chat template, no weights),
        kept for the next prompt; a file changed since is read again."""
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with self._vocabs_lock:
            vocab = self._vocabs.get(key)
            if vocab is None:
                # The smallest context and batch: llama-cpp-python still makes a context, and
                # sizes its token and logits arrays (n_batch x n_vocab floats) by them.
                vocab, _ = _new_llama(model_path=str(path), vocab_only=True, n_ctx=16, n_batch=16)
                self._vocabs = {k: v for k, v in self._vocabs.items() if k[0] != key[0]}
                self._vocabs[key] = vocab
        return vocab

    def resident_bytes(self, name: str) -> int | None:
        loaded = self._models.get(name)
        return loaded.measured if loaded else None

    def load_peak_bytes(self, name: str) -> int | None:
        """This process's growth over model ``name``'s load (other threads' allocations
        meanwhile included: see :mod:`localmoa.footprint.measurements`)."""
        loaded = self._models.get(name)
        return loaded.peak if loaded else None

    def loaded(self) -> list[str]:
        return list(self._models)


async def _on_worker(
    loaded: _Loaded, work: Callable[[Callable[[Any], None], threading.Event], None]
) -> AsyncIterator[Any]:
    """Run ``work(emit, stop)`` on the model's worker thread and yield what it emits, as it
    emits it; what it raises is raised here. Closing the iterator sets ``stop`` (which ends
    the work within a token, or within a graph node of a prompt's evaluation) and waits for
    the worker, so the model is free again when this returns; whatever the work emits or
    raises after ``stop`` is nobody's and is dropped (a decode aborted on purpose)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    stop = threading.Event()
    loaded.busy.append(stop)

    def put(kind: str, value: Any) -> None:
        if not stop.is_set():
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

    def run() -> None:
        try:
            work(lambda value: put("item", value), stop)
        except Exception as exc:
            put("error", exc)
        else:
            put("done", None)

    future = loop.run_in_executor(loaded.worker, run)
    try:
        while True:
            kind, value = await queue.get()
            if kind == "error":
                raise value
            if kind == "done":
                return
            yield value
    finally:
        stop.set()
        loaded.busy.remove(stop)
        await asyncio.shield(future)


_ASKED = re.compile(r"Requested tokens \((\d+)\) exceed context window")


def _failure(
    name: str, n_ctx: int, request: ChatRequest, exc: Exception, prompt: int, generated: int
) -> BackendError:
    """A failed call as a BackendError. A context overflow, in each form llama-cpp-python gives
    it, names the n_ctx and what to do:

    - ``Requested tokens (N) exceed context window of C``: the prompt alone does not fit;
    - ``llama_decode returned 1`` (no KV slot): the answer filled the context;
    - ``could not broadcast input array ...``: the same, when llama.cpp rounded the context up
      (to a multiple of 256) past the configured n_ctx, whose size llama-cpp-python's token
      array keeps.
    """
    text = str(exc)
    asked = _ASKED.search(text)
    if asked:
        tokens = int(asked[1])
        why = _too_long(name, n_ctx, tokens, tokens + request.max_tokens)
    elif text == "llama_decode returned 1" or "could not broadcast input array" in text:
        used = f": {prompt} prompt tokens + {generated} generated" if generated else ""
        why = (
            f"the context is full (n_ctx {n_ctx}{used}); raise n_ctx of [models.{name}] or "
            "lower max_tokens / shorten the prompt"
        )
    else:
        why = f"generation failed: {exc}"
    error = BackendError(name, why)
    error.__cause__ = exc
    return error


def _too_long(name: str, n_ctx: int, tokens: int, needed: int, unfit: int = 1, of: int = 1) -> str:
    """Why a call failed whose prompt of ``tokens`` does not fit, and the n_ctx that holds it
    and its answer (``needed``); with ``of`` prompts in the call, ``unfit`` of them too long,
    ``tokens`` is the longest's."""
    fix = f"raise n_ctx of [models.{name}] to at least {needed}"
    if of == 1:
        return (
            f"the prompt's {tokens} tokens do not fit the context (n_ctx {n_ctx}); {fix}, "
            "or shorten the prompt"
        )
    if unfit == 1:
        return (
            f"1 of {of} prompts does not fit the context (n_ctx {n_ctx}): it has {tokens} "
            f"tokens; {fix}, or shorten it"
        )
    return (
        f"{unfit} of {of} prompts do not fit the context (n_ctx {n_ctx}): the longest has "
        f"{tokens} tokens; {fix}, or shorten them"
    )


def _unfit(
    name: str,
    n_ctx: int,
    requests: Sequence[ChatRequest],
    samples: list[Sample],
    unfit: list[tuple[int, int, Exception]],
) -> BackendError:
    """The failure of a :meth:`LlamaCppBackend.chat_samples` call some of whose prompts do not
    fit the context (``unfit``: tokens, the request's index and llama-cpp-python's error): it
    names the longest, and the n_ctx that would give every request its whole max_tokens."""
    sizes = [(s.prompt_tokens, s.index) for s in samples] + [(t, i) for t, i, _ in unfit]
    needed = max(tokens + requests[index].max_tokens for tokens, index in sizes)
    tokens, _, exc = max(unfit, key=lambda u: u[0])
    too_long = {index for _, index, _ in unfit}
    prompts: list[list[ChatMessage]] = []  # distinct, in order (messages are not hashable)
    unfit_prompts: list[list[ChatMessage]] = []
    for index, request in enumerate(requests):
        if request.messages not in prompts:
            prompts.append(request.messages)
        if index in too_long and request.messages not in unfit_prompts:
            unfit_prompts.append(request.messages)
    why = _too_long(name, n_ctx, tokens, needed, len(unfit_prompts), len(prompts))
    error = BackendError(name, why)
    error.__cause__ = exc
    return error


def _stream(name: str, llama: Any, request: ChatRequest, each_token: Any) -> Iterator[str]:
    from llama_cpp import LLAMA_DEFAULT_SEED, LogitsProcessorList

    grammar = grammar_for(name, request.response_format)
    chunks = llama.create_chat_completion(
        messages=[m.model_dump() for m in request.messages],
        temperature=request.temperature,
        max_tokens=request.max_tokens,
        stop=request.stop or [],
        seed=None if request.seed is None else request.seed % LLAMA_DEFAULT_SEED,
        grammar=grammar,
        logits_processor=LogitsProcessorList([each_token]),
        stream=True,
    )
    for chunk in chunks:
        text = chunk["choices"][0]["delta"].get("content")
        if text:
            yield text


class _Counted(Exception):
    def __init__(self, tokens: int) -> None:
        super().__init__(tokens)
        self.tokens = tokens


class _Counter:
    """Stands in for a ``Llama`` in ``Llama.create_chat_completion``: the model's own chat
    handler formats and tokenizes with the real vocabulary, exactly as in a call, and the count
    is taken where evaluation would begin."""

    def __init__(self, vocab: Any) -> None:
        self._vocab = vocab

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vocab, name)

    def create_completion(self, prompt: Any, **kwargs: Any) -> Any:
        if isinstance(prompt, str):
            prompt = self._vocab.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        raise _Counted(len(prompt))


def _count(vocab: Any, messages: list[ChatMessage]) -> int:
    from llama_cpp import Llama

    complete: Any = Llama.create_chat_completion  # called with the stand-in as ``self``
    try:
        complete(_Counter(vocab), messages=[m.model_dump() for m in messages], max_tokens=1)
    except _Counted as counted:
        return counted.tokens
    raise RuntimeError("llama-cpp-python's chat handler never asked for a completion")
