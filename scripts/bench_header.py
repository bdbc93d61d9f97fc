"""How long sizing a model takes: localmoa's GGUF header reader against gguf.GGUFReader.

    python scripts/bench_header.py [--repeat 5]

Writes an 8B-shaped llama header (32 layers, n_embd 4096, 128,256-token vocabulary) with no
tensor data, sparse on disk (localmoa.tinymodels.write_header_only), then times
localmoa.footprint.estimate.read_gguf and gguf's own GGUFReader on it. Planning reads every
model of an ensemble, so this is paid once per model per `localmoa plan` or `run`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf

from localmoa.footprint.estimate import read_gguf
from localmoa.tinymodels import TinySpec, write_header_only

SPEC = TinySpec(n_layer=32, n_embd=4096, n_head=32, n_head_kv=8, n_ff=14336, n_vocab=128256)


def timed(read: Callable[[Path], Any], path: Path, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        read(path)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = write_header_only(Path(folder) / "8b.gguf", SPEC)
        ours = timed(read_gguf, path, args.repeat)
        theirs = timed(gguf.GGUFReader, path, max(1, args.repeat // 5))
    print("| reader | median |\n|---|--:|")
    print(f"| localmoa.footprint.estimate.read_gguf | {ours * 1000:.0f} ms |")
    print(f"| gguf.GGUFReader | {theirs:.1f} s |")


if __name__ == "__main__":
    main()
