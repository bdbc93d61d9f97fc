"""Read a GGUF file's header: its scalar metadata, array lengths, and the tensor table's bytes.

Why not ``gguf.GGUFReader``: it builds a numpy view for every element of every metadata array,
which for a real vocabulary (128k tokens, 280k merges) takes 8 seconds per model, and planning
must read every model of an ensemble. This reader walks the same layout (the llama.cpp project's
``gguf-py`` and ``docs/gguf.md``) with ``struct`` over a memory map, keeps scalars, keeps only
the length of arrays, and skips their contents: a few tens of milliseconds for the same file. It
uses the ``gguf`` package's constants for value types and tensor type sizes, so new quantization
types come with a ``gguf`` upgrade.

A file is rejected (``ValueError`` with the reason) when it does not start with the GGUF magic,
has a version other than 2 or 3, ends inside the header, or is shorter than its tensor table says
(a partial download).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
)

__all__ = ["ArrayInfo", "GGUFHeader", "read_header"]

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
_SMALL_ARRAY = 64  # numeric arrays up to this length are kept (per-layer head counts)


@dataclass(frozen=True)
class ArrayInfo:
    """A metadata array's element type and length (its contents are skipped)."""

    item_type: GGUFValueType
    length: int


@dataclass(frozen=True)
class GGUFHeader:
    """What the header says: metadata (scalars, small numeric arrays as lists, other arrays as
    ArrayInfo), the bytes of every tensor, and where the tensor data starts."""

    metadata: dict[str, Any]
    tensor_bytes: dict[str, int]
    data_offset: int
    file_size: int


def read_header(path: Path) -> GGUFHeader:
    """Parse ``path``'s header; ValueError says what is wrong with a file that is not usable."""
    with path.open("rb") as file:
        size = path.stat().st_size
        if size < 24:
            raise ValueError(f"{size} bytes is too short for a GGUF header")
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _Parser(data, size).header()


class _Parser:
    def __init__(self, data: mmap.mmap, size: int) -> None:
        self.data = data
        self.size = size
        self.at = 0
        self.order = "<"

    def header(self) -> GGUFHeader:
        (magic,) = self._unpack("I")
        if magic != GGUF_MAGIC:
            raise ValueError("GGUF magic invalid: not a GGUF file")
        (version,) = self._unpack("I")
        if version & 0xFFFF == 0 and version:  # written on a big-endian machine
            self.order = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = self._unpack("QQ")
        if n_tensors > self.size or n_kv > self.size:
            raise ValueError("header counts exceed the file size: corrupt header")
        metadata = {}
        for _ in range(n_kv):
            key = self._string()
            (kind,) = self._unpack("I")
            metadata[key] = self._value(GGUFValueType(kind))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = self._unpack("I")
            dims = self._unpack("Q" * n_dims)
            kind, offset = self._unpack("IQ")
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            elements = 1
            for dim in dims:
                elements *= dim
            infos.append((name, offset, elements // block * type_size))
        alignment = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        data_offset = -(-self.at // alignment) * alignment
        end = max((offset + n for _, offset, n in infos), default=0)
        if data_offset + end > self.size:
            raise ValueError(
                f"tensor data ends at byte {data_offset + end} but the file has {self.size}: "
                "truncated"
            )
        return GGUFHeader(
            metadata=metadata,
            tensor_bytes={name: n for name, _, n in infos},
            data_offset=data_offset,
            file_size=self.size,
        )

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        layout = struct.Struct(self.order + fmt)
        if self.at + layout.size > self.size:
            raise ValueError(f"file ends inside the header (at byte {self.at})")
        values = layout.unpack_from(self.data, self.at)
        self.at += layout.size
        return values

    def _string(self) -> str:
        (length,) = self._unpack("Q")
        if self.at + length > self.size:
            raise ValueError(f"file ends inside the header (at byte {self.at})")
        raw = self.data[self.at : self.at + length]
        self.at += length
        return raw.decode("utf-8", errors="replace")

    def _value(self, kind: GGUFValueType) -> Any:
        if kind == GGUFValueType.STRING:
            return self._string()
        if kind == GGUFValueType.ARRAY:
            item, length = self._unpack("IQ")
            item_type = GGUFValueType(item)
            if item_type in _SCALARS and length <= _SMALL_ARRAY:
                return list(self._unpack(_SCALARS[item_type] * length))
            self._skip(item_type, length)
            return ArrayInfo(item_type, length)
        return self._unpack(_SCALARS[kind])[0]

    def _skip(self, kind: GGUFValueType, length: int) -> None:
        if kind in _SCALARS:
            self.at += struct.calcsize(_SCALARS[kind]) * length
        elif kind == GGUFValueType.STRING:
            read_length = struct.Struct(self.order + "Q").unpack_from
            data, at = self.data, self.at
            for _ in range(length):
                at += 8 + read_length(data, at)[0]
            self.at = at
        else:  # nested arrays never occur in model files; walk them anyway
            for _ in range(length):
                self._value(kind)
        if self.at > self.size:
            raise ValueError("file ends inside the header")
