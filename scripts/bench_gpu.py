"""Devices on a real NVIDIA GPU: what NVML finds, a model pinned to a GPU as the planner places
it, its real VRAM against the estimate, and decoding alone and together on the GPU.

    python scripts/bench_gpu.py [--workdir DIR] [--json FILE]

Needs llama-cpp-python built with CUDA (``CMAKE_ARGS="-DGGML_CUDA=on"``) and nvidia-ml-py. For
one random-weight F32 model (~1.2 GB, ``localmoa.tinymodels``), loaded twice:

- ``default``: no placement (llama.cpp's LAYER split over every visible GPU, what localmoa did
  before devices were planned, and still does for a ``--memory-budget`` device);
- ``pinned``: the placement a plan gives a model on ``gpu0`` (``split_mode = NONE``,
  ``main_gpu``), through ``LlamaCppBackend.load``.

For each: the GPU's used memory before and after the load (NVML, the whole device) against
localmoa's estimate from the GGUF header (weights + KV cache + compute), the load's seconds,
one answer's decode rate, and 8 different prompts decoded together (``chat_samples``) against
the same 8 one after another. Then ``localmoa plan --json`` and ``localmoa run --json`` on a
two-model ensemble with the devices as found, to see the planned device reach the calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from localmoa.backends.base import ChatMessage, ChatRequest
from localmoa.backends.configs import LlamaCppModel
from localmoa.backends.llamacpp import LlamaCppBackend
from localmoa.hardware import Placement, detect_devices, pin_cuda_order

SPEC: dict[str, Any] = dict(n_layer=12, n_embd=2048, n_head=16, n_head_kv=8, n_ff=5632, seed=7)
PROMPTS = [f"Question {i}: what is {i} times {i + 3}, and why?" for i in range(8)]


def gpu_used(index: int) -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).used)
    finally:
        pynvml.nvmlShutdown()


async def measure(path: Path, placement: Placement | None) -> dict[str, Any]:
    backend = LlamaCppBackend()
    config = LlamaCppModel(backend="llamacpp", path=path, n_ctx=2048, parallel=8, seed=1)
    footprint = await backend.footprint("m", config)
    before = gpu_used(0)
    began = time.perf_counter()
    await backend.load("m", config, placement)
    load_s = time.perf_counter() - began
    used = gpu_used(0) - before

    async def one(prompt: str) -> int:
        request = ChatRequest(
            messages=[ChatMessage(role="user", content=prompt)], max_tokens=128, temperature=0.0
        )
        return sum([1 async for delta in backend.chat("m", request) if delta.text])

    began = time.perf_counter()
    await one(PROMPTS[0])
    one_s = time.perf_counter() - began
    began = time.perf_counter()
    for prompt in PROMPTS:
        await one(prompt)
    row_s = time.perf_counter() - began
    requests = [
        ChatRequest(messages=[ChatMessage(role="user", content=p)], max_tokens=128, temperature=0)
        for p in PROMPTS
    ]
    began = time.perf_counter()
    async for _ in backend.chat_samples("m", requests, 8):
        pass
    together_s = time.perf_counter() - began
    await backend.unload("m")
    return {
        "placement": None if placement is None else placement.names,
        "estimate_bytes": footprint.total,
        "estimate_parts": [footprint.weights, footprint.kv_cache, footprint.compute],
        "gpu_bytes": used,
        "gpu_over_estimate": round(used / footprint.total, 3),
        "load_s": round(load_s, 2),
        "one_answer_s": round(one_s, 3),
        "eight_in_a_row_s": round(row_s, 3),
        "eight_together_s": round(together_s, 3),
        "together_gain": round(row_s / together_s, 2),
    }


def cli(workdir: Path, model: Path) -> dict[str, Any]:
    (workdir / "models.toml").write_text(
        f"""
[models.a]
backend = "llamacpp"
path = "{model}"
n_ctx = 2048
[models.b]
backend = "llamacpp"
path = "{model}"
n_ctx = 2048
[ensembles.default]
layers = [["a", "b"]]
aggregator = "a"
max_tokens = 32
"""
    )
    out: dict[str, Any] = {}
    for command in (["plan", "--json"], ["run", "--json", "Why is the sky blue?"]):
        done = subprocess.run(
            [sys.executable, "-m", "localmoa", *command],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=300,
        )
        out[command[0]] = json.loads(done.stdout) if done.returncode == 0 else done.stderr[-2000:]
    plan, run = out["plan"], out["run"]
    return {
        "plan_devices": plan["devices"] if isinstance(plan, dict) else plan,
        "plan_waves": [w["devices"] for w in plan["waves"]] if isinstance(plan, dict) else None,
        "run_calls": [(c["model"], c["device"], c["ok"]) for c in run["calls"]]
        if isinstance(run, dict)
        else run,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--model", type=Path, help="a GGUF to use instead of writing one")
    args = parser.parse_args()
    pin_cuda_order()
    # llama.cpp first: on a machine whose PyTorch brings its own CUDA libraries, importing
    # gguf's stack (localmoa.tinymodels) before llama.cpp's CUDA build crashed its model load
    # (seen on an H200 with torch 2.11 + cu130 beside a CUDA 13.0 llama.cpp build).
    import llama_cpp

    from localmoa.tinymodels import TinySpec, write_tiny_model

    figures: dict[str, Any] = {
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "devices": [d.model_dump() for d in detect_devices()],
    }
    print(json.dumps(figures, indent=1), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        model = args.model or write_tiny_model(workdir / "m.gguf", TinySpec(**SPEC))
        figures["model_bytes"] = model.stat().st_size
        gpu0 = detect_devices()[0]
        for name, placement in (("default", None), ("pinned", Placement(devices=(gpu0,)))):
            figures[name] = asyncio.run(measure(model, placement))
            print(name, json.dumps(figures[name]), flush=True)
        figures["cli"] = cli(workdir, model)
        print("cli", json.dumps(figures["cli"]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
