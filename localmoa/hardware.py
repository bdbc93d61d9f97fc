"""How many bytes of models the device can hold at once: the planner's budget.

Detection order, first that answers wins:

1. **NVIDIA** through NVML (``nvidia-ml-py``, imported lazily; absent, failing, or reporting no
   memory as on unified-memory boards → next). Budget = free memory of the GPU with the most free
   memory − margin. Free, not total: other processes' allocations are real (ollama/ollama#3765).
2. **Apple Silicon** unified memory. Metal lets a process keep about
   ``recommendedMaxWorkingSetSize`` resident on the GPU, which Ollama reads
   (``discover/gpu_info_darwin.m``) and which is about 2/3 of RAM up to 36 GiB and 3/4 above;
   ``sysctl iogpu.wired_limit_mb`` overrides it when set. Budget = that working set − margin.
3. **System RAM** (psutil): available memory − margin.

The margin is ``max(1 GiB, 10 % of the device)``: 1 GiB matches llama.cpp's own ``--fit-target``
default headroom (common/fit.cpp) for the runtime's context and allocator slack; 10 % guards
large devices where fragmentation and other tenants grow with size.

An explicit budget (``--memory-budget`` or ``settings.memory_budget``) is used exactly as given,
once :func:`localmoa.sizes.parse_size` has accepted it: 1 byte to 1 PiB, never ``inf`` or ``nan``.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import sys
from typing import Literal

import psutil
from pydantic import BaseModel, ConfigDict, Field

from localmoa.errors import BudgetError
from localmoa.sizes import parse_size

__all__ = [
    "DETECTED",
    "Budget",
    "Device",
    "DeviceKind",
    "Placement",
    "detect_budget",
    "device_budget",
    "resolve_budget",
]

log = logging.getLogger(__name__)

GiB = 1 << 30
MARGIN_MIN = 1 * GiB
MARGIN_FRACTION = 0.10
APPLE_SMALL_FRACTION = 2 / 3
APPLE_LARGE_FRACTION = 3 / 4
APPLE_LARGE_RAM = 36 * GiB


DETECTED = frozenset({"nvml", "apple", "ram"})
"""Budget sources that read the device: such a budget also says what kind of device it is."""


DeviceKind = Literal["gpu", "unified", "cpu"]
"""A discrete GPU (llama.cpp pins a model to it by ``index``), Apple unified memory, or RAM
(llama.cpp runs a model placed there on the CPU)."""


class Device(BaseModel):
    """One bin the planner packs models into: a GPU, unified memory, or RAM, on this machine or
    on a cluster node. Placement is decided per device; ``memory`` is all a plan may use of it."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="how plans and records name it: gpu0, ram, or as declared")
    memory: int = Field(description="bytes models placed on it may take (the margin taken off)")
    kind: DeviceKind = "gpu"
    index: int | None = Field(
        default=None, description="the GPU's CUDA ordinal: llama.cpp's main_gpu when pinned"
    )
    uuid: str | None = Field(default=None, description="NVML's GPU UUID, stable across orders")
    node: str | None = Field(
        default=None, description="the Ray node it belongs to; None = this machine"
    )
    detail: str = Field(default="", description="where the figure came from, for the plan")


class Placement(BaseModel):
    """Where one model loads: one device, or (a model too large for any one device, that allows
    ``split``) several, each holding ``shares`` of its bytes."""

    model_config = ConfigDict(frozen=True)

    devices: tuple[Device, ...]
    shares: tuple[int, ...] = ()
    """Bytes on each of ``devices`` when split (llama.cpp's tensor_split proportions)."""

    @property
    def device(self) -> Device:
        """The device that holds the model, or most of it."""
        if not self.shares:
            return self.devices[0]
        return max(zip(self.shares, self.devices, strict=True), key=lambda p: p[0])[1]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.devices]


class Budget(BaseModel):
    """The budget the planner plans against, and where it came from."""

    bytes: int
    source: Literal["nvml", "apple", "ram", "config", "flag"]
    detail: str


def margin(device_bytes: int) -> int:
    """Headroom kept free on a device of ``device_bytes``."""
    return max(MARGIN_MIN, int(device_bytes * MARGIN_FRACTION))


def resolve_budget(flag: str | None, setting: int | Literal["auto"]) -> Budget:
    """``--memory-budget`` beats ``settings.memory_budget``; "auto" detects the device."""
    if flag is not None and flag != "auto":
        try:
            size = parse_size(flag)
        except ValueError as exc:
            raise BudgetError(f"--memory-budget: {exc}") from None
        return Budget(bytes=size, source="flag", detail="--memory-budget")
    if flag is None and setting != "auto":
        try:  # validated with the config already; checked again for settings made in code
            size = parse_size(setting)
        except ValueError as exc:
            raise BudgetError(f"settings.memory_budget: {exc}") from None
        return Budget(bytes=size, source="config", detail="settings.memory_budget")
    return detect_budget()


def device_budget(budget: Budget) -> Budget:
    """The device behind ``budget``: ``budget`` itself when it was detected, else the device
    read now (a budget from a flag or the config says nothing about the hardware, and the
    planner, which is pure, times plans by the kind of device it is given)."""
    return budget if budget.source in DETECTED else detect_budget()


def detect_budget() -> Budget:
    """The first of NVML, Apple unified memory and system RAM that answers."""
    return _nvml_budget() or _apple_budget() or _ram_budget()


def _nvml_budget() -> Budget | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError has many subclasses; any of them means "no NVIDIA"
        log.debug("NVML unavailable: %s", exc)
        return None
    try:
        best: tuple[int, int, str] | None = None
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else str(name)
            if int(info.total) > 0 and (best is None or int(info.free) > best[0]):
                best = (int(info.free), int(info.total), f"GPU {i} {name}")
    except Exception as exc:
        log.debug("NVML query failed: %s", exc)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)
    if best is None:
        return None
    free, total, name = best
    return Budget(
        bytes=max(0, free - margin(total)),
        source="nvml",
        detail=f"{name}: {free / GiB:.1f} GiB free of {total / GiB:.1f} GiB, minus margin",
    )


def _apple_budget() -> Budget | None:
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return None
    ram = int(psutil.virtual_memory().total)
    wired_mb = _sysctl_int("iogpu.wired_limit_mb")
    if wired_mb:
        working_set, how = wired_mb << 20, "iogpu.wired_limit_mb"
    else:
        fraction = APPLE_LARGE_FRACTION if ram > APPLE_LARGE_RAM else APPLE_SMALL_FRACTION
        working_set, how = int(ram * fraction), f"{fraction:.0%} of RAM"
    return Budget(
        bytes=max(0, working_set - margin(working_set)),
        source="apple",
        detail=f"unified memory: GPU working set {working_set / GiB:.1f} GiB ({how}), minus margin",
    )


def _sysctl_int(name: str) -> int:
    try:
        out = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=True
        ).stdout
        return int(out.strip() or 0)
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0


def _ram_budget() -> Budget:
    memory = psutil.virtual_memory()
    available, total = int(memory.available), int(memory.total)
    return Budget(
        bytes=max(0, available - margin(total)),
        source="ram",
        detail=f"system RAM: {available / GiB:.1f} GiB available of {total / GiB:.1f} GiB, "
        "minus margin",
    )
