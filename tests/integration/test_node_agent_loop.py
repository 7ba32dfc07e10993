"""Real loop devices: attach, symlinks, idempotency, recovery, resize, read-only, detach."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.agent import Agent
from node_agent.pools import Pool
from tessera.errors import AlreadyExists, FailedPrecondition
from tessera.ids import new_volume_id
from tessera.system.loopdev import bound_under
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2


def release_loops(prefix: Path) -> None:
    """Detach every loop device backed by a file under prefix (test finalizer)."""
    for dev in [b.path for b in bound_under(prefix)]:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30, check=False)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    (tmp_path / "pool").mkdir()
    pool = Pool.open("default", tmp_path / "pool")
    try:
        yield Agent("it-node", {"default": pool}, tmp_path / "dev")
    finally:
        release_loops(tmp_path)
    assert bound_under(tmp_path) == []


def getsize64(device: str) -> int:
    res = subprocess.run(
        ["blockdev", "--getsize64", device], capture_output=True, text=True, timeout=30, check=True
    )
    return int(res.stdout)


def attached_to(path: str) -> list[str]:
    res = subprocess.run(
        ["losetup", "-j", path], capture_output=True, text=True, timeout=30, check=True
    )
    return [line.split(":", 1)[0] for line in res.stdout.splitlines()]


def new_volume(agent: Agent, size: int = 64 * MiB) -> str:
    vid = new_volume_id()
    agent.create_volume(vid, "default", size)
    return vid


def test_attach_sparse_file_gives_a_symlinked_loop_device(agent: Agent) -> None:
    vid = new_volume(agent)
    att = agent.attach(vid, readonly=False)
    assert att.backing_device.startswith("/dev/loop") and att.transport == "loop"
    link = agent.dev_dir / vid
    assert att.device == str(link) and os.path.realpath(link) == att.backing_device
    assert getsize64(att.device) == att.size_bytes == 64 * MiB
    path = agent.pools["default"].volume_path(vid)
    assert attached_to(str(path)) == [att.backing_device]
    with open(link, "r+b") as f:
        f.write(b"tessera!")
        f.flush()
        os.fsync(f.fileno())
    with open(path, "rb") as f:
        assert f.read(8) == b"tessera!"


def test_reattach_is_idempotent(agent: Agent) -> None:
    vid = new_volume(agent)
    first = agent.attach(vid, readonly=False)
    assert agent.attach(vid, readonly=False) == first
    assert attached_to(str(agent.pools["default"].volume_path(vid))) == [first.backing_device]
    with pytest.raises(AlreadyExists):
        agent.attach(vid, readonly=True)


def test_only_a_never_written_volume_is_reported_blank(agent: Agent) -> None:
    vid = new_volume(agent)
    assert agent.attach(vid, readonly=False).blank
    with open(agent.dev_dir / vid, "r+b") as device:
        device.write(b"\x01" * 4096)
        device.flush()  # in the device's page cache only: the file has no blocks yet
        assert not agent.attach(vid, readonly=False).blank
        assert not agent.get_attachment(vid).blank


def test_a_device_bound_to_a_replaced_file_is_not_blank(agent: Agent) -> None:
    vid = new_volume(agent)
    att = agent.attach(vid, readonly=False)
    with open(att.device, "r+b") as device:
        device.write(b"\x01" * 4096)
    path = agent.pools["default"].volume_path(vid)
    path.unlink()  # the device still reads the old (written) inode
    with open(path, "xb") as f:
        f.truncate(64 * MiB)  # an empty file now carries the name
    assert not agent.get_attachment(vid).blank


def test_a_volume_with_a_filesystem_is_not_blank(agent: Agent) -> None:
    vid = new_volume(agent)
    att = agent.attach(vid, readonly=False)
    subprocess.run(["mkfs.ext4", "-q", att.device], check=True, capture_output=True, timeout=120)
    agent.detach(vid)
    assert not agent.attach(vid, readonly=False).blank


def test_new_agent_recovers_the_same_device_without_attaching_again(agent: Agent) -> None:
    vid = new_volume(agent)
    first = agent.attach(vid, readonly=False)
    (agent.dev_dir / vid).unlink()  # a crash between losetup and the symlink
    fresh = Agent("it-node", agent.pools, agent.dev_dir)
    adopted = fresh.recover()
    assert [a.backing_device for a in adopted] == [first.backing_device]
    assert os.path.realpath(agent.dev_dir / vid) == first.backing_device
    assert fresh.attach(vid, readonly=False).backing_device == first.backing_device
    assert attached_to(str(agent.pools["default"].volume_path(vid))) == [first.backing_device]


def test_resize_refreshes_the_attached_device(agent: Agent) -> None:
    vid = new_volume(agent)
    att = agent.attach(vid, readonly=False)
    agent.resize_volume(vid, 128 * MiB)
    assert getsize64(att.backing_device) == 128 * MiB
    assert agent.get_attachment(vid).size_bytes == 128 * MiB


def test_readonly_attach_refuses_writes(agent: Agent) -> None:
    vid = new_volume(agent)
    att = agent.attach(vid, readonly=True)
    assert att.readonly
    with pytest.raises(OSError):  # EROFS/EPERM at open or at the write, per kernel
        fd = os.open(att.device, os.O_WRONLY | os.O_SYNC)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    res = subprocess.run(["blockdev", "--getro", att.device], capture_output=True, text=True,
                         timeout=30, check=True)  # fmt: skip
    assert res.stdout.strip() == "1"


def test_detach_leaves_no_loop_device_and_unblocks_delete(agent: Agent) -> None:
    vid = new_volume(agent)
    agent.attach(vid, readonly=False)
    with pytest.raises(FailedPrecondition):
        agent.delete_volume(vid)
    agent.detach(vid)
    agent.detach(vid)
    path = agent.pools["default"].volume_path(vid)
    assert attached_to(str(path)) == []
    assert not (agent.dev_dir / vid).is_symlink()
    assert agent.list_attachments() == []
    agent.delete_volume(vid)
    assert not path.exists()


def test_detach_refuses_a_mounted_device(agent: Agent, tmp_path: Path) -> None:
    vid = new_volume(agent)
    att = agent.attach(vid, readonly=False)
    subprocess.run(["mkfs.ext4", "-q", att.device], check=True, timeout=60, capture_output=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", att.device, str(mnt)], check=True, timeout=60)
    try:
        with pytest.raises(FailedPrecondition):
            agent.detach(vid)
        assert os.path.realpath(agent.dev_dir / vid) == att.backing_device
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
    agent.detach(vid)
