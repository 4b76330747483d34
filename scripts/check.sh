#!/usr/bin/env bash
# The checks CI runs, in order: lint, format, types, then the tests (arguments go to pytest).
#   bash scripts/check.sh                        everything
#   bash scripts/check.sh -m "not integration"   the fast unit tests (under 2 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/python -m pytest --durations=20 "${@:-tests}"
