#!/usr/bin/env bash
# Build the Tessera image from scratch (no registry, no container engine):
# build/image/tessera-<version>.oci.tar. See image/build.py and docs/image.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
[ -x "$python" ] || python=python3
exec "$python" image/build.py "$@"
