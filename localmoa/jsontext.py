"""JSON found inside a model's free text: a verdict, a rating or a list of roles may sit in a
fenced block, among prose, or after an echo of the schema, so every place a JSON value could
start is tried with :meth:`json.JSONDecoder.raw_decode`, in order.

Only a ``{`` before a quoted key (or a ``[``) is tried: each failed attempt costs up to the
text's length, and an object without keys carries nothing to read.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

__all__ = ["json_objects", "json_values"]

_OBJECT = re.compile(r'\{\s*"')
_VALUE = re.compile(r'\{\s*"|\[')


def json_values(text: str) -> Iterator[Any]:
    """Every JSON object or array that decodes at some point of ``text``, in order (an
    object's inner objects follow it, so a value nested in a wrapper is found too)."""
    yield from _decoded(text, _VALUE)


def json_objects(text: str) -> Iterator[dict[str, Any]]:
    """Every JSON object (with a key) that decodes at some ``{`` of ``text``, in order."""
    for value in _decoded(text, _OBJECT):
        if isinstance(value, dict):
            yield value


def _decoded(text: str, starts: re.Pattern[str]) -> Iterator[Any]:
    decoder = json.JSONDecoder()
    for start in starts.finditer(text):
        try:
            value, _ = decoder.raw_decode(text, start.start())
        except (ValueError, RecursionError):
            continue
        yield value
