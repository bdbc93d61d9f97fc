#!/usr/bin/env bash
# Make .venv (Python 3.11+) with localmoa, its llamacpp extra and its dev tools installed, ready
# to use: the demo and the tests run real llama.cpp on generated models. (`pip install localmoa`
# alone has no llama.cpp; the `dev` extra includes `llamacpp`.)
#
# llama-cpp-python is built from source by pip (a few minutes on 2 cores, the first time only):
# pip keeps the wheel it built in its cache (~/.cache/pip/wheels), so later runs, and fresh
# clones on the same machine, install it in seconds. Nothing is downloaded except from PyPI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-}
if [ -z "$python" ]; then
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
      "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      python=$candidate
      break
    fi
  done
fi
if [ -z "$python" ]; then
  echo "localmoa needs Python 3.11 or newer; install it, or set PYTHON=/path/to/python3.11" >&2
  exit 2
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$python" --version)" >&2
  "$python" -m venv .venv
fi
# A stamp skips pip when pyproject.toml has not changed since the last successful install.
stamp=.venv/.localmoa-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing localmoa[dev] (with llama.cpp: llama-cpp-python compiles once)" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet --editable ".[dev]"
  touch "$stamp"
fi

# The web console's browser test (tests/serve/test_console.py) drives Debian's chromium through
# playwright; no browser is ever downloaded from elsewhere (never `playwright install`).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the console's browser test" >&2
    export DEBIAN_FRONTEND=noninteractive
    # A fresh image has no package lists: read them once, only when the install needs them.
    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
  else
    echo "setup: /usr/bin/chromium is missing; the console's browser test needs it: install" \
      "Debian's chromium as root (apt-get install --no-install-recommends chromium)" >&2
  fi
fi
