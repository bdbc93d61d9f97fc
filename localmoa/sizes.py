"""Byte sizes as people write them ("12GiB", "512MB") and as localmoa prints them ("1.5 GiB").

A size is a whole number of bytes from 1 to :data:`MAX_SIZE` (1 PiB). Zero and negatives mean
nothing as a memory size; ``inf``, ``nan`` and figures such as ``1e400`` (TOML reads them as
floats, and ``1e400`` *is* ``inf``) cannot be counted in bytes at all. Sizes above 1 PiB are
refused too, rather than taken as "more than any device": no machine has that much memory, so
such a figure is a slip of the keyboard, and every accepted size stays exact as a JSON number
(below 2^53) in ``--json`` output and the server's responses. To plan without a memory limit,
give the device's real size, or a generous one such as "1TiB".
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import ByteSize, TypeAdapter, ValidationError

__all__ = ["MAX_SIZE", "format_bytes", "parse_size"]

MAX_SIZE = 1 << 50
"""1 PiB: the largest size accepted anywhere (module docstring)."""

_BYTE_SIZE = TypeAdapter(ByteSize)
_EXAMPLE = 'write e.g. "512MiB" or "12GiB"'


def parse_size(value: Any) -> int:
    """A size in bytes (1 to 1 PiB) from "12GiB", "512MB", "1.5 GiB" or a number of bytes.

    ValueError (with an example of what works) for anything else: zero, negatives, infinity,
    NaN, overflowing figures and sizes over 1 PiB included. Never another exception, because
    pydantic turns only ValueError into a config error that names the key.
    """
    size = 0
    if isinstance(value, float) and math.isnan(value):
        raise ValueError(f"not a size: {value!r} is not a number ({_EXAMPLE})")
    if isinstance(value, float) and math.isinf(value):
        raise ValueError(
            f"not a size: {value!r} is infinite (TOML reads 1e400 and beyond as inf too; "
            f"{_EXAMPLE})"
        )
    if isinstance(value, int | float) and not isinstance(value, bool):
        size = int(value)
    elif isinstance(value, str):
        try:
            size = int(_BYTE_SIZE.validate_python(value))
        except (ValidationError, ValueError, OverflowError):
            # OverflowError: a figure beyond a float's range, should pydantic let one out
            size = 0
    if size > MAX_SIZE:
        raise ValueError(
            f"not a size: {_short(value)} is more than any machine's memory (at most 1 PiB; "
            f"{_EXAMPLE})"
        )
    if size <= 0:
        raise ValueError(f"not a size: {_short(value)} ({_EXAMPLE})")
    return size


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "…"


def format_bytes(n: int) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'. Any int, however large."""
    if abs(n) >= 1 << 60:  # beyond float's exact range well before it overflows: whole TiB
        return f"{n >> 40} TiB"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
