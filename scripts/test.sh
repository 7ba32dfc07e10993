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
.venv/bin/python -m pytest -q -p no:cacheprovider tests --ignore=tests/vm "$@"

# nvmet, nvme-tcp, md and dm only exist in the VM's kernel (docs/vm-tests.md):
# its own step and budget, the image build (debootstrap) included
echo "== kernel data path in a VM"
timeout 1500 .venv/bin/python -m pytest -q -p no:cacheprovider tests/vm "$@"

echo "== CSI sanity (mount and block)"
.venv/bin/python -m pytest -q -p no:cacheprovider sanity --access-type both "$@"

echo "== demo"
rm -rf .state-ci-demo
.venv/bin/tessera dev up --state-dir .state-ci-demo --pool-size 2G --exit-after-demo
rm -rf .state-ci-demo
