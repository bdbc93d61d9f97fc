"""Hostile GGUF headers: sizing a model either works or is one ModelFileError naming the file.

The base is a real header from localmoa.tinymodels (1 layer, 8-dim embeddings, sparse tensor
data). Hypothesis mutates it: flipped and overwritten header bytes, huge 64-bit counts and lengths
written over it, truncation, and chosen key/value pairs rewritten with values of every GGUF type
(wrong types, signs and ranges, unknown type codes, long or lying arrays, deep nesting). Every
read must end within a second, in a positive footprint or a ModelFileError that names the file
on one line; any other exception, or a hang (an alarm fires after 5 s), fails the test.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import gguf
import pytest
from conftest import write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localmoa.errors import ModelFileError
from localmoa.footprint.estimate import estimate, read_gguf
from localmoa.footprint.gguf import MAX_KEPT_STRING, MAX_NESTED, MAX_WALKED, LongString, read_header
from localmoa.tinymodels import TinySpec, write_header_only

SPEC = TinySpec(n_layer=1, n_embd=8, n_head=2, n_head_kv=1, n_ff=8)
T = gguf.GGUFValueType
FORMATS = {
    T.UINT8: "B",
    T.INT8: "b",
    T.UINT16: "H",
    T.INT16: "h",
    T.UINT32: "I",
    T.INT32: "i",
    T.FLOAT32: "f",
    T.BOOL: "?",
    T.UINT64: "Q",
    T.INT64: "q",
    T.FLOAT64: "d",
}
KEYS = (
    "llama.block_count",
    "llama.embedding_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "llama.attention.value_length",
    "llama.feed_forward_length",
    "llama.vocab_size",
    "llama.context_length",
    "general.alignment",
    "general.architecture",
    "tokenizer.ggml.tokens",
)

# ---- a GGUF file as parts, so a test can rewrite one of them and write the file again -------


def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def scalar(kind: gguf.GGUFValueType, value: object) -> bytes:
    """A key's value: its type, then the value."""
    return struct.pack("<I", kind) + struct.pack("<" + FORMATS[kind], value)


def string(text: str | bytes) -> bytes:
    return struct.pack("<I", T.STRING) + _string(text)


def array(item: int, length: int, payload: bytes = b"") -> bytes:
    """An array header claiming ``length`` items of type ``item``, then ``payload`` as given."""
    return struct.pack("<IIQ", T.ARRAY, item, length) + payload


def nested(depth: int) -> bytes:
    """An array of an array of ... (``depth`` levels) of nothing."""
    if depth == 0:
        return array(T.UINT8, 0)
    # Each nested element is its own item type and length: one array per level, one element each.
    levels = struct.pack("<IQ", T.ARRAY, 1) * (depth - 1)
    return struct.pack("<I", T.ARRAY) + levels + struct.pack("<IQ", T.UINT8, 0)


@dataclass
class Model:
    """A header as its parts: key/value pairs (raw type and value bytes), the raw tensor infos,
    and the size of the (sparse, all-zero) data section."""

    kvs: dict[str, bytes]
    tensors: bytes
    n_tensors: int
    data_bytes: int
    version: int = 3
    counts: tuple[int, int] | None = None  # (tensors, key/values) to claim instead of the truth
    extra: list[tuple[bytes, bytes]] = field(default_factory=list)  # raw (key, value) appended

    def __repr__(self) -> str:  # a failing example prints this: keep it to what was changed
        return f"Model(<{len(self.kvs)} keys>, version={self.version}, counts={self.counts})"

    def rewritten(self, kvs: dict[str, bytes]) -> Model:
        """This model with ``kvs`` replacing (or added after) its key/value pairs."""
        return dataclasses.replace(self, kvs={**self.kvs, **kvs})

    def header(self) -> bytes:
        pairs = [(_string(k), v) for k, v in self.kvs.items()]
        pairs += [(_string(k), v) for k, v in self.extra]
        n_tensors, n_kv = self.counts or (self.n_tensors, len(pairs))
        out = struct.pack("<IIQQ", gguf.GGUF_MAGIC, self.version, n_tensors, n_kv)
        return out + b"".join(k + v for k, v in pairs) + self.tensors

    def write(self, path: Path, header: bytes | None = None) -> Path:
        data = self.header() if header is None else header
        path.write_bytes(data)
        # Tensor data at the default alignment after the header, as a hole.
        os.truncate(path, -(-len(data) // 32) * 32 + self.data_bytes)
        return path


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Model:
    """The tiny model's real header, taken apart with gguf's own reader."""
    folder = tmp_path_factory.mktemp("base")
    full = write_header_only(folder / "full.gguf", SPEC)
    raw = write_header_only(folder / "header.gguf", SPEC, sparse_size=False).read_bytes()
    reader = gguf.GGUFReader(full)
    tensors_at = reader.tensors[0].field.offset
    fields = [f for f in reader.fields.values() if not f.name.startswith("GGUF.")]
    ends = [f.offset for f in fields[1:]] + [tensors_at]
    kvs = {}
    for f, end in zip(fields, ends, strict=True):
        key_end = f.offset + 8 + len(f.name.encode())
        kvs[f.name] = raw[key_end:end]
    data_bytes = full.stat().st_size - -(-len(raw) // 32) * 32
    model = Model(kvs, raw[tensors_at:], len(reader.tensors), data_bytes)
    assert model.header() == raw  # the parts put back together are the real header
    return model


# ---- the property every read must have ----------------------------------------------------


@contextmanager
def alarm(seconds: float) -> Iterator[None]:
    """Raise in the test if the body runs longer than ``seconds``: a hang fails, not blocks."""

    def fire(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"reading the header took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def sized_or_refused(path: Path) -> str:
    """Read ``path`` as planning does: a positive footprint, or one line naming the file."""
    with alarm(5):
        try:
            facts = read_gguf(path)
        except ModelFileError as exc:
            message = str(exc)
            assert message.startswith(f"{path}: "), message
            assert "\n" not in message and "\x1b" not in message, message
            return message
    footprint = estimate(facts, n_ctx=4096, n_batch=512)
    assert min(footprint.weights, footprint.kv_cache) >= 0 and footprint.compute > 0
    assert math.isfinite(float(footprint.total)) and footprint.total > 0
    return ""


FUZZ = settings(
    max_examples=150,
    deadline=1000,  # ms per example, writing the file included
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def test_the_base_header_plans(base: Model, tmp_path: Path) -> None:
    assert sized_or_refused(base.write(tmp_path / "m.gguf")) == ""


# ---- mutations --------------------------------------------------------------------------------

HUGE = st.sampled_from(
    [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**60, 2**63 - 1, 2**63, 2**64 - 1]
) | st.integers(0, 2**64 - 1)
"""A count or length as a hostile header claims it: edges of 32 and 64 bits, or anything."""


@FUZZ
@given(
    flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8),
    words=st.lists(st.tuples(st.integers(0, 10**6), HUGE), max_size=3),
)
def test_overwritten_header_bytes(
    base: Model, tmp_path: Path, flips: list[tuple[int, int]], words: list[tuple[int, int]]
) -> None:
    header = bytearray(base.header())
    for at, byte in flips:
        header[at % len(header)] = byte
    for at, value in words:  # a count or a length made huge, anywhere in the header
        at %= len(header) - 8
        header[at : at + 8] = struct.pack("<Q", value)
    sized_or_refused(base.write(tmp_path / "m.gguf", bytes(header)))


@FUZZ
@given(cut=st.floats(0, 1))
def test_truncated_anywhere(base: Model, tmp_path: Path, cut: float) -> None:
    path = base.write(tmp_path / "m.gguf")
    size = path.stat().st_size
    os.truncate(path, int(size * cut))
    assert sized_or_refused(path) != "" or int(size * cut) == size


def scalars(kind: gguf.GGUFValueType) -> st.SearchStrategy[bytes]:
    """Any value a scalar of this type holds: NaN, infinities, negatives and extremes included."""
    fmt = FORMATS[kind]
    numbers: st.SearchStrategy[object]
    if fmt in "fd":
        numbers = st.floats(width=32 if fmt == "f" else 64)
    elif fmt == "?":
        numbers = st.booleans()
    else:
        bits = struct.calcsize(fmt) * 8
        low, high = (0, 2**bits - 1) if fmt.isupper() else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        numbers = st.integers(low, high)
    return numbers.map(lambda value: scalar(kind, value))


def values() -> st.SearchStrategy[bytes]:
    """A key's value, hostile or not, of every GGUF type and then some."""
    return st.one_of(
        *(scalars(kind) for kind in FORMATS),
        st.text(max_size=20).map(string),
        HUGE.map(lambda n: struct.pack("<IQ", T.STRING, n)),  # a string claiming n bytes
        st.builds(  # an array of any item type, claiming any length, over some bytes
            array,
            st.integers(0, 14) | st.integers(0, 2**32 - 1),
            HUGE | st.integers(0, 5000),
            st.binary(max_size=64),
        ),
        st.lists(st.integers(-(2**31), 2**31 - 1), max_size=6).map(
            lambda xs: array(T.INT32, len(xs), struct.pack(f"<{len(xs)}i", *xs))
        ),
        st.sampled_from([1, 2, 4, 5, 6, 50, 1000, 100_000]).map(nested),
        st.integers(13, 2**32 - 1).map(lambda kind: struct.pack("<I", kind) + b"\0" * 8),
    )


@FUZZ
@given(rewrites=st.dictionaries(st.sampled_from(KEYS), values(), min_size=1, max_size=3))
def test_rewritten_values(base: Model, tmp_path: Path, rewrites: dict[str, bytes]) -> None:
    model = base.rewritten(rewrites)
    sized_or_refused(model.write(tmp_path / "m.gguf"))


@FUZZ
@given(
    counts=st.tuples(HUGE, HUGE) | st.tuples(st.integers(0, 40), st.integers(0, 40)),
    version=st.sampled_from([1, 2, 3, 4, 0x03000000, 2**32 - 1]),
    extra=st.lists(st.tuples(st.binary(max_size=12), values()), max_size=2),
)
def test_lying_counts_versions_and_odd_keys(
    base: Model,
    tmp_path: Path,
    counts: tuple[int, int],
    version: int,
    extra: list[tuple[bytes, bytes]],
) -> None:
    model = dataclasses.replace(base, version=version, counts=counts, extra=extra)
    sized_or_refused(model.write(tmp_path / "m.gguf"))


# ---- the cases of issue #9, one by one --------------------------------------------------------

CASES = {
    "negative-layers": ({"llama.block_count": scalar(T.INT32, -1_000_000)}, "llama.block_count"),
    "alignment-zero": ({"general.alignment": scalar(T.UINT32, 0)}, "general.alignment = 0"),
    "deep-nesting": ({"tokenizer.ggml.scores": nested(100_000)}, "nested more than"),
    "string-layers": ({"llama.block_count": string("32")}, "llama.block_count = '32'"),
}


@pytest.mark.parametrize("case", CASES)
def test_issue_cases_are_model_file_errors(base: Model, tmp_path: Path, case: str) -> None:
    rewrites, expected = CASES[case]
    path = base.rewritten(rewrites).write(tmp_path / f"{case}.gguf")
    message = sized_or_refused(path)
    assert "not a valid GGUF file" in message and expected in message, message


@pytest.mark.parametrize(
    ("rewrites", "expected"),
    [
        ({"llama.block_count": scalar(T.UINT32, 5000)}, "from 1 to 4,096"),
        ({"llama.block_count": scalar(T.FLOAT32, 2.0)}, "llama.block_count = 2.0: must be an"),
        ({"llama.block_count": scalar(T.BOOL, True)}, "llama.block_count = True"),
        ({"llama.embedding_length": scalar(T.UINT64, 2**40)}, "llama.embedding_length ="),
        ({"llama.attention.head_count_kv": scalar(T.INT8, -1)}, "head_count_kv = -1"),
        (
            {"llama.attention.head_count": array(T.INT32, 2, struct.pack("<2i", 2, 2))},
            "has 2 entries for 1 layers",
        ),
        (
            {"llama.feed_forward_length": array(T.FLOAT32, 1, struct.pack("<f", 8.0))},
            "llama.feed_forward_length[0] = 8.0",
        ),
        (
            {"llama.attention.head_count": array(T.STRING, 1, _string("2"))},
            "llama.attention.head_count = an array of 1 STRING: must be integers",
        ),
        ({"general.alignment": scalar(T.UINT32, 48)}, "general.alignment = 48"),
        ({"general.alignment": scalar(T.UINT32, 1 << 30)}, "general.alignment"),
        ({"llama.vocab_size": scalar(T.INT64, -5)}, "llama.vocab_size = -5"),
        ({"llama.context_length": string("4k")}, "llama.context_length = '4k'"),
        ({"general.architecture": scalar(T.UINT32, 7)}, "general.architecture = 7"),
        ({"general.architecture": string("ll\nama")}, "general.architecture = 'll\\nama'"),
        ({"tokenizer.ggml.tokens": array(T.STRING, 2**60)}, "does not fit"),
        ({"tokenizer.ggml.tokens": array(99, 1)}, "unknown value type 99"),
        ({"llama.block_count": struct.pack("<I", 13) + b"\0" * 8}, "unknown value type 13"),
    ],
)
def test_each_field_is_checked(
    base: Model, tmp_path: Path, rewrites: dict[str, bytes], expected: str
) -> None:
    model = base.rewritten(rewrites)
    message = sized_or_refused(model.write(tmp_path / "m.gguf"))
    assert expected in message, message


def test_per_layer_arrays_are_read_element_by_element(base: Model, tmp_path: Path) -> None:
    model = base.rewritten(
        {
            "llama.attention.head_count": array(T.UINT32, 1, struct.pack("<I", 2)),
            "llama.attention.head_count_kv": array(T.UINT16, 1, struct.pack("<H", 1)),
            "llama.feed_forward_length": array(T.INT32, 1, struct.pack("<i", 8)),
        }
    )
    facts = read_gguf(model.write(tmp_path / "m.gguf"))
    assert (facts.n_head, facts.n_head_kv_total, facts.n_ff) == (2, 1, 8)


def test_a_tensor_with_an_unknown_type_or_too_many_dimensions(base: Model, tmp_path: Path) -> None:
    # The first tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64).
    name_end = 8 + struct.unpack_from("<Q", base.tensors)[0]
    n_dims = struct.unpack_from("<I", base.tensors, name_end)[0]
    type_at = name_end + 4 + 8 * n_dims
    for patch, expected in [
        ((type_at, struct.pack("<I", 4)), "unknown tensor type 4"),  # Q4_2, long removed
        ((name_end, struct.pack("<I", 2**31)), "2147483648 dimensions"),
        ((name_end, struct.pack("<I", 0)), "0 dimensions"),
    ]:
        tensors = bytearray(base.tensors)
        at, raw = patch
        tensors[at : at + len(raw)] = raw
        model = dataclasses.replace(base, tensors=bytes(tensors))
        message = sized_or_refused(model.write(tmp_path / "m.gguf"))
        assert expected in message, message


def test_the_reader_walks_no_more_than_its_limits(base: Model, tmp_path: Path) -> None:
    """Arrays whose every claimed element would be walked: refused before the first step, even
    when the file (sparse zeros: empty strings, empty arrays) is big enough to hold them."""
    for value, expected in [
        (array(T.STRING, MAX_WALKED + 1), f"more than {MAX_WALKED:,} array elements"),
        (array(T.ARRAY, MAX_NESTED + 1), f"more than {MAX_NESTED:,} arrays inside arrays"),
    ]:
        model = dataclasses.replace(base.rewritten({"tokenizer.ggml.merges": value}), n_tensors=0)
        path = model.write(tmp_path / "m.gguf")
        os.truncate(path, path.stat().st_size + 12 * (MAX_WALKED + 1))
        message = sized_or_refused(path)
        assert expected in message, message


def test_a_huge_string_is_skipped_not_copied(base: Model, tmp_path: Path) -> None:
    template = string("x" * (MAX_KEPT_STRING + 1))
    model = base.rewritten({"tokenizer.chat_template": template})
    path = model.write(tmp_path / "m.gguf")
    assert sized_or_refused(path) == ""
    metadata = read_header(path).metadata
    assert metadata["tokenizer.chat_template"] == LongString(MAX_KEPT_STRING + 1)


def test_a_vocabulary_sized_array_still_reads_fast(tmp_path: Path) -> None:
    """The limits cost the common case nothing: a 128k-token vocabulary reads in milliseconds."""
    path = write_header_only(tmp_path / "vocab.gguf", TinySpec(n_vocab=128_256))
    with alarm(1):
        facts = read_gguf(path)
    assert facts.n_vocab == 128_256


# ---- through the command line ----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_plan_on_a_hostile_file_is_one_line_and_exit_2(
    base: Model, tmp_path: Path, case: str
) -> None:
    rewrites, expected = CASES[case]
    path = base.rewritten(rewrites).write(tmp_path / f"{case}.gguf")
    config = write_config(
        tmp_path,
        f"""
        [models.m]
        backend = "llamacpp"
        path = "{path}"
        [ensembles.default]
        layers = [["m"]]
        aggregator = "m"
        """,
    )
    out = subprocess.run(
        [sys.executable, "-m", "localmoa", "plan", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if path.name in line]
    assert len(lines) == 1 and expected in lines[0], out.stderr
