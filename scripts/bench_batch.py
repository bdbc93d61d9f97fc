"""Batch runs: N prompts through ``localmoa batch`` against the same N through N ``localmoa run``s.

    python scripts/bench_batch.py [--prompts 16] [--max-tokens 24] [--n-ctx 512] [--json]
                                  [--workdir DIR] [--skip-real]

Two targets of issue #13, measured side by side in one run:

1. **Loads** (planning only, instant): three 1 GiB fake models on a budget that holds two, the
   2-layer ensemble of all three with the first aggregating. How many loads does one prompt
   need, and how many do N prompts need planned together by ``localmoa batch`` (the chunk it
   chooses), against N separate runs (N times one prompt's)?
2. **Wall time with real llama.cpp**: three random-weight GGUF models of about 100 MB
   (``localmoa.tinymodels``, F32, distinct shapes and seeds; their answers are noise but every
   token is really decoded). Their vocabulary has English word pieces (``TinySpec.english``),
   so prompts and references read at about 4 characters a token as with a real model's
   vocabulary; ``--byte-vocab`` runs the fixtures' byte-level one instead, which reads 1
   character a token and so makes every prompt's evaluation (work a batch cannot share: it
   is compute-bound) 4 times too costly against decoding (which it shares). Loaded with
   ``use_mmap = false`` so a load copies the weights, at ``temperature`` 0. The budget holds
   the two largest models as one prompt's run loads them, never all three: every run swaps,
   and the batch must fit the KV caches of its sequences in the same memory (``localmoa
   batch`` caps each model's sequences or takes smaller chunks).
   The same N prompts go (a) once through ``localmoa batch IN -o OUT`` and (b) through N
   ``localmoa run PROMPT --json`` processes one after another, as a shell loop would
   run them; each is a fresh process, so (b) also pays N process starts, which is what a user
   running them one by one pays. The two ways alternate ``--repeat`` times; reported: the
   median wall seconds of each, their ratio, and the loads each made (from ``--json``). One
   untimed ``localmoa run`` first warms the page cache.

The machine is shared and noisy: compare the ratio, not absolute seconds, across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from localmoa.backends import make_backends
from localmoa.batch.runner import ensemble_system, plan_batch
from localmoa.config import load_config
from localmoa.tinymodels import (
    ENGLISH_VOCAB,
    PRESETS,
    TinySpec,
    ensemble_config,
    write_tiny_model,
)

SPECS: dict[str, TinySpec] = {
    # ~100 MB each: the benchmark preset, then two other shapes and seeds.
    "m1": PRESETS["large-100m"],
    "m2": TinySpec(n_layer=7, n_embd=512, n_head=8, n_head_kv=4, n_ff=1536, seed=31),
    "m3": TinySpec(n_layer=6, n_embd=512, n_head=8, n_head_kv=2, n_ff=1536, seed=32),
}
"""The three agents; ``m1`` also aggregates."""


def specs(byte_vocab: bool) -> dict[str, TinySpec]:
    """The agents with English word pieces in their vocabulary (prompts read at about 4
    characters a token, as real vocabularies read English), or, with ``byte_vocab``, the
    fixtures' byte-level one (about 1 character a token: every prompt 4 times as long)."""
    if byte_vocab:
        return SPECS
    return {
        name: dataclasses.replace(spec, english=True, n_vocab=ENGLISH_VOCAB)
        for name, spec in SPECS.items()
    }


FAKES = """
[models.a]
backend = "fake"
memory = "1GiB"
[models.b]
backend = "fake"
memory = "1GiB"
[models.c]
backend = "fake"
memory = "1GiB"
[ensembles.default]
layers = [["a", "b", "c"], ["a", "b", "c"]]
aggregator = "a"
"""


def prompts(n: int) -> list[str]:
    return [f"Question {i}: explain in two sentences why the sky is blue." for i in range(n)]


def loads_section(workdir: Path, n: int) -> dict[str, Any]:
    """Target 1: the loads of N prompts planned together against one prompt's."""
    path = workdir / "fakes.toml"
    path.write_text(FAKES)
    config = load_config(path)
    backends = make_backends(config.settings)
    systems = [ensemble_system(config, "default")]

    async def planned(count: int) -> tuple[int, int]:
        batch = await plan_batch(config, systems, count, backends, memory_budget="2GiB")
        return batch.loads, batch.chunk

    one, _ = asyncio.run(planned(1))
    together, chunk = asyncio.run(planned(n))
    return {
        "budget": "2 GiB (two of the three 1 GiB models)",
        "one_prompt_loads": one,
        "batch_loads": together,
        "batch_chunk": chunk,
        "separate_runs_loads": n * one,
    }


def model_file(workdir: Path, name: str, spec: TinySpec) -> Path:
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:12]
    path = workdir / f"batch-{name}-{digest}.gguf"
    if not path.exists():
        write_tiny_model(path.with_suffix(".part"), spec).rename(path)
    return path


def write_config(
    workdir: Path, n_ctx: int, max_tokens: int, byte_vocab: bool
) -> tuple[Path, dict[str, Path]]:
    paths = {name: model_file(workdir, name, spec) for name, spec in specs(byte_vocab).items()}
    raw = ensemble_config(paths, n_ctx=n_ctx, max_tokens=max_tokens, seed=7)
    lines = []
    for name, model in raw["models"].items():
        lines += [
            f"[models.{name}]",
            'backend = "llamacpp"',
            f'path = "{model["path"]}"',
            f"n_ctx = {n_ctx}",
            "seed = 7",
            "use_mmap = false",
        ]
    names = list(paths)
    lines += [
        "[ensembles.default]",
        f"layers = [{json.dumps(names)}, {json.dumps(names)}]",
        f'aggregator = "{names[0]}"',
        f"max_tokens = {max_tokens}",
        "temperature = 0.0",
    ]
    path = workdir / "models.toml"
    path.write_text("\n".join(lines) + "\n")
    return path, paths


def budget_for(config_path: Path) -> int:
    """Room for the two largest models as one prompt's run loads them (by localmoa's own
    footprints), never for all three: a run swaps, and the batch must fit its KV caches in the
    same memory (it caps each model's sequences or takes smaller chunks)."""
    config = load_config(config_path)

    async def sizes() -> list[int]:
        backends = make_backends(config.settings)
        systems = [ensemble_system(config, "default")]
        planned = await plan_batch(config, systems, 1, backends, memory_budget="64GiB")
        return sorted(planned.sizes.values())

    found = asyncio.run(sizes())
    return found[-1] + found[-2] + (1 << 20)


def localmoa(*args: str, env: dict[str, str]) -> tuple[float, dict[str, Any]]:
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "localmoa", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"localmoa {' '.join(args[:2])} failed:\n{done.stderr[-2000:]}")
    return seconds, json.loads(done.stdout.strip().splitlines()[-1])


def real_section(
    workdir: Path, n: int, n_ctx: int, max_tokens: int, repeat: int, byte_vocab: bool
) -> dict[str, Any]:
    """Target 2: ``localmoa batch`` against N ``localmoa run``s, real llama.cpp."""
    config_path, paths = write_config(workdir, n_ctx, max_tokens, byte_vocab)
    budget = budget_for(config_path)
    env = {**os.environ, "LOCALMOA_HOME": str(workdir / "home"), "LOCALMOA_RECORD": "off"}
    common = ["--config", str(config_path), "--memory-budget", str(budget)]
    asked = prompts(n)
    localmoa("run", asked[0], *common, "--json", env=env)  # warm the page cache, untimed
    source = workdir / "in.jsonl"
    source.write_text(
        "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(asked))
    )
    out = workdir / "out.jsonl"
    batches: list[float] = []
    loops: list[float] = []
    for r in range(repeat):  # alternating, so drift on a shared machine falls on both
        for way in ("batch", "runs") if r % 2 == 0 else ("runs", "batch"):
            if way == "batch":
                out.unlink(missing_ok=True)
                seconds, summary = localmoa(
                    "batch", str(source), "-o", str(out), *common, "--json", env=env
                )
                batches.append(seconds)
                answered = [json.loads(line) for line in out.read_text().splitlines()]
            else:
                runs_s, runs_loads = 0.0, 0
                for prompt in asked:
                    seconds, report = localmoa("run", prompt, *common, "--json", env=env)
                    runs_s += seconds
                    runs_loads += report["loads"]
                loops.append(runs_s)
    batch_s, runs_s = statistics.median(batches), statistics.median(loops)
    return {
        "models_mb": {name: round(p.stat().st_size / 1e6) for name, p in paths.items()},
        "budget_mb": round(budget / 1e6),
        "prompts": n,
        "max_tokens": max_tokens,
        "n_ctx": n_ctx,
        "vocabulary": "byte-level" if byte_vocab else "English word pieces",
        "batch_seconds": round(batch_s, 2),
        "batch_loads": summary["loads"],
        "batch_answered": sum(1 for line in answered if line["ok"]),
        "runs_seconds": round(runs_s, 2),
        "runs_loads": runs_loads,
        "speedup": round(runs_s / batch_s, 2),
        "repeat": repeat,
        "batch_samples": [round(x, 2) for x in batches],
        "runs_samples": [round(x, 2) for x in loops],
    }


def markdown(doc: dict[str, Any]) -> str:
    loads = doc["loads"]
    rows = [
        "| | loads | wall s |",
        "|---|---:|---:|",
        f"| 1 prompt (fakes, planned) | {loads['one_prompt_loads']} | |",
        f"| {doc['prompts']} prompts, `localmoa batch` (fakes, planned; chunk "
        f"{loads['batch_chunk']}) | {loads['batch_loads']} | |",
        f"| {doc['prompts']} prompts, separate runs (fakes) | {loads['separate_runs_loads']} | |",
    ]
    real = doc.get("real")
    if real:
        rows += [
            f"| {real['prompts']} prompts, `localmoa batch` (llama.cpp) | {real['batch_loads']} "
            f"| {real['batch_seconds']} |",
            f"| {real['prompts']} × `localmoa run` (llama.cpp) | {real['runs_loads']} "
            f"| {real['runs_seconds']} |",
            f"| speedup | | **{real['speedup']}×** |",
        ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--n-ctx", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=2, help="each way, alternating")
    parser.add_argument(
        "--byte-vocab",
        action="store_true",
        help="the fixtures' byte-level vocabulary (1 character a token) instead of English pieces",
    )
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--skip-real", action="store_true", help="Only the planned loads.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.gettempdir()) / "localmoa-bench-batch"
    workdir.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"prompts": args.prompts, "loads": loads_section(workdir, args.prompts)}
    if not args.skip_real:
        doc["real"] = real_section(
            workdir, args.prompts, args.n_ctx, args.max_tokens, args.repeat, args.byte_vocab
        )
    print(json.dumps(doc, indent=2) if args.json else markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
