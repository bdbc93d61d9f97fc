"""The machines the cost model knows, and which one stands for this machine.

A :class:`Profile` is what timing a plan needs to know of a machine: its memory, how fast
decode reads the weights (bandwidth), how fast prefill computes, how fast a model file loads,
and how many tokens/s one stream can reach at most. Each figure of :data:`PROFILES` cites where
it comes from. :func:`profile_for` picks the profile of the same kind as the device the caller
read (pure: it never reads the device itself).

A machine with several devices (GPUs, a GPU and its RAM, the nodes of a cluster) is timed with a
profile per device (:func:`device_profiles`): each has its own memory and bandwidth, and the
cost model lets calls on different devices run side by side
(:mod:`localmoa.planning.timing`, "Several devices"). A profile is still a whole machine's
figures (its disk, its runtime's start-up), read for the device that runs a model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

from localmoa.hardware import APPLE_SMALL_FRACTION, Budget, Device, margin

__all__ = [
    "MEMORY_EFFICIENCY",
    "PROFILES",
    "Profile",
    "device_profiles",
    "profile_for",
    "profile_for_device",
]

GiB = 1 << 30
GB = 10**9

MEMORY_EFFICIENCY = 0.7
"""Share of the theoretical memory bandwidth decode reaches. "Real-world efficiency is typically
70-85% of theoretical maximum" (https://calculator-cloud.com/other/memory-bandwidth); llama.cpp
measures 68 % on a CPU (i9-13900K, DDR5-6400 = 102.4 GB/s, 7B Q4_0 3.8 GB at 18.27 t/s,
ggml-org/llama.cpp#34) and 56 % on an RTX 4090 (7B q4_0 at 146.8 t/s, ggml-org/llama.cpp#6766,
where per-token overhead, our ``stream_cap``, is part of the loss)."""

CUDA_STREAM_CAP = 200.0
"""A small model on a big NVIDIA GPU tops out near 190-200 tokens/s in llama.cpp: Gemma-3 4B
Q4_K_M (≈2.5 GB) decodes at 189-197 t/s on an RTX 3090 (https://calebcoffie.com/benchmarks/
gemma-3-4b-it-gguf), where bandwidth alone would allow ≈260 t/s."""

METAL_STREAM_CAP = 100.0
"""llama.cpp on an M4 decodes a 0.8B Q4_K_M at 103 t/s (https://www.jitesh.dev/blog/
qwen35-apple-silicon-benchmark.html), well under what its bandwidth would allow."""

CUDA_LOAD_INIT_S = 1.3
"""CUDA context ≈0.8 s plus warm-up ≈0.5 s per model start (harvard-edge/cs249r_book#1631)."""

METAL_LOAD_INIT_S = 1.0
"""Assumed (no measurement found): a Metal device and pipeline setup, like CUDA's order. It
shifts every policy by the same amount per load."""

CPU_LOAD_INIT_S = 0.5
"""Assumed (no measurement found): a runner process start and warm-up with no device context."""


@dataclass(frozen=True)
class Profile:
    """One machine: what it holds and how fast it reads, computes and loads."""

    name: str
    memory_bytes: int
    """The planner's budget: the device minus localmoa's margin (localmoa.hardware)."""
    bandwidth: float
    """Bytes/s decode reaches from device memory (theoretical × MEMORY_EFFICIENCY)."""
    compute: float
    """FLOP/s prefill reaches."""
    disk: float
    """Bytes/s a model file is read at."""
    load_init_s: float
    """Fixed seconds per load on top of reading the file."""
    stream_cap: float
    """Most tokens/s one decode stream reaches, whatever its size (runtime overhead)."""


def _budget(device_bytes: float) -> int:
    return int(device_bytes) - margin(int(device_bytes))


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        # RTX 4060 Laptop: 8 GB GDDR6, 128-bit at 16 Gbps = 256.0 GB/s (https://fpsbench.com/
        # compare/gpu/nvidia-geforce-rtx-4060-mobile-vs-nvidia-t400). Prefill ≈24 TFLOPS: 1000+
        # tok/s prefill of a 12B on an RTX 4060 8 GB (https://threadreaderapp.com/user/
        # analogalok: 2·12e9·1000), and the 4090's 165 TFLOPS scaled by tensor cores (96/512)
        # and boost clock (2370/2520 MHz) gives 29. Laptop SSDs: PCIe 3.0 x4 NVMe "up to
        # 3,500 MB/s" (https://nuvorix.com/glossary/nvme).
        Profile(
            name="laptop-8g",
            memory_bytes=_budget(8 * GiB),
            bandwidth=256 * GB * MEMORY_EFFICIENCY,
            compute=24e12,
            disk=3.5 * GB,
            load_init_s=CUDA_LOAD_INIT_S,
            stream_cap=CUDA_STREAM_CAP,
        ),
        # RTX 4090: 24 GB GDDR6X, 1008 GB/s; FP16 tensor 165 TFLOPS dense (https://waredb.com/
        # processor/nvidia-geforce-rtx-4090), matched by llama.cpp's 8B Q4_0 pp512 at 10359
        # t/s (ggml-org/llama.cpp#7676: 2·8e9·10359 = 166e12). PCIe 4.0 NVMe "up to 7,000
        # MB/s" (https://nuvorix.com/glossary/nvme).
        Profile(
            name="desktop-24g",
            memory_bytes=_budget(24 * GiB),
            bandwidth=1008 * GB * MEMORY_EFFICIENCY,
            compute=165e12,
            disk=7.0 * GB,
            load_init_s=CUDA_LOAD_INIT_S,
            stream_cap=CUDA_STREAM_CAP,
        ),
        # A100 80GB: HBM2e 2039 GB/s, FP16 matrix 312 TFLOPS (https://glennklockwood.com/
        # garden/processors/A100, from NVIDIA's datasheet). PCIe 4.0 NVMe as above.
        Profile(
            name="server-80g",
            memory_bytes=_budget(80 * GiB),
            bandwidth=2039 * GB * MEMORY_EFFICIENCY,
            compute=312e12,
            disk=7.0 * GB,
            load_init_s=CUDA_LOAD_INIT_S,
            stream_cap=CUDA_STREAM_CAP,
        ),
        # M2 Pro, 32 GB unified, 200 GB/s (https://www.moneycontrol.com/news/technology/
        # apple-m2-pro-m2-max-chips-announced-for-next-generation-of-macs-9883741.html). The
        # GPU may keep only recommendedMaxWorkingSetSize resident, about 2/3 of RAM at this
        # size: 21845 MB on a 32 GB Mac (ggml-org/llama.cpp#2011); localmoa.hardware uses the
        # same 2/3. Prefill ≈6 TFLOPS: an M4 (10 GPU cores) reaches 3.9 (9B Q4_K_M pp 214 t/s,
        # jitesh.dev above), the M2 Pro has 19 older cores, assumed ×1.5. SSD read 5,372 MB/s
        # (https://macrumors.com/2023/01/24/new-macbook-pro-ssd-speeds).
        Profile(
            name="apple-32g",
            memory_bytes=_budget(32 * GiB * APPLE_SMALL_FRACTION),
            bandwidth=200 * GB * MEMORY_EFFICIENCY,
            compute=6e12,
            disk=5.37 * GB,
            load_init_s=METAL_LOAD_INIT_S,
            stream_cap=METAL_STREAM_CAP,
        ),
        # CPU only, 16 GiB dual-channel DDR5-5600: 89.6 GB/s (https://calculator-cloud.com/
        # other/memory-bandwidth); of the RAM, 13 GiB assumed available (OS and desktop hold the
        # rest). Prefill 0.74 TFLOPS: i9-13900K 7B pp512 55.2 t/s at 32 threads
        # (ggml-org/llama.cpp#34: 2·6.74e9·55.2). SATA SSD "tops out around 550 MB/s"
        # (https://ricojia.github.io/2018/05/05/SSD). No stream cap binds on a CPU: decode is
        # bandwidth-bound at every size.
        Profile(
            name="cpu-16g",
            memory_bytes=13 * GiB - margin(16 * GiB),
            bandwidth=89.6 * GB * MEMORY_EFFICIENCY,
            compute=0.74e12,
            disk=0.55 * GB,
            load_init_s=CPU_LOAD_INIT_S,
            stream_cap=math.inf,
        ),
    )
}


def profile_for(device: Budget | None, *, name: str = "auto") -> Profile:
    """The cost-model profile that stands for this machine, with ``device``'s bytes.

    ``name`` picks one of ``PROFILES`` (``settings.timing_profile``); "auto" goes by the kind
    of ``device``, the device's own budget as the caller read it (an NVIDIA GPU by its memory,
    Apple unified memory, else a CPU). The profile's ``memory_bytes`` only matter to a caller
    that times with it directly: :func:`localmoa.planning.plan_run` gives it the plan's budget.
    """
    if name != "auto":
        base = PROFILES[name]
        return base if device is None else dataclasses.replace(base, memory_bytes=device.bytes)
    if device is None:
        raise ValueError('timing profile "auto" goes by the device: pass the device\'s budget')
    if device.source == "nvml":
        base = _gpu(device.bytes)
    elif device.source == "apple":
        base = PROFILES["apple-32g"]
    else:
        base = PROFILES["cpu-16g"]
    return dataclasses.replace(base, memory_bytes=device.bytes)


def profile_for_device(device: Device, *, name: str = "auto") -> Profile:
    """The cost-model profile of one of several devices, with ``device.memory`` as its memory.

    "auto" goes by its kind: a GPU by its memory (as :func:`profile_for`), unified memory as
    Apple's, RAM as a CPU. ``name`` (``settings.timing_profile``) says how fast the machine's
    GPUs or unified memory are; a device of kind "cpu" is the machine's RAM whatever they are,
    and is timed as ``cpu-16g`` (a model placed there decodes at RAM speed)."""
    if device.kind == "cpu":
        base = PROFILES["cpu-16g"]
    elif name != "auto":
        base = PROFILES[name]
    elif device.kind == "unified":
        base = PROFILES["apple-32g"]
    else:
        base = _gpu(device.memory)
    return dataclasses.replace(base, memory_bytes=device.memory)


def device_profiles(devices: Sequence[Device], *, name: str = "auto") -> dict[str, Profile]:
    """Each device's profile by its name, in order: what
    :func:`localmoa.planning.timing.simulate_plan` takes as ``devices``."""
    return {d.name: profile_for_device(d, name=name) for d in devices}


def _gpu(memory: int) -> Profile:
    """An NVIDIA GPU's profile by its memory: a laptop's, a desktop's, or a server's."""
    if memory <= 12 * GiB:
        return PROFILES["laptop-8g"]
    if memory <= 40 * GiB:
        return PROFILES["desktop-24g"]
    return PROFILES["server-80g"]
