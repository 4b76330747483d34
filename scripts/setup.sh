#!/usr/bin/env bash
# Create .venv and install wanray with its test tools. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned in pyproject.toml (the CPU build; add the npu extra on Ascend nodes)
.venv/bin/python -m pip install --quiet -e ".[dev]"
echo "wanray installed in .venv"
