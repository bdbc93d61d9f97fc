"""Measured footprints, remembered between runs so later plans start from measurement.

Ollama reports what a loaded model really holds (``/api/ps`` ``size`` and ``size_vram``); that
beats any estimate, so the Ollama backend records it here after every load, keyed by what decides
the size: server, model digest and context length. The file is small JSON in the user cache dir
(``$LOCALMOA_HOME/cache`` when set), written atomically; a corrupt or unreadable file is treated
as empty (it is only a cache) and rewritten on the next measurement.

A model loaded in this process (llama.cpp) has no such report; what its load took is measured
as this process's growth over the load (:class:`ProcessMemory`): resident memory (RSS, psutil)
and, where ``nvidia-ml-py`` is installed and a GPU present, the GPU memory NVML says this
process holds. Both are whole-process figures: another thread allocating or freeing meanwhile
(a call running on another model) is counted in, so they are a model's load as the process saw
it, not its exact size. With ``use_mmap`` the weights are mapped, not read, and count in RSS only
once touched; the growth over the load is then mostly the context (KV cache, buffers).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import platformdirs
import psutil
from pydantic import BaseModel, NonNegativeInt, ValidationError

__all__ = [
    "Measurement",
    "MeasurementCache",
    "ProcessMemory",
    "default_cache_path",
    "gpu_bytes_of_this_process",
]

log = logging.getLogger(__name__)


class Measurement(BaseModel):
    """What one loaded model held."""

    bytes: NonNegativeInt
    vram_bytes: NonNegativeInt | None = None
    measured_at: str


class _File(BaseModel):
    version: int = 1
    entries: dict[str, Measurement] = {}


def default_cache_path() -> Path:
    home = os.environ.get("LOCALMOA_HOME")
    folder = Path(home) / "cache" if home else Path(platformdirs.user_cache_dir("localmoa"))
    return folder / "measurements.json"


class MeasurementCache:
    """Read-through, write-through store of measurements."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_cache_path()

    def get(self, key: str) -> Measurement | None:
        return self._read().entries.get(key)

    def put(self, key: str, size: int, vram: int | None = None) -> None:
        data = self._read()
        data.entries[key] = Measurement(
            bytes=size, vram_bytes=vram, measured_at=datetime.now(UTC).isoformat(timespec="seconds")
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "w", dir=self.path.parent, delete=False, suffix=".tmp", encoding="utf-8"
        ) as tmp:
            tmp.write(data.model_dump_json(indent=1))
        os.replace(tmp.name, self.path)

    def _read(self) -> _File:
        try:
            return _File.model_validate(json.loads(self.path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            return _File()
        except (OSError, ValueError, ValidationError) as exc:
            log.warning("ignoring unreadable measurement cache %s: %s", self.path, exc)
            return _File()


@dataclass(frozen=True)
class ProcessMemory:
    """What this process holds at one moment: RSS, the anonymous part of it where the system
    says (Linux), and GPU memory where NVML can tell."""

    rss: int
    anon: int | None
    gpu: int | None

    @classmethod
    def now(cls) -> ProcessMemory:
        rss = psutil.Process().memory_info().rss
        return cls(rss, _anonymous_rss(), gpu_bytes_of_this_process())

    def growth_since(self, before: ProcessMemory) -> int:
        """Bytes this process took on since ``before``: RAM and GPU together, each kind
        counted on its own and never negative. Memory given back meanwhile is not a load
        giving memory back: another thread's frees, or file pages (a shared library's) the
        kernel reclaims on a busy machine, which would otherwise cancel the load's own
        anonymous memory (its KV cache, its buffers) out of the sum."""
        pairs = [(self.rss, before.rss)]
        if self.anon is not None and before.anon is not None:
            pairs = [(self.anon, before.anon), (self.rss - self.anon, before.rss - before.anon)]
        if self.gpu is not None and before.gpu is not None:
            pairs.append((self.gpu, before.gpu))
        return sum(max(0, now - then) for now, then in pairs)


def _anonymous_rss() -> int | None:
    """``RssAnon`` of /proc/self/status (Linux ≥ 4.5): resident memory that no file backs."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


_nvml_lock = threading.Lock()
_nvml: Any = None  # the pynvml module once initialized; False once found unusable


def gpu_bytes_of_this_process() -> int | None:
    """GPU memory NVML says this process holds, summed over the GPUs; None without
    ``nvidia-ml-py``, without an NVIDIA driver or GPU, or when NVML fails (it is optional: a
    missing NVML is never an error). A process NVML does not list (no CUDA context yet, or a
    container whose process ids NVML cannot see) holds 0."""
    global _nvml
    with _nvml_lock:
        if _nvml is None:
            _nvml = _init_nvml()
        nvml = _nvml
    if nvml is False:
        return None
    pid = os.getpid()
    try:
        held = 0
        for index in range(nvml.nvmlDeviceGetCount()):
            device = nvml.nvmlDeviceGetHandleByIndex(index)
            listed = [
                *nvml.nvmlDeviceGetComputeRunningProcesses(device),
                *nvml.nvmlDeviceGetGraphicsRunningProcesses(device),
            ]
            held += max((p.usedGpuMemory or 0 for p in listed if p.pid == pid), default=0)
        return held
    except Exception as exc:  # any NVML error (a GPU lost, a driver mismatch): not measurable
        log.debug("NVML could not say this process's GPU memory: %s", exc)
        return None


def _init_nvml() -> Any:
    try:
        import pynvml  # nvidia-ml-py, optional

        pynvml.nvmlInit()
    except Exception as exc:  # not installed, no driver, no GPU: GPU memory is not measured
        log.debug("NVML unavailable: %s", exc)
        return False
    return pynvml
