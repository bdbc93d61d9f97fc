"""Measured footprints, remembered between runs so later plans start from measurement.

Ollama reports what a loaded model really holds (``/api/ps`` ``size`` and ``size_vram``); that
beats any estimate, so the Ollama backend records it here after every load, keyed by what decides
the size: server, model digest and context length. The file is small JSON in the user cache dir
(``$LOCALMOA_HOME/cache`` when set), written atomically; a corrupt or unreadable file is treated
as empty (it is only a cache) and rewritten on the next measurement.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import platformdirs
from pydantic import BaseModel, NonNegativeInt, ValidationError

__all__ = ["Measurement", "MeasurementCache", "default_cache_path"]

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
