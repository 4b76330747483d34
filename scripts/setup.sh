#!/usr/bin/env bash
# Create .venv and install wanray with its test tools. Safe to re-run.
#   --with-test-deps  also install Chromium (the UI screenshot test) with apt-get when missing
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--with-test-deps" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium (headless UI screenshot test)"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  else
    echo "warning: chromium not found; install it (Debian: apt-get install chromium) for the UI screenshot test" >&2
  fi
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned in pyproject.toml (the CPU build; add the npu extra on Ascend nodes)
.venv/bin/python -m pip install --quiet -e ".[dev]"
.venv/bin/python -m pip install --quiet --no-deps -r scripts/requirements-no-deps.txt
if [ "${1:-}" = "--with-test-deps" ]; then
  # the fp8 extra's torchao beside the environment, not in it (see pyproject.toml): the fp8 test imports it from here
  .venv/bin/python -m pip install --quiet --no-deps --target .venv/extras "torchao==0.18.0"
fi
echo "wanray installed in .venv"
