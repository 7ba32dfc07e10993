"""The image builder's layer writer on a small real tree: what a container would get wrong."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import stat
import struct
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import needs_root

REPO = Path(__file__).resolve().parents[2]
EPOCH = 1_700_000_000
#: vfs_cap_data v2 with the effective bit: cap_net_bind_service permitted
CAP_NET_BIND_SERVICE = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


@pytest.fixture(scope="module")
def build() -> Iterator[ModuleType]:
    """image/build.py (a script, not a package), loaded as a module."""
    spec = importlib.util.spec_from_file_location("image_build", REPO / "image/build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve their annotations there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def make_rootfs(root: Path) -> None:
    (root / "usr/bin").mkdir(parents=True)
    for d in ("dev", "tmp", "proc"):
        (root / d).mkdir()
    mount = root / "usr/bin/mount"
    mount.write_bytes(b"\x7fELF mount")
    os.chmod(mount, 0o4755)
    ping = root / "usr/bin/ping"
    ping.write_bytes(b"\x7fELF ping")
    os.setxattr(ping, "security.capability", CAP_NET_BIND_SERVICE)
    os.link(ping, root / "usr/bin/ping4")
    (root / "usr/bin/sh").symlink_to("dash")
    os.mknod(root / "dev/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "tmp/leftover").write_text("from the build")
    shadow = root / "usr/bin/chage"
    shadow.write_bytes(b"\x7fELF chage")
    os.chown(shadow, 0, 42)
    os.chmod(shadow, 0o2755)
    os.utime(shadow, (EPOCH + 10**6, EPOCH + 10**6))  # newer than the source


@needs_root
def test_layer_keeps_setuid_capabilities_hard_links_and_owners_and_drops_devices(
    build: ModuleType, tmp_path: Path
) -> None:
    root = tmp_path / "rootfs"
    make_rootfs(root)
    blob = build.write_layer(root, ["."], tmp_path / "layer.tar.gz", EPOCH)
    data = (tmp_path / "layer.tar.gz").read_bytes()
    assert (blob.digest, blob.size) == (f"sha256:{hashlib.sha256(data).hexdigest()}", len(data))
    assert blob.diff_id == f"sha256:{hashlib.sha256(gzip.decompress(data)).hexdigest()}"

    with tarfile.open(tmp_path / "layer.tar.gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert sorted(members) == [
        "dev", "proc", "tmp", "usr", "usr/bin", "usr/bin/chage", "usr/bin/mount",
        "usr/bin/ping", "usr/bin/ping4", "usr/bin/sh",
    ]  # fmt: skip
    assert members["usr/bin/mount"].mode == 0o4755
    chage = members["usr/bin/chage"]
    assert (chage.uid, chage.gid, chage.mode, chage.mtime) == (0, 42, 0o2755, EPOCH)
    assert all((m.uname, m.gname) == ("", "") for m in members.values())
    caps = members["usr/bin/ping"].pax_headers["SCHILY.xattr.security.capability"]
    assert caps.encode("utf-8", "surrogateescape") == CAP_NET_BIND_SERVICE
    assert members["usr/bin/ping4"].islnk() and members["usr/bin/ping4"].linkname == "usr/bin/ping"
    assert members["usr/bin/sh"].issym() and members["usr/bin/sh"].linkname == "dash"


def test_a_changed_package_list_means_a_new_base_and_the_same_list_the_cached_one(
    build: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listing = tmp_path / "packages.txt"
    listing.write_text("# comment\npython3\ntini\n")
    monkeypatch.setattr(build, "PACKAGES_FILE", listing)
    first = build.base_key(build.MIRROR, build.SECURITY_MIRROR)
    assert build.packages() == ["python3", "tini"]
    listing.write_text("# another comment\npython3\n\ntini\n")
    assert build.base_key(build.MIRROR, build.SECURITY_MIRROR) == first
    listing.write_text("python3\ntini\nnvme-cli\n")
    assert build.base_key(build.MIRROR, build.SECURITY_MIRROR) != first
