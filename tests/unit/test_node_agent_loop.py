"""The loop layer without root: kernel struct layouts, sysfs parsing, retry logic.

The ioctl paths themselves run against real loop devices in
tests/integration/test_node_agent_loop_ioctl.py; here the kernel is faked
to reach the branches a real kernel does not take on demand.
"""

from __future__ import annotations

import ctypes
import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from node_agent.transports import BlockDevice, loops
from node_agent.transports.loops import check_loop_device
from tessera.errors import InvalidArgument, Unavailable
from tessera.system import blockdev, loopdev


def test_struct_layouts_match_linux_loop_h() -> None:
    assert ctypes.sizeof(loopdev.LoopInfo64) == 232
    assert ctypes.sizeof(loopdev.LoopConfig) == 304
    assert loopdev.LoopInfo64.lo_flags.offset == 52
    assert loopdev.LoopInfo64.lo_file_name.offset == 56
    assert loopdev.LoopInfo64.lo_init.offset == 216
    assert loopdev.LoopConfig.info.offset == 8
    assert loopdev.LoopConfig.reserved.offset == 240


def test_file_name_is_truncated_and_nul_terminated() -> None:
    info = loopdev._info("/p/" + "x" * 100, loopdev.LO_FLAGS_DIRECT_IO)
    name = bytes(info.lo_file_name)
    assert name[:63] == b"/p/" + b"x" * 60 and name[63] == 0
    assert info.lo_flags == loopdev.LO_FLAGS_DIRECT_IO


@pytest.mark.parametrize(
    "device",
    ["/dev/sda", "/dev/loop", "/dev/loop1; rm", "loop1", "/dev/loop-control", "/dev/loop3\n"],
)
def test_only_loop_devices_reach_an_ioctl(device: str) -> None:
    with pytest.raises(InvalidArgument):
        check_loop_device(device)
    with pytest.raises(InvalidArgument):
        loops.unbind(BlockDevice("vol-1", device, "/f", False, "loop"))
    with pytest.raises(InvalidArgument):
        loops.refresh(BlockDevice("vol-1", device, "/f", False, "loop"))


def fake_loop(sys_block: Path, n: int, backing: str | None, ro: bool = False) -> None:
    dev = sys_block / f"loop{n}"
    dev.mkdir(parents=True)
    (dev / "ro").write_text("1\n" if ro else "0\n")
    if backing is not None:
        (dev / "loop").mkdir()
        (dev / "loop" / "backing_file").write_text(backing + "\n")
        (dev / "loop" / "dio").write_text("1\n")


def test_list_devices_reads_sysfs_sorted_by_number(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(blockdev, "SYS_BLOCK", tmp_path)
    fake_loop(tmp_path, 10, "/pool/b.img", ro=True)
    fake_loop(tmp_path, 2, "/pool/a.img (deleted)")
    fake_loop(tmp_path, 3, None)  # exists, not bound
    (tmp_path / "sda").mkdir()
    (tmp_path / "loop-control").mkdir()
    devices = loops.bound(lambda backing: "vol-" + Path(backing).stem, "loop")
    assert [(d.volume_id, d.path, d.backing, d.readonly) for d in devices] == [
        ("vol-a", "/dev/loop2", "/pool/a.img", False),
        ("vol-b", "/dev/loop10", "/pool/b.img", True),
    ]


class FakeKernel:
    """Answers loop ioctls from a script; records what was asked."""

    def __init__(self, failures: dict[int, list[int]]) -> None:
        self.failures = failures  # request -> errnos to raise, one per call, in order
        self.calls: list[int] = []
        self.free = 0
        self.stale: dict[str, list[str]] = {}  # device -> what still references it

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        self.calls.append(request)
        queue = self.failures.get(request, [])
        if queue:
            err = queue.pop(0)
            raise OSError(err, f"fake {errno.errorcode[err]}")
        if request == loopdev.LOOP_CTL_GET_FREE:
            self.free += 1
            return self.free - 1
        if request == loopdev.LOOP_GET_STATUS64:
            arg.lo_flags = loopdev.LO_FLAGS_DIRECT_IO
        return 0


@pytest.fixture
def kernel(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKernel]:
    fake = FakeKernel({})

    @contextmanager
    def opened(path: str, flags: int) -> Iterator[int]:
        yield 99

    monkeypatch.setattr(loopdev, "_ioctl", fake.ioctl)
    monkeypatch.setattr(loopdev, "_opened", opened)
    monkeypatch.setattr(loopdev.os.path, "exists", lambda p: True)
    monkeypatch.setattr(loopdev.blockdev, "holders", lambda device: fake.stale.get(device, []))
    yield fake


def configures(kernel: FakeKernel) -> list[int]:
    return [c for c in kernel.calls if c not in (loopdev.LOOP_CTL_GET_FREE,)]


def test_busy_device_means_ask_for_another(kernel: FakeKernel) -> None:
    kernel.failures = {loopdev.LOOP_CONFIGURE: [errno.EBUSY, errno.EBUSY]}
    assert loopdev.attach("/f", readonly=False, direct_io=True) == ("/dev/loop2", True)
    assert kernel.calls.count(loopdev.LOOP_CTL_GET_FREE) == 3


def test_a_free_device_still_referenced_is_never_handed_out(kernel: FakeKernel) -> None:
    kernel.stale = {"/dev/loop0": ["its device node is bind-mounted at /old/target"]}
    assert loopdev.attach("/f", readonly=False, direct_io=True) == ("/dev/loop1", True)
    assert kernel.calls.count(loopdev.LOOP_CONFIGURE) == 1


def test_busy_retries_are_bounded(kernel: FakeKernel) -> None:
    kernel.failures = {loopdev.LOOP_CONFIGURE: [errno.EBUSY] * 1000}
    with pytest.raises(Unavailable):
        loops.bind("vol-1", "/f", readonly=False, transport="loop")
    assert kernel.calls.count(loopdev.LOOP_CTL_GET_FREE) == loopdev.BUSY_RETRIES


def test_einval_with_direct_io_retries_buffered(kernel: FakeKernel) -> None:
    kernel.failures = {loopdev.LOOP_CONFIGURE: [errno.EINVAL]}
    assert loopdev.attach("/f", readonly=False, direct_io=True) == ("/dev/loop0", False)
    assert configures(kernel) == [loopdev.LOOP_CONFIGURE, loopdev.LOOP_CONFIGURE]


@pytest.mark.parametrize("answers", [[errno.ENOTTY], [errno.EINVAL, errno.EINVAL]])
def test_kernel_without_loop_configure_gets_set_fd(kernel: FakeKernel, answers: list[int]) -> None:
    """Before 5.8: ENOTTY, or EINVAL with and without direct I/O."""
    kernel.failures = {loopdev.LOOP_CONFIGURE: list(answers)}
    assert loopdev.attach("/f", readonly=False, direct_io=True) == ("/dev/loop0", True)
    assert configures(kernel)[len(answers) :] == [
        loopdev.LOOP_SET_FD,
        loopdev.LOOP_SET_STATUS64,
        loopdev.LOOP_SET_DIRECT_IO,
        loopdev.LOOP_GET_STATUS64,
    ]


def test_legacy_failure_after_set_fd_unbinds_again(kernel: FakeKernel) -> None:
    kernel.failures = {
        loopdev.LOOP_CONFIGURE: [errno.ENOTTY],
        loopdev.LOOP_SET_STATUS64: [errno.EIO],
    }
    with pytest.raises(OSError):
        loopdev.attach("/f", readonly=False, direct_io=False)
    assert configures(kernel)[-1] == loopdev.LOOP_CLR_FD


def test_other_configure_errors_are_not_retried(kernel: FakeKernel) -> None:
    kernel.failures = {loopdev.LOOP_CONFIGURE: [errno.EIO]}
    with pytest.raises(OSError) as err:
        loopdev.attach("/f", readonly=False, direct_io=True)
    assert err.value.errno == errno.EIO
    assert configures(kernel) == [loopdev.LOOP_CONFIGURE]
