"""Several answers decoded together as sequences of one llama.cpp context: the batched half of
:mod:`localmoa.backends.llamacpp`. The answers may be one prompt's (an agent's ``samples``,
Self-MoA) or several prompts' (one model's calls for the prompts of a batch, or for concurrent
``serve`` requests), in any mix.

Each prompt is built exactly as a chat call builds it (:class:`Capture` runs llama-cpp-python's
own ``create_chat_completion`` and takes over where generation would start: its chat template,
stop strings, context check and sampler chain). Up to ``width`` sequences decode at a time, in
rounds. A round evaluates each of its distinct prompts into a sequence of its own, ``n_batch``
tokens a decode, and the samples of that prompt sample their first token right away (the next
decode overwrites the logits); the prompt's sequence is then copied to its other samples' with
``llama_memory_seq_cp``, so identical prompts are evaluated once. Then each step is one
``llama_decode`` with one token per live sequence, each at its own position (its prompt's length
plus what it has generated), each sampled by its own chain. Text is released per sequence with
stop strings held back while they may still match, UTF-8 decoded incrementally. Everything
here runs on the model's worker thread, like a chat call.

Prompts are not packed into one decode: a prompt's evaluation is already a product over many
tokens, bound by compute, so packing would save little, and with one cache stream per sequence
llama.cpp splits such a batch into equal shares per sequence anyway (``split_equal``). The
steps, one token per sequence, are where sharing one read of the weights pays. What a round
keeps of the last is a sequence's prompt cells: the next prompt goes to the sequence that holds
the longest start of it (for one prompt's samples over several rounds, all but the last token,
evaluated again for its logits; for different prompts, often the chat template's opening).

Each sample's last delta says its prompt's evaluation rate, timed around that evaluation (the
first, when a later round evaluated only its last token again): the engine's estimate from the
stream (prompt tokens over the time to the first token) would count, for a sample of a later
round or a later prompt, what was decoded before it.
"""

from __future__ import annotations

import codecs
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from localmoa.backends.base import ChatDelta, ChatRequest, ResponseFormat
from localmoa.errors import BackendError

if TYPE_CHECKING:
    from localmoa.backends.llamacpp import _Loaded

__all__ = ["Capture", "Sample", "decode_together", "grammar_for", "stop_prefix"]


def grammar_for(name: str, response_format: ResponseFormat | None) -> Any:
    """The llama.cpp grammar that keeps the answer to ``response_format``; None for free text.
    A schema llama.cpp cannot express is a BackendError naming it (see the module docstring)."""
    if response_format is None or response_format.type == "text":
        return None
    from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

    schema = response_format.json_schema
    if schema is None:
        return LlamaGrammar.from_string(JSON_GBNF, verbose=False)
    try:
        return LlamaGrammar.from_json_schema(json.dumps(schema.schema_), verbose=False)
    except Exception as exc:  # the converter asserts, or raises whatever its parser does
        raise BackendError(
            name,
            f'response_format: llama.cpp cannot turn the JSON schema "{schema.name}" into a '
            f"grammar ({exc}); simplify the schema",
        ) from exc


class Captured(Exception):
    def __init__(self, tokens: list[int], options: dict[str, Any]) -> None:
        super().__init__(len(tokens))
        self.tokens = tokens
        self.options = options


class Capture:
    """Stands in for a loaded ``Llama`` in ``Llama.create_chat_completion``, so that a sample's
    prompt, stop strings, seed and sampler are exactly a chat call's: the model's chat handler
    formats the prompt and adds its own stop strings, ``Llama._create_completion`` tokenizes it,
    checks it against the context (raising as in a call) and sets the seed, and the call is
    taken over where it would start generating.

    The seed is set on the real ``Llama`` as a call sets it, so samples without a seed get the
    seeds that as many calls in a row would. A prompt is tokenized once for all the samples.
    """

    def __init__(self, llama: Any) -> None:
        self._llama = llama
        self._tokenized: dict[tuple[bytes, bool, bool], list[int]] = {}
        self.completion: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llama, name)

    def tokenize(self, text: bytes, add_bos: bool = True, special: bool = False) -> list[int]:
        key = (text, add_bos, special)
        if key not in self._tokenized:
            self._tokenized[key] = self._llama.tokenize(text, add_bos=add_bos, special=special)
        return list(self._tokenized[key])

    def create_completion(self, **completion: Any) -> Any:
        from llama_cpp import Llama

        self.completion = completion
        create: Any = Llama._create_completion  # called with the stand-in as ``self``
        next(create(self, **completion))
        raise RuntimeError("llama-cpp-python's completion never began to generate")

    def generate(self, tokens: Sequence[int], **options: Any) -> Any:
        raise Captured(list(tokens), options)


@dataclass
class Sample:
    """One request's sequence: its sampler chain, stop strings and limit, and its answer so far.

    Text is released as it becomes certain: bytes wait for the rest of their UTF-8 character
    (invalid bytes are dropped, as a chat call drops them), and the end of the text waits while
    it may be the start of a stop string.
    """

    index: int
    prompt: list[int]
    sampler: Any
    stops: list[str]
    limit: int
    """max_tokens, capped to the room the prompt leaves in the sequence's n_ctx (as a call)."""
    criteria: Any
    """The chat handler's stopping criteria, or None."""
    seq: int = 0
    """Its sequence in the context, in its round."""
    at: int = -1
    """The row of the last decode's logits this sequence samples from."""
    tokens: list[int] = field(default_factory=list)
    prefill_tok_s: float | None = None
    """Its prompt's evaluation rate, told on the last delta."""
    generated: int = 0
    counted: int = 0
    done: bool = False
    pending: str = ""
    ids: Any = None
    """The prompt and answer's tokens as the stopping criteria see them (numpy)."""
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("ignore")
    )

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @classmethod
    def prepare(cls, name: str, capture: Capture, index: int, request: ChatRequest) -> Sample:
        """Everything a chat call would decide before generating, for ``request``."""
        from llama_cpp import LLAMA_DEFAULT_SEED, Llama

        complete: Any = Llama.create_chat_completion  # called with the stand-in as ``self``
        try:
            complete(
                capture,
                messages=[m.model_dump() for m in request.messages],
                temperature=request.temperature,
                max_tokens=request.max_tokens,
                stop=request.stop or [],
                seed=None if request.seed is None else request.seed % LLAMA_DEFAULT_SEED,
                grammar=grammar_for(name, request.response_format),
                stream=True,
            )
        except Captured as captured:
            options = captured.options
            criteria = options.pop("stopping_criteria", None)
            init: Any = Llama._init_sampler  # reads the seed just set on the real Llama
            return cls(
                index=index,
                prompt=captured.tokens,
                sampler=init(capture, **options),
                stops=[s for s in capture.completion.get("stop") or [] if s],
                limit=min(request.max_tokens, capture._n_ctx - len(captured.tokens)),
                criteria=criteria,
            )
        raise RuntimeError("llama-cpp-python's chat handler never asked for a completion")

    def take(self, llama: Any, token: int) -> ChatDelta | None:
        """Account for the sampled ``token`` (``done`` once it ends the answer): the delta to
        send, None while the token brought no text; the last delta has ``prompt_tokens``."""
        import llama_cpp

        self.generated += 1
        end = llama_cpp.llama_vocab_is_eog(llama._model.vocab, token) or self._criteria_met(llama)
        if not end:
            self.tokens.append(token)
        final = end or self.generated >= self.limit
        text, stopped = self._release(b"" if end else llama.detokenize([token]), final)
        self.done = final or stopped
        if not text and not self.done:
            return None
        tokens, self.counted = self.generated - self.counted, self.generated
        if not self.done:
            return ChatDelta(text, tokens)
        return ChatDelta(text, tokens, self.prompt_tokens, prefill_tok_s=self.prefill_tok_s)

    def _criteria_met(self, llama: Any) -> bool:
        """The chat handler's stopping criteria, asked as a chat call asks them: with the
        tokens before the one just sampled and the logits it was sampled from."""
        if self.criteria is None:
            return False
        import llama_cpp
        import numpy as np

        if self.ids is None:  # one array for the whole answer: prompts run to thousands
            self.ids = np.zeros(len(self.prompt) + self.limit, dtype=np.intc)
            self.ids[: len(self.prompt)] = self.prompt
        seen = len(self.prompt) + len(self.tokens)
        if self.tokens:
            self.ids[seen - 1] = self.tokens[-1]
        logits = llama_cpp.llama_get_logits_ith(llama.ctx, self.at)
        scores = np.ctypeslib.as_array(logits, shape=(llama.n_vocab(),))
        return bool(self.criteria(self.ids[:seen], scores))

    def _release(self, piece: bytes, final: bool) -> tuple[str, bool]:
        """The text now certain, and whether a stop string ended the answer."""
        self.pending += self.decoder.decode(piece, final)
        found = [at for at in (self.pending.find(s) for s in self.stops) if at >= 0]
        if found:
            text, self.pending = self.pending[: min(found)], ""
            return text, True
        held = 0 if final else stop_prefix(self.pending, self.stops)
        text = self.pending[: len(self.pending) - held]
        self.pending = self.pending[len(text) :]
        return text, False


def stop_prefix(text: str, stops: list[str]) -> int:
    """The length of the longest end of ``text`` that begins one of ``stops``."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def decode_together(
    loaded: _Loaded,
    samples: list[Sample],
    parallel: int,
    stop: threading.Event,
    emit: Callable[[int, ChatDelta], None],
    crowded: Callable[[], bool] = lambda: False,
) -> None:
    """Decode ``samples`` together, ``parallel`` (at most the context's sequences) at a time,
    from the model's worker thread; return early once ``stop`` is set. The context is left
    empty, as after a load.

    Threads: llama.cpp gives a decode of more than one token its batch threads (all cores by
    default) and one token its decode threads (half). A step of several sequences is the
    former; alone on the device it should have them all, but while other models compute too
    (``crowded``: a layer's agents decode at once), as many busy threads as cores each
    oversubscribe the CPU and every model slows down, so the step gets the decode threads.
    Measured on 2 cores (``scripts/bench_serve.py --large``): three ~100 MB models serving 8
    requests at once, each model's calls made together, 1.41x the throughput of one call per
    model turn (4 requests: 1.14x). A batch whose models run one at a time keeps the batch
    threads (``scripts/bench_batch.py``).

    The samples of one prompt are taken next to each other, so that they share a round and
    its one evaluation; no answer depends on that order (each sample samples with its own
    chain, and its deltas are told by its index).
    """
    import llama_cpp

    llama = loaded.llama
    memory = llama_cpp.llama_get_memory(llama.ctx)
    width = max(1, min(parallel, llama_cpp.llama_n_seq_max(llama.ctx), llama.n_batch))
    rank: dict[tuple[int, ...], int] = {}
    for sample in samples:
        rank.setdefault(tuple(sample.prompt), len(rank))
    ordered = sorted(samples, key=lambda sample: rank[tuple(sample.prompt)])
    rounds = _Rounds(loaded, memory, width, stop, emit)
    threads = _Threads(llama)
    llama_cpp.llama_memory_clear(memory, True)
    llama.reset()
    try:
        for first in range(0, len(ordered), width):
            if stop.is_set():
                return
            threads.fit(crowded())
            live = rounds.begin(ordered[first : first + width])
            while live and not stop.is_set():
                threads.fit(crowded())
                step(llama, rounds.batch, live)
                rounds.take(live)
                live = [sample for sample in live if not sample.done]
    finally:
        threads.fit(False)
        rounds.batch.close()
        llama_cpp.llama_memory_clear(memory, True)
        llama.reset()


class _Threads:
    """The threads a batch of several tokens decodes with: the batch's own, or the decode's
    while other models compute (see :func:`decode_together`)."""

    def __init__(self, llama: Any) -> None:
        self.llama = llama
        self.crowded = False

    def fit(self, crowded: bool) -> None:
        if crowded != self.crowded:
            import llama_cpp

            batch = self.llama.n_threads if crowded else self.llama.n_threads_batch
            llama_cpp.llama_set_n_threads(self.llama.ctx, self.llama.n_threads, batch)
            self.crowded = crowded


class _Rounds:
    """What a round of :func:`decode_together` starts from: the cells each sequence holds from
    the rounds before, and each prompt's evaluation rate."""

    def __init__(
        self,
        loaded: _Loaded,
        memory: Any,
        width: int,
        stop: threading.Event,
        emit: Callable[[int, ChatDelta], None],
    ) -> None:
        from llama_cpp._internals import LlamaBatch

        self.loaded, self.llama, self.memory = loaded, loaded.llama, memory
        self.stop, self.emit = stop, emit
        self.batch: Any = LlamaBatch(
            n_tokens=self.llama.n_batch, embd=0, n_seq_max=1, verbose=False
        )
        self.held: list[list[int]] = [[] for _ in range(width)]
        """The prompt tokens each sequence holds, from position 0 (what was generated after
        them is removed before the sequence is used again)."""
        self.rates: dict[tuple[int, ...], float] = {}
        """Each prompt's first evaluation, tokens per second: a later round that evaluates
        only its last token again says nothing about the rate."""

    def begin(self, group: list[Sample]) -> list[Sample]:
        """Start a round of ``group`` (at most ``width`` samples): each distinct prompt is
        evaluated into a sequence, its samples sample their first token at once (the next
        prompt's evaluation overwrites the logits) and those still going get copies of the
        sequence. The samples still live, on sequences 0 to ``len(group) - 1``."""
        import llama_cpp

        prompts: dict[tuple[int, ...], list[Sample]] = {}
        for sample in group:
            prompts.setdefault(tuple(sample.prompt), []).append(sample)
        free = list(range(len(group)))
        homes: dict[tuple[int, ...], int] = {}
        for prompt in prompts:
            # The sequence that holds the most of it already: for the prompt the last round
            # ended with, all but its last token; else often the chat template's opening.
            home = max(free, key=lambda seq: shared(self.held[seq], prompt))
            free.remove(home)
            homes[prompt] = home
        live: list[Sample] = []
        for prompt, members in prompts.items():
            if self.stop.is_set():
                break
            home = homes[prompt]
            last = self.evaluate(list(prompt), home)
            for sample in members:
                sample.seq = home if sample is members[0] else free.pop(0)
                sample.at, sample.prefill_tok_s = last, self.rates.get(prompt)
            self.take(members)
            for sample in members:
                if sample.seq != home and not sample.done:
                    llama_cpp.llama_memory_seq_rm(self.memory, sample.seq, -1, -1)
                    llama_cpp.llama_memory_seq_cp(self.memory, home, sample.seq, -1, -1)
                    self.held[sample.seq] = list(prompt)
            live += [sample for sample in members if not sample.done]
        return live

    def evaluate(self, prompt: list[int], seq: int) -> int:
        """Evaluate ``prompt`` into sequence ``seq``, past what it already holds of it (the
        last token at least, for its logits), with the abort callback armed; the row of the
        last token's logits."""
        import llama_cpp

        keep = min(shared(self.held[seq], prompt), len(prompt) - 1)
        llama_cpp.llama_memory_seq_rm(self.memory, seq, keep, -1)
        self.held[seq] = prompt[:keep]
        self.loaded.abort.arm(self.stop)
        began = time.perf_counter()
        try:
            last = evaluate(self.llama, self.batch, prompt, keep, seq)
        finally:
            self.loaded.abort.disarm()
        took = time.perf_counter() - began
        self.held[seq] = prompt
        if tuple(prompt) not in self.rates and took > 0:
            self.rates[tuple(prompt)] = (len(prompt) - keep) / took
        return last

    def take(self, samples: list[Sample]) -> None:
        """Sample each of ``samples``' next token from the last decode and emit its text."""
        for sample in samples:
            delta = sample.take(self.llama, sample.sampler.sample(self.llama._ctx, sample.at))
            if delta is not None:
                self.emit(sample.index, delta)


def shared(held: Sequence[int], prompt: Sequence[int]) -> int:
    """How many tokens ``held`` and ``prompt`` begin with in common."""
    count = 0
    for a, b in zip(held, prompt, strict=False):
        if a != b:
            break
        count += 1
    return count


def evaluate(llama: Any, batch: Any, prompt: list[int], start: int, seq: int) -> int:
    """Evaluate ``prompt[start:]`` on sequence ``seq``, ``n_batch`` tokens a decode; the row
    of the last token's logits."""
    size = int(llama.n_batch)
    for begin in range(start, len(prompt), size):
        chunk = prompt[begin : begin + size]
        native = batch.batch
        native.n_tokens = len(chunk)
        for i, token in enumerate(chunk):
            native.token[i] = token
            native.pos[i] = begin + i
            native.n_seq_id[i] = 1
            native.seq_id[i][0] = seq
            native.logits[i] = begin + i == len(prompt) - 1
        llama._ctx.decode(batch)
    return (len(prompt) - 1 - start) % size


def step(llama: Any, batch: Any, live: list[Sample]) -> None:
    """Decode the last sampled token of every live sequence, one ``llama_decode`` for all,
    each at its own position (the prompts' lengths differ)."""
    native = batch.batch
    native.n_tokens = len(live)
    for i, sample in enumerate(live):
        native.token[i] = sample.tokens[-1]
        native.pos[i] = len(sample.prompt) + len(sample.tokens) - 1
        native.n_seq_id[i] = 1
        native.seq_id[i][0] = sample.seq
        native.logits[i] = True
        sample.at = i
    llama._ctx.decode(batch)
