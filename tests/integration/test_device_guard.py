"""The agent guards the device itself: nothing is released or reused while referenced.

Reproduced before: DELETE /v1/attachments/<id> answered 204 while the
volume's loop device was still bind-mounted at a block target (an O_EXCL
open cannot see a bind of a device node); the next attach took the same
loop device and the stale target read the other volume's bytes. These
tests drive a real agent process on its unix socket, with real loop
devices and real bind mounts.
"""

from __future__ import annotations

import fcntl
import os
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tessera.clients import AgentClient
from tessera.errors import FailedPrecondition
from tessera.ids import new_volume_id
from tessera.system import blockdev, filesystems, loopdev, mounts
from tests.conftest import needs_root
from tests.integration.test_node_agent_loop import release_loops
from tests.integration.test_node_agent_process import TOKEN, AgentProcess

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, AgentClient]]:
    proc = AgentProcess(tmp_path)
    client = proc.start()
    try:
        yield proc, client
    finally:
        client.close()
        for target in reversed(mounts.mounts_under(tmp_path)):
            mounts.unmount(target)
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)
        release_loops(tmp_path)
    assert loopdev.bound_under(tmp_path) == []


def bind_node(device: str, target: Path) -> None:
    """What a block publish does: the device node bound onto a file."""
    target.touch()
    mounts.bind_mount(device, str(target), readonly=False)


def write_at_start(device: str, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def raw_delete(socket: Path, path: str) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(socket))
    with httpx.Client(transport=transport, base_url="http://agent") as http:
        return http.delete(path, headers={"Authorization": f"Bearer {TOKEN}"})


def test_detach_is_refused_while_the_device_node_is_bound_at_a_stale_target(
    agent: tuple[AgentProcess, AgentClient],
) -> None:
    proc, client = agent
    vid = new_volume_id()
    client.create_volume(vid, "default", 16 * MiB)
    device = client.attach(vid).backing_device
    stale = proc.tmp / "elsewhere" / "pod-block-target"
    stale.parent.mkdir()
    bind_node(device, stale)

    answer = raw_delete(proc.socket, f"/v1/attachments/{vid}")
    assert answer.status_code == 409, answer.text
    problem = answer.json()
    assert problem["type"].endswith("/failed-precondition")
    assert str(stale) in problem["detail"] and "bind-mounted" in problem["detail"]
    with pytest.raises(FailedPrecondition, match=f"attached on this node as {device}"):
        client.delete_volume(vid)  # still attached: the file stays too
    assert [b.path for b in loopdev.bound_under(proc.tmp)] == [device]
    assert client.get_attachment(vid).backing_device == device

    mounts.unmount(str(stale))
    client.detach(vid)
    assert loopdev.bound_under(proc.tmp) == []
    client.delete_volume(vid)


def test_a_filesystem_mount_of_the_device_also_blocks_detach(
    agent: tuple[AgentProcess, AgentClient],
) -> None:
    proc, client = agent
    vid = new_volume_id()
    client.create_volume(vid, "default", 32 * MiB)
    device = client.attach(vid).backing_device
    filesystems.make_filesystem(device, "ext4", [])
    staging = proc.tmp / "staging"
    staging.mkdir()
    mounts.mount(device, str(staging), "ext4", [])
    with pytest.raises(FailedPrecondition, match=f"mounted at {staging}"):
        client.detach(vid)
    mounts.unmount(str(staging))
    client.detach(vid)
    client.delete_volume(vid)


def test_attach_never_hands_out_a_free_device_still_referenced_by_a_stale_bind(
    agent: tuple[AgentProcess, AgentClient],
) -> None:
    """A stale bind of a free loop device (left by an old agent, or `losetup -d`
    behind our back) must not become the next volume's device."""
    proc, client = agent
    with open(loopdev.LOOP_CONTROL, "rb") as control:
        free = loopdev.device_path(fcntl.ioctl(control, loopdev.LOOP_CTL_GET_FREE))
    stale = proc.tmp / "stale-target"
    bind_node(free, stale)
    assert blockdev.holders(free) == [f"its device node is bind-mounted at {stale}"]

    vid = new_volume_id()
    client.create_volume(vid, "default", 16 * MiB)
    device = client.attach(vid).backing_device
    assert device != free, f"{free} is still bound at {stale} and was handed out anyway"
    write_at_start(device, b"volume B's secret")
    with open(stale, "rb") as f:
        assert b"secret" not in f.read(64), "the stale target reads the new volume's data"
    assert f"not using free {free}" in proc.log.read_text()

    mounts.unmount(str(stale))
    client.detach(vid)
    client.delete_volume(vid)


def test_holders_compares_device_numbers_not_names(tmp_path: Path) -> None:
    """A node of the same device under another name, bound elsewhere, is still found;
    so is a loop device stacked on the device (what kubelet keeps on block volumes)."""
    image = tmp_path / "vol.img"
    image.write_bytes(b"\0" * MiB)
    device, _ = loopdev.attach(str(image), readonly=False, direct_io=False)
    alias = tmp_path / "renamed-node"
    target = tmp_path / "target"
    stacked = ""
    try:
        assert blockdev.holders(device) == []
        os.mknod(alias, stat.S_IFBLK | 0o600, os.stat(device).st_rdev)
        bind_node(str(alias), target)
        assert blockdev.holders(device) == [f"its device node is bind-mounted at {target}"]
        assert blockdev.holders(device, ignore_mountpoints=[str(target)]) == []
        mounts.unmount(str(target))
        stacked = subprocess.run(
            ["losetup", "--find", "--show", "--read-only", device],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout.strip()  # fmt: skip
        (found,) = blockdev.holders(device)
        assert found.startswith(f"loop device {stacked} is stacked on it")
    finally:
        if stacked:
            loopdev.detach(stacked)
        mounts.unmount(str(target))
        loopdev.detach(device)
    assert blockdev.holders(device) == []
