"""Read a GGUF file's header: its scalar metadata, array lengths, and the tensor table's bytes.

Why not ``gguf.GGUFReader``: it builds a numpy view for every element of every metadata array,
which for a real vocabulary (128k tokens, 280k merges) takes 8 seconds per model, and planning
must read every model of an ensemble. This reader walks the same layout (the llama.cpp project's
``gguf-py`` and ``docs/gguf.md``) with ``struct`` over a memory map, keeps scalars, keeps only
the length of arrays, and skips their contents: a few tens of milliseconds for the same file.

The few format constants it needs (the magic, the default alignment, the 13 value types and each
tensor type's block size and bytes) are written out here instead of imported from the ``gguf``
package. They are facts of the file format, not code; ``gguf`` would bring numpy with it (about
80 ms to import, and 45 MB installed) to a reader that never uses it; and without it the core
install (``pip install localmoa``, no llama.cpp) still reads GGUF headers and plans. The tests
compare every constant with the installed ``gguf`` package's (tests/footprint/test_gguf.py),
so a ``gguf`` release with a new quantization type fails them until the table here has it; a
file with a type not in the table is refused by name (:class:`GGUFError`).

A model file is input from the internet, so the reader treats every count, length and type in it
as hostile: each is checked *before* it sizes a loop, an allocation or a division, and a file
that breaks a limit is refused with :class:`GGUFError` (a ``ValueError``) naming the key, tensor
or byte offset at fault. No file can make the reader recurse without bound, loop for longer than
its own size allows, or raise anything else. The limits, each far beyond any real model:

=========================  =========================================================================
version                    2 or 3 (version 1 had 32-bit counts)
tensor count               ≤ 131,072 and ≤ the bytes left / 24 (the smallest tensor info); real
                           models have about 14,000 at most (MoE experts stored apart)
key/value count            ≤ 65,536 and ≤ the bytes left / 13 (the smallest key/value pair); real
                           models have about 40
key                        ≤ 65,535 bytes (the GGUF spec's own limit), no key twice
value type                 one of GGUF's 13 types
string                     ≤ the bytes left; one over 1 MiB is kept as its length only
                           (:class:`LongString`): a chat template is kilobytes, and only
                           ``general.architecture`` is ever read
array                      length × its smallest element ≤ the bytes left, checked before the
                           array is walked; numeric arrays of ≤ 4096 elements (per-layer values)
                           are kept as lists, longer ones and all others as :class:`ArrayInfo`
array elements read        ≤ 8,388,608 per file, counting the elements of arrays of strings or of
                           arrays and of numeric arrays kept as lists (a real vocabulary is
                           262,144 tokens and 280,147 merges): 0.6 s of skipping at most on a
                           laptop core
nesting                    arrays inside arrays at most 4 deep and 65,536 in all (model files
                           never nest them)
tensor name                ≤ 65,535 bytes, no name twice
tensor dimensions          1 to 4 (``GGML_MAX_DIMS``); the first a multiple of the type's block
                           size; elements ≤ 2^62 (llama.cpp's own overflow bound)
tensor type                one of :data:`TENSOR_TYPES` (the ``gguf`` package's, see above)
``general.alignment``      an integer, a power of two from 1 to 1 MiB (GGUF's default is 32)
tensor data                every tensor inside the file, and their bytes together no more than the
                           data section holds (overlapping tensors would inflate the estimate)
=========================  =========================================================================

A file that ends inside its header, or before the end of its tensor data (a partial download), is
refused the same way. The model facts the memory estimate reads from the metadata have limits of
their own, in :mod:`localmoa.footprint.estimate`.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

__all__ = [
    "GGUF_DEFAULT_ALIGNMENT",
    "GGUF_MAGIC",
    "TENSOR_TYPES",
    "ArrayInfo",
    "GGUFError",
    "GGUFHeader",
    "GGUFValueType",
    "LongString",
    "printable",
    "read_header",
]

GGUF_MAGIC = 0x46554747
"""b"GGUF" read as a little-endian uint32."""
GGUF_DEFAULT_ALIGNMENT = 32


class GGUFValueType(IntEnum):
    """The type of a metadata value (gguf-py's ``GGUFValueType``)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


TENSOR_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", 32, 18),
    3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24),
    8: ("Q8_0", 32, 34),
    9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66),
    17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18),
    21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1),
    25: ("I16", 1, 2),
    26: ("I32", 1, 4),
    27: ("I64", 1, 8),
    28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2),
    34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17),
    40: ("NVFP4", 64, 36),
    41: ("Q1_0", 128, 18),
}
"""Tensor type id: (name, elements per block, bytes per block), as gguf-py's
``GGMLQuantizationType`` and ``GGML_QUANT_SIZES`` (gguf 0.19) have them."""

_SCALARS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
_TYPES = {int(kind): kind for kind in GGUFValueType}
_TENSOR_TYPES = {kind: (block, size) for kind, (_, block, size) in TENSOR_TYPES.items()}

HEADER_BYTES = 24  # magic, version, tensor count, key/value count
MAX_TENSORS = 1 << 17
MAX_KV = 1 << 16
MIN_TENSOR_INFO = 24  # empty name (8), n_dims (4), type (4), offset (8); dims come on top
MIN_KV = 13  # empty key (8), value type (4), a one-byte value
MAX_NAME = 65_535  # keys and tensor names
MAX_KEPT_STRING = 1 << 20
MAX_KEPT_ARRAY = 4096  # numeric arrays up to this length are kept (per-layer head counts)
MAX_WALKED = 1 << 23  # string and array elements walked per file
MAX_DEPTH = 4
MAX_NESTED = 1 << 16  # arrays inside arrays, per file: each costs a few Python calls to walk
MAX_DIMS = 4
MAX_ELEMENTS = 1 << 62
MAX_ALIGNMENT = 1 << 20
_ARRAY_HEAD = 12  # an array's item type (4) and length (8)


class GGUFError(ValueError):
    """A GGUF header, or GGUF-style metadata, that localmoa cannot use; the message names the
    key, tensor or byte offset at fault and the rule it breaks."""


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array's element type and length (its contents are skipped)."""

    item_type: GGUFValueType
    length: int


@dataclass(frozen=True)
class LongString:
    """A metadata string over 1 MiB: only its length is kept (its contents are skipped)."""

    length: int


@dataclass(frozen=True)
class GGUFHeader:
    """What the header says: metadata (scalars, small numeric arrays as lists, other arrays as
    ArrayInfo, strings over 1 MiB as LongString), the bytes of every tensor, and where the tensor
    data starts."""

    metadata: dict[str, Any]
    tensor_bytes: dict[str, int]
    data_offset: int
    file_size: int


def read_header(path: Path) -> GGUFHeader:
    """Parse ``path``'s header. GGUFError says what is wrong with a file that is not usable;
    OSError comes through when the file cannot be read at all."""
    with path.open("rb") as file:
        size = path.stat().st_size
        if size < HEADER_BYTES:
            raise GGUFError(f"{size} bytes is too short for a GGUF header")
        try:
            data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError as exc:  # the file shrank to nothing since stat
            raise GGUFError(f"cannot map the file: {exc}") from None
        with data:
            return _Parser(data, min(size, len(data))).header()


class _Parser:
    def __init__(self, data: mmap.mmap, size: int) -> None:
        self.data = data
        self.size = size
        self.at = 0
        self.order = "<"
        self.key = ""  # the key whose value is being read, for messages
        self.walk_left = MAX_WALKED
        self.nested_left = MAX_NESTED

    def header(self) -> GGUFHeader:
        (magic,) = self._unpack("I")
        if magic != GGUF_MAGIC:
            raise GGUFError("GGUF magic invalid: not a GGUF file")
        (version,) = self._unpack("I")
        if version & 0xFFFF == 0 and version:  # written on a big-endian machine
            self.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            raise GGUFError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._unpack("QQ")
        self._check_count("tensor count", n_tensors, MAX_TENSORS, MIN_TENSOR_INFO)
        self._check_count("key/value count", n_kv, MAX_KV, MIN_KV)
        metadata = self._metadata(n_kv)
        alignment = _alignment(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        infos = self._tensor_infos(n_tensors)
        data_offset = -(-self.at // alignment) * alignment
        end = max((offset + n for offset, n in infos.values()), default=0)
        if data_offset + end > self.size:
            raise GGUFError(
                f"tensor data ends at byte {data_offset + end} but the file has {self.size}: "
                "truncated"
            )
        total = sum(n for _, n in infos.values())
        if total > self.size - data_offset:
            raise GGUFError(
                f"the tensor table claims {total} bytes but the data section holds "
                f"{self.size - data_offset}: tensors overlap"
            )
        return GGUFHeader(
            metadata=metadata,
            tensor_bytes={name: n for name, (_, n) in infos.items()},
            data_offset=data_offset,
            file_size=self.size,
        )

    def _check_count(self, what: str, count: int, maximum: int, smallest: int) -> None:
        """A count read from the header, against its limit and what the file could hold."""
        room = (self.size - self.at) // smallest
        if count > min(maximum, room):
            raise GGUFError(
                f"{what} {count} is more than the file could hold (at most {min(maximum, room):,}"
                f" in {self.size:,} bytes; the limit is {maximum:,}): corrupt header"
            )

    def _metadata(self, n_kv: int) -> dict[str, Any]:
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string(MAX_NAME, "key")
            if not isinstance(key, str):
                raise GGUFError(f"a key of {key.length} bytes at byte {self.at}: corrupt header")
            if key in metadata:
                raise GGUFError(f"key {printable(key)} appears twice")
            self.key = printable(key)
            metadata[key] = self._value(self._type(), 0)
        self.key = ""
        return metadata

    def _tensor_infos(self, n_tensors: int) -> dict[str, tuple[int, int]]:
        """Each tensor's (offset, bytes) by name."""
        infos: dict[str, tuple[int, int]] = {}
        for _ in range(n_tensors):
            name = self._string(MAX_NAME, "tensor name")
            if not isinstance(name, str):
                raise GGUFError(f"a tensor name of {name.length} bytes: corrupt tensor table")
            shown = printable(name)
            if name in infos:
                raise GGUFError(f"tensor {shown} appears twice")
            (n_dims,) = self._unpack("I")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"tensor {shown}: {n_dims} dimensions (GGUF allows 1 to 4)")
            dims = self._unpack("Q" * n_dims)
            kind, offset = self._unpack("IQ")
            if kind not in _TENSOR_TYPES:
                raise GGUFError(
                    f"tensor {shown}: unknown tensor type {kind} (a newer quantization? upgrade "
                    "localmoa)"
                )
            block, type_size = _TENSOR_TYPES[kind]
            elements = 1
            for dim in dims:
                elements *= dim
            if elements > MAX_ELEMENTS:
                raise GGUFError(f"tensor {shown}: shape {list(dims)} has too many elements")
            if dims[0] % block:
                raise GGUFError(
                    f"tensor {shown}: first dimension {dims[0]} is not a multiple of its type's "
                    f"block of {block}"
                )
            infos[name] = (offset, elements // block * type_size)
        return infos

    def _type(self) -> GGUFValueType:
        (kind,) = self._unpack("I")
        if kind not in _TYPES:
            raise GGUFError(f"key {self.key}: unknown value type {kind}")
        return _TYPES[kind]

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        layout = struct.Struct(self.order + fmt)
        if self.at + layout.size > self.size:
            raise self._ends_inside()
        values = layout.unpack_from(self.data, self.at)
        self.at += layout.size
        return values

    def _ends_inside(self) -> GGUFError:
        where = f" (in key {self.key})" if self.key else ""
        return GGUFError(f"file ends inside the header at byte {self.at}{where}")

    def _string(self, keep: int = MAX_KEPT_STRING, what: str = "") -> str | LongString:
        (length,) = self._unpack("Q")
        if self.at + length > self.size:
            raise self._ends_inside()
        if length > keep:
            if what:  # names must be short
                raise GGUFError(f"{what} of {length:,} bytes at byte {self.at} (at most {keep:,})")
            self.at += length
            return LongString(length)
        raw = self.data[self.at : self.at + length]
        self.at += length
        return raw.decode("utf-8", errors="replace")

    def _value(self, kind: GGUFValueType, depth: int = 0) -> Any:
        if kind == GGUFValueType.STRING:
            return self._string()
        if kind == GGUFValueType.ARRAY:
            return self._array(depth + 1)
        return self._unpack(_SCALARS[kind])[0]

    def _array(self, depth: int) -> list[Any] | ArrayInfo:
        """An array's length is checked against the bytes left before anything walks it; only
        top-level numeric arrays are kept, and kept or walked elements count against the file's
        walking allowance, so neither time nor memory can grow beyond the limits."""
        if depth > MAX_DEPTH:
            raise GGUFError(f"key {self.key}: arrays nested more than {MAX_DEPTH} deep")
        item = self._type()
        (length,) = self._unpack("Q")
        if item in _SCALARS:
            smallest = struct.calcsize(_SCALARS[item])
        else:
            smallest = _ARRAY_HEAD if item == GGUFValueType.ARRAY else 8
        if length * smallest > self.size - self.at:
            raise GGUFError(
                f"key {self.key}: an array of {length:,} {item.name} elements does not fit in "
                f"the {self.size - self.at:,} bytes left: corrupt header"
            )
        keep = item in _SCALARS and depth == 1 and length <= MAX_KEPT_ARRAY
        if keep or item not in _SCALARS:
            self.walk_left -= length
            if self.walk_left < 0:
                raise GGUFError(
                    f"key {self.key}: more than {MAX_WALKED:,} array elements to read in the "
                    "header: corrupt header"
                )
        if item == GGUFValueType.ARRAY:
            self.nested_left -= length
            if self.nested_left < 0:
                raise GGUFError(
                    f"key {self.key}: more than {MAX_NESTED:,} arrays inside arrays: corrupt header"
                )
        if keep:
            return list(self._unpack(_SCALARS[item] * length))
        if item in _SCALARS:
            self.at += smallest * length
        elif item == GGUFValueType.STRING:
            self._skip_strings(length)
        else:
            for _ in range(length):
                self._value(item, depth)
        return ArrayInfo(item, length)

    def _skip_strings(self, length: int) -> None:
        """Step over ``length`` strings: the hot loop for vocabularies, so bounds are checked by
        struct itself (an offset past the end raises) and once at the end."""
        read_length = struct.Struct(self.order + "Q").unpack_from
        data, at = self.data, self.at
        try:
            for _ in range(length):
                at += 8 + read_length(data, at)[0]
        except (struct.error, OverflowError):  # an offset past the end, or past 2^63
            raise self._ends_inside() from None
        if at > self.size:
            raise self._ends_inside()
        self.at = at


def printable(text: str, limit: int = 60) -> str:
    """A key or name from a file as a one-line message may quote it: a hostile file could
    otherwise put newlines, terminal escapes or 64 KiB into the user's terminal."""
    if text and text.isprintable() and len(text) <= limit:
        return text
    quoted = ascii(text)
    return quoted if len(quoted) <= limit else quoted[: limit - 1] + "…"


def _alignment(value: Any) -> int:
    """``general.alignment``: data starts at a multiple of it, so it divides and must be sane."""
    if (
        isinstance(value, int)
        and not isinstance(value, bool)
        and 1 <= value <= MAX_ALIGNMENT
        and value & (value - 1) == 0
    ):
        return value
    shown = value if isinstance(value, int | float | str | list) else type(value).__name__
    raise GGUFError(
        f"general.alignment = {shown!r}: must be a power of two from 1 to {MAX_ALIGNMENT:,}"
    )
