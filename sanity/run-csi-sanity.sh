#!/usr/bin/env bash
# Run the upstream CSI conformance suite (kubernetes-csi/csi-test's csi-sanity)
# against a real Tessera stack started with `tessera dev up` in a temporary
# state directory. Needs root (loop devices, mkfs, mounts).
#
#   CSI_SANITY=/path/to/csi-sanity sanity/run-csi-sanity.sh [extra csi-sanity args...]
#   ACCESS_TYPE=block CSI_SANITY=... sanity/run-csi-sanity.sh --ginkgo.focus=Node
#
# Environment: CSI_SANITY (the csi-sanity binary; without it this prints how to
# use it and exits 0), ACCESS_TYPE (mount | block, default mount), PYTHON
# (interpreter with tessera installed; default ./.venv/bin/python, else python3).
# Exits with csi-sanity's exit code; the stack is stopped whatever happens.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [ -z "${CSI_SANITY:-}" ]; then
  cat <<EOF
run-csi-sanity: skipped (CSI_SANITY is not set).

To run the upstream CSI conformance suite against a Tessera dev stack:

  go install github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@latest
  sudo CSI_SANITY="\$(go env GOPATH)/bin/csi-sanity" $0 [extra csi-sanity args]

ACCESS_TYPE=block tests block volumes (default: mount). Extra arguments go to
csi-sanity unchanged, e.g. --ginkgo.focus=NodeStage or --ginkgo.v.
Our own suite runs without it: pytest sanity --access-type both
EOF
  exit 0
fi

if [ ! -x "$CSI_SANITY" ]; then
  echo "run-csi-sanity: CSI_SANITY=$CSI_SANITY is not an executable file" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "run-csi-sanity: needs root (the stack creates loop devices, filesystems and mounts)" >&2
  exit 2
fi

python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$repo/.venv/bin/python" ]; then python="$repo/.venv/bin/python"; else python=python3; fi
fi

work="$(mktemp -d /tmp/tessera-csi-sanity.XXXXXX)"
state="$work/state"
stack_pid=""

stop_stack() {
  local rc=$?
  if [ -n "$stack_pid" ] && kill -0 "$stack_pid" 2>/dev/null; then
    kill -TERM "$stack_pid" 2>/dev/null || true
    if ! wait "$stack_pid"; then
      echo "run-csi-sanity: tessera dev up did not stop cleanly; see $work/dev-up.log" >&2
      [ "$rc" -ne 0 ] || rc=1
    fi
  fi
  if [ "$rc" -eq 0 ] && ! grep -qs " $work" /proc/self/mountinfo; then
    rm -rf "$work"
  else
    echo "run-csi-sanity: kept $work for inspection (logs: $state/logs, $work/dev-up.log)" >&2
  fi
  exit "$rc"
}
trap stop_stack EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

(cd "$repo" && exec "$python" -m tessera.cli dev up --state-dir "$state" --pool-size 8G \
  --node-id csi-sanity-node) >"$work/dev-up.log" 2>&1 &
stack_pid=$!

for _ in $(seq 1 600); do
  [ -f "$state/stack.json" ] && break
  if ! kill -0 "$stack_pid" 2>/dev/null; then
    echo "run-csi-sanity: tessera dev up exited before it was ready:" >&2
    tail -n 40 "$work/dev-up.log" >&2 || true
    exit 1
  fi
  sleep 0.2
done
if [ ! -f "$state/stack.json" ]; then
  echo "run-csi-sanity: tessera dev up was not ready after 120s" >&2
  tail -n 40 "$work/dev-up.log" >&2 || true
  exit 1
fi

endpoint="$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["csi_endpoint"])' \
  "$state/stack.json")"
socket="${endpoint#unix://}"

set +e
"$CSI_SANITY" \
  --csi.endpoint="$socket" \
  --csi.stagingdir="$work/csi-staging" \
  --csi.mountdir="$work/csi-mount" \
  --csi.testvolumeaccesstype="${ACCESS_TYPE:-mount}" \
  --csi.testvolumesize=$((1 << 30)) \
  --csi.testnodevolumeattachlimit \
  "$@"
sanity_rc=$?
set -e
exit "$sanity_rc"
