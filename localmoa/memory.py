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
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from localmoa.errors import ModelFileError
from localmoa.ggufheader import ArrayInfo, read_header

__all__ = [
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
    except PermissionError as exc:
        raise ModelFileError(f"{path}: cannot read: {exc.strerror}") from None
    except (OSError, ValueError, KeyError, struct.error) as exc:
        raise ModelFileError(
            f"{path}: not a valid GGUF file ({exc}); the file may be truncated or not a "
            "model: download or convert it again"
        ) from None
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    try:
        return facts_from_metadata(
            header.metadata,
            path=path,
            weights=sum(header.tensor_bytes.values()),
            vocab=tokens.length if isinstance(tokens, ArrayInfo) else 0,
        )
    except KeyError as exc:
        raise ModelFileError(
            f"{path}: GGUF header lacks {exc.args[0]}; not a model file localmoa can size"
        ) from None


def facts_from_metadata(
    meta: Mapping[str, Any], *, path: Path, weights: int, vocab: int = 0
) -> GGUFFacts:
    """The facts from GGUF-style metadata (a file's header, or Ollama's ``model_info``).

    ``vocab`` is the vocabulary size when the metadata has no ``vocab_size`` (the length of the
    token list). KeyError names a required key that is missing.
    """
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise KeyError("general.architecture")

    def number(key: str, default: int | None = None) -> int:
        """A per-model number; per-layer lists count at their largest (an upper bound)."""
        value = meta.get(f"{arch}.{key}", default)
        if value is None or value == []:
            if default is None:
                raise KeyError(f"{arch}.{key}")
            value = default
        return int(max(value) if isinstance(value, list) else value)

    n_layer = number("block_count")
    n_embd = number("embedding_length")
    n_head = number("attention.head_count")
    kv_heads = meta.get(f"{arch}.attention.head_count_kv", n_head)
    n_head_kv_total = int(sum(kv_heads)) if isinstance(kv_heads, list) else int(kv_heads) * n_layer
    head_dim = n_embd // max(n_head, 1)
    return GGUFFacts(
        path=path,
        architecture=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv_total=n_head_kv_total,
        key_length=number("attention.key_length", head_dim),
        value_length=number("attention.value_length", head_dim),
        n_ff=number("feed_forward_length", 4 * n_embd),
        n_vocab=number("vocab_size", vocab),
        n_ctx_train=number("context_length", 0),
        weights_bytes=weights,
    )


def kv_cache_bytes(facts: GGUFFacts, n_ctx: int) -> int:
    """K and V for every layer's KV heads at ``n_ctx`` positions, f16."""
    per_position = facts.n_head_kv_total * (facts.key_length + facts.value_length)
    return per_position * padded_ctx(n_ctx) * KV_BYTES_PER_ELEMENT


def padded_ctx(n_ctx: int) -> int:
    """llama.cpp allocates the KV cache in cells of 256 positions."""
    return _round_up(n_ctx, CTX_PAD)


def graph_bytes(facts: GGUFFacts, n_ctx: int, n_batch: int) -> int:
    """llama.cpp's compute ("graph") buffer plus its output row, as llama.cpp logs them."""
    ctx, ub = padded_ctx(n_ctx), _micro_batch(n_ctx, n_batch)
    embd, heads = facts.n_embd, facts.n_head
    embd_kv = facts.n_head_kv_total // max(facts.n_layer, 1) * facts.key_length
    attention = 4 * ctx * (heads + 1) + 20 * embd + 8 * embd_kv
    feed_forward = 12 * facts.n_ff + 4 * ctx + 20 * embd
    logits = 4 * facts.n_vocab + 12 * embd
    return ub * max(attention, feed_forward, logits) + GRAPH_SLACK + 4 * facts.n_vocab


def work_bytes(facts: GGUFFacts, n_ctx: int, n_batch: int) -> int:
    """ggml's CPU work buffer, which llama.cpp does not log but RSS shows."""
    ctx, ub = padded_ctx(n_ctx), _micro_batch(n_ctx, n_batch)
    return ub * (2 * max(facts.n_embd, facts.n_ff) + 2 * ctx * facts.n_head)


def compute_bytes(facts: GGUFFacts, n_ctx: int, n_batch: int) -> int:
    """Everything beside weights and KV cache (see the module docstring)."""
    return graph_bytes(facts, n_ctx, n_batch) + work_bytes(facts, n_ctx, n_batch) + FIXED_PER_MODEL


def _micro_batch(n_ctx: int, n_batch: int) -> int:
    return min(n_ctx, n_batch, N_UBATCH)


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
