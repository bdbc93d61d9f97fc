"""What a model costs in memory once loaded, read from its GGUF header without loading weights.

    total = weights + kv_cache + compute

- **weights**: the tensor table's bytes (every tensor's type and shape is in the header, so a
  sparse or not-yet-read file is sized exactly). Equals llama.cpp's logged "model buffer".
- **kv_cache**: ``2 · n_layer · n_head_kv · head_dim · n_ctx · 2 · n_seq``. The first 2 is K and
  V, the second is f16, llama-cpp-python's default cache type. ``head_dim`` is
  ``attention.key_length`` / ``value_length`` when declared (K and V may differ), else
  ``n_embd / n_head``; per-layer ``head_count_kv`` arrays are summed. ``n_ctx`` is padded to
  llama.cpp's 256-cell granularity. This is Ollama's server estimate (``PredictServerVRAM``,
  llm/llama_server.go) with declared head sizes honoured; sliding-window layers count at full
  context (an over-estimate). ``n_seq`` is the sequences decoded together (an agent's samples),
  each in its own stream of ``n_ctx`` cells: llama.cpp's non-unified KV cache, which localmoa
  loads for them (see :mod:`localmoa.backends.llamacpp`).
- **compute**: everything llama.cpp allocates beside weights and cache, per context
  (``ub = min(n_ctx, n_batch, 512)``, the micro-batch; llama-cpp-python's ``n_ubatch`` is 512):

  - graph buffer ``ub · max(A, F, L) + 256 KiB``: ggml reuses memory across the graph, so it is
    the largest phase, not a sum. Attention ``A = 4·n_ctx·(n_head+1) + 20·n_embd + 8·n_embd_kv``
    (f32 scores of every head and the f32 mask), feed-forward
    ``F = 12·n_ff + 4·n_ctx + 20·n_embd``, logits ``L = 4·n_vocab + 12·n_embd``;
  - ggml's CPU work buffer ``ub · (2·max(n_embd, n_ff) + 2·n_ctx·n_head)`` (the scores as f16
    for the product with V; not in llama.cpp's log, but in RSS);
  - the output buffer ``4·n_vocab·n_seq`` (a row of logits per sequence) and 8 MiB fixed per
    model (3-5 MiB measured: context, sampler, thread pool).

  With ``n_seq`` sequences the graph and work buffers do not grow: each stream attends over its
  own ``n_ctx`` cells, so the worst case is still one sequence's ``ub`` tokens (measured: the
  compute buffer llama.cpp logs is the same for 1, 4 and 16 sequences; the output buffer grows
  by one row each).

The constants were fitted by ``scripts/calibrate_memory.py`` on 99 shapes and contexts
(n_embd 64-1024, n_ff to 8192, vocab to 65536, ctx 512-8192): the graph buffer formula is 1.00 to
1.07 times what llama.cpp logs, never below. The whole sum is checked against process RSS by
``scripts/bench_memory.py`` (README, "Memory estimate"). Flash attention (off by default in
llama-cpp-python) would only shrink the buffers, so the estimate stays an upper bound.

``memory = "6GiB"`` in models.toml replaces the whole estimate, as-is.

Every fact is checked before it enters the formula, because a model file (or an Ollama server's
``model_info``) is input from elsewhere: a negative layer count once gave a negative footprint
that the planner's cost model never finished with. Each must be an integer (not a string, float,
bool or array of the wrong kind) within these limits, each far beyond any real model; the
per-layer keys may also be arrays of one such integer per layer, checked element by element.

=============================  ===========  =======================================================
``ARCH.block_count``           1 to 4096    8 times llama.cpp's own LLAMA_MAX_LAYERS (512)
``ARCH.embedding_length``      1 to 2^20    real models: up to 16,384 (Llama 3.1 405B)
``ARCH.attention.head_count``  0 to 16,384  per layer; 0 for attention-free layers and models
``…head_count_kv``             0 to 16,384  per layer
``…key_length``, ``value_…``   0 to 65,536  real models: up to 576 (MLA)
``ARCH.feed_forward_length``   0 to 2^20    per layer; real models: up to 53,248
``ARCH.vocab_size`` (or the    0 to 2^24    real models: up to 262,144
token list's length)
``ARCH.context_length``        0 to 2^32    only reported; real models: up to 10M
weights (the tensors' bytes)   0 to 1 PiB   the largest size localmoa accepts (localmoa.sizes)
=============================  ===========  =======================================================

A fact outside them is a :class:`~localmoa.footprint.gguf.GGUFError` naming the key and its value
(a missing key stays a ``KeyError``); :func:`read_gguf` turns both into a
:class:`~localmoa.errors.ModelFileError` naming the file. With the limits (and ``n_ctx`` at most
2^30 and at most 64 sequences, localmoa.backends.configs), every footprint is a positive whole
number of bytes below 2^81: :class:`Footprint` refuses a negative part, so no other code has to
wonder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from localmoa.errors import ModelFileError
from localmoa.footprint.gguf import ArrayInfo, GGUFError, LongString, printable, read_header
from localmoa.sizes import MAX_SIZE

__all__ = [
    "LIMITS",
    "Footprint",
    "GGUFFacts",
    "compute_bytes",
    "estimate",
    "facts_from_metadata",
    "graph_bytes",
    "kv_cache_bytes",
    "padded_ctx",
    "read_gguf",
    "work_bytes",
]

MiB = 1 << 20
KV_BYTES_PER_ELEMENT = 2  # f16 K and V caches, llama-cpp-python's default type_k/type_v
CTX_PAD = 256  # llama.cpp pads n_ctx to a multiple of this
N_UBATCH = 512  # llama-cpp-python's default micro-batch
GRAPH_SLACK = MiB // 4  # covers ggml's rounding of the graph buffer
FIXED_PER_MODEL = 8 * MiB  # context, sampler, thread pool: 3-5 MiB measured

LIMITS: dict[str, tuple[int, int]] = {
    "block_count": (1, 4096),
    "embedding_length": (1, 1 << 20),
    "attention.head_count": (0, 1 << 14),
    "attention.head_count_kv": (0, 1 << 14),
    "attention.key_length": (0, 1 << 16),
    "attention.value_length": (0, 1 << 16),
    "feed_forward_length": (0, 1 << 20),
    "vocab_size": (0, 1 << 24),
    "context_length": (0, 1 << 32),
}
"""Each fact's smallest and largest value, under its key after ``ARCH.`` (module docstring)."""


@dataclass(frozen=True)
class GGUFFacts:
    """The header facts the estimate needs."""

    path: Path
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv_total: int
    """Σ over layers of KV heads (n_layer · head_count_kv for uniform models)."""
    key_length: int
    value_length: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    weights_bytes: int


@dataclass(frozen=True)
class Footprint:
    """Bytes a loaded model holds, by part, and where the figure comes from."""

    weights: int
    kv_cache: int
    compute: int
    source: Literal["gguf", "override", "ollama", "measured", "server"]
    """gguf: estimated from the file's header; override: the config's ``memory``; ollama:
    estimated from Ollama's model facts; measured: what a previous load really held; server: an
    OpenAI-compatible server's own model, outside localmoa's budget (0 bytes)."""
    note: str = ""

    def __post_init__(self) -> None:
        # The planner and its cost model assume sizes that only add up: a negative part once
        # made the cost model search forever.
        for part in ("weights", "kv_cache", "compute"):
            value = getattr(self, part)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"footprint {part} must be a whole number of bytes ≥ 0: {value!r}")

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    @classmethod
    def override(cls, total: int) -> Footprint:
        return cls(weights=total, kv_cache=0, compute=0, source="override")


def read_gguf(path: Path) -> GGUFFacts:
    """Read the header facts of a GGUF file; ModelFileError if it is missing or not usable."""
    if not path.exists():
        raise ModelFileError(f"{path}: file not found; check the model's path in models.toml")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a file; point the model's path at a .gguf file")
    try:
        header = read_header(path)
        tokens = header.metadata.get("tokenizer.ggml.tokens")
        return facts_from_metadata(
            header.metadata,
            path=path,
            weights=sum(header.tensor_bytes.values()),
            vocab=tokens.length if isinstance(tokens, ArrayInfo) else 0,
        )
    except PermissionError as exc:
        raise ModelFileError(f"{path}: cannot read: {exc.strerror}") from None
    except (OSError, GGUFError) as exc:
        raise ModelFileError(
            f"{path}: not a valid GGUF file ({exc}); the file may be truncated or not a "
            "model: download or convert it again"
        ) from None
    except KeyError as exc:
        raise ModelFileError(
            f"{path}: GGUF header lacks {exc.args[0]}; not a model file localmoa can size"
        ) from None


def facts_from_metadata(
    meta: Mapping[str, Any], *, path: Path, weights: int, vocab: int = 0
) -> GGUFFacts:
    """The facts from GGUF-style metadata (a file's header, or Ollama's ``model_info``).

    ``vocab`` is the vocabulary size when the metadata has no ``vocab_size`` (the length of the
    token list). KeyError names a required key that is missing; GGUFError (a ValueError) names
    a key whose value breaks the limits in the module docstring.
    """
    arch = meta.get("general.architecture")
    if arch is None or isinstance(arch, LongString):
        raise KeyError("general.architecture")
    if not isinstance(arch, str) or not 0 < len(arch) <= 64 or not arch.isprintable():
        raise GGUFError(f"general.architecture = {_show(arch)}: must be a name such as 'llama'")
    if not 0 <= weights <= MAX_SIZE:
        raise GGUFError(f"the tensors' {weights:,} bytes are not a size (0 to 1 PiB)")
    if not 0 <= vocab <= LIMITS["vocab_size"][1]:
        raise GGUFError(f"tokenizer.ggml.tokens has {vocab:,} entries: too many for a vocabulary")

    def given(key: str) -> Any:
        value = meta.get(f"{arch}.{key}")
        # Ollama blanks long arrays in /api/show unless asked to be verbose: as if missing.
        return None if value is None or value == [] else value

    def number(key: str, default: int | None = None) -> int:
        """A per-model number within its limits; KeyError when missing and required."""
        value = given(key)
        if value is None:
            if default is None:
                raise KeyError(f"{arch}.{key}")
            return default
        return _whole(f"{arch}.{key}", value, LIMITS[key])

    def per_layer(key: str, default: list[int] | None = None) -> list[int]:
        """One number per layer: an array of them, or one number for every layer."""
        value, name = given(key), f"{arch}.{key}"
        if value is None:
            if default is None:
                raise KeyError(name)
            return default
        if not isinstance(value, list | ArrayInfo):
            return [_whole(name, value, LIMITS[key])] * n_layer
        length = value.length if isinstance(value, ArrayInfo) else len(value)
        if length != n_layer:
            raise GGUFError(
                f"{name} has {length:,} entries for {n_layer} layers ({arch}.block_count): "
                "must have one per layer"
            )
        if isinstance(value, ArrayInfo):  # a per-layer array of strings, or of arrays
            raise GGUFError(f"{name} = {_show(value)}: must be integers, one per layer")
        return [_whole(f"{name}[{i}]", v, LIMITS[key]) for i, v in enumerate(value)]

    n_layer = number("block_count")
    n_embd = number("embedding_length")
    heads = per_layer("attention.head_count")
    kv_heads = per_layer("attention.head_count_kv", heads)
    n_head = max(heads)
    head_dim = n_embd // max(n_head, 1)
    return GGUFFacts(
        path=path,
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv_total=sum(kv_heads),
        key_length=number("attention.key_length", head_dim),
        value_length=number("attention.value_length", head_dim),
        n_ff=max(per_layer("feed_forward_length", [4 * n_embd])),
        n_vocab=number("vocab_size", vocab),
        n_ctx_train=number("context_length", 0),
        weights_bytes=weights,
    )


def _whole(key: str, value: Any, limits: tuple[int, int]) -> int:
    """``value`` when it is an integer within ``limits``, else a GGUFError naming ``key``."""
    low, high = limits
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return value
    raise GGUFError(f"{key} = {_show(value)}: must be an integer from {low} to {high:,}")


def _show(value: Any) -> str:
    """A metadata value as a message quotes it: short, whatever it is."""
    if isinstance(value, ArrayInfo):
        return f"an array of {value.length:,} {value.item_type.name}"
    if isinstance(value, LongString):
        return f"a string of {value.length:,} bytes"
    if isinstance(value, list):
        shown = ", ".join(_show(v) for v in value[:4])
        return f"[{shown}{', …' if len(value) > 4 else ''}]"
    if isinstance(value, bool | int | float):
        return repr(value)
    if isinstance(value, str):
        return printable(repr(value), 40)
    return f"a {type(value).__name__}"


def kv_cache_bytes(facts: GGUFFacts, n_ctx: int, n_seq: int = 1) -> int:
    """K and V for every layer's KV heads at ``n_ctx`` positions, f16, for each of ``n_seq``
    sequences."""
    per_position = facts.n_head_kv_total * (facts.key_length + facts.value_length)
    return per_position * padded_ctx(n_ctx) * KV_BYTES_PER_ELEMENT * n_seq


def padded_ctx(n_ctx: int) -> int:
    """llama.cpp allocates the KV cache in cells of 256 positions."""
    return _round_up(n_ctx, CTX_PAD)


def graph_bytes(facts: GGUFFacts, n_ctx: int, n_batch: int, n_seq: int = 1) -> int:
    """llama.cpp's compute ("graph") buffer plus its output rows (one per sequence), as
    llama.cpp logs them."""
    ctx, ub = padded_ctx(n_ctx), _micro_batch(n_ctx, n_batch)
    embd, heads = facts.n_embd, facts.n_head
    embd_kv = facts.n_head_kv_total // max(facts.n_layer, 1) * facts.key_length
    attention = 4 * ctx * (heads + 1) + 20 * embd + 8 * embd_kv
    feed_forward = 12 * facts.n_ff + 4 * ctx + 20 * embd
    logits = 4 * facts.n_vocab + 12 * embd
    return ub * max(attention, feed_forward, logits) + GRAPH_SLACK + 4 * facts.n_vocab * n_seq


def work_bytes(facts: GGUFFacts, n_ctx: int, n_batch: int) -> int:
    """ggml's CPU work buffer, which llama.cpp does not log but RSS shows."""
    ctx, ub = padded_ctx(n_ctx), _micro_batch(n_ctx, n_batch)
    return ub * (2 * max(facts.n_embd, facts.n_ff) + 2 * ctx * facts.n_head)


def compute_bytes(facts: GGUFFacts, n_ctx: int, n_batch: int, n_seq: int = 1) -> int:
    """Everything beside weights and KV cache (see the module docstring)."""
    graph = graph_bytes(facts, n_ctx, n_batch, n_seq)
    return graph + work_bytes(facts, n_ctx, n_batch) + FIXED_PER_MODEL


def _micro_batch(n_ctx: int, n_batch: int) -> int:
    return min(n_ctx, n_batch, N_UBATCH)


def estimate(facts: GGUFFacts, *, n_ctx: int, n_batch: int, n_seq: int = 1) -> Footprint:
    """The footprint of ``facts``'s model loaded with this context and batch size, holding
    ``n_seq`` sequences of ``n_ctx`` positions each."""
    if n_seq < 1:
        raise ValueError(f"a context holds at least one sequence, not {n_seq}")
    return Footprint(
        weights=facts.weights_bytes,
        kv_cache=kv_cache_bytes(facts, n_ctx, n_seq),
        compute=compute_bytes(facts, n_ctx, n_batch, n_seq),
        source="gguf",
    )


def _round_up(value: int, quantum: int) -> int:
    return math.ceil(value / quantum) * quantum
