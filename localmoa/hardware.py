"""The devices models are placed on, and how many bytes of models each can hold at once.

**Detection** (:func:`detect_devices`), first that answers wins:

1. **NVIDIA** through NVML (``nvidia-ml-py``, module ``pynvml``, imported lazily; absent,
   failing, or reporting no memory as on unified-memory boards → next). One device per GPU,
   keyed by its UUID, whose memory is the GPU's free memory − margin. Free, not total: other
   processes' allocations are real (ollama/ollama#3765). The v2 memory struct is read where the
   driver has it (v1's "used" counts reserved memory as used: Cldfire/nvml-wrapper#57).
2. **Apple Silicon** unified memory: one device, "unified". Metal lets a process keep about
   ``recommendedMaxWorkingSetSize`` resident on the GPU, which Ollama reads
   (``discover/gpu_info_darwin.m``) and which is about 2/3 of RAM up to 36 GiB and 3/4 above;
   ``sysctl iogpu.wired_limit_mb`` overrides it when set. Memory = that working set − margin.
3. **System RAM** (psutil): one device, "ram": available memory − margin.

The margin is ``max(1 GiB, 10 % of the device)``: 1 GiB matches llama.cpp's own ``--fit-target``
default headroom (common/fit.cpp) for the runtime's context and allocator slack; 10 % guards
large devices where fragmentation and other tenants grow with size.

**Which GPU is "gpu1".** A GPU is named by its CUDA ordinal, because that is the number
llama.cpp's ``main_gpu`` and ``tensor_split`` take. NVML numbers GPUs by PCI bus; CUDA numbers
them fastest first unless ``CUDA_DEVICE_ORDER=PCI_BUS_ID``, so the two agree only when that is
set: :func:`pin_cuda_order` sets it (the CLI calls it before llama.cpp starts CUDA), and a user
who chose another order is warned that the numbers may differ. The UUID stays the key that
never moves. ``CUDA_VISIBLE_DEVICES`` is read as CUDA reads it: the listed GPUs only (indices,
or UUIDs and their prefixes such as ``GPU-1a2b``), numbered from 0 in the listed order; the
list ends at the first entry that names no GPU, so ``""`` and ``"-1"`` hide every GPU
(checked against libcuda itself: :func:`_cuda_visible`).

**Declared and explicit devices** (:func:`resolve_devices`): ``--memory-budget`` is one device
of that size, ``[[settings.devices]]`` (localmoa.config) are the devices as declared, in their
order, and ``settings.memory_budget`` is one device; only without any of them is the machine
read. An explicit size is used exactly as given, once :func:`localmoa.sizes.parse_size` has
accepted it: 1 byte to 1 PiB, never ``inf`` or ``nan``.

:class:`Budget` is the older, single-figure view (the planner's ``budget``, the run records,
the timing profile): :func:`budget_of` sums devices into one.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import psutil
from pydantic import BaseModel, ConfigDict, Field

from localmoa.errors import BudgetError, ConfigError
from localmoa.sizes import format_bytes, parse_size

if TYPE_CHECKING:
    from localmoa.config import Settings

__all__ = [
    "DETECTED",
    "Budget",
    "Device",
    "DeviceKind",
    "Placement",
    "budget_of",
    "detect_budget",
    "detect_devices",
    "device_budget",
    "pin_cuda_order",
    "resolve_budget",
    "resolve_devices",
]

log = logging.getLogger(__name__)

GiB = 1 << 30
MARGIN_MIN = 1 * GiB
MARGIN_FRACTION = 0.10
APPLE_SMALL_FRACTION = 2 / 3
APPLE_LARGE_FRACTION = 3 / 4
APPLE_LARGE_RAM = 36 * GiB

CUDA_DEVICE_ORDER = "CUDA_DEVICE_ORDER"
PCI_BUS_ID = "PCI_BUS_ID"
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"

FLAG_DETAIL = "--memory-budget"
CONFIG_DETAIL = "settings.memory_budget"
DECLARED_DETAIL = "settings.devices"
"""The ``detail`` of devices that come from the command line or the config rather than the
hardware: :func:`budget_of` tells a budget's source by it."""

BudgetSource = Literal["nvml", "apple", "ram", "config", "flag", "devices"]

DETECTED = frozenset({"nvml", "apple", "ram"})
"""Budget sources that read the device: such a budget also says what kind of device it is.
"devices" (declared by hand, or detected devices of several kinds) is not one of them."""

_KIND_SOURCE: dict[str, BudgetSource] = {"gpu": "nvml", "unified": "apple", "cpu": "ram"}


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

    @property
    def node_label(self) -> str | None:
        """The cluster node as plans and records name it (``name`` is "LABEL/DEVICE"); None for
        a device of this machine. ``node`` is Ray's id, for pinning."""
        return None if self.node is None else self.name.split("/", 1)[0]


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
    source: BudgetSource
    detail: str


def margin(device_bytes: int) -> int:
    """Headroom kept free on a device of ``device_bytes``."""
    return max(MARGIN_MIN, int(device_bytes * MARGIN_FRACTION))


def pin_cuda_order() -> None:
    """Make CUDA number GPUs as NVML does (by PCI bus), so that "gpu1" is CUDA device 1.

    Sets ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` unless the user set an order. CUDA reads the
    variable once, when it starts, so call this before llama.cpp (or anything else) does."""
    if not os.environ.get(CUDA_DEVICE_ORDER):
        os.environ[CUDA_DEVICE_ORDER] = PCI_BUS_ID


def resolve_devices(flag: str | None, settings: Settings) -> list[Device]:
    """The devices a plan may use, first that is given wins:

    ``--memory-budget X`` → one device of X (``--memory-budget auto`` → the machine's, read
    now, whatever the config says); ``settings.devices`` → those, in their declared order;
    ``settings.memory_budget`` → one device; else :func:`detect_devices`.

    One device given as a size (name "budget") has the kind of this machine's first device,
    so that it is timed as what it is, but no ``index``: nothing is pinned, as before devices
    existed. BudgetError or ConfigError, naming the flag or key, for a size that is not one."""
    if flag is not None and flag != "auto":
        return [_sized_device(_flag_size(flag), FLAG_DETAIL)]
    if flag is None and settings.devices:
        problems = settings.device_problems()  # parse_config checks a file; these may be code
        if problems:
            raise ConfigError("; ".join(problems))
        return [
            Device(
                name=declared.name,
                memory=declared.memory,
                kind=declared.kind,
                index=declared.index,
                detail=f"{DECLARED_DETAIL}[{position}]",
            )
            for position, declared in enumerate(settings.devices)
        ]
    if flag is None and settings.memory_budget != "auto":
        return [_sized_device(_setting_size(settings.memory_budget), CONFIG_DETAIL)]
    return detect_devices()


def budget_of(devices: Sequence[Device]) -> Budget:
    """All of ``devices`` as one budget: their memory summed; one device's budget is the one
    :func:`resolve_budget` gives for it. The source is the devices' (a flag, the config, NVML,
    Apple, RAM) when they share one, else "devices"."""
    if not devices:
        raise ValueError("budget_of needs at least one device")
    sources = {_source(device) for device in devices}
    source = sources.pop() if len(sources) == 1 else "devices"
    if len(devices) == 1:
        detail = devices[0].detail
    else:
        detail = f"{len(devices)} devices: " + ", ".join(
            f"{device.name} {format_bytes(device.memory)}" for device in devices
        )
    return Budget(bytes=sum(d.memory for d in devices), source=source, detail=detail)


def _source(device: Device) -> BudgetSource:
    if device.detail == FLAG_DETAIL:
        return "flag"
    if device.detail == CONFIG_DETAIL:
        return "config"
    if device.detail.startswith(DECLARED_DETAIL):
        return "devices"
    return _KIND_SOURCE[device.kind]


def resolve_budget(flag: str | None, setting: int | Literal["auto"]) -> Budget:
    """``--memory-budget`` beats ``settings.memory_budget``; "auto" detects the device."""
    if flag is not None and flag != "auto":
        return Budget(bytes=_flag_size(flag), source="flag", detail=FLAG_DETAIL)
    if flag is None and setting != "auto":
        return Budget(bytes=_setting_size(setting), source="config", detail=CONFIG_DETAIL)
    return detect_budget()


def _flag_size(flag: str) -> int:
    try:
        return parse_size(flag)
    except ValueError as exc:
        raise BudgetError(f"--memory-budget: {exc}") from None


def _setting_size(setting: int | str) -> int:
    try:  # validated with the config already; checked again for settings made in code
        return parse_size(setting)
    except ValueError as exc:
        raise BudgetError(f"settings.memory_budget: {exc}") from None


def _sized_device(size: int, detail: str) -> Device:
    return Device(name="budget", memory=size, kind=detect_devices()[0].kind, detail=detail)


def device_budget(budget: Budget) -> Budget:
    """The device behind ``budget``: ``budget`` itself when it was detected, else the device
    read now (a budget from a flag or the config says nothing about the hardware, and the
    planner, which is pure, times plans by the kind of device it is given)."""
    return budget if budget.source in DETECTED else detect_budget()


def detect_budget() -> Budget:
    """The budget of the detected device with the most memory for models: what a run that
    uses one device plans against."""
    return budget_of([max(detect_devices(), key=lambda device: device.memory)])


def detect_devices() -> list[Device]:
    """This machine's devices: every visible NVIDIA GPU, else Apple unified memory, else RAM
    (module docstring). Never empty."""
    gpus = _nvml_devices()
    if gpus:
        return gpus
    return [_apple_device() or _ram_device()]


class _Gpu(NamedTuple):
    """One GPU as NVML reports it (NVML's index is its place on the PCI bus)."""

    uuid: str
    name: str
    free: int
    total: int


def _nvml_devices() -> list[Device]:
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError has many subclasses; any of them means "no NVIDIA"
        log.debug("NVML unavailable: %s", exc)
        return []
    try:
        gpus = [_read_gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception as exc:
        log.debug("NVML query failed: %s", exc)
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            log.debug("nvmlShutdown failed", exc_info=True)
    visible, exact = _cuda_visible(gpus, os.environ.get(CUDA_VISIBLE_DEVICES))
    order = os.environ.get(CUDA_DEVICE_ORDER) or ""
    if len(gpus) > 1 and not exact and order != PCI_BUS_ID:
        log.warning(
            "CUDA_DEVICE_ORDER is %s: CUDA numbers GPUs fastest first and NVML by PCI bus, so "
            "gpuN may not be CUDA device N where the GPUs differ; set CUDA_DEVICE_ORDER=%s "
            "(or list the GPUs by UUID in CUDA_VISIBLE_DEVICES)",
            f'"{order}"' if order else "unset",
            PCI_BUS_ID,
        )
    return [
        Device(
            name=f"gpu{ordinal}",
            memory=max(0, gpu.free - margin(gpu.total)),
            kind="gpu",
            index=ordinal,
            uuid=gpu.uuid,
            detail=f"GPU {ordinal} {gpu.name}: {gpu.free / GiB:.1f} GiB free of "
            f"{gpu.total / GiB:.1f} GiB, minus margin",
        )
        for ordinal, gpu in enumerate(visible)
        if gpu.total > 0  # unified-memory boards report none: Apple/RAM detection reads them
    ]


def _read_gpu(pynvml: Any, index: int) -> _Gpu:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    info = None
    v2 = getattr(pynvml, "nvmlMemory_v2", None)
    if v2 is not None:
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=v2)
        except Exception as exc:  # a driver older than the v2 call
            log.debug("NVML memory info v2 unavailable: %s", exc)
    if info is None:
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
    return _Gpu(
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        free=int(info.free),
        total=int(info.total),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _cuda_visible(gpus: Sequence[_Gpu], setting: str | None) -> tuple[list[_Gpu], bool]:
    """The GPUs CUDA shows under ``CUDA_VISIBLE_DEVICES=setting``, in CUDA's order, and
    whether that is exact: no entry is an index, whose meaning depends on CUDA_DEVICE_ORDER.
    Unset: all of them, numbered as CUDA_DEVICE_ORDER says.

    What CUDA does was read off libcuda (driver 580, cuInit under each setting): entries may
    have spaces around them; the list ends at the first entry that names no GPU, or one
    already shown; an index listed twice ("0,0") makes CUDA refuse to start, so no GPU."""
    if setting is None:
        return list(gpus), False
    entries = [raw.strip() for raw in setting.split(",")]
    indices = [entry for entry in entries if entry.isascii() and entry.isdigit()]
    if len(set(indices)) < len(indices):
        log.warning(
            "CUDA_VISIBLE_DEVICES=%s lists an index twice: CUDA starts with no GPU at all",
            setting,
        )
        return [], True
    shown: list[_Gpu] = []
    exact = True
    for entry in entries:
        gpu = _visible_entry(gpus, entry)
        if gpu is None or gpu in shown:
            if entry not in ("", "-1"):  # the usual ways to hide every GPU
                log.warning(
                    "CUDA_VISIBLE_DEVICES=%s: %r names no GPU (or one already listed), so CUDA "
                    "shows none from it on",
                    setting,
                    entry,
                )
            break
        exact = exact and entry not in indices  # an index: CUDA's order decides which GPU
        shown.append(gpu)
    return shown, exact


def _visible_entry(gpus: Sequence[_Gpu], entry: str) -> _Gpu | None:
    """The GPU one CUDA_VISIBLE_DEVICES entry names: an index, or "GPU-" and the start of a
    single GPU's UUID, its hex digits in either case (CUDA ignores "gpu-…" and a bare "GPU-")."""
    if entry.isascii() and entry.isdigit():
        index = int(entry)
        return gpus[index] if index < len(gpus) else None
    if not entry.startswith("GPU-") or entry == "GPU-":
        return None  # MIG-… instances and anything else: not a whole GPU
    matches = [gpu for gpu in gpus if gpu.uuid.lower().startswith(entry.lower())]
    return matches[0] if len(matches) == 1 else None


def _apple_device() -> Device | None:
    if sys.platform != "darwin" or platform.machine() != "arm64":
        return None
    ram = int(psutil.virtual_memory().total)
    wired_mb = _sysctl_int("iogpu.wired_limit_mb")
    if wired_mb:
        working_set, how = wired_mb << 20, "iogpu.wired_limit_mb"
    else:
        fraction = APPLE_LARGE_FRACTION if ram > APPLE_LARGE_RAM else APPLE_SMALL_FRACTION
        working_set, how = int(ram * fraction), f"{fraction:.0%} of RAM"
    return Device(
        name="unified",
        memory=max(0, working_set - margin(working_set)),
        kind="unified",
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


def _ram_device() -> Device:
    memory = psutil.virtual_memory()
    available, total = int(memory.available), int(memory.total)
    return Device(
        name="ram",
        memory=max(0, available - margin(total)),
        kind="cpu",
        detail=f"system RAM: {available / GiB:.1f} GiB available of {total / GiB:.1f} GiB, "
        "minus margin",
    )
