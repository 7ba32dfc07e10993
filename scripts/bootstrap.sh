#!/usr/bin/env bash
# Install everything Tessera needs on a fresh Debian machine (as root):
# system tools from apt, then the Python package into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "bootstrap: run as root (it installs apt packages; the stack makes loop devices and mounts)" >&2
  exit 2
fi

apt_packages=(
  python3 python3-venv python3-pip
  util-linux mount e2fsprogs xfsprogs
  nbdkit libnbd-bin fuse3 fio psmisc kmod iproute2
  unzip
  debootstrap containerd runc
  qemu-system-x86 qemu-utils busybox-static zstd
  postgresql
)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm (the chart tests fetch helm and kubectl with it): Debian's package, unless
# a nodejs that ships its own npm is installed (Debian's npm conflicts with it)
command -v npm >/dev/null || missing+=(npm)
if [ "${#missing[@]}" -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
