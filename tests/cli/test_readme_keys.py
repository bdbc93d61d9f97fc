"""README's `--json` key lists are the report models' (scripts/readme_keys.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "readme_keys.py"


def readme_keys(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


def test_readme_lists_the_keys_the_reports_dump() -> None:
    out = readme_keys("--check")
    assert out.returncode == 0, out.stderr


def test_a_drifted_list_fails_the_check_and_write_repairs_only_the_list(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    original = (ROOT / "README.md").read_text(encoding="utf-8")
    drifted = original.replace('"prompt_tokens", ', "", 1)
    assert drifted != original
    readme.write_text(drifted, encoding="utf-8")
    out = readme_keys("--check", "--readme", str(readme))
    assert out.returncode == 1
    assert "the --json key lists differ from the report models" in out.stderr
    added = [line for line in out.stderr.splitlines() if line.startswith("+ ")]
    assert added and any('"prompt_tokens"' in line for line in added)
    assert readme_keys("--write", "--readme", str(readme)).returncode == 0
    assert readme.read_text(encoding="utf-8") == original


def test_the_printed_block_is_the_one_in_readme() -> None:
    out = readme_keys()
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("```text\nrun --json ") and out.stdout in (
        ROOT / "README.md"
    ).read_text(encoding="utf-8")
