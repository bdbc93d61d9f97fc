"""How fast a cancel frees a llama.cpp model in the middle of a long prompt's evaluation.

    python scripts/bench_cancel.py [--repeat 3] [--words 800] [--after 0.3]

A signal or a client that goes away cancels a run; until the model's worker thread is free, its
memory cannot be given back. Generation checks for the cancel at every token, but a prompt's
evaluation is one long native call per batch: llama.cpp's abort callback (armed by
localmoa.backends.llamacpp while a prompt is evaluated) stops it between graph nodes. This
writes the ``large-300m`` random-weight model (~313 MB), then, with and without the callback in
the same run, times an uncancelled evaluation, and a cancel ``--after`` seconds into one: until
``chat`` returns, and until ``unload`` is done.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from localmoa.backends import llamacpp
from localmoa.backends.base import ChatMessage, ChatRequest
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.config import LlamaCppModel
from localmoa.tinymodels import PRESETS, write_tiny_model


@contextmanager
def without_abort(disabled: bool) -> Iterator[None]:
    """The behaviour before the abort callback existed: never armed."""
    real = llamacpp._Abort.arm
    if disabled:
        llamacpp._Abort.arm = lambda self, stop: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        llamacpp._Abort.arm = real  # type: ignore[method-assign]


async def measure(
    config: LlamaCppModel, request: ChatRequest, repeat: int, after: float
) -> dict[str, list[float]]:
    backend = LlamaCppBackend()
    out: dict[str, list[float]] = {"whole": [], "returned": [], "unloaded": []}
    for _ in range(repeat):
        await backend.load("m", config)
        began = time.perf_counter()
        async for _ in backend.chat("m", request):
            pass
        out["whole"].append(time.perf_counter() - began)
        await backend.unload("m")

        await backend.load("m", config)
        decoding = threading.Event()
        context: Any = backend._models["m"].llama._ctx
        real = context.decode

        def decode(batch: Any, real: Any = real, decoding: threading.Event = decoding) -> Any:
            decoding.set()
            return real(batch)

        context.decode = decode
        task = asyncio.create_task(anext(backend.chat("m", request)))  # type: ignore[arg-type]
        await asyncio.to_thread(decoding.wait)
        await asyncio.sleep(after)  # well inside the evaluation
        began = time.perf_counter()
        task.cancel()
        with suppress(asyncio.CancelledError, StopAsyncIteration):
            await task
        out["returned"].append(time.perf_counter() - began)
        await backend.unload("m")
        out["unloaded"].append(time.perf_counter() - began)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--words", type=int, default=800, help="words in the prompt")
    parser.add_argument("--after", type=float, default=0.3, help="seconds into the evaluation")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = write_tiny_model(Path(folder) / "big.gguf", PRESETS["large-300m"])
        config = LlamaCppModel(backend="llamacpp", path=path, n_ctx=4096, seed=1)
        words = " ".join(str(i) for i in range(args.words))
        request = ChatRequest(
            messages=[ChatMessage(role="user", content=words)], temperature=0.7, max_tokens=1
        )
        tokens = asyncio.run(LlamaCppBackend().prompt_tokens("m", config, request.messages))
        print(f"model {path.stat().st_size / 1e6:.0f} MB, prompt {tokens} tokens, n_batch 512")
        for label, disabled in (("without abort callback", True), ("with abort callback", False)):
            with without_abort(disabled):
                figures = asyncio.run(measure(config, request, args.repeat, args.after))
            print(label)
            for key, what in (
                ("whole", "uncancelled evaluation"),
                ("returned", "cancel -> chat returned"),
                ("unloaded", "cancel -> unload done"),
            ):
                runs = ", ".join(f"{x:.3f}" for x in figures[key])
                print(f"  {what:24} median {statistics.median(figures[key]):.3f}s ({runs})")


if __name__ == "__main__":
    main()
