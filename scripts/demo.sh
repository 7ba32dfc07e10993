#!/usr/bin/env bash
# Bring up the whole stack (SQLite management, one node with a file-backed
# pool, the CSI socket) in ./.state and run a short demo through CSI.
# Extra arguments go to `tessera dev up` (e.g. --exit-after-demo).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/bootstrap.sh
exec .venv/bin/tessera dev up --state-dir .state --demo "$@"
