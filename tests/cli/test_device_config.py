"""`[[settings.devices]]` mistakes as a user meets them: exit 2, one message, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import write_config

from .invoke import FAKE_THREE, localmoa

TWICE = """
[[settings.devices]]
name = "gpu0"
memory = "8GiB"
[[settings.devices]]
name = "gpu0"
memory = "8GiB"
"""

NO_MEMORY = """
[[settings.devices]]
name = "gpu0"
"""


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        (TWICE, 'settings.devices[1].name: "gpu0" is declared twice'),
        (NO_MEMORY, "settings.devices[0].memory: required key is missing: give the bytes"),
    ],
)
def test_a_bad_device_declaration_exits_2_naming_the_key(
    tmp_path: Path, devices: str, expected: str
) -> None:
    write_config(tmp_path, devices + FAKE_THREE)
    out = localmoa("plan")
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
