"""The generated models are real GGUF files that llama.cpp loads and chats with."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import gguf
import llama_cpp
import pytest

from localmoa.footprint.estimate import estimate, read_gguf
from localmoa.tinymodels import BASE_VOCAB, PRESETS, TinySpec, write_header_only, write_tiny_model

GiB = 1 << 30
LLAMA_8B = TinySpec(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)
"""Llama-3-8B's layout: GQA with 8 KV heads, a 128k vocabulary; 32 GB at F32."""


@pytest.fixture(scope="module")
def tiny_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-a.gguf", PRESETS["tiny-a"])


def test_llama_cpp_chats_with_system_message(tiny_a: Path) -> None:
    llm = llama_cpp.Llama(model_path=str(tiny_a), n_ctx=512, verbose=False, seed=1)
    try:
        chunks = cast(
            "Iterator[dict[str, Any]]",
            llm.create_chat_completion(
                messages=[
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Say something."},
                ],
                max_tokens=16,
                stream=True,
            ),
        )
        reply = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    finally:
        llm.close()
    assert reply


def test_same_spec_gives_same_bytes(tmp_path: Path) -> None:
    spec = PRESETS["tiny-b"]
    first = write_tiny_model(tmp_path / "1.gguf", spec).read_bytes()
    second = write_tiny_model(tmp_path / "2.gguf", spec).read_bytes()
    assert first == second


def test_different_seeds_give_different_bytes(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a.gguf", TinySpec(seed=1)).read_bytes()
    b = write_tiny_model(tmp_path / "b.gguf", TinySpec(seed=2)).read_bytes()
    assert len(a) == len(b)
    assert a != b


@pytest.mark.parametrize("name", ["tiny-a", "tiny-c"])
def test_header_declares_the_spec(tmp_path: Path, name: str) -> None:
    spec = PRESETS[name]
    reader = gguf.GGUFReader(write_tiny_model(tmp_path / "m.gguf", spec))

    def scalar(key: str) -> object:
        field = reader.fields[key]
        return field.contents()

    assert scalar("general.architecture") == "llama"
    assert scalar("llama.block_count") == spec.n_layer
    assert scalar("llama.embedding_length") == spec.n_embd
    assert scalar("llama.feed_forward_length") == spec.n_ff
    assert scalar("llama.attention.head_count") == spec.n_head
    assert scalar("llama.attention.head_count_kv") == spec.n_head_kv
    assert scalar("llama.context_length") == spec.n_ctx_train
    assert "noise" in str(scalar("general.description"))
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == spec.n_vocab
    assert sum(int(t.n_elements) for t in reader.tensors) == spec.n_params


def test_padded_vocabulary(tmp_path: Path) -> None:
    spec = dataclasses.replace(TinySpec(), n_vocab=BASE_VOCAB + 100)
    reader = gguf.GGUFReader(write_tiny_model(tmp_path / "m.gguf", spec))
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert list(embd.shape) == [spec.n_embd, spec.n_vocab]  # GGUF order: fastest axis first


@pytest.mark.parametrize(
    "bad",
    [
        {"n_embd": 66},  # 66 / 4 heads is not an integer
        {"n_head_kv": 3},  # 4 heads do not group into 3
        {"n_layer": 0},
        {"n_vocab": BASE_VOCAB - 1},
    ],
)
def test_invalid_spec_is_rejected(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        TinySpec(**bad)


@pytest.mark.parametrize(
    "spec",
    [
        PRESETS["tiny-c"],
        # 144-byte norm tensors: the data section pads every tensor to 32 bytes.
        TinySpec(n_layer=1, n_embd=36, n_head=2, n_head_kv=1, n_ff=72),
    ],
)
def test_header_only_is_the_real_header(tmp_path: Path, spec: TinySpec) -> None:
    full = write_tiny_model(tmp_path / "full.gguf", spec).read_bytes()
    header = write_header_only(tmp_path / "h.gguf", spec, sparse_size=False).read_bytes()
    assert full[: len(header)] == header
    sparse = write_header_only(tmp_path / "s.gguf", spec)
    assert sparse.stat().st_size == len(full)
    assert sparse.read_bytes()[len(header) :].count(0) == len(full) - len(header)


def test_header_only_8b_plans_like_the_real_model(tmp_path: Path) -> None:
    began = time.perf_counter()
    path = write_header_only(tmp_path / "llama-8b.gguf", LLAMA_8B)
    took = time.perf_counter() - began
    # ~0.5 s on a 2-core CI box, nearly all of it gguf packing the 3 x 128k tokenizer arrays.
    assert took < 1.0

    footprint = estimate(read_gguf(path), n_ctx=8192, n_batch=512)
    assert footprint.weights == 4 * LLAMA_8B.n_params  # every tensor F32
    assert footprint.kv_cache == 2 * 32 * 8 * 128 * 8192 * 2 == GiB

    header = write_header_only(tmp_path / "header.gguf", LLAMA_8B, sparse_size=False)
    data_start = -(-header.stat().st_size // 32) * 32  # GGUF's default alignment
    stat = path.stat()
    assert stat.st_size == data_start + footprint.weights  # no tensor here needs padding
    assert stat.st_blocks * 512 < 8 << 20  # only the ~3 MB header is on disk


def test_an_english_vocabulary_reads_english_as_real_vocabularies_do(tmp_path: Path) -> None:
    from localmoa.runtime.moa import AGGREGATE_PROMPT
    from localmoa.tinymodels import ENGLISH_VOCAB

    def chars_per_token(spec: TinySpec) -> float:
        path = write_tiny_model(tmp_path / f"{spec.english}.gguf", spec)
        vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        text = AGGREGATE_PROMPT + " Explain in two sentences why the sky is blue."
        tokens = vocab.tokenize(text.encode())
        assert vocab.detokenize(tokens).decode().strip() == text  # every word spelled back
        return len(text) / len(tokens)

    assert chars_per_token(TinySpec()) < 1.1  # the fixtures: one byte a token
    assert chars_per_token(TinySpec(english=True, n_vocab=ENGLISH_VOCAB)) > 3.5
    with pytest.raises(ValueError, match="with english"):
        TinySpec(english=True)
