"""tessera.system mounts and filesystems on real loop devices: libblkid, mount(2), umount2(2).

Every loop device and mount a test makes is released by the `scratch`
fixture, also when the test fails.
"""

from __future__ import annotations

import errno
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera.errors import FailedPrecondition, Internal, Unavailable
from tessera.system import filesystems, mounts
from tessera.system.loopdev import bound_under
from tessera.system.mounts import mounts_under
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2


def run(*args: str) -> None:
    subprocess.run(list(args), check=True, capture_output=True, timeout=120)


class Scratch:
    """Sparse files, their loop devices and mountpoints under one tmp_path."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    def image(self, name: str, size: int) -> Path:
        path = self.root / f"{name}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def loop(self, name: str = "vol", size: int = 64 * MiB) -> str:
        res = subprocess.run(
            ["losetup", "--find", "--show", str(self.image(name, size))],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return res.stdout.strip()

    def dir(self, name: str) -> str:
        path = self.root / name
        path.mkdir(exist_ok=True)
        return str(path)

    def release(self) -> None:
        for mountpoint in reversed(mounts_under(self.root)):
            subprocess.run(["umount", mountpoint], capture_output=True, timeout=60, check=False)
        for dev in [b.path for b in bound_under(self.root)]:
            subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=60, check=False)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Scratch]:
    s = Scratch(tmp_path)
    try:
        yield s
    finally:
        s.release()
    assert mounts_under(s.root) == [] and bound_under(s.root) == []


def mountinfo_line(mountpoint: str) -> tuple[set[str], set[str]]:
    """(per-mount options, superblock options) of the top mount at mountpoint."""
    found = None
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        if left.split()[4] == mountpoint:
            found = (set(left.split()[5].split(",")), set(right.split()[2].split(",")))
    assert found is not None, f"{mountpoint} is not mounted"
    return found


def ext4(scratch: Scratch, name: str = "vol") -> str:
    dev = scratch.loop(name)
    run("mkfs.ext4", "-q", "-F", dev)
    return dev


# ---- probing -------------------------------------------------------------------------


def test_a_blank_device_probes_blank_so_it_gets_formatted(scratch: Scratch) -> None:
    assert filesystems.probe_filesystem(scratch.loop()) is None


def test_an_ext4_device_is_recognised_and_never_reformatted(scratch: Scratch) -> None:
    assert filesystems.probe_filesystem(ext4(scratch)) == "ext4"


def test_an_xfs_device_is_recognised_and_never_reformatted(scratch: Scratch) -> None:
    dev = scratch.loop(size=512 * MiB)  # mkfs.xfs wants 300 MiB at least
    run("mkfs.xfs", "-q", "-K", dev)
    assert filesystems.probe_filesystem(dev) == "xfs"


def test_a_partitioned_device_is_reported_as_a_partition_table(scratch: Scratch) -> None:
    dev = scratch.loop()
    mbr = bytearray(512)
    mbr[440:444] = b"\x78\x56\x34\x12"  # disk signature
    # one Linux (0x83) partition from sector 2048 to the end
    mbr[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + struct.pack("<II", 2048, 64 * 2048 - 2048)
    mbr[510:512] = b"\x55\xaa"
    with open(dev, "r+b") as f:
        f.write(mbr)
        os.fsync(f.fileno())
    assert filesystems.probe_filesystem(dev) == "partition table (dos)"


def test_two_contradicting_signatures_are_not_blank(scratch: Scratch) -> None:
    donor = ext4(scratch, "donor")
    dev = scratch.loop(size=512 * MiB)
    run("mkfs.xfs", "-q", "-K", dev)
    # an ext4 superblock (at 1 KiB) over the xfs one's neighbours
    with open(donor, "rb") as f:
        f.seek(1024)
        superblock = f.read(1024)
    with open(dev, "r+b") as f:
        f.seek(1024)
        f.write(superblock)
        os.fsync(f.fileno())
    found = filesystems.probe_filesystem(dev)
    assert found is not None and "ambivalent" in found


def test_probing_a_missing_device_is_a_retryable_error_not_blank(scratch: Scratch) -> None:
    with pytest.raises(Unavailable, match="No such file or directory"):
        filesystems.probe_filesystem(str(scratch.root / "gone"))


def test_reported_device_size_is_the_backing_file_size(scratch: Scratch) -> None:
    dev = scratch.loop(size=96 * MiB)
    assert filesystems.device_size(dev) == 96 * MiB


def test_size_of_something_that_is_not_a_block_device_is_an_error(scratch: Scratch) -> None:
    with pytest.raises(Unavailable, match="could not read the size"):
        filesystems.device_size(str(scratch.image("plain", MiB)))


# ---- mounting ------------------------------------------------------------------------


def test_kubelet_mount_flags_reach_the_mount(scratch: Scratch) -> None:
    dev, target = ext4(scratch), scratch.dir("staging")
    mounts.mount(dev, target, "ext4", ["noatime", "ro"])
    per_mount, _ = mountinfo_line(target)
    assert {"ro", "noatime"} <= per_mount
    (top,) = mounts.mounts_at(target)
    assert top.readonly and top.fs_type == "ext4" and top.source == dev


def test_filesystem_options_like_discard_reach_the_filesystem(scratch: Scratch) -> None:
    dev, target = ext4(scratch), scratch.dir("staging")
    mounts.mount(dev, target, "ext4", ["discard", "nodev"])
    per_mount, superblock = mountinfo_line(target)
    assert "discard" in superblock and "nodev" in per_mount and "rw" in per_mount


def test_mount_table_names_the_device_when_mounted_through_a_symlink(scratch: Scratch) -> None:
    dev, target = ext4(scratch), scratch.dir("staging")
    link = scratch.root / "by-id"
    link.symlink_to(dev)
    mounts.mount(str(link), target, "ext4", [])
    assert mounts.mounts_at(target)[0].source == dev


def test_a_bad_mount_option_fails_with_a_message_naming_it(scratch: Scratch) -> None:
    dev, target = ext4(scratch), scratch.dir("staging")
    with pytest.raises(Internal) as err:
        mounts.mount(dev, target, "ext4", ["noatime", "nosuchoption"])
    assert "nosuchoption" in err.value.message and "Invalid argument" in err.value.message
    assert not mounts.is_mount(target)


def test_read_only_publish_cannot_be_written_while_staging_stays_writable(
    scratch: Scratch,
) -> None:
    dev, staging, target = ext4(scratch), scratch.dir("staging"), scratch.dir("pod")
    mounts.mount(dev, staging, "ext4", ["nosuid"])
    mounts.bind_mount(staging, target, readonly=True)
    with pytest.raises(OSError) as err:
        Path(target, "f").write_text("x")
    assert err.value.errno == errno.EROFS
    Path(staging, "f").write_text("still writable")
    assert Path(target, "f").read_text() == "still writable"
    per_mount, _ = mountinfo_line(target)
    assert "ro" in per_mount and "nosuid" in per_mount  # the remount kept nosuid
    assert "rw" in mountinfo_line(staging)[0]


def test_read_write_publish_is_writable(scratch: Scratch) -> None:
    dev, staging, target = ext4(scratch), scratch.dir("staging"), scratch.dir("pod")
    mounts.mount(dev, staging, "ext4", [])
    mounts.bind_mount(staging, target, readonly=False)
    Path(target, "f").write_text("x")
    assert Path(staging, "f").read_text() == "x"


def test_block_volume_publish_binds_the_device_node_onto_a_file(scratch: Scratch) -> None:
    dev = scratch.loop()
    target = scratch.root / "pod-block"
    target.touch()
    mounts.bind_mount(dev, str(target), readonly=True)
    st = os.stat(target)
    assert os.major(st.st_rdev) == os.major(os.stat(dev).st_rdev)
    assert os.minor(st.st_rdev) == os.minor(os.stat(dev).st_rdev)
    (top,) = mounts.mounts_at(str(target))
    assert top.readonly and mounts.uses_device(top, dev)


# ---- unmounting ----------------------------------------------------------------------


def test_unmount_removes_every_stacked_mount(scratch: Scratch) -> None:
    dev, target = ext4(scratch), scratch.dir("staging")
    mounts.mount(dev, target, "ext4", [])
    mounts.bind_mount(scratch.dir("other"), target, readonly=False)
    assert len(mounts.mounts_at(target)) == 2
    mounts.unmount(target)
    assert not mounts.is_mount(target)


def test_unmounting_what_is_not_mounted_is_fine(scratch: Scratch) -> None:
    mounts.unmount(scratch.dir("never-mounted"))
    mounts.unmount(str(scratch.root / "does-not-exist"))


def test_a_busy_mount_is_reported_and_left_mounted(scratch: Scratch) -> None:
    dev, target = ext4(scratch), scratch.dir("staging")
    mounts.mount(dev, target, "ext4", [])
    with open(Path(target, "open-file"), "w"):  # an open file keeps the mount busy
        with pytest.raises(FailedPrecondition, match="target is busy"):
            mounts.unmount(target)
        assert mounts.is_mount(target)  # not lazily detached behind our back
    mounts.unmount(target)
    assert not mounts.is_mount(target)
