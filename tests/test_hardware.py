"""Budget detection: explicit sizes win; detection falls back NVML -> Apple -> RAM."""

from __future__ import annotations

import sys
import types
from typing import Any

import psutil
import pytest

from localmoa import hardware
from localmoa.errors import BudgetError
from localmoa.hardware import GiB, detect_budget, margin, resolve_budget


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


def test_margin_is_one_gib_or_ten_percent() -> None:
    assert margin(4 * GiB) == GiB
    assert margin(80 * GiB) == 8 * GiB


def test_without_nvidia_or_apple_the_budget_is_available_ram_minus_margin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as if not installed
    memory = psutil.virtual_memory()
    budget = detect_budget()
    assert budget.source == "ram"
    expected = memory.available - margin(memory.total)
    assert abs(budget.bytes - expected) < 512 * (1 << 20)  # available RAM moves a little


class FakeNvml(types.SimpleNamespace):
    """The few pynvml calls the detector makes, for a machine with two GPUs."""

    def __init__(self, devices: list[tuple[int, int]], fail_init: bool = False) -> None:
        def init() -> None:
            if fail_init:
                raise RuntimeError("NVML Shared Library Not Found")

        super().__init__(
            nvmlInit=init,
            nvmlShutdown=lambda: None,
            nvmlDeviceGetCount=lambda: len(devices),
            nvmlDeviceGetHandleByIndex=lambda i: i,
            nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(
                free=devices[h][0], total=devices[h][1]
            ),
            nvmlDeviceGetName=lambda h: b"NVIDIA Test GPU",
        )


def test_nvml_budget_uses_the_gpu_with_most_free_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([(6 * GiB, 8 * GiB), (20 * GiB, 24 * GiB)]))
    budget = detect_budget()
    assert budget.source == "nvml"
    assert budget.bytes == 20 * GiB - margin(24 * GiB)
    assert "GPU 1 NVIDIA Test GPU: 20.0 GiB free of 24.0 GiB" in budget.detail


@pytest.mark.parametrize(
    "nvml",
    [FakeNvml([], fail_init=True), FakeNvml([(0, 0)])],  # no driver; unified memory reports 0
)
def test_unusable_nvml_falls_back(monkeypatch: pytest.MonkeyPatch, nvml: Any) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert detect_budget().source == "ram"


def test_apple_silicon_uses_the_gpu_working_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(hardware.sys, "platform", "darwin")
    monkeypatch.setattr(hardware.platform, "machine", lambda: "arm64")
    monkeypatch.setattr(
        hardware.psutil, "virtual_memory", lambda: types.SimpleNamespace(total=32 * GiB)
    )
    monkeypatch.setattr(hardware, "_sysctl_int", lambda name: 0)
    budget = detect_budget()
    working_set = int(32 * GiB * 2 / 3)
    assert (budget.source, budget.bytes) == ("apple", working_set - margin(working_set))
    monkeypatch.setattr(hardware, "_sysctl_int", lambda name: 28 * 1024)  # wired limit raised
    assert detect_budget().bytes == 28 * GiB - margin(28 * GiB)
