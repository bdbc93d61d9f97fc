"""Estimate vs measured: localmoa's memory estimate next to the RSS a loaded model really adds.

    python scripts/bench_memory.py [--json] [--workdir DIR]

For each benchmark preset of localmoa.tinymodels and each context, a fresh interpreter loads the
model and fills its context; the table puts the RSS it gained next to what the planner would
budget for it, ``memory.estimate(read_gguf(path), n_ctx=..., n_batch=512).total``.

Why it is measured this way:

- **A fresh process per row.** glibc keeps freed memory in its arenas and llama.cpp keeps its
  backend initialised, so a second load in the same process would look cheaper than a first.
- **RSS before loading is taken after ``import llama_cpp``**: the library itself is paid once per
  process, whatever the number of models; what a row measures is the model's own cost.
- **``use_mmap=False``.** Mapped weights are page cache, counted in RSS only as they are touched
  and dropped under pressure; copied weights are anonymous memory, all of it counted. That is
  the worst case the estimate has to cover, and it is deterministic.
- **A prompt that fills the context** (all but 16 positions, byte tokens, 4 tokens generated).
  llama.cpp allocates the KV cache and compute buffers at load but the pages become resident
  only when written: a short chat would leave most of the KV cache untouched and flatter the
  estimate.

Error is ``(estimate - measured) / measured``: positive means the planner over-budgets by that
much, negative that it would let models overlap that do not fit. Models are random-weight F32
files written once into a directory under the system temp dir (``--workdir`` to choose) and
reused; nothing is downloaded. About a minute on 2 cores, most of it the 2048-token prompts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

# Run from a checkout without installing: the repository's package wins over an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localmoa.footprint.estimate import estimate, read_gguf
from localmoa.tinymodels import PRESETS, TinySpec, write_tiny_model

MiB = 1 << 20
MODELS = ("tiny-a", "tiny-b", "tiny-c", "large-100m", "large-300m")
CONTEXTS = (512, 2048)
N_BATCH = 512  # llama-cpp-python's default, and models.toml's
UNFILLED = 16  # positions left free: the prompt plus the generated tokens must fit


@dataclass(frozen=True)
class Row:
    """One (model, context) measurement; sizes in MiB."""

    model: str
    file_mib: float
    n_ctx: int
    estimate_mib: float
    measured_mib: float
    error_pct: float
    weights_mib: float
    kv_cache_mib: float
    compute_mib: float
    loaded_mib: float
    """RSS growth right after loading, before the prompt: the buffers not yet touched."""


def model_file(workdir: Path, name: str, spec: TinySpec) -> Path:
    """The preset's file, written on first use; the name pins the spec, so edits rewrite it."""
    digest = hashlib.sha256(repr(spec).encode()).hexdigest()[:12]
    path = workdir / f"{name}-{digest}.gguf"
    if not path.exists():
        # Via a temporary name: an interrupted write must not be reused as a model.
        write_tiny_model(path.with_suffix(".part"), spec).rename(path)
    return path


def _child(path: str, n_ctx: int) -> None:
    """Runs in a fresh interpreter (see the module docstring); prints RSS samples as JSON."""
    import llama_cpp
    import psutil

    proc = psutil.Process()
    before = proc.memory_info().rss
    llm = llama_cpp.Llama(model_path=path, n_ctx=n_ctx, use_mmap=False, verbose=False, seed=1)
    loaded = proc.memory_info().rss
    filler = [3 + i % 256 for i in range(n_ctx - UNFILLED)]  # byte tokens: any text will do
    llm.create_completion(filler, max_tokens=4)
    full = proc.memory_info().rss
    llm.close()
    print(json.dumps({"before": before, "loaded": loaded, "full": full}))


def measure(path: Path, n_ctx: int) -> dict[str, int]:
    """RSS samples of loading ``path`` with ``n_ctx`` and filling it, in a fresh process."""
    out = subprocess.run(
        [sys.executable, __file__, "_child", str(path), str(n_ctx)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    samples: dict[str, int] = json.loads(out)
    return samples


def bench(workdir: Path) -> list[Row]:
    rows = []
    for name in MODELS:
        path = model_file(workdir, name, PRESETS[name])
        facts = read_gguf(path)
        for n_ctx in CONTEXTS:
            est = estimate(facts, n_ctx=n_ctx, n_batch=N_BATCH)
            rss = measure(path, n_ctx)
            measured = rss["full"] - rss["before"]
            rows.append(
                Row(
                    model=name,
                    file_mib=path.stat().st_size / MiB,
                    n_ctx=n_ctx,
                    estimate_mib=est.total / MiB,
                    measured_mib=measured / MiB,
                    error_pct=100 * (est.total - measured) / measured,
                    weights_mib=est.weights / MiB,
                    kv_cache_mib=est.kv_cache / MiB,
                    compute_mib=est.compute / MiB,
                    loaded_mib=(rss["loaded"] - rss["before"]) / MiB,
                )
            )
    return rows


def summary(rows: Sequence[Row]) -> str:
    errors = [r.error_pct for r in rows]
    under = [r for r in rows if r.error_pct < 0]
    verdict = (
        "the estimate was never below the measurement"
        if not under
        else "the estimate was BELOW the measurement for "
        + ", ".join(f"{r.model} at n_ctx {r.n_ctx}" for r in under)
    )
    return f"Error: min {min(errors):+.1f} %, max {max(errors):+.1f} %; {verdict}."


def markdown(rows: Sequence[Row]) -> str:
    lines = [
        "| model | file MiB | n_ctx | estimate MiB | measured MiB | error |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {r.model} | {r.file_mib:.1f} | {r.n_ctx} | {r.estimate_mib:.1f} | "
        f"{r.measured_mib:.1f} | {r.error_pct:+.1f} % |"
        for r in rows
    ]
    return "\n".join([*lines, "", summary(rows)])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        _child(argv[1], int(argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--json", action="store_true", help="rows and summary as JSON")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "localmoa-bench-memory",
        help="where generated models are kept between runs",
    )
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = bench(args.workdir)
    if args.json:
        report = {"rows": [asdict(r) for r in rows], "summary": summary(rows)}
        print(json.dumps(report, indent=2))
    else:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
