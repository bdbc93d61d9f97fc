"""Small GGUF models with random weights, so tests and the demo run real llama.cpp on CPU.

The output of these models is noise, but everything around it is real: GGUF parsing, weight
loading, KV cache, chat templates, sampling, threading and memory use. That makes them the
integration fixture for the backends and the memory estimate, with nothing to download.

Shape of the file (llama architecture, every tensor F32):

- a byte-level SentencePiece-style vocabulary: ``<unk>``, ``<s>``, ``</s>``, the 256 byte tokens
  ``<0x00>``..``<0xFF>`` and a few whole-word pieces, so any text tokenizes and any reply
  detokenizes (``TinySpec.english`` adds English word pieces, for benchmarks that need
  prompts as long in tokens as a real vocabulary makes them);
- a small Jinja chat template over system/user/assistant messages ending with an assistant cue,
  so ``Llama.create_chat_completion`` works as with a real instruct model;
- norm weights of one and all other weights N(0, 0.02): the logits stay nearly flat, so sampling
  wanders over the whole vocabulary and hits end-of-sequence only about once in ``n_vocab``
  tokens.

Tensors are generated and written one at a time (``GGUFWriter`` in its streaming mode), so
writing the 300 MB preset needs only about one tensor's worth of extra memory. The same spec
gives the same bytes: one ``numpy.random.default_rng(seed)`` draws every tensor in file order.

``write_header_only`` writes the same header without the tensor data and, by default, extends
the file to its full size as a sparse hole. The memory estimate reads only the header, so an
8B-shaped (32 GB at F32) file can be planned from at the cost of its ~3 MB header: that is how
tests cover real-model layouts without writing or downloading gigabytes. Such a file reads as
zeros past the header; llama.cpp would load it, but as 32 GB of zero weights.

Writing needs ``gguf`` and numpy, which come with the ``llamacpp`` extra (these models are only
of use to llama.cpp): without them, importing this module says which extra to install.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import gguf
    import numpy as np
    import numpy.typing as npt
except ModuleNotFoundError as exc:  # the core install: no llamacpp extra
    raise ModuleNotFoundError(
        f"localmoa.tinymodels needs {exc.name}, which comes with the llamacpp extra: "
        "pip install 'localmoa[llamacpp]'",
        name=exc.name,
    ) from exc

__all__ = [
    "BASE_VOCAB",
    "PRESETS",
    "TinySpec",
    "ensemble_config",
    "write_header_only",
    "write_tiny_model",
]

_SPECIALS = ("<unk>", "<s>", "</s>")
_WORDS = ("▁", "▁the", "▁a", "▁and", "▁of", "▁to", "▁is", "▁in")
BASE_VOCAB = len(_SPECIALS) + 256 + len(_WORDS)
"""Vocabulary size without padding pieces: specials, byte tokens and a few words."""

_ENGLISH = tuple(
    """
the be to of and a in that have it for not on with he as you do at this but his by from they we
say her she or an will my one all would there their what so up out if about who get which go me
when make can like time no just him know take people into year your good some could them see
other than then now look only come its over think also back after use two how our work first
well way even new want because any these give day most us is are was were been has had did does
answer answers response responses model models below several latest user message some may be
biased incomplete simply wrong evaluate them critically keep what accurate resolve where they
disagree write one refined well structured own do not copy verbatim mention that other exist
question explain two sentences why sky blue light sun scattering air short long waves color name
prime number what say hello world system assistant red green yellow more less very much many
each every same different small large great right left high low old young early late best better
true false yes no number numbers word words text line lines list point points part parts
""".split()  # noqa: SIM905 - a word list reads best as text
)
"""English words (with the benchmarks' prompts and the aggregate instruction among them) for
``TinySpec.english``: real vocabularies read English at about 4 characters a token, a
byte-level one at 1, which would make every prompt's evaluation 4 times too costly against
decoding."""


def _english_pieces() -> list[str]:
    """Pieces that let SentencePiece's merges spell the words: every printable ASCII
    character, then each word's prefixes (``▁t``, ``▁th``, ``▁the``), capitalized too."""
    pieces = dict.fromkeys(chr(c) for c in range(33, 127))
    for word in _ENGLISH:
        for spelled in (word, word.capitalize()):
            marked = "▁" + spelled
            for end in range(2, len(marked) + 1):
                pieces[marked[:end]] = None
    return [p for p in pieces if p not in _WORDS]


ENGLISH_VOCAB = BASE_VOCAB + len(_english_pieces())
"""The smallest ``n_vocab`` of a spec with ``english`` set."""

_WEIGHT_STD = 0.02

# Role tags are plain text (they tokenize to byte pieces); ``eos_token`` closes each turn the way
# real templates do, and the trailing assistant cue is what the model continues.
_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Shape and seed of a random llama model.

    ``n_vocab`` pads the vocabulary with extra word pieces beyond the base byte-level one
    (``BASE_VOCAB`` tokens), to reproduce the embedding and output costs of real vocabularies.
    """

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_ctx_train: int = 4096
    seed: int = 0
    n_vocab: int = BASE_VOCAB
    english: bool = False
    """Add English word pieces to the vocabulary (``n_vocab`` at least ``ENGLISH_VOCAB``), so
    English prompts tokenize at about 3-4 characters a token as with real vocabularies, and
    the random answers are words: for benchmarks whose prompts' evaluation must cost what it
    would against decoding. Off for the fixtures, whose token counts tests rely on."""

    def __post_init__(self) -> None:
        if min(self.n_layer, self.n_embd, self.n_head, self.n_head_kv, self.n_ff) < 1:
            raise ValueError(f"every dimension of {self} must be positive")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd must split into n_head heads of even size: {self}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head must be a multiple of n_head_kv: {self}")
        if self.n_vocab < BASE_VOCAB:
            raise ValueError(f"n_vocab must be at least {BASE_VOCAB}: {self}")
        if self.english and self.n_vocab < ENGLISH_VOCAB:
            raise ValueError(f"n_vocab must be at least {ENGLISH_VOCAB} with english: {self}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_params(self) -> int:
        """Number of weights; the file holds 4 bytes per weight plus a small header."""
        kv = self.n_head_kv * self.head_dim
        per_block = 2 * self.n_embd * self.n_embd + 2 * kv * self.n_embd
        per_block += 3 * self.n_ff * self.n_embd + 2 * self.n_embd
        return self.n_layer * per_block + 2 * self.n_vocab * self.n_embd + self.n_embd


PRESETS: dict[str, TinySpec] = {
    # Test fixtures: 0.4-2 MB, load in milliseconds; distinct seeds so agents differ.
    "tiny-a": TinySpec(seed=0),
    "tiny-b": TinySpec(n_layer=2, n_embd=96, n_head=4, n_head_kv=2, n_ff=192, seed=1),
    "tiny-c": TinySpec(n_layer=3, n_embd=128, n_head=8, n_head_kv=4, n_ff=256, seed=2),
    # Benchmarks of real load and swap cost.
    "large-100m": TinySpec(n_layer=8, n_embd=512, n_head=8, n_head_kv=4, n_ff=1536, seed=10),
    "large-300m": TinySpec(n_layer=8, n_embd=1024, n_head=16, n_head_kv=4, n_ff=2304, seed=11),
}
"""Named specs; ``tiny-*`` for tests and the demo, ``large-*`` (~100 MB, ~300 MB) for benchmarks."""


def ensemble_config(
    paths: Mapping[str, Path],
    *,
    n_ctx: int = 2048,
    max_tokens: int = 32,
    seed: int = 1,
    temperature: float = 0.0,
) -> dict[str, Any]:
    """A models.toml document (as a mapping) for tiny models: every model in two layers, the
    first one aggregating. What the tests, the serve benchmark and the demo run."""
    models = {
        name: {"backend": "llamacpp", "path": str(path), "n_ctx": n_ctx, "seed": seed}
        for name, path in paths.items()
    }
    layer = list(models)
    return {
        "models": models,
        "ensembles": {
            "default": {
                "layers": [layer, layer],
                "aggregator": layer[0],
                "max_tokens": max_tokens,
                "temperature": temperature,
            }
        },
    }


def write_tiny_model(path: str | os.PathLike[str], spec: TinySpec = TinySpec()) -> Path:
    """Write a random-weight GGUF model for ``spec`` to ``path`` and return the path.

    The file is written in place (no temporary copy); an existing file is overwritten.
    """
    out = Path(path)
    writer = gguf.GGUFWriter(out, arch="llama")
    try:
        _write_header(writer, spec)
        rng = np.random.default_rng(spec.seed)
        for _, shape, is_norm in _tensor_plan(spec):
            writer.write_tensor_data(_tensor(rng, shape, is_norm))
    finally:
        writer.close()
    return out


def write_header_only(
    path: str | os.PathLike[str], spec: TinySpec, *, sparse_size: bool = True
) -> Path:
    """Write ``write_tiny_model``'s header for ``spec`` (metadata and tensor infos), no data.

    With ``sparse_size`` the file is then extended with ``truncate`` to the size the full model
    would have: GGUF readers check that every tensor lies inside the file, and the hole takes no
    disk blocks on filesystems with sparse files (ext4, xfs, btrfs, tmpfs, APFS). Without it the
    file ends after the tensor infos, which is enough for byte-level header checks. Returns
    ``path``; an existing file is overwritten.
    """
    out = Path(path)
    writer = gguf.GGUFWriter(out, arch="llama")
    try:
        data_bytes = _write_header(writer, spec)
        alignment = writer.data_alignment
    finally:
        writer.close()
    if sparse_size:
        # The data section starts at the next alignment boundary after the tensor infos.
        data_start = gguf.GGUFWriter.ggml_pad(out.stat().st_size, alignment)
        os.truncate(out, data_start + data_bytes)
    return out


def _write_header(writer: gguf.GGUFWriter, spec: TinySpec) -> int:
    """Write the header of ``spec``'s file; return the size of the data section that follows.

    Both writers go through here, so a header-only file plans exactly like the real model.
    """
    _add_metadata(writer, spec)
    data_bytes = 0
    for name, shape, _ in _tensor_plan(spec):
        nbytes = math.prod(shape) * 4
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes)
        # GGUFWriter pads every tensor to the data alignment, in the offsets and in the file.
        data_bytes += gguf.GGUFWriter.ggml_pad(nbytes, writer.data_alignment)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    return data_bytes


def _add_metadata(writer: gguf.GGUFWriter, spec: TinySpec) -> None:
    writer.add_name(f"localmoa-tiny-{spec.n_layer}L-{spec.n_embd}d-v{spec.n_vocab}-seed{spec.seed}")
    writer.add_description("random weights — output is noise (localmoa test model)")
    writer.add_context_length(spec.n_ctx_train)
    writer.add_embedding_length(spec.n_embd)
    writer.add_block_count(spec.n_layer)
    writer.add_feed_forward_length(spec.n_ff)
    writer.add_head_count(spec.n_head)
    writer.add_head_count_kv(spec.n_head_kv)
    writer.add_rope_dimension_count(spec.head_dim)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    words = [*_WORDS, *(_english_pieces() if spec.english else [])]
    pad = [f"▁w{i}" for i in range(spec.n_vocab - len(_SPECIALS) - 256 - len(words))]
    tokens = [*_SPECIALS, *(f"<0x{b:02X}>" for b in range(256)), *words, *pad]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (len(words) + len(pad))
    # SentencePiece merges by score: longer pieces first (so words form), then padding pieces,
    # bytes last.
    ranked = sorted(range(len(words)), key=lambda i: (-len(words[i]), i))
    rank = {i: r for r, i in enumerate(ranked)}
    scores = [0.0] * 3 + [-1000.0] * 256
    scores += [-float(rank[i]) for i in range(len(words))]
    scores += [-float(len(words) + i) for i in range(len(pad))]
    writer.add_tokenizer_model("llama")
    # Typed arrays, not add_token_list & co: those make gguf infer and check every element's
    # type, a third of the time of writing a 128k-token header. The bytes are the same.
    array, keys = gguf.GGUFValueType.ARRAY, gguf.Keys.Tokenizer
    writer.add_key_value(keys.LIST, tokens, array, sub_type=gguf.GGUFValueType.STRING)
    writer.add_key_value(keys.TOKEN_TYPE, types, array, sub_type=gguf.GGUFValueType.INT32)
    writer.add_key_value(keys.SCORES, scores, array, sub_type=gguf.GGUFValueType.FLOAT32)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(_CHAT_TEMPLATE)


def _tensor_plan(spec: TinySpec) -> Iterator[tuple[str, tuple[int, ...], bool]]:
    """Yield (name, numpy shape, is_norm) for every tensor, in file order."""
    e, kv = spec.n_embd, spec.n_head_kv * spec.head_dim
    yield "token_embd.weight", (spec.n_vocab, e), False
    for i in range(spec.n_layer):
        yield f"blk.{i}.attn_norm.weight", (e,), True
        yield f"blk.{i}.attn_q.weight", (e, e), False
        yield f"blk.{i}.attn_k.weight", (kv, e), False
        yield f"blk.{i}.attn_v.weight", (kv, e), False
        yield f"blk.{i}.attn_output.weight", (e, e), False
        yield f"blk.{i}.ffn_norm.weight", (e,), True
        yield f"blk.{i}.ffn_gate.weight", (spec.n_ff, e), False
        yield f"blk.{i}.ffn_up.weight", (spec.n_ff, e), False
        yield f"blk.{i}.ffn_down.weight", (e, spec.n_ff), False
    yield "output_norm.weight", (e,), True
    yield "output.weight", (spec.n_vocab, e), False


def _tensor(
    rng: np.random.Generator, shape: tuple[int, ...], is_norm: bool
) -> npt.NDArray[np.float32]:
    if is_norm:
        return np.ones(shape, dtype=np.float32)
    noise = rng.standard_normal(shape, dtype=np.float32)
    noise *= _WEIGHT_STD
    return noise
