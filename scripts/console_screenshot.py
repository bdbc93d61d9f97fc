"""README's picture of the web console: a real `localmoa serve` on tiny models, driven in a browser.

    python scripts/console_screenshot.py [--out scripts/pictures/console.png] [--workdir DIR]

Writes the three tiny random-weight models (``localmoa.tinymodels``; nothing is downloaded),
starts ``localmoa serve`` on them with the demo's budget (two of the three models fit, so the
plan swaps), opens the console in Debian's chromium through playwright (headless; install it
with scripts/setup.sh), asks two questions, opens the past runs, and saves a 1200x800 PNG. The
models' weights are random, so the agents' text is noise; the page, the streaming, the plan and
the memory accounting are the real thing.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import Page, expect, sync_playwright

# Run from a checkout without installing: the repository's package wins over an installed one.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from localmoa.tinymodels import PRESETS, write_tiny_model  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
MODELS = ("tiny-a", "tiny-b", "tiny-c")
START_SECONDS = 60.0
ANSWER_MS = 120_000
QUESTIONS = ("Why would anyone run language models locally?", "And what does it cost?")

CONFIG = """\
# Written by scripts/console_screenshot.py: the demo's ensemble; two of the three models fit.
[settings]
memory_budget = "110MiB"
{models}
[ensembles.default]
layers = [["tiny-a", "tiny-b", "tiny-c"], ["tiny-a", "tiny-b", "tiny-c"]]
aggregator = "tiny-c"
max_tokens = 40
temperature = 0.7
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_config(workdir: Path) -> Path:
    tables = ""
    for name in MODELS:
        path = write_tiny_model(workdir / f"{name}.gguf", PRESETS[name])
        tables += f'\n[models.{name}]\nbackend = "llamacpp"\npath = "{path}"\nn_ctx = 2048\n'
    config = workdir / "models.toml"
    config.write_text(CONFIG.format(models=tables), encoding="utf-8")
    return config


def wait_until_up(root: str, server: subprocess.Popen[bytes]) -> None:
    """Poll /health until the server answers (or exits, or START_SECONDS pass)."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"localmoa serve exited with {server.returncode}")
        try:
            if httpx.get(f"{root}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    sys.exit(f"localmoa serve did not answer within {START_SECONDS:.0f} s")


def drive(page: Page, root: str) -> None:
    page.goto(root + "/")
    expect(page.locator("#ensemble option")).to_have_count(1)
    for question in QUESTIONS:
        page.get_by_test_id("prompt").fill(question)
        page.get_by_test_id("send").click()
        expect(page.get_by_role("status")).to_contain_text("Answered", timeout=ANSWER_MS)
    page.locator("#runs summary").click()
    expect(page.locator("#runs-note, #runs-list li").first).to_be_attached()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "scripts/pictures/console.png")
    parser.add_argument("--workdir", type=Path, help="where models and the run log go (temp)")
    args = parser.parse_args(argv)
    if not CHROMIUM.exists():
        sys.exit(f"{CHROMIUM} is missing: run scripts/setup.sh (it installs Debian's chromium)")
    with tempfile.TemporaryDirectory() as temp:
        workdir = args.workdir or Path(temp)
        workdir.mkdir(parents=True, exist_ok=True)
        config = write_config(workdir)
        port = free_port()
        root = f"http://127.0.0.1:{port}"
        env = {**os.environ, "LOCALMOA_HOME": str(workdir / "home")}
        command = [sys.executable, "-m", "localmoa", "serve", "--config", str(config)]
        server = subprocess.Popen([*command, "--port", str(port)], env=env, cwd=ROOT)
        try:
            wait_until_up(root, server)
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                drive(page, root)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
