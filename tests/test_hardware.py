"""Devices and budgets: explicit sizes win; detection reads every NVIDIA GPU (keyed by UUID,
numbered as CUDA numbers them), else Apple unified memory, else RAM."""

from __future__ import annotations

import logging
import os
import sys
import types
from typing import Any, Literal, NamedTuple

import psutil
import pytest

from localmoa import hardware
from localmoa.config import Settings
from localmoa.errors import BudgetError, ConfigError
from localmoa.hardware import (
    DETECTED,
    Device,
    GiB,
    budget_of,
    detect_budget,
    detect_devices,
    device_budget,
    margin,
    pin_cuda_order,
    resolve_budget,
    resolve_devices,
)


class FakeGpu(NamedTuple):
    uuid: str
    name: str
    free: int
    total: int


# NVML's order (PCI bus): a small card, a 24 GiB card, a 48 GiB card.
SMALL = FakeGpu("GPU-aa11aa11-0000-0000-0000-000000000000", "Small", 6 * GiB, 8 * GiB)
MID = FakeGpu("GPU-bb22bb22-0000-0000-0000-000000000000", "Mid", 20 * GiB, 24 * GiB)
BIG = FakeGpu("GPU-bb22cc33-0000-0000-0000-000000000000", "Big", 40 * GiB, 48 * GiB)
THREE = [SMALL, MID, BIG]


class FakeNvml(types.ModuleType):
    """The pynvml calls the detector makes, answered for ``gpus`` in NVML's (PCI) order.

    ``v2``: whether the driver has the v2 memory call (older ones fail it). ``memory_asks``
    records the struct version each memory query asked for (None = v1)."""

    nvmlMemory_v2 = 0x02000028

    def __init__(self, gpus: list[FakeGpu], *, fail_init: bool = False, v2: bool = True) -> None:
        super().__init__("pynvml")
        self.gpus, self.fail_init, self.v2 = gpus, fail_init, v2
        self.memory_asks: list[int | None] = []
        self.open = False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")
        self.open = True

    def nvmlShutdown(self) -> None:
        self.open = False

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetUUID(self, handle: FakeGpu) -> str:
        return handle.uuid

    def nvmlDeviceGetName(self, handle: FakeGpu) -> bytes:
        return f"NVIDIA {handle.name}".encode()  # older nvidia-ml-py answers bytes

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu, version: int | None = None) -> Any:
        self.memory_asks.append(version)
        if version is not None and not self.v2:
            raise RuntimeError("Function Not Found")
        reserved = GiB // 2
        if version is None:  # v1: "used" counts the driver's reserved memory as used
            used = handle.total - handle.free
            return types.SimpleNamespace(free=handle.free, total=handle.total, used=used)
        used = handle.total - handle.free - reserved
        return types.SimpleNamespace(
            free=handle.free, total=handle.total, used=used, reserved=reserved, version=version
        )


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNvml:
    """Three NVIDIA GPUs, CUDA numbering them by PCI bus, none hidden."""
    fake = FakeNvml(list(THREE))
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return fake


def gpu(ordinal: int, card: FakeGpu) -> Device:
    """The device detection makes of ``card`` when CUDA calls it device ``ordinal``."""
    return Device(
        name=f"gpu{ordinal}",
        memory=card.free - margin(card.total),
        kind="gpu",
        index=ordinal,
        uuid=card.uuid,
        detail=f"GPU {ordinal} NVIDIA {card.name}: {card.free / GiB:.1f} GiB free of "
        f"{card.total / GiB:.1f} GiB, minus margin",
    )


def settings(**table: Any) -> Settings:
    return Settings.model_validate(table)


TWO_DECLARED = [
    {"name": "left", "memory": "8GiB", "index": 1},
    {"name": "right", "memory": "6GiB", "kind": "gpu", "index": 0},
]


# Explicit budgets, the margin --------------------------------------------------------------


def test_explicit_budgets_are_used_as_given() -> None:
    assert resolve_budget("12GiB", "auto").bytes == 12 * GiB
    assert resolve_budget("512MB", "auto").bytes == 512 * 10**6
    flagged = resolve_budget("1GiB", 5 * GiB)
    assert (flagged.bytes, flagged.source) == (GiB, "flag")
    configured = resolve_budget(None, 5 * GiB)
    assert (configured.bytes, configured.source) == (5 * GiB, "config")


@pytest.mark.parametrize("text", ["lots", "-1GiB", "0", "12 parsecs"])
def test_bad_budget_flag_is_a_budget_error(text: str) -> None:
    with pytest.raises(BudgetError, match="--memory-budget"):
        resolve_budget(text, "auto")
    with pytest.raises(BudgetError, match=r"^--memory-budget: not a size"):
        resolve_devices(text, settings())


def test_margin_is_one_gib_or_ten_percent() -> None:
    assert margin(4 * GiB) == GiB
    assert margin(80 * GiB) == 8 * GiB


# Detection: NVIDIA ------------------------------------------------------------------------


def test_every_gpu_is_a_device_keyed_by_uuid_with_its_free_memory_minus_margin(
    nvml: FakeNvml,
) -> None:
    assert detect_devices() == [gpu(0, SMALL), gpu(1, MID), gpu(2, BIG)]
    tenth = [24 * GiB // 10, 48 * GiB // 10]  # 8 GiB's margin is the 1 GiB floor
    assert [d.memory for d in detect_devices()] == [
        5 * GiB,
        20 * GiB - tenth[0],
        40 * GiB - tenth[1],
    ]
    assert not nvml.open  # NVML is shut down again


def test_the_v2_memory_struct_is_read_where_the_driver_has_it(nvml: FakeNvml) -> None:
    detect_devices()
    assert nvml.memory_asks == [FakeNvml.nvmlMemory_v2] * 3
    nvml.v2, nvml.memory_asks = False, []  # an older driver: the v2 call fails, v1 answers
    assert detect_devices() == [gpu(0, SMALL), gpu(1, MID), gpu(2, BIG)]
    assert nvml.memory_asks == [FakeNvml.nvmlMemory_v2, None] * 3


def test_cuda_visible_devices_by_index_shows_those_gpus_renumbered_in_listed_order(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert detect_devices() == [gpu(0, BIG), gpu(1, SMALL)]


def test_cuda_visible_devices_by_uuid_prefix(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"GPU-BB22C, {MID.uuid}")  # hex in any case, spaces
    assert detect_devices() == [gpu(0, BIG), gpu(1, MID)]


@pytest.mark.parametrize("setting", ["", "-1", "GPU-", "GPU-bb22", "gpu-aa11", "MIG-aa11", "2,2"])
def test_cuda_visible_devices_that_shows_no_gpu_leaves_ram(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    """As libcuda does (driver 580): empty and -1 hide every GPU; "GPU-" alone names none, nor
    does a prefix that fits two GPUs ("GPU-bb22"), nor "gpu-"; MIG slices are not whole GPUs; an index
    listed twice makes CUDA start with none."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", setting)
    monkeypatch.setattr("localmoa.hardware.sys.platform", "linux")
    assert [(d.name, d.kind) for d in detect_devices()] == [("ram", "cpu")]


def test_cuda_visible_devices_ends_at_the_first_entry_naming_no_gpu(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,7,0")
    with caplog.at_level(logging.WARNING, logger="localmoa.hardware"):
        assert detect_devices() == [gpu(0, MID)]
    assert "'7' names no GPU" in caplog.text
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"1,{MID.uuid},0")  # a GPU listed again ends it
    assert detect_devices() == [gpu(0, MID)]


def test_a_gpu_reporting_no_memory_keeps_its_cuda_number_but_is_no_device(
    monkeypatch: pytest.MonkeyPatch, nvml: FakeNvml
) -> None:
    nvml.gpus = [SMALL._replace(free=0, total=0), MID]
    assert detect_devices() == [gpu(1, MID)]


def test_pin_cuda_order_sets_pci_bus_order_unless_the_user_chose_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    pin_cuda_order()
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    pin_cuda_order()
    assert os.environ["CUDA_DEVICE_ORDER"] == "FASTEST_FIRST"


def test_another_cuda_order_is_warned_about_and_devices_stay_keyed_by_uuid(
    nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    with caplog.at_level(logging.WARNING, logger="localmoa.hardware"):
        devices = detect_devices()
    assert [d.uuid for d in devices] == [SMALL.uuid, MID.uuid, BIG.uuid]
    assert 'CUDA_DEVICE_ORDER is "FASTEST_FIRST"' in caplog.text
    assert "set CUDA_DEVICE_ORDER=PCI_BUS_ID" in caplog.text
    caplog.clear()
    # GPUs listed by UUID are numbered in the listed order whatever CUDA_DEVICE_ORDER says
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{BIG.uuid},{SMALL.uuid}")
    with caplog.at_level(logging.WARNING, logger="localmoa.hardware"):
        assert detect_devices() == [gpu(0, BIG), gpu(1, SMALL)]
    assert caplog.text == ""


def test_pci_bus_order_is_not_warned_about(
    nvml: FakeNvml, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="localmoa.hardware"):
        detect_devices()
    assert caplog.text == ""


def test_nvml_budget_uses_the_gpu_with_most_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([SMALL, MID]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    budget = detect_budget()
    assert budget.source == "nvml"
    assert budget.bytes == 20 * GiB - margin(24 * GiB)
    assert "GPU 1 NVIDIA Mid: 20.0 GiB free of 24.0 GiB" in budget.detail


@pytest.mark.parametrize(
    "fake",
    [FakeNvml([], fail_init=True), FakeNvml([FakeGpu("GPU-0", "Orin", 0, 0)])],
    ids=["no driver", "unified memory reports 0"],
)
def test_unusable_nvml_falls_back(monkeypatch: pytest.MonkeyPatch, fake: FakeNvml) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr("localmoa.hardware.sys.platform", "linux")
    assert detect_budget().source == "ram"
    assert [d.name for d in detect_devices()] == ["ram"]


# Detection: Apple, RAM ---------------------------------------------------------------------


def test_without_nvidia_or_apple_the_device_is_available_ram_minus_margin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    monkeypatch.setattr("localmoa.hardware.sys.platform", "linux")
    memory = psutil.virtual_memory()
    budget = detect_budget()
    assert budget.source == "ram"
    expected = memory.available - margin(memory.total)
    assert abs(budget.bytes - expected) < 512 * (1 << 20)  # available RAM moves a little
    (ram,) = detect_devices()
    assert (ram.name, ram.kind, ram.index, ram.uuid) == ("ram", "cpu", None, None)
    assert abs(ram.memory - expected) < 512 * (1 << 20)


def test_apple_silicon_uses_the_gpu_working_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr("localmoa.hardware.sys.platform", "darwin")
    monkeypatch.setattr("localmoa.hardware.platform.machine", lambda: "arm64")
    monkeypatch.setattr(
        "localmoa.hardware.psutil.virtual_memory", lambda: types.SimpleNamespace(total=32 * GiB)
    )
    monkeypatch.setattr(hardware, "_sysctl_int", lambda name: 0)
    budget = detect_budget()
    working_set = int(32 * GiB * 2 / 3)
    assert (budget.source, budget.bytes) == ("apple", working_set - margin(working_set))
    (unified,) = detect_devices()
    assert (unified.name, unified.kind, unified.memory) == ("unified", "unified", budget.bytes)
    monkeypatch.setattr(hardware, "_sysctl_int", lambda name: 28 * 1024)  # wired limit raised
    assert detect_budget().bytes == 28 * GiB - margin(28 * GiB)


# resolve_devices: --memory-budget > settings.devices > settings.memory_budget > detection ---


def test_memory_budget_flag_is_one_unpinned_device_of_the_machines_kind(nvml: FakeNvml) -> None:
    declared = settings(devices=TWO_DECLARED)
    (device,) = resolve_devices("8GiB", declared)
    assert device == Device(name="budget", memory=8 * GiB, kind="gpu", detail="--memory-budget")
    assert device.index is None  # nothing pinned: llama.cpp's own placement, as before


def test_memory_budget_flag_on_a_machine_without_gpus_is_a_cpu_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr("localmoa.hardware.sys.platform", "linux")
    assert [d.kind for d in resolve_devices("8GiB", settings())] == ["cpu"]


def test_declared_devices_come_in_declared_order_instead_of_detected_ones(
    nvml: FakeNvml,
) -> None:
    left, right = resolve_devices(None, settings(devices=TWO_DECLARED))
    assert left == Device(
        name="left", memory=8 * GiB, kind="gpu", index=1, detail="settings.devices[0]"
    )
    assert right == Device(
        name="right", memory=6 * GiB, kind="gpu", index=0, detail="settings.devices[1]"
    )


def test_settings_memory_budget_is_one_device(nvml: FakeNvml) -> None:
    (device,) = resolve_devices(None, settings(memory_budget="6GiB"))
    assert device == Device(
        name="budget", memory=6 * GiB, kind="gpu", detail="settings.memory_budget"
    )


def test_nothing_given_or_auto_detects(nvml: FakeNvml) -> None:
    every = [gpu(0, SMALL), gpu(1, MID), gpu(2, BIG)]
    assert resolve_devices(None, settings()) == every
    assert resolve_devices("auto", settings(memory_budget="6GiB")) == every
    assert resolve_devices("auto", settings(devices=TWO_DECLARED)) == every


def test_devices_built_in_code_are_checked_as_a_file_would_be() -> None:
    twice = settings(devices=[TWO_DECLARED[0], {**TWO_DECLARED[1], "name": "left"}])
    with pytest.raises(ConfigError, match=r'settings\.devices\[1\]\.name: "left" is declared'):
        resolve_devices(None, twice)


# budget_of: devices as one figure -----------------------------------------------------------


def test_one_devices_budget_is_the_budget_it_always_was(nvml: FakeNvml) -> None:
    cases: list[tuple[str | None, int | Literal["auto"]]] = [
        ("8GiB", "auto"),
        (None, 6 * GiB),
        (None, "auto"),
    ]
    for flag, setting in cases:
        table = settings() if setting == "auto" else settings(memory_budget=setting)
        devices = resolve_devices(flag, table)
        if len(devices) > 1:  # detection: the planner of one device took the one with most
            devices = [max(devices, key=lambda d: d.memory)]
        assert budget_of(devices) == resolve_budget(flag, setting)


def test_several_devices_sum_and_keep_their_source(nvml: FakeNvml) -> None:
    detected = budget_of(detect_devices())
    assert detected.bytes == 5 * GiB + 20 * GiB - 24 * GiB // 10 + 40 * GiB - 48 * GiB // 10
    assert detected.source == "nvml" and detected.source in DETECTED
    assert detected.detail == "3 devices: gpu0 5.0 GiB, gpu1 17.6 GiB, gpu2 35.2 GiB"
    declared = budget_of(resolve_devices(None, settings(devices=TWO_DECLARED)))
    assert (declared.bytes, declared.source) == (14 * GiB, "devices")
    assert declared.source not in DETECTED
    assert device_budget(declared) == detect_budget()  # the hardware is read for the profile
    mixed = budget_of([gpu(0, SMALL), Device(name="ram", memory=GiB, kind="cpu")])
    assert mixed.source == "devices"
    with pytest.raises(ValueError, match="at least one device"):
        budget_of([])
