#!/usr/bin/env bash
# Set up .venv if needed, then run the whole suite: lint, types, tests. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/ruff check localmoa tests scripts examples
.venv/bin/ruff format --check localmoa tests scripts examples
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
