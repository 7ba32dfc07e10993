#!/usr/bin/env bash
# The full test suite: lint, unit, integration (real loop devices, mkfs,
# mounts, processes on unix sockets), and the CSI sanity suite in both
# mount and block access types. Run as root on Debian.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh

echo "== ruff"
.venv/bin/ruff check .

echo "== unit, integration, CLI, fuzzers (fixed seeds and budgets)"
.venv/bin/python -m pytest -q -p no:cacheprovider tests "$@"

echo "== CSI sanity (mount and block)"
.venv/bin/python -m pytest -q -p no:cacheprovider sanity --access-type both "$@"

echo "== demo"
rm -rf .state-ci-demo
.venv/bin/tessera dev up --state-dir .state-ci-demo --pool-size 2G --exit-after-demo
rm -rf .state-ci-demo
