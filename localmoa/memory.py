"""What a model costs in memory once loaded, read from its GGUF header without loading weights.

    total = weights + kv_cache + compute

- **weights**: the tensor table's bytes (every tensor's type and shape is in the header, so a
  sparse or not-yet-read file is sized exactly).
- **kv_cache**: ``2 · n_layer · n_head_kv · head_dim · n_ctx · bytes_per_element``. The 2 is K and
  V; ``head_dim`` is ``attention.key_length``/``value_length`` when the model declares them (K
  and V may differ), else ``n_embd / n_head``; per-layer ``head_count_kv`` arrays are summed over
  layers. ``bytes_per_element`` is 2: llama-cpp-python's default cache type is f16. This is the
  formula of Ollama's server estimate (``PredictServerVRAM``, llm/llama_server.go) corrected for
  declared head sizes; sliding-window layers are counted at full context (an over-estimate).
- **compute**: llama.cpp's compute buffers (graph activations for one micro-batch, plus the
  logits/output buffer), see :func:`compute_bytes` for the formula and its calibration.

``memory = "6GiB"`` in models.toml replaces the whole estimate, as-is.

Checked against measurement by ``scripts/bench_memory.py`` (README, "Memory estimate").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from localmoa.errors import ModelFileError

__all__ = ["Footprint", "GGUFFacts", "compute_bytes", "estimate", "kv_cache_bytes", "read_gguf"]

KV_BYTES_PER_ELEMENT = 2  # f16 K and V caches, llama-cpp-python's default type_k/type_v
MiB = 1 << 20


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
    return per_position * n_ctx * KV_BYTES_PER_ELEMENT


def compute_bytes(facts: GGUFFacts, n_ctx: int, n_batch: int) -> int:
    """llama.cpp's compute buffer plus output buffer for one context.

    Placeholder formula until calibrated: activations of one micro-batch, the attention scores
    for it over the whole context, and the logits of one batch row.
    """
    n_ubatch = min(n_batch, 512, n_ctx)
    activations = 4 * n_ubatch * (3 * facts.n_embd + 2 * facts.n_ff)
    scores = 4 * n_ubatch * n_ctx * facts.n_head
    logits = 4 * facts.n_vocab * n_ubatch
    return _round_up(activations + scores + logits, MiB)


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
