"""Footprints from GGUF headers, and clear errors for files that are not usable models."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from localmoa.backends.ollama import _facts as _ollama_facts
from localmoa.errors import ModelFileError
from localmoa.footprint.estimate import (
    Footprint,
    estimate,
    facts_from_metadata,
    kv_cache_bytes,
    read_gguf,
)
from localmoa.footprint.gguf import GGUFError
from localmoa.tinymodels import PRESETS, write_header_only


def test_header_facts_match_what_was_written(tiny_models: dict[str, Path]) -> None:
    spec = PRESETS["tiny-c"]
    facts = read_gguf(tiny_models["tiny-c"])
    assert facts.architecture == "llama"
    assert (facts.n_layer, facts.n_embd, facts.n_head) == (spec.n_layer, spec.n_embd, spec.n_head)
    assert facts.n_head_kv_total == spec.n_layer * spec.n_head_kv
    assert facts.key_length == facts.value_length == spec.n_embd // spec.n_head
    assert facts.n_vocab == spec.n_vocab and facts.n_ff == spec.n_ff
    # F32 tensors: the tensor table is nearly the whole file (the rest is header and vocab).
    size = tiny_models["tiny-c"].stat().st_size
    assert 0.8 * size < facts.weights_bytes < size


def test_kv_cache_is_k_and_v_for_every_kv_head_at_f16(tiny_models: dict[str, Path]) -> None:
    spec = PRESETS["tiny-b"]
    facts = read_gguf(tiny_models["tiny-b"])
    head_dim = spec.n_embd // spec.n_head
    assert kv_cache_bytes(facts, 1024) == 2 * spec.n_layer * spec.n_head_kv * head_dim * 1024 * 2
    small, large = estimate(facts, n_ctx=512, n_batch=512), estimate(facts, n_ctx=4096, n_batch=512)
    assert large.kv_cache == 8 * small.kv_cache and large.weights == small.weights
    assert large.total > small.total


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "not a valid GGUF file"),
        (b"hello, I am a text file, not a model\n" * 10, "not a valid GGUF file"),
        (b"GGUF\x03\x00\x00\x00" + b"\xff" * 64, "not a valid GGUF file"),
    ],
)
def test_unusable_files_are_model_file_errors(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=expected) as caught:
        read_gguf(path)
    assert str(path) in str(caught.value)


def test_truncated_model_is_a_model_file_error(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    data = tiny_models["tiny-a"].read_bytes()
    for cut in (len(data) // 2, 100):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelFileError, match="not a valid GGUF file"):
            read_gguf(path)


def test_missing_path_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match=r"missing\.gguf: file not found"):
        read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(ModelFileError, match="not a file"):
        read_gguf(tmp_path)


def test_lean_header_reader_agrees_with_gguf_reader(tiny_models: dict[str, Path]) -> None:
    for path in tiny_models.values():
        reader = gguf.GGUFReader(path)
        facts = read_gguf(path)
        assert facts.weights_bytes == sum(int(t.n_bytes) for t in reader.tensors)
        assert facts.n_vocab == len(reader.fields["tokenizer.ggml.tokens"].data)
        assert facts.n_ctx_train == reader.fields["llama.context_length"].contents()


def test_header_without_its_tensor_data_is_truncated(tmp_path: Path) -> None:
    path = write_header_only(tmp_path / "partial.gguf", PRESETS["tiny-a"], sparse_size=False)
    with pytest.raises(ModelFileError, match="truncated"):
        read_gguf(path)


# An Ollama /api/show model_info as it looks for a small llama (JSON numbers, per-layer arrays).
OLLAMA_INFO = {
    "general.architecture": "llama",
    "llama.block_count": 2,
    "llama.embedding_length": 64,
    "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": [2, 1],
    "llama.feed_forward_length": [128, 256],
    "llama.context_length": 4096,
}


def test_per_layer_values_are_summed_or_maxed() -> None:
    facts = facts_from_metadata(OLLAMA_INFO, path=Path("m"), weights=1000, vocab=32000)
    assert (facts.n_head_kv_total, facts.n_ff, facts.n_vocab) == (3, 256, 32000)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"llama.block_count": -1_000_000}, "llama.block_count = -1000000: must be an integer"),
        ({"llama.block_count": "32"}, "llama.block_count = '32'"),
        ({"llama.block_count": 32.0}, "llama.block_count = 32.0"),
        ({"llama.block_count": [2, 2]}, "llama.block_count = [2, 2]"),
        ({"llama.embedding_length": True}, "llama.embedding_length = True"),
        ({"llama.attention.head_count_kv": [2, -1]}, "head_count_kv[1] = -1"),
        ({"llama.attention.head_count_kv": [2, 1, 1]}, "has 3 entries for 2 layers"),
        ({"llama.feed_forward_length": [128, 2.5]}, "feed_forward_length[1] = 2.5"),
        ({"llama.attention.key_length": 1 << 40}, "key_length = 1099511627776"),
        ({"general.architecture": 5}, "general.architecture = 5"),
    ],
)
def test_metadata_out_of_its_limits_is_a_value_error_naming_the_key(
    change: dict[str, object], expected: str
) -> None:
    """A ValueError (GGUFError) whatever the source: Ollama's backend falls back to the model's
    file size on ValueError, read_gguf turns it into a ModelFileError naming the file."""
    with pytest.raises(GGUFError) as caught:
        facts_from_metadata({**OLLAMA_INFO, **change}, path=Path("m"), weights=1000)
    assert isinstance(caught.value, ValueError) and expected in str(caught.value)
    assert _ollama_facts("m", {**OLLAMA_INFO, **change}, 1000) is None


def test_footprint_refuses_negative_parts() -> None:
    assert Footprint(weights=0, kv_cache=0, compute=0, source="server").total == 0
    for parts in [(-1, 0, 0), (0, -1, 0), (0, 0, -(1 << 40))]:
        with pytest.raises(ValueError, match="must be a whole number of bytes"):
            Footprint(*parts, source="gguf")


def test_each_sequence_holds_its_own_kv_cache_and_row_of_logits(
    tiny_models: dict[str, Path],
) -> None:
    """Samples decoded together: n_seq streams of n_ctx cells, the compute buffer unchanged."""
    facts = read_gguf(tiny_models["tiny-b"])
    one = estimate(facts, n_ctx=1000, n_batch=512)
    four = estimate(facts, n_ctx=1000, n_batch=512, n_seq=4)
    assert four.kv_cache == 4 * one.kv_cache == 4 * kv_cache_bytes(facts, 1024)
    assert four.compute - one.compute == 3 * 4 * facts.n_vocab
    assert four.weights == one.weights
    with pytest.raises(ValueError, match="at least one sequence"):
        estimate(facts, n_ctx=1000, n_batch=512, n_seq=0)
