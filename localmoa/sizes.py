"""Byte sizes as people write them ("12GiB", "512MB") and as localmoa prints them ("1.5 GiB")."""

from __future__ import annotations

from typing import Any

from pydantic import ByteSize, TypeAdapter, ValidationError

__all__ = ["format_bytes", "parse_size"]

_BYTE_SIZE = TypeAdapter(ByteSize)


def parse_size(value: Any) -> int:
    """A positive size in bytes from "12GiB", "512MB", "1.5 GiB" or an integer of bytes.

    ValueError (with an example of what works) for anything else, zero and negatives included.
    """
    size = 0
    if isinstance(value, int | float) and not isinstance(value, bool):
        size = int(value)
    elif isinstance(value, str):
        try:
            size = int(_BYTE_SIZE.validate_python(value))
        except ValidationError:
            size = 0
    if size <= 0:
        raise ValueError(f'not a size: {value!r} (write e.g. "512MiB" or "12GiB")')
    return size


def format_bytes(n: int) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
