"""What a model costs in memory once loaded, read from its GGUF header without loading weights.

    total = weights + kv_cache + compute

- **weights**: the tensor table's bytes (every tensor's type and shape is in the header, so a
  sparse or not-yet-read file is sized exactly). Equals llama.cpp's logged "model buffer".
- **kv_cache**: ``2 · n_layer · n_head_kv · head_dim · n_ctx · 2``. The first 2 is K and V, the
  last is f16, llama-cpp-python's default cache type. ``head_dim`` is ``attention.key_length`` /
  ``value_length`` when declared (K and V may differ), else ``n_embd / n_head``; per-layer
  ``head_count_kv`` arrays are summed. ``n_ctx`` is padded to llama.cpp's 256-cell granularity.
  This is Ollama's server estimate (``PredictServerVRAM``, llm/llama_server.go) with declared head
  sizes honoured; sliding-window layers count at full context (an over-estimate).
- **compute**: everything llama.cpp allocates beside weights and cache, per context
  (``ub = min(n_ctx, n_batch, 512)``, the micro-batch; llama-cpp-python's ``n_ubatch`` is 512):

  - graph buffer ``ub · max(A, F, L) + 256 KiB``: ggml reuses memory across the graph, so it is
    the largest phase, not a sum. Attention ``A = 4·n_ctx·(n_head+1) + 20·n_embd + 8·n_embd_kv``
    (f32 scores of every head and the f32 mask), feed-forward
    ``F = 12·n_ff + 4·n_ctx + 20·n_embd``, logits ``L = 4·n_vocab + 12·n_embd``;
  - ggml's CPU work buffer ``ub · (2·max(n_embd, n_ff) + 2·n_ctx·n_head)`` (the scores as f16
    for the product with V; not in llama.cpp's log, but in RSS);
  - the output buffer ``4·n_vocab`` (one row of logits) and 8 MiB fixed per model (3-5 MiB
    measured: context, sampler, thread pool).

The constants were fitted by ``scripts/calibrate_memory.py`` on 99 shapes and contexts
(n_embd 64-1024, n_ff to 8192, vocab to 65536, ctx 512-8192): the graph buffer formula is 1.00 to
1.07 times what llama.cpp logs, never below. The whole sum is checked against process RSS by
``scripts/bench_memory.py`` (README, "Memory estimate"). Flash attention (off by default in
llama-cpp-python) would only shrink the buffers, so the estimate stays an upper bound.

``memory = "6GiB"`` in models.toml replaces the whole estimate, as-is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from localmoa.errors import ModelFileError

__all__ = [
    "Footprint",
    "GGUFFacts",
    "compute_bytes",
    "estimate",
    "kv_cache_bytes",
    "padded_ctx",
    "read_gguf",
]

MiB = 1 << 20
KV_BYTES_PER_ELEMENT = 2  # f16 K and V caches, llama-cpp-python's default type_k/type_v
CTX_PAD = 256  # llama.cpp pads n_ctx to a multiple of this
N_UBATCH = 512  # llama-cpp-python's default micro-batch
GRAPH_SLACK = MiB // 4  # covers ggml's rounding of the graph buffer
FIXED_PER_MODEL = 8 * MiB  # context, sampler, thread pool: 3-5 MiB measured


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
    source: Literal["gguf", "override"]

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.compute

    @classmethod
    def override(cls, total: int) -> Footprint:
        return cls(weights=total, kv_cache=0, compute=0, source="override")


def read_gguf(path: Path) -> GGUFFacts:
    """Read the header facts of a GGUF file; ModelFileError if it is missing or not usable."""
    from gguf import GGUFReader  # imported here: numpy + gguf cost ~100 ms, only needed here

    if not path.exists():
        raise ModelFileError(f"{path}: file not found; check the model's path in models.toml")
    if not path.is_file():
        raise ModelFileError(f"{path}: not a file; point the model's path at a .gguf file")
    try:
        reader = GGUFReader(path, "r")
    except PermissionError as exc:
        raise ModelFileError(f"{path}: cannot read: {exc.strerror}") from None
    except Exception as exc:  # gguf raises ValueError, IndexError, struct errors on bad input
        raise ModelFileError(
            f"{path}: not a valid GGUF file ({type(exc).__name__}: {exc}); the file may be "
            "truncated or not a model: download or convert it again"
        ) from exc

    def field(key: str, default: Any = None) -> Any:
        found = reader.get_field(key)
        return default if found is None else found.contents()

    arch = field("general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{path}: GGUF header has no general.architecture; not a model file")

    def required(key: str) -> Any:
        value = field(f"{arch}.{key}")
        if value is None:
            raise ModelFileError(f"{path}: GGUF header lacks {arch}.{key}; cannot size the model")
        return value

    n_layer = int(required("block_count"))
    n_embd = int(required("embedding_length"))
    n_head_raw = required("attention.head_count")
    n_head = int(max(n_head_raw) if isinstance(n_head_raw, list) else n_head_raw)
    n_head_kv_raw = field(f"{arch}.attention.head_count_kv", n_head_raw)
    n_head_kv_total = (
        int(sum(n_head_kv_raw)) if isinstance(n_head_kv_raw, list) else int(n_head_kv_raw) * n_layer
    )
    head_dim = n_embd // max(n_head, 1)
    tokens = reader.get_field("tokenizer.ggml.tokens")
    n_vocab = int(field(f"{arch}.vocab_size", 0) or (len(tokens.data) if tokens else 0))
    n_ff_raw = field(f"{arch}.feed_forward_length", 4 * n_embd)
    try:
        weights = sum(int(t.n_bytes) for t in reader.tensors)
    except Exception as exc:
        raise ModelFileError(f"{path}: unreadable tensor table ({exc})") from exc
    return GGUFFacts(
        path=path,
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv_total=n_head_kv_total,
        key_length=int(field(f"{arch}.attention.key_length", head_dim)),
        value_length=int(field(f"{arch}.attention.value_length", head_dim)),
        n_ff=int(max(n_ff_raw) if isinstance(n_ff_raw, list) else n_ff_raw),
        n_vocab=n_vocab,
        n_ctx_train=int(field(f"{arch}.context_length", 0)),
        weights_bytes=weights,
    )


def kv_cache_bytes(facts: GGUFFacts, n_ctx: int) -> int:
    """K and V for every layer's KV heads at ``n_ctx`` positions, f16."""
    per_position = facts.n_head_kv_total * (facts.key_length + facts.value_length)
    return per_position * padded_ctx(n_ctx) * KV_BYTES_PER_ELEMENT


def padded_ctx(n_ctx: int) -> int:
    """llama.cpp allocates the KV cache in cells of 256 positions."""
    return _round_up(n_ctx, CTX_PAD)


def compute_bytes(facts: GGUFFacts, n_ctx: int, n_batch: int) -> int:
    """Graph, work and output buffers plus the fixed per-model cost (see module docstring)."""
    ctx = padded_ctx(n_ctx)
    ub = min(n_ctx, n_batch, N_UBATCH)
    embd, ff, heads = facts.n_embd, facts.n_ff, facts.n_head
    embd_kv = facts.n_head_kv_total // max(facts.n_layer, 1) * facts.key_length
    attention = 4 * ctx * (heads + 1) + 20 * embd + 8 * embd_kv
    feed_forward = 12 * ff + 4 * ctx + 20 * embd
    logits = 4 * facts.n_vocab + 12 * embd
    graph = ub * max(attention, feed_forward, logits) + GRAPH_SLACK
    work = ub * (2 * max(embd, ff) + 2 * ctx * heads)
    return graph + work + 4 * facts.n_vocab + FIXED_PER_MODEL


def estimate(facts: GGUFFacts, *, n_ctx: int, n_batch: int) -> Footprint:
    """The footprint of ``facts``'s model loaded with this context and batch size."""
    return Footprint(
        weights=facts.weights_bytes,
        kv_cache=kv_cache_bytes(facts, n_ctx),
        compute=compute_bytes(facts, n_ctx, n_batch),
        source="gguf",
    )


def _round_up(value: int, quantum: int) -> int:
    return math.ceil(value / quantum) * quantum
