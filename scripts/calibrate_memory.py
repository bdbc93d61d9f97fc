"""Measure llama.cpp's CPU memory use, to calibrate localmoa's footprint estimate.

    python scripts/calibrate_memory.py buffers [--fa]  # llama.cpp's buffer sizes vs the estimate
    python scripts/calibrate_memory.py rss             # process RSS around load/chat/close
    python scripts/calibrate_memory.py errors          # how broken files fail (gguf, llama.cpp)
    python scripts/calibrate_memory.py all

Models are random-weight GGUF files from localmoa.tinymodels, written once into --workdir
(default: a directory under the system temp dir) and reused. Nothing is downloaded.

The formula under test is ``localmoa.footprint.estimate`` itself (its docstring has the formula
and where its constants come from): every figure below is read from the generated file with
``read_gguf`` and computed by its functions, so this script cannot drift from what the planner
uses. Loads pass what localmoa's llama.cpp backend passes (``n_ctx``, ``n_batch``; ``n_ubatch``
left at llama-cpp-python's default), so the contexts measured are the ones localmoa can ask for.

``buffers`` loads each (model shape x context) pair with ``verbose=True`` and reads the sizes
llama.cpp logs (model, KV cache, compute, output buffers). Weights and KV cache must match the
log exactly. llama.cpp logs the graph ("compute") and output buffers; ``memory.compute_bytes``
bundles those with ggml's CPU work buffer and a fixed per-model cost, which llama.cpp does not
log. So the comparable pair is localmoa's compute against logged compute + output: the ratio
must never be below 1.00 (the estimate is an upper bound), and the excess in MiB is what covers
the work buffer and the fixed cost, which only ``rss`` can check. ``--fa`` loads with flash
attention on, measured only: localmoa never enables it and its estimate assumes it off, so this
checks that flash attention keeps the estimate an upper bound.

``rss`` checks the whole estimate against process RSS after a prompt that fills the context,
which is what touches every buffer.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Run from a checkout without installing: the repository's package wins over an installed one.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from localmoa.footprint import estimate as memory
from localmoa.tinymodels import BASE_VOCAB, PRESETS, TinySpec, write_tiny_model

MiB = 1 << 20


@dataclass(frozen=True)
class Context:
    """What localmoa's llama.cpp backend asks of ``Llama(...)`` (models.toml's keys)."""

    n_ctx: int = 512
    n_batch: int = 512

    @property
    def ubatch(self) -> int:
        """The micro-batch llama.cpp should report: localmoa's assumption, checked here."""
        return min(self.n_ctx, self.n_batch, memory.N_UBATCH)


# --- measuring ----------------------------------------------------------------------------------

_LOG_SIZES = {
    "model": r"model buffer size =\s+([\d.]+) MiB",
    "kv": r"KV buffer size =\s+([\d.]+) MiB",
    "compute": r"compute buffer size =\s+([\d.]+) MiB",
    "output": r"output buffer size =\s+([\d.]+) MiB",
}


@dataclass(frozen=True)
class Measured:
    """The buffer sizes (MiB) and settings llama.cpp logged for one load."""

    model: float
    kv: float
    compute: float
    output: float
    flash_attn: str
    n_ctx: int
    n_batch: int
    n_ubatch: int


def model_file(workdir: Path, spec: TinySpec) -> Path:
    name = (
        f"L{spec.n_layer}-E{spec.n_embd}-H{spec.n_head}-KV{spec.n_head_kv}-F{spec.n_ff}"
        f"-V{spec.n_vocab}-s{spec.seed}.gguf"
    )
    path = workdir / name
    if not path.exists():
        write_tiny_model(path.with_suffix(".part"), spec).rename(path)
    return path


def measure_buffers(path: Path, ctx: Context, flash_attn: bool) -> Measured:
    """Load ``path`` with verbose logging and read the buffer sizes llama.cpp reports."""
    import llama_cpp

    # llama-cpp-python routes llama.cpp's log through a callback that prints to sys.stderr.
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=ctx.n_ctx,
            n_batch=ctx.n_batch,
            flash_attn=flash_attn,
            verbose=True,
        )
        llm.close()
    text = log.getvalue()

    def last(pattern: str) -> str:
        found = re.findall(pattern, text)
        if not found:
            raise RuntimeError(f"no match for {pattern!r} in llama.cpp's log of {path}")
        return str(found[-1])

    # Several buffers of one kind (e.g. CPU_Mapped + CPU_REPACK model buffers) add up.
    def total(kind: str) -> float:
        return sum(float(x) for x in re.findall(_LOG_SIZES[kind], text))

    return Measured(
        model=total("model"),
        kv=total("kv"),
        compute=float(last(r"sched_reserve:.*CPU compute buffer size =\s+([\d.]+) MiB")),
        output=total("output"),
        flash_attn=last(r"flash_attn\s+= (\w+)"),
        n_ctx=int(last(r"llama_context: n_ctx\s+= (\d+)")),
        n_batch=int(last(r"llama_context: n_batch\s+= (\d+)")),
        n_ubatch=int(last(r"llama_context: n_ubatch\s+= (\d+)")),
    )


def _shape(
    n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int = BASE_VOCAB
) -> TinySpec:
    return TinySpec(
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        n_ff=n_ff,
        n_vocab=n_vocab,
    )


SHAPES = [
    _shape(2, 64, 4, 2, 128),
    _shape(2, 256, 4, 2, 768),
    _shape(4, 512, 8, 4, 1536),
    _shape(16, 256, 4, 4, 704),
    _shape(2, 1024, 16, 4, 2816),
    _shape(2, 512, 16, 16, 1536),  # no GQA
    _shape(2, 1024, 32, 8, 2816),  # head_dim 32
    _shape(2, 256, 4, 2, 8192),  # FFN-heavy
    _shape(2, 1024, 8, 8, 4096),
    _shape(2, 512, 8, 4, 1536, 32000),  # Llama-2 vocabulary
    _shape(2, 256, 4, 2, 768, 65536),
]
CONTEXTS = [
    Context(512, 512),
    Context(2048, 512),
    Context(8192, 512),
    Context(2048, 128),  # micro-batch below 512
    Context(2048, 2048),  # n_batch above n_ubatch: the micro-batch stays 512
    Context(4096, 1024),
    Context(1000, 512),  # padded to 1024 cells
    Context(300, 512),  # micro-batch clamped to the requested context
]


def run_buffers(workdir: Path, flash_attn: bool) -> None:
    fa = "on (measured only: localmoa's estimate assumes it off)" if flash_attn else "off"
    print(
        "kv: logged vs memory.kv_cache_bytes (must be equal). est: memory.compute_bytes = graph\n"
        "+ output + work + fixed; llama.cpp logs only graph (compute) + output, so ratio =\n"
        "memory.graph_bytes / (compute + output) and extra = est - (compute + output), the\n"
        f"unlogged work buffer + fixed cost (checked by `rss`). flash attention {fa}.\n"
    )
    print(
        f"{'L':>2} {'E':>5} {'H':>3} {'KV':>3} {'F':>5} {'V':>6} {'ctx':>5} {'ub':>5} "
        f"{'weights':>8} {'kv':>6} {'kv~':>6} {'compute':>8} {'out':>5} {'est':>8} "
        f"{'ratio':>5} {'extra':>6}  (MiB)"
    )
    lo, hi = math.inf, 0.0
    for spec in SHAPES:
        path = model_file(workdir, spec)
        facts = memory.read_gguf(path)
        for ctx in CONTEXTS:
            m = measure_buffers(path, ctx, flash_attn)
            # localmoa's assumptions about what llama.cpp makes of the request, and its weights.
            assert m.n_ctx == memory.padded_ctx(ctx.n_ctx), (m, ctx)
            assert m.n_ubatch == ctx.ubatch, (m, ctx)
            assert abs(m.model - facts.weights_bytes / MiB) < 0.02, (m.model, facts)
            kv = memory.kv_cache_bytes(facts, ctx.n_ctx) / MiB
            assert abs(m.kv - kv) < 0.02, (m.kv, kv)
            est = memory.compute_bytes(facts, ctx.n_ctx, ctx.n_batch) / MiB
            logged = m.compute + m.output
            ratio = memory.graph_bytes(facts, ctx.n_ctx, ctx.n_batch) / MiB / logged
            lo, hi = min(lo, ratio), max(hi, ratio)
            flag = "  UNDER" if ratio < 1 else ""
            print(
                f"{spec.n_layer:>2} {spec.n_embd:>5} {spec.n_head:>3} {spec.n_head_kv:>3} "
                f"{spec.n_ff:>5} {spec.n_vocab:>6} {m.n_ctx:>5} {m.n_ubatch:>5} "
                f"{m.model:>8.2f} {m.kv:>6.2f} {kv:>6.2f} {m.compute:>8.2f} {m.output:>5.2f} "
                f"{est:>8.2f} {ratio:>5.2f} {est - logged:>6.2f}{flag}",
                flush=True,
            )
    print(
        f"localmoa graph_bytes / logged compute + output: min {lo:.2f}, max {hi:.2f} "
        f"(flash_attn {'on' if flash_attn else 'off'}; < 1.00 means an under-estimate)"
    )


# --- RSS ----------------------------------------------------------------------------------------


def _rss_child(path: str, use_mmap: bool, n_ctx: int, flash_attn: bool) -> None:
    """Runs in a fresh interpreter so earlier loads do not blur the numbers; prints JSON.

    Steps: construct; one short chat; one prompt that fills the context (this is what touches
    the whole KV cache and compute buffer); ``close()`` + gc. RSS is split into anonymous and
    file-backed (mmapped weights) pages.
    """
    import llama_cpp
    import psutil

    proc = psutil.Process()
    steps: dict[str, dict[str, int]] = {}

    def sample(step: str) -> None:
        info = proc.memory_info()
        steps[step] = {"rss": info.rss, "file": info.shared}

    sample("before")
    llm = llama_cpp.Llama(
        model_path=path, n_ctx=n_ctx, use_mmap=use_mmap, flash_attn=flash_attn, verbose=False
    )
    sample("loaded")
    llm.create_chat_completion(
        messages=[{"role": "user", "content": "Say something about memory."}], max_tokens=8
    )
    sample("chatted")
    filler = [3 + i % 256 for i in range(n_ctx - 16)]  # byte tokens, any text will do
    llm.create_completion(filler, max_tokens=4)
    sample("full")
    llm.close()
    del llm
    gc.collect()
    sample("closed")
    print(json.dumps(steps))


RSS_CASES = [  # (use_mmap, n_ctx, flash_attn): flash attention is measured only
    (False, 512, False),
    (False, 4096, False),
    (False, 4096, True),
    (True, 512, False),
    (True, 4096, False),
]


def run_rss(workdir: Path) -> None:
    print(
        f"{'model':<11} {'mmap':<5} {'fa':<5} {'ctx':>5} {'weights':>7} {'kv':>5} "
        f"{'compute':>7} {'total':>6} | {'loaded':>6} {'chat':>6} {'full':>6} "
        f"{'file':>5} {'closed':>6} {'total/full':>10}  (MiB; RSS minus RSS before loading;"
        " compute includes work + output + fixed)"
    )
    models = {
        "large-100m": PRESETS["large-100m"],
        "large-300m": PRESETS["large-300m"],
        "vocab-32k": _shape(2, 512, 8, 4, 1536, 32000),
    }
    for name, spec in models.items():
        path = model_file(workdir, spec)
        facts = memory.read_gguf(path)
        for use_mmap, n_ctx, fa in RSS_CASES:
            flags = [str(int(use_mmap)), str(n_ctx), str(int(fa))]
            out = subprocess.run(
                [sys.executable, __file__, "_rss-child", str(path), *flags],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            steps = json.loads(out)
            rss = {k: (v["rss"] - steps["before"]["rss"]) / MiB for k, v in steps.items()}
            file_backed = (steps["full"]["file"] - steps["before"]["file"]) / MiB
            est = memory.estimate(facts, n_ctx=n_ctx, n_batch=512)
            total = est.total / MiB
            print(
                f"{name:<11} {use_mmap!s:<5} {fa!s:<5} {n_ctx:>5} "
                f"{est.weights / MiB:>7.1f} {est.kv_cache / MiB:>5.1f} "
                f"{est.compute / MiB:>7.1f} {total:>6.1f} | "
                f"{rss['loaded']:>6.1f} {rss['chatted']:>6.1f} {rss['full']:>6.1f} "
                f"{file_backed:>5.1f} {rss['closed']:>6.1f} {total / rss['full']:>10.2f}",
                flush=True,
            )


# --- broken files -------------------------------------------------------------------------------


def _header_only(path: Path, arch: str) -> bytes:
    """A well-formed GGUF file with metadata but no tensors."""
    import gguf

    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path.read_bytes()


def run_errors(workdir: Path) -> None:
    """Show what gguf.GGUFReader and llama_cpp.Llama raise for broken files, and the reason
    llama.cpp logs (only visible with verbose=True; llama-cpp-python's message never has it)."""
    import gguf
    import llama_cpp

    good = model_file(workdir, PRESETS["tiny-a"]).read_bytes()
    cases = {
        "empty": b"",
        "text": b"this is not a model\n" * 10,
        "bad magic": b"XXXX" + good[4:],
        "bad version": good[:4] + (99).to_bytes(4, "little") + good[8:],
        "header only": good[:24],
        "cut in kv": good[:2000],
        "cut in data": good[: len(good) // 2],
        "last byte cut": good[:-1],
        "huge tensor count": good[:8] + (2**40).to_bytes(8, "little") + good[16:],
        "no tensors": _header_only(workdir / "tmp-no-tensors.gguf", "llama"),
        "unknown arch": _header_only(workdir / "tmp-unknown-arch.gguf", "nosucharch"),
    }
    paths = {"directory": workdir, "missing": workdir / "missing.gguf"}
    for name, data in cases.items():
        paths[name] = workdir / f"broken-{name.replace(' ', '-')}.gguf"
        paths[name].write_bytes(data)
    for name, path in paths.items():
        size = f"{path.stat().st_size} bytes" if path.is_file() else "not a file"
        print(f"{name} ({size})")
        try:
            gguf.GGUFReader(path)
            print("  gguf.GGUFReader: no error")
        except Exception as exc:
            print(f"  gguf.GGUFReader: {type(exc).__name__}: {exc}")
        log = io.StringIO()
        try:
            with contextlib.redirect_stderr(log):
                llama_cpp.Llama(model_path=str(path), verbose=True).close()
            print("  llama_cpp.Llama: no error")
        except Exception as exc:
            print(f"  llama_cpp.Llama: {type(exc).__name__}: {exc}")
        reasons = [line for line in log.getvalue().splitlines() if "error loading model" in line]
        if reasons:
            print(f"  llama.cpp log: {reasons[-1]}")


# --- CLI ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_rss-child"]:
        _rss_child(argv[1], argv[2] == "1", int(argv[3]), argv[4] == "1")
        return 0
    parser = argparse.ArgumentParser(description="Measure llama.cpp's CPU memory use.")
    parser.add_argument("what", choices=["buffers", "rss", "errors", "all"])
    parser.add_argument(
        "--fa", action="store_true", help="buffers with flash attention on (measured only)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "localmoa-calibrate",
        help="where generated models are kept between runs",
    )
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.what in ("buffers", "all"):
        run_buffers(args.workdir, flash_attn=args.fa)
    if args.what in ("rss", "all"):
        run_rss(args.workdir)
    if args.what in ("errors", "all"):
        run_errors(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
