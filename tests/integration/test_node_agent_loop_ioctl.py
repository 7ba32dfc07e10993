"""LoopTransport on real loop devices, through ioctls and sysfs only.

Every test detaches what it attached (fixture finalizers), and the module
checks with losetup, independently of the code under test, that nothing
backed by tmp_path is left.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from node_agent.transports import BlockDevice, loops
from tessera.system import loopdev
from tessera.system.loopdev import bound_under
from tests.conftest import needs_root
from tests.integration.test_node_agent_loop import release_loops

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2


def sysfs(device: str, *parts: str) -> str | None:
    path = Path("/sys/class/block", os.path.basename(device), *parts)
    try:
        return path.read_text().rstrip("\n")
    except FileNotFoundError:
        return None


def sparse(path: Path, size: int = 16 * MiB) -> str:
    with open(path, "xb") as f:
        f.truncate(size)
    return str(path)


def accepts_o_direct(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        return False
    return True


VOLUME = "vol-test"


class LoopLayer:
    """The loop layer every file-backed transport ends in, on files of one test."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def attach(self, volume_file: str, readonly: bool) -> BlockDevice:
        return loops.bind(VOLUME, volume_file, readonly, "loop")

    def list_devices(self) -> list[BlockDevice]:
        return loops.bound(self._volume_of, "loop")

    def _volume_of(self, backing: str) -> str | None:
        return VOLUME if backing.startswith(str(self.root) + "/") else None

    def detach(self, device: str) -> None:
        loops.unbind(BlockDevice(VOLUME, device, "", False, "loop"))

    def refresh_size(self, device: str) -> None:
        loops.refresh(BlockDevice(VOLUME, device, "", False, "loop"))

    def size_bytes(self, device: str) -> int:
        return loops.size_bytes(BlockDevice(VOLUME, device, "", False, "loop"))


class Tracked(LoopLayer):
    """The loop layer remembering what it attached, for the finalizer."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.attached: list[str] = []

    def attach(self, volume_file: str, readonly: bool) -> BlockDevice:
        device = super().attach(volume_file, readonly)
        self.attached.append(device.path)
        return device


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[Tracked]:
    transport = Tracked(tmp_path)
    try:
        yield transport
    finally:
        try:
            for device in transport.attached:
                transport.detach(device)
        finally:
            release_loops(tmp_path)  # whatever a failure left, by independent means
    assert bound_under(tmp_path) == []


@pytest.fixture
def mount_fs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a fresh tmpfs/ramfs under tmp_path; loops on it are released before unmounting."""
    mounts: list[Path] = []

    def mount(fstype: str) -> Path:
        target = tmp_path / fstype
        target.mkdir()
        subprocess.run(["mount", "-t", fstype, fstype, str(target)], check=True, timeout=30)
        mounts.append(target)
        return target

    try:
        yield mount
    finally:
        for target in reversed(mounts):
            release_loops(target)
            subprocess.run(["umount", str(target)], check=True, timeout=30)


def status(device: str) -> loopdev.LoopInfo64:
    info = loopdev.LoopInfo64()
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        loopdev._ioctl(fd, loopdev.LOOP_GET_STATUS64, info)
    finally:
        os.close(fd)
    return info


def write_through(device: str, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data.ljust(4096, b"\0"))
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def test_attach_binds_the_file_with_direct_io_and_no_autoclear(
    loop: Tracked, tmp_path: Path
) -> None:
    path = sparse(tmp_path / "a.img")
    if not accepts_o_direct(path):
        pytest.skip("tmp_path's filesystem refuses O_DIRECT")
    dev = loop.attach(path, readonly=False)
    assert dev == BlockDevice(VOLUME, dev.path, path, False, "loop")
    assert sysfs(dev.path, "loop", "backing_file") == path
    assert sysfs(dev.path, "loop", "dio") == "1"
    assert sysfs(dev.path, "loop", "autoclear") == "0"  # outlives every fd and the agent
    assert sysfs(dev.path, "ro") == "0"
    assert bytes(status(dev.path).lo_file_name).rstrip(b"\0") == os.fsencode(path)[:63]
    write_through(dev.path, b"tessera!")
    assert read_file(path, 8) == b"tessera!"
    assert sysfs(dev.path, "loop", "backing_file") == path  # still bound, all fds closed


def test_readonly_attach_refuses_writes(loop: Tracked, tmp_path: Path) -> None:
    path = sparse(tmp_path / "ro.img")
    dev = loop.attach(path, readonly=True)
    assert dev.readonly and sysfs(dev.path, "ro") == "1"
    with pytest.raises(OSError) as err:  # at open or at the write, per kernel
        write_through(dev.path, b"x")
    assert err.value.errno in (errno.EROFS, errno.EPERM, errno.EACCES)
    assert dev in loop.list_devices()


@pytest.mark.parametrize("fstype", ["tmpfs", "ramfs"])
def test_filesystems_without_direct_io_get_a_buffered_device(
    loop: Tracked, mount_fs: Callable[[str], Path], fstype: str
) -> None:
    """ramfs refuses O_DIRECT; tmpfs does since Linux 6.6, and refused it before."""
    path = sparse(mount_fs(fstype) / "v.img")
    direct = accepts_o_direct(path)
    if fstype == "ramfs":
        assert not direct
    dev = loop.attach(path, readonly=False)
    assert sysfs(dev.path, "loop", "backing_file") == path
    assert sysfs(dev.path, "loop", "dio") == ("1" if direct else "0")
    write_through(dev.path, b"buffered")
    assert read_file(path, 8) == b"buffered"


def test_a_fresh_transport_lists_the_same_device(loop: Tracked, tmp_path: Path) -> None:
    path = sparse(tmp_path / "f.img")
    dev = loop.attach(path, readonly=False)
    assert dev in loop.list_devices()
    restarted = LoopLayer(tmp_path)  # as after an agent restart: nothing in memory
    assert dev in restarted.list_devices()
    numbers = [int(d.path.removeprefix("/dev/loop")) for d in restarted.list_devices()]
    assert numbers == sorted(numbers)
    assert str(tmp_path / "other.img") not in [d.backing for d in restarted.list_devices()]


def test_detach_unbinds_and_twice_is_fine(loop: Tracked, tmp_path: Path) -> None:
    path = sparse(tmp_path / "d.img")
    dev = loop.attach(path, readonly=False)
    loop.detach(dev.path)
    assert sysfs(dev.path, "loop", "backing_file") is None
    assert path not in [d.backing for d in loop.list_devices()]
    loop.detach(dev.path)


def test_detach_waits_for_another_opener_to_let_go(loop: Tracked, tmp_path: Path) -> None:
    """Like udev's blkid probe: the kernel clears the device on that last close.

    States, not durations: bound while the other opener holds it (after the
    kernel took the detach request), and detach returns only once that
    opener has closed and the device is unbound.
    """
    path = sparse(tmp_path / "held.img")
    dev = loop.attach(path, readonly=False)
    fd = os.open(dev.path, os.O_RDONLY | os.O_CLOEXEC)
    closing = threading.Event()

    def detach() -> tuple[bool, bool]:
        unbound = loopdev.detach(dev.path)
        return unbound, closing.is_set()

    with ThreadPoolExecutor(1) as pool:
        try:
            detaching = pool.submit(detach)
            _until(lambda: sysfs(dev.path, "loop", "autoclear") == "1" or detaching.done())
            assert sysfs(dev.path, "loop", "backing_file") == path, "unbound while held"
        finally:
            closing.set()  # before the close: detach cannot see the unbind before this
            os.close(fd)
        unbound, closed_before_return = detaching.result()
    assert unbound and closed_before_return, "detach returned while the opener held the device"
    assert sysfs(dev.path, "loop", "backing_file") is None


def _until(condition: Callable[[], bool], limit: float = 10.0) -> None:
    """Wait for a state another thread or the kernel brings about (a deadline, not a timing)."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "the state never came"
        time.sleep(0.001)


def test_refresh_size_after_the_file_grew(loop: Tracked, tmp_path: Path) -> None:
    path = sparse(tmp_path / "r.img", 16 * MiB)
    dev = loop.attach(path, readonly=False)
    os.truncate(path, 48 * MiB)
    assert loop.size_bytes(dev.path) == 16 * MiB
    loop.refresh_size(dev.path)
    assert loop.size_bytes(dev.path) == 48 * MiB


def test_concurrent_attaches_get_distinct_devices(loop: Tracked, tmp_path: Path) -> None:
    paths = [sparse(tmp_path / f"c{i}.img") for i in range(8)]
    barrier = threading.Barrier(len(paths))

    def attach(path: str) -> BlockDevice:
        barrier.wait()
        return loop.attach(path, readonly=False)

    with ThreadPoolExecutor(len(paths)) as pool:
        devices = list(pool.map(attach, paths))
    assert len({d.path for d in devices}) == len(paths)
    for path, dev in zip(paths, devices, strict=True):
        assert sysfs(dev.path, "loop", "backing_file") == path


def test_a_device_taken_by_another_process_means_another_device(
    loop: Tracked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """losetup binds the free device between our GET_FREE and CONFIGURE: a real EBUSY."""
    other = sparse(tmp_path / "other.img")
    taken: list[int] = []
    real = loopdev._ioctl

    def racing(fd: int, request: int, arg: Any = 0) -> Any:
        result = real(fd, request, arg)
        if request == loopdev.LOOP_CTL_GET_FREE and not taken:
            taken.append(result)
            subprocess.run(["losetup", f"/dev/loop{result}", other], check=True, timeout=30)
        return result

    monkeypatch.setattr(loopdev, "_ioctl", racing)
    path = sparse(tmp_path / "mine.img")
    dev = loop.attach(path, readonly=False)
    assert dev.path != f"/dev/loop{taken[0]}"
    assert sysfs(dev.path, "loop", "backing_file") == path
    assert sysfs(f"/dev/loop{taken[0]}", "loop", "backing_file") == other


@pytest.mark.parametrize("answer", [errno.ENOTTY, errno.EINVAL])
def test_kernels_without_loop_configure_use_set_fd(
    loop: Tracked, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, answer: int
) -> None:
    """LOOP_CONFIGURE is made to fail as before Linux 5.8 (ENOTTY, or EINVAL)."""
    real = loopdev._ioctl
    asked: list[int] = []

    def old_kernel(fd: int, request: int, arg: Any = 0) -> Any:
        asked.append(request)
        if request == loopdev.LOOP_CONFIGURE:
            raise OSError(answer, os.strerror(answer))
        return real(fd, request, arg)

    monkeypatch.setattr(loopdev, "_ioctl", old_kernel)
    rw = sparse(tmp_path / "rw.img")
    ro = sparse(tmp_path / "ro.img")
    dev = loop.attach(rw, readonly=False)
    dev_ro = loop.attach(ro, readonly=True)
    assert loopdev.LOOP_SET_FD in asked and loopdev.LOOP_SET_DIRECT_IO in asked
    assert sysfs(dev.path, "loop", "backing_file") == rw and sysfs(dev.path, "ro") == "0"
    assert sysfs(dev_ro.path, "loop", "backing_file") == ro and sysfs(dev_ro.path, "ro") == "1"
    assert sysfs(dev.path, "loop", "dio") == ("1" if accepts_o_direct(rw) else "0")
    assert sysfs(dev.path, "loop", "autoclear") == "0"
    assert bytes(status(dev.path).lo_file_name).rstrip(b"\0") == os.fsencode(rw)[:63]
    write_through(dev.path, b"legacy")
    assert read_file(rw, 6) == b"legacy"
