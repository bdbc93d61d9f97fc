"""Self-MoA on llama.cpp: 4 samples decoded together against one answer and 4 calls in a row;
with ``--distinct``, N different prompts decoded together against N calls in a row.

    python scripts/bench_samples.py [--repeat 7] [--max-tokens 64] [--threads N] [--json]
                                    [--workdir DIR] [--preset large-300m|bench-230m|large-100m]
                                    [--distinct]

An agent with ``samples = 4`` asks one model for 4 answers with distinct seeds. localmoa decodes
them as 4 sequences of the model's one context (``LlamaCppBackend.chat_samples``): the prompt
is evaluated once and each step decodes one token of every sample in one ``llama_decode``,
which reads the weights once for all four. The target (issue 11): 4 samples in at most 1.6×
the wall time of one answer of the same length, on this 2-core machine.

The model is random-weight F32 (``localmoa.tinymodels``), loaded once with ``parallel = 4``
and ``use_mmap = false``, so every mode runs on the same resident weights:

- ``one``: one ``chat`` call;
- ``together``: ``chat_samples`` with 4 requests (seeds 1-4);
- ``in_a_row``: 4 ``chat`` calls one after another (what a backend without batching does).

The default model is the other real-run benchmarks' preset, ``large-300m`` (313 MB);
``bench-230m`` is a 100M-class body with a real model's 32,000-token vocabulary (its output
layer, its sampling over the whole vocabulary per sample), ``large-100m`` the smallest. Random
weights end an answer early about once in ``n_vocab`` tokens, so every measurement reports the
tokens each answer took (a mode where any answer fell short of ``--max-tokens`` is flagged).
Each measurement asks a question it has never asked before, so no mode reuses another's
prompt from llama-cpp-python's prefix cache (the calls in a row do reuse their own: they are
the same prompt, as an engine without batching would send them). Modes alternate within each
repetition, after one untimed warm-up of each; the figures are medians, and the ratio is also
given as the median of each repetition's own (the modes of a repetition run back to back, so a
burst of load from elsewhere on a shared machine disturbs that least).

Why the ratio depends on the model's size: a step of 4 tokens reads the weights once, as a step
of one does, but computes 4 times as much. Where one token's step is bound by memory bandwidth
(a model larger than the caches, quantized weights) the 3 more tokens are nearly free; this
2-core VM's 480 MiB L3 holds each of these models whole, so the smaller the matrices the more
the extra compute shows. Measured here, one ``llama_decode`` step of 1 and of 4 tokens:
large-300m 12.1 and 14.5 ms (1.21×), bench-230m 5.4 and 9.0 ms (1.66×), large-100m 2.6 and
4.6 ms (1.74×); flash attention or a unified KV cache moved these by under 5 %.

``--distinct`` (issue 13: a batch's prompts, concurrent ``serve`` requests) answers N different
prompts (N = 4 and 8), each question asked once, through one ``chat_samples`` call (each prompt
evaluated into its own sequence, then one ``llama_decode`` a step for all N) against N ``chat``
calls one after another, side by side in each repetition, on one model loaded with
``parallel = 8`` (both modes on the same resident weights; the default model is then
``large-100m``, ~100 MB). The calls in a row are what a model does when each prompt's call
waits for the last: llama-cpp-python reuses only the chat template's opening that the prompts
share. The figure is the ratio of wall times (in a row ÷ together), median over repetitions and
median of each repetition's own.

``--threads`` sets llama.cpp's threads for one token (``n_threads``); batches of several tokens
(the samples' steps, prompts) use ``n_threads_batch``, which llama-cpp-python sets to all cores.
The default gives both all cores, so the comparison is of batching alone; ``--threads 0`` leaves
n_threads unset, as localmoa's default does (llama-cpp-python then gives one token half the
cores, which flatters the samples).
"""

from __future__ import annotations

import asyncio
import json
import shlex
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# Run from a checkout without installing: the repository's package wins over an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_real_swap import real_run_options

from localmoa.backends.base import ChatMessage, ChatRequest
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.config import LlamaCppModel
from localmoa.tinymodels import PRESETS, TinySpec, write_tiny_model

MB = 10**6
N_CTX = 1024
SAMPLES = 4
SPECS: dict[str, TinySpec] = {
    "large-300m": PRESETS["large-300m"],
    # ~230 MB: a 100M-class body with a real model's vocabulary (its output layer, its sampling).
    "bench-230m": TinySpec(
        n_layer=8, n_embd=512, n_head=8, n_head_kv=4, n_ff=1536, n_vocab=32000, seed=12
    ),
    "large-100m": PRESETS["large-100m"],
}
MODES = ("one", "together", "in_a_row")
DISTINCT = (4, 8)
"""How many different prompts ``--distinct`` answers at once."""
QUESTIONS = (
    "Explain in two sentences why the sky is blue.",
    "What is the capital of France, and how did it become the capital?",
    "Summarize the plot of Hamlet for a ten-year-old.",
    "Give three tips for writing clear code.",
    "How does a refrigerator keep food cold?",
    "Why do cats purr?",
    "Compare trains and planes for a 500 km trip: time, cost, comfort.",
    "What causes the seasons on Earth?",
)


def request(question: str, seed: int, max_tokens: int) -> ChatRequest:
    return ChatRequest(
        messages=[ChatMessage(role="user", content=question)],
        temperature=0.8,
        max_tokens=max_tokens,
        seed=seed,
    )


async def one(backend: LlamaCppBackend, question: str, max_tokens: int) -> list[int]:
    return [sum([d.tokens async for d in backend.chat("m", request(question, 1, max_tokens))])]


async def together(backend: LlamaCppBackend, question: str, max_tokens: int) -> list[int]:
    tokens = [0] * SAMPLES
    requests = [request(question, seed, max_tokens) for seed in range(1, SAMPLES + 1)]
    async for index, delta in backend.chat_samples("m", requests, SAMPLES):
        tokens[index] += delta.tokens
    return tokens


async def in_a_row(backend: LlamaCppBackend, question: str, max_tokens: int) -> list[int]:
    tokens = []
    for seed in range(1, SAMPLES + 1):
        chat = backend.chat("m", request(question, seed, max_tokens))
        tokens.append(sum([d.tokens async for d in chat]))
    return tokens


RUNS: dict[str, Callable[[LlamaCppBackend, str, int], Awaitable[list[int]]]] = {
    "one": one,
    "together": together,
    "in_a_row": in_a_row,
}


async def bench(args: Any) -> dict[str, Any]:
    spec = SPECS[args.preset]
    path = args.workdir / f"{args.preset}.gguf"
    if not path.exists():
        write_tiny_model(path, spec)
    config = LlamaCppModel(
        backend="llamacpp",
        path=path,
        n_ctx=N_CTX,
        n_threads=args.threads or None,
        use_mmap=False,
        parallel=SAMPLES,
    )
    backend = LlamaCppBackend()
    await backend.load("m", config)
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    tokens: dict[str, list[list[int]]] = {mode: [] for mode in MODES}
    try:
        for rep in range(-1, args.repeat):  # -1: the untimed warm-up
            for mode in MODES:
                question = f"({rep} {mode}) Explain in two sentences why the sky is blue."
                began = time.perf_counter()
                made = await RUNS[mode](backend, question, args.max_tokens)
                took = time.perf_counter() - began
                print(f"{rep:>2} {mode:<9} {took:6.2f}s tokens {made}", file=sys.stderr)
                if rep >= 0:
                    seconds[mode].append(took)
                    tokens[mode].append(made)
    finally:
        await backend.unload("m")
    median = {mode: statistics.median(seconds[mode]) for mode in MODES}
    # Each repetition's modes run back to back: their ratio is what a burst of load from
    # elsewhere (a shared machine) disturbs least.
    paired = [t / o for t, o in zip(seconds["together"], seconds["one"], strict=True)]
    return {
        "command": args.command,
        "model": {"preset": args.preset, "file_mb": round(path.stat().st_size / MB)},
        "threads": args.threads or "unset",
        "max_tokens": args.max_tokens,
        "modes": {
            mode: {
                "median_s": round(median[mode], 3),
                "min_s": round(min(seconds[mode]), 3),
                "max_s": round(max(seconds[mode]), 3),
                "runs": len(seconds[mode]),
                "tokens_per_answer": sorted({t for made in tokens[mode] for t in made}),
                "full_length": all(t == args.max_tokens for made in tokens[mode] for t in made),
            }
            for mode in MODES
        },
        "together_vs_one": round(median["together"] / median["one"], 3),
        "together_vs_one_paired": round(statistics.median(paired), 3),
        "in_a_row_vs_one": round(median["in_a_row"] / median["one"], 3),
        "target": 1.6,
    }


def distinct_requests(label: str, n: int, max_tokens: int) -> list[ChatRequest]:
    """N different questions, never asked before (``label``), each with its own seed."""
    return [request(f"({label}) {QUESTIONS[i]}", i + 1, max_tokens) for i in range(n)]


async def answered_together(backend: LlamaCppBackend, requests: list[ChatRequest]) -> list[int]:
    tokens = [0] * len(requests)
    async for index, delta in backend.chat_samples("m", requests, len(requests)):
        tokens[index] += delta.tokens
    return tokens


async def answered_in_a_row(backend: LlamaCppBackend, requests: list[ChatRequest]) -> list[int]:
    return [sum([d.tokens async for d in backend.chat("m", one)]) for one in requests]


DISTINCT_RUNS: dict[str, Callable[[LlamaCppBackend, list[ChatRequest]], Awaitable[list[int]]]] = {
    "together": answered_together,
    "in_a_row": answered_in_a_row,
}


async def bench_distinct(args: Any) -> dict[str, Any]:
    spec = SPECS[args.preset]
    path = args.workdir / f"{args.preset}.gguf"
    if not path.exists():
        write_tiny_model(path, spec)
    config = LlamaCppModel(
        backend="llamacpp",
        path=path,
        n_ctx=N_CTX,
        n_threads=args.threads or None,
        use_mmap=False,
        parallel=max(DISTINCT),
    )
    backend = LlamaCppBackend()
    await backend.load("m", config)
    seconds: dict[int, dict[str, list[float]]] = {
        n: {m: [] for m in DISTINCT_RUNS} for n in DISTINCT
    }
    tokens: dict[int, dict[str, list[int]]] = {n: {m: [] for m in DISTINCT_RUNS} for n in DISTINCT}
    try:
        for rep in range(-1, args.repeat):  # -1: the untimed warm-up
            for n in DISTINCT:
                for mode, run in DISTINCT_RUNS.items():
                    requests = distinct_requests(f"{rep} {mode} {n}", n, args.max_tokens)
                    began = time.perf_counter()
                    made = await run(backend, requests)
                    took = time.perf_counter() - began
                    print(f"{rep:>2} {n} {mode:<9} {took:6.2f}s tokens {made}", file=sys.stderr)
                    if rep >= 0:
                        seconds[n][mode].append(took)
                        tokens[n][mode].extend(made)
    finally:
        await backend.unload("m")
    prompts = {}
    for n in DISTINCT:
        median = {mode: statistics.median(seconds[n][mode]) for mode in DISTINCT_RUNS}
        paired = [
            r / t for r, t in zip(seconds[n]["in_a_row"], seconds[n]["together"], strict=True)
        ]
        prompts[str(n)] = {
            "modes": {
                mode: {
                    "median_s": round(median[mode], 3),
                    "min_s": round(min(seconds[n][mode]), 3),
                    "max_s": round(max(seconds[n][mode]), 3),
                    "runs": len(seconds[n][mode]),
                    "tokens_per_answer": sorted(set(tokens[n][mode])),
                    "full_length": all(t == args.max_tokens for t in tokens[n][mode]),
                }
                for mode in DISTINCT_RUNS
            },
            "speedup": round(median["in_a_row"] / median["together"], 3),
            "speedup_paired": round(statistics.median(paired), 3),
        }
    return {
        "command": args.command,
        "model": {"preset": args.preset, "file_mb": round(path.stat().st_size / MB)},
        "threads": args.threads or "unset",
        "max_tokens": args.max_tokens,
        "prompts": prompts,
    }


def markdown_distinct(doc: dict[str, Any]) -> str:
    lines = [
        f"`{doc['command']}`",
        "",
        f"model: {doc['model']['preset']} ({doc['model']['file_mb']} MB, F32), "
        f"{doc['max_tokens']} tokens an answer, threads {doc['threads']}",
        "",
        "| prompts | together s (median) | in a row s (median) | in a row ÷ together "
        "| paired | tokens an answer |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for n, row in doc["prompts"].items():
        modes = row["modes"]
        made = sorted({t for m in modes.values() for t in m["tokens_per_answer"]})
        full = "" if all(m["full_length"] for m in modes.values()) else " (some short)"
        lines.append(
            f"| {n} | {modes['together']['median_s']:.2f} | {modes['in_a_row']['median_s']:.2f} "
            f"| **{row['speedup']:.2f}×** | {row['speedup_paired']:.2f}× | {made}{full} |"
        )
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"`{doc['command']}`",
        "",
        f"model: {doc['model']['preset']} ({doc['model']['file_mb']} MB, F32), "
        f"{doc['max_tokens']} tokens an answer, threads {doc['threads']}",
        "",
        "| mode | answers | wall s (median) | min–max | tokens an answer | × one |",
        "|---|---:|---:|---:|---|---:|",
    ]
    one_s = doc["modes"]["one"]["median_s"]
    for mode, m in doc["modes"].items():
        answers = 1 if mode == "one" else SAMPLES
        full = "" if m["full_length"] else " (some short)"
        lines.append(
            f"| {mode} | {answers} | {m['median_s']:.2f} | {m['min_s']:.2f}–{m['max_s']:.2f} "
            f"| {m['tokens_per_answer']}{full} | {m['median_s'] / one_s:.2f} |"
        )
    verdict = "met" if doc["together_vs_one"] <= doc["target"] else "missed"
    lines += [
        "",
        f"4 samples together / one answer: **{doc['together_vs_one']:.2f}×** (target ≤ "
        f"{doc['target']}×: {verdict}; median of each repetition's ratio "
        f"{doc['together_vs_one_paired']:.2f}×); 4 calls in a row / one: "
        f"{doc['in_a_row_vs_one']:.2f}×",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = real_run_options(__doc__, repeat=7, per="mode", max_tokens=64)
    parser.add_argument(
        "--preset",
        choices=sorted(SPECS),
        help="the model (default: large-300m; with --distinct, large-100m)",
    )
    parser.add_argument(
        "--distinct",
        action="store_true",
        help=f"{' and '.join(map(str, DISTINCT))} different prompts together against in a row",
    )
    args = parser.parse_args(argv)
    args.preset = args.preset or ("large-100m" if args.distinct else "large-300m")
    args.command = shlex.join(["python", "scripts/bench_samples.py", *(argv or sys.argv[1:])])
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.distinct:
        doc = asyncio.run(bench_distinct(args))
        print(json.dumps(doc, indent=2) if args.json else markdown_distinct(doc))
    else:
        doc = asyncio.run(bench(args))
        print(json.dumps(doc, indent=2) if args.json else markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
