"""Freeze holders, leases and thaws on the node, on real loop devices, filesystems and mounts.

The reviewer's scenarios: two cuts of one volume must not thaw each
other; a renewal after the freeze was lost must be refused; a FIFREEZE
stuck on one volume's stalled storage must not hold up another volume's
thaw; and a thaw must reach the frozen filesystem even after its
mountpoint path was unmounted and mounted over.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node_agent.agent import Agent
from node_agent.pools import Pool, Reserve
from tessera.errors import Conflict, Unavailable
from tessera.ids import new_volume_id
from tessera.system import filesystems, mounts
from tessera.system import freeze as fs_freeze
from tessera.system.loopdev import bound_under
from tests.conftest import needs_root
from tests.integration.processes import mounted_pool, processes
from tests.integration.test_node_agent_loop import release_loops
from tests.integration.test_snapshots_agent import is_frozen

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2
#: patience for something that happens at once when the code is right
SETTLE_SECONDS = 10.0


@dataclass
class Node:
    agent: Agent
    tmp: Path
    #: the pools' own mountpoints (their filesystems hold the volume files)
    pool_dirs: dict[str, Path]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """An agent with two ext4 pools, "p" and "q", each its own loop-mounted filesystem."""
    (tmp_path / "p").mkdir()
    (tmp_path / "q").mkdir()
    with (
        mounted_pool(tmp_path / "p", "ext4", 256 * MiB) as p,
        mounted_pool(tmp_path / "q", "ext4", 256 * MiB) as q,
    ):
        try:
            pools = {
                name: Pool.open(name, directory, reserve=Reserve(1, 4 * MiB))
                for name, directory in (("p", p), ("q", q))
            }
            yield Node(
                Agent("freeze-node", pools, tmp_path / "dev", state_dir=tmp_path / "state"),
                tmp_path,
                {"p": p, "q": q},
            )
        finally:
            release_loops(tmp_path)
    assert bound_under(tmp_path) == []


@pytest.fixture
def mounted(node: Node) -> Iterator[Callable[[str], tuple[str, str]]]:
    """mounted(pool) -> (volume id, mountpoint) of a new ext4 volume; all torn down after."""
    made: list[tuple[str, str]] = []

    def make(pool: str) -> tuple[str, str]:
        vid = new_volume_id()
        node.agent.create_volume(vid, pool, 64 * MiB)
        made.append((vid, ""))
        device = node.agent.attach(vid, readonly=False).device
        filesystems.make_filesystem(device, "ext4", [])
        mnt = node.tmp / f"mnt-{vid}"
        mnt.mkdir()
        mounts.mount(device, str(mnt), "ext4", [])
        made[-1] = (vid, str(mnt))
        return vid, str(mnt)

    try:
        yield make
    finally:
        node.agent.freezes.thaw_all()
        for vid, mnt in reversed(made):
            if mnt:
                if is_frozen(mnt):  # a regression must not leave an orphaned frozen superblock
                    fs_freeze.thaw(mnt)
                mounts.unmount(mnt)
            node.agent.detach(vid)
            node.agent.delete_volume(vid)


def start_write(directory: str, name: str = "f") -> threading.Event:
    """Write and fsync a file in a thread; the event is set once it is on disk."""
    done = threading.Event()

    def writer() -> None:
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC)
        try:
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
        done.set()

    threading.Thread(target=writer, daemon=True).start()
    return done


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SETTLE_SECONDS
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_one_snapshot_thawing_does_not_unfreeze_another_snapshots_volume(
    node: Node, mounted: Callable[[str], tuple[str, str]]
) -> None:
    vid, mnt = mounted("p")
    assert node.agent.freeze(vid, 30, holder="snap-a").frozen
    assert node.agent.freeze(vid, 30, holder="snap-b").mountpoints == [mnt]
    still = node.agent.thaw(vid, holder="snap-a")  # snapshot A's cut is done
    assert still.frozen and still.mountpoints == [mnt]
    written = start_write(mnt)
    assert not written.wait(0.5), "a write went through while snapshot B still held the freeze"
    thawed = node.agent.thaw(vid, holder="snap-b")  # the last holder lets go
    assert not thawed.frozen and thawed.mountpoints == [mnt]
    assert written.wait(SETTLE_SECONDS)
    assert not is_frozen(mnt)


def test_an_anonymous_thaw_releases_every_holder(
    node: Node, mounted: Callable[[str], tuple[str, str]]
) -> None:
    vid, mnt = mounted("p")
    node.agent.freeze(vid, 30, holder="snap-a")
    node.agent.freeze(vid, 30)  # an older caller: the anonymous holder
    assert not node.agent.thaw(vid).frozen
    assert not is_frozen(mnt)
    with pytest.raises(Conflict):
        node.agent.freeze(vid, 30, holder="snap-a", renew=True)


def test_renewing_a_lapsed_freeze_is_refused_so_the_cut_knows_its_instant_was_lost(
    node: Node, mounted: Callable[[str], tuple[str, str]], tmp_path: Path
) -> None:
    vid, mnt = mounted("p")
    node.agent.freeze(vid, 30, holder="snap-a")
    assert node.agent.freeze(vid, 30, holder="snap-a", renew=True).frozen  # held: extended
    node.agent.freeze(vid, 0.3, holder="snap-a", renew=True)  # a short lease that runs out
    wait_until(lambda: not node.agent.freezes.is_frozen(vid), "the lease never ran out")
    assert not is_frozen(mnt)
    with pytest.raises(Conflict) as err:
        node.agent.freeze(vid, 30, holder="snap-a", renew=True)
    assert err.value.field == "holder" and "instant was lost" in str(err.value)
    assert not is_frozen(mnt)  # a refused renewal freezes nothing

    node.agent.freeze(vid, 30, holder="snap-b")
    node.agent.thaw(vid, holder="snap-b")
    with pytest.raises(Conflict):  # thawed: lost too
        node.agent.freeze(vid, 30, holder="snap-b", renew=True)

    node.agent.freeze(vid, 30, holder="snap-c")
    restarted = Agent(
        "freeze-node", node.agent.pools, tmp_path / "dev", state_dir=tmp_path / "state"
    )
    with pytest.raises(Conflict):  # the agent restarted: its freezes are gone from memory
        restarted.freeze(vid, 30, holder="snap-c", renew=True)
    node.agent.thaw(vid, holder="snap-c")


def test_a_stuck_freeze_of_one_volume_does_not_delay_another_volumes_thaw(
    node: Node, mounted: Callable[[str], tuple[str, str]]
) -> None:
    vid_a, mnt_a = mounted("q")
    vid_b, mnt_b = mounted("p")  # its volume file lives on pool p's filesystem
    outer = str(node.pool_dirs["p"])
    answered: list[BaseException | None] = []
    try:
        with open(os.path.join(mnt_b, "dirty"), "wb") as f:  # unflushed data to sync
            f.write(os.urandom(8 * MiB))
        node.agent.freeze(vid_a, 2.0, holder="snap-a")  # its lease ends while b is stuck
        fs_freeze.freeze(outer)  # volume b's storage stalls (as an owner gone away would)

        def freeze_b() -> None:
            try:
                node.agent.freeze(vid_b, 2.0, holder="snap-b")
                answered.append(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                answered.append(exc)

        # b's FIFREEZE blocks syncing into the frozen pool, for as long as it stays frozen
        threading.Thread(target=freeze_b, daemon=True).start()
        wait_until(lambda: not node.agent.freezes.is_frozen(vid_a), "a's lease thaw waited on b")
        assert start_write(mnt_a).wait(SETTLE_SECONDS), "volume a stayed frozen"
        wait_until(lambda: bool(answered), "b's freeze never answered")
        assert isinstance(answered[0], Unavailable), answered
        assert "not answering" in str(answered[0])
    finally:
        fs_freeze.thaw(outer)
        wait_until(lambda: bool(answered), "b's freeze still blocked after its storage came back")
    # b's FIFREEZE ends once its storage answers; nobody holds b: thawed again
    wait_until(lambda: not node.agent.freezes.stuck(vid_b), "b's late freeze never ended")
    assert not node.agent.freezes.is_frozen(vid_b)
    assert not is_frozen(mnt_b)


def test_a_thaw_reaches_the_filesystem_after_its_mountpoint_was_replaced(
    node: Node, mounted: Callable[[str], tuple[str, str]]
) -> None:
    vid, staging = mounted("p")
    pod = node.tmp / "pod"
    pod.mkdir()
    mounts.bind_mount(staging, str(pod), readonly=False)  # the pod's view of the volume
    replaced = False
    written = threading.Event()
    try:
        assert node.agent.freeze(vid, 30, holder="snap-a").mountpoints == [staging]
        # the staging path is detached and something else mounted there meanwhile
        subprocess.run(["umount", "-l", staging], check=True, timeout=30)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", staging], check=True, timeout=30)
        replaced = True
        written = start_write(str(pod))
        assert not written.wait(0.3), "the volume was not frozen"
        node.agent.thaw(vid, holder="snap-a")
        assert written.wait(SETTLE_SECONDS), "the thaw missed the volume: it stayed frozen"
    finally:
        if is_frozen(str(pod)):
            fs_freeze.thaw(str(pod))
        written.wait(SETTLE_SECONDS)  # the writer's file is closed before the unmount
        if replaced:
            mounts.unmount(staging)  # the tmpfs
            mounts.bind_mount(str(pod), staging, readonly=False)  # for the fixture's teardown
        mounts.unmount(str(pod))


def test_the_agent_api_takes_holders_and_answers_409_to_a_lost_renewal(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with mounted_pool(tmp_path / "p", "ext4", 256 * MiB) as pool:
        try:
            with processes(tmp_path) as procs:
                procs.start_management()
                agent = procs.start_agent("freeze-node", {"p": pool})
                vid = new_volume_id()
                agent.create_volume(vid, "p", 64 * MiB)
                device = agent.attach(vid).device
                filesystems.make_filesystem(device, "ext4", [])
                mounts.mount(device, str(mnt), "ext4", [])
                try:
                    assert agent.freeze(vid, 30, holder="snap-a").frozen
                    assert agent.freeze(vid, 30, holder="snap-b").frozen
                    assert agent.thaw(vid, holder="snap-a").frozen  # snap-b still holds it
                    assert agent.freeze(vid, 30, holder="snap-b", renew=True).frozen
                    with pytest.raises(Conflict) as err:  # 409 problem+json, rebuilt
                        agent.freeze(vid, 30, holder="snap-a", renew=True)
                    assert err.value.field == "holder"
                    # an older caller's thaw has no body: every holder is released
                    agent._c.request("POST", f"/v1/attachments/{vid}/thaw")
                    assert not is_frozen(str(mnt))
                finally:
                    if is_frozen(str(mnt)):
                        fs_freeze.thaw(str(mnt))
                    mounts.unmount(str(mnt))
                    agent.detach(vid)
                    agent.delete_volume(vid)
        finally:
            release_loops(tmp_path)
    assert bound_under(tmp_path) == []
