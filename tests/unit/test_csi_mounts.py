"""Reading the kernel's mount table, and the node's path rules (no root needed)."""

from __future__ import annotations

import pytest

from csi_driver.mounts import parse_mountinfo
from csi_driver.node import _path
from tessera.errors import InvalidArgument

MOUNTINFO = (
    "22 1 253:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "40 22 7:3 / /var/lib/kubelet/staging\\040dir rw,noatime shared:9 - ext4 /dev/loop3 rw\n"
    "41 22 7:3 / /pods/p1/volumes/data ro,relatime shared:9 - ext4 /dev/loop3 rw\n"
    "42 22 0:5 /loop4 /pods/p2/dev/block rw,nosuid shared:2 - devtmpfs udev rw,size=10k\n"
)


def test_paths_with_spaces_are_read_back_exactly() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[1].mountpoint == "/var/lib/kubelet/staging dir"
    assert mounts[1].source == "/dev/loop3"


def test_read_only_bind_mounts_are_recognised() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[2].readonly and not mounts[1].readonly


def test_a_block_device_bind_mount_shows_the_device_node_as_root() -> None:
    block = parse_mountinfo(MOUNTINFO)[3]
    assert (block.fs_type, block.root, block.device) == ("devtmpfs", "/loop4", "0:5")


@pytest.mark.parametrize("value", ["", "relative/path", "/var/lib/../../etc", "/a/../b"])
def test_kubelet_paths_must_be_absolute_and_free_of_dotdot(value: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        _path(value, "target_path")
    assert "target_path" in err.value.message


def test_a_normal_kubelet_path_is_accepted() -> None:
    assert _path("/var/lib/kubelet/pods/x/volumes/y/", "target_path") == (
        "/var/lib/kubelet/pods/x/volumes/y"
    )
