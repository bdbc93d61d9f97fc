"""The GGUF reader's own copy of the format's constants is the gguf package's, exactly.

The reader does not import ``gguf`` (the core install has no numpy; see localmoa.footprint.gguf),
so this is what keeps the copy honest: a ``gguf`` release with a new tensor type or a changed
size fails here until the table has it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf

from localmoa.footprint import gguf as reader


def test_value_types_are_ggufs() -> None:
    assert {t.name: int(t) for t in reader.GGUFValueType} == {
        t.name: int(t) for t in gguf.GGUFValueType
    }


def test_tensor_types_and_sizes_are_ggufs() -> None:
    theirs = {
        int(kind): (kind.name, *gguf.GGML_QUANT_SIZES[kind])
        for kind in gguf.GGMLQuantizationType
        if kind in gguf.GGML_QUANT_SIZES
    }
    assert theirs == reader.TENSOR_TYPES


def test_magic_and_alignment_are_ggufs() -> None:
    assert reader.GGUF_MAGIC == gguf.GGUF_MAGIC
    assert reader.GGUF_DEFAULT_ALIGNMENT == gguf.GGUF_DEFAULT_ALIGNMENT


SOURCE = str(Path(__file__).resolve().parents[2])


def test_reading_a_header_imports_neither_gguf_nor_numpy(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["tiny-a"]
    code = (
        "import sys\n"
        "from localmoa.footprint.estimate import read_gguf\n"
        f"facts = read_gguf(__import__('pathlib').Path({str(path)!r}))\n"
        "assert facts.n_layer == 2, facts\n"
        "print(sorted(m for m in ('gguf', 'numpy', 'llama_cpp') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONPATH": SOURCE},
    )
    assert out.stdout.strip() == "[]"
