"""A block publish is told by device number, wherever its device node lives.

Reproduced before: `mounts.uses_device` recognised a bind of a device node
only when it came from devtmpfs and was named like the kernel's device
(root "/loop3"), and the CSI node service took "devtmpfs" to mean "block
publish". In a container /dev is a tmpfs: a block volume published from
there was not the volume's (NodeGetVolumeStats and NodeExpandVolume said
NOT_FOUND) and its stale binds went unseen. Real loop devices, a real tmpfs
/dev and real bind mounts.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera.system import blockdev, filesystems, loopdev, mounts
from tests.conftest import needs_root
from tests.integration.test_node_agent_loop import release_loops

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2


@pytest.fixture
def loops(tmp_path: Path) -> Iterator[list[str]]:
    """Two loop devices on files under tmp_path; every mount under it is undone after."""
    devices = []
    try:
        for name in ("a", "b"):
            image = tmp_path / f"{name}.img"
            with open(image, "xb") as f:
                f.truncate(8 * MiB)
            devices.append(loopdev.attach(str(image), readonly=False, direct_io=False)[0])
        yield devices
    finally:
        for target in reversed(mounts.mounts_under(tmp_path)):
            mounts.unmount(target)
        release_loops(tmp_path)
    assert loopdev.bound_under(tmp_path) == []


def container_dev(tmp_path: Path, device: str, name: str) -> Path:
    """A container's /dev: a tmpfs holding a node of the device under its own name."""
    dev = tmp_path / "dev"
    dev.mkdir(exist_ok=True)
    if not mounts.is_mount(str(dev)):
        mounts.mount("tmpfs", str(dev), "tmpfs", ["mode=755"])
    node = dev / name
    os.mknod(node, stat.S_IFBLK | 0o600, os.stat(device).st_rdev)
    return node


def test_a_block_publish_from_a_tmpfs_dev_is_the_volumes_device(
    tmp_path: Path, loops: list[str]
) -> None:
    device, other = loops
    node = container_dev(tmp_path, device, "xvdb")
    target = tmp_path / "pod" / "volumeDevices" / "data"
    target.parent.mkdir(parents=True)
    target.touch()
    mounts.bind_mount(str(node), str(target), readonly=False)

    (top,) = mounts.mounts_at(str(target))
    assert (top.fs_type, top.root) == ("tmpfs", "/xvdb")  # what the mount table shows
    assert mounts.uses_device(top, device) and mounts.binds_device(top, device)
    assert mounts.mount_of_device(str(target), device) == top
    assert str(target) in mounts.mounts_of_devices([device])
    assert blockdev.holders(device) == [f"its device node is bind-mounted at {target}"]
    # the other device, and the tmpfs itself, are not this bind
    assert not mounts.uses_device(top, other) and not mounts.binds_device(top, other)
    assert str(target) not in mounts.mounts_of_devices([other])
    (tmpfs,) = mounts.mounts_at(str(tmp_path / "dev"))
    assert not mounts.uses_device(tmpfs, device)


def test_a_filesystem_on_the_device_is_used_by_it_but_is_no_node_bind(
    tmp_path: Path, loops: list[str]
) -> None:
    """What NodeGetVolumeStats tells apart: a filesystem's numbers, or a device's size."""
    device, _ = loops
    staging = tmp_path / "staging"
    staging.mkdir()
    assert filesystems.probe_filesystem(device) is None  # a fresh sparse file: blank
    filesystems.make_filesystem(device, "ext4", [])
    mounts.mount(device, str(staging), "ext4", [])
    (top,) = mounts.mounts_at(str(staging))
    assert mounts.uses_device(top, device)
    assert not mounts.binds_device(top, device)
