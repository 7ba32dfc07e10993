"""The node-agent's snapshot, clone, extent and freeze routes, through a real agent process.

What management and the CSI plugin see: problem+json errors rebuilt as
types, pools registered with their physical use and snapshot method.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera.clients import AgentClient, ManagementClient
from tessera.errors import FailedPrecondition, InvalidArgument, NotFound
from tessera.ids import new_snapshot_id, new_volume_id
from tessera.models import AgentSource, AgentSourceKind, Pool, SnapshotMethod
from tessera.system import filesystems, mounts
from tessera.system import freeze as fs_freeze
from tessera.system.loopdev import bound_under
from tests.conftest import needs_root
from tests.integration.processes import mounted_pool, processes
from tests.integration.test_node_agent_loop import release_loops
from tests.integration.test_snapshots_agent import is_frozen

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2
POOL_SIZE = 320 * MiB


@pytest.fixture
def pools(tmp_path: Path) -> Iterator[dict[str, Path]]:
    with (
        mounted_pool(tmp_path, "xfs", POOL_SIZE) as xfs,
        mounted_pool(tmp_path, "ext4", POOL_SIZE) as ext4,
    ):
        try:
            yield {"fast": xfs, "plain": ext4}
        finally:
            release_loops(tmp_path)
    assert bound_under(tmp_path) == []


def pool_named(mgmt: ManagementClient, name: str) -> Pool:
    return next(p for p in mgmt.list_pools().items if p.name == name)


def fill(agent: AgentClient, pool: str, written: int) -> str:
    vid = new_volume_id()
    path = agent.create_volume(vid, pool, 64 * MiB).path
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, os.urandom(written), 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    return vid


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def test_pools_report_their_snapshot_method_and_physical_use(
    pools: dict[str, Path], tmp_path: Path
) -> None:
    with processes(tmp_path) as procs:
        mgmt = procs.start_management()
        agent = procs.start_agent("snap-node", pools, "--heartbeat-interval", "0.2")
        assert pool_named(mgmt, "fast").snapshot_method == SnapshotMethod.REFLINK
        assert pool_named(mgmt, "plain").snapshot_method == SnapshotMethod.NONE
        first = pool_named(mgmt, "fast").used_bytes
        assert first > 0
        fill(agent, "fast", 32 * MiB)
        deadline = time.monotonic() + 10
        while pool_named(mgmt, "fast").used_bytes < first + 32 * MiB:
            assert time.monotonic() < deadline, "physical use never reached management"
            time.sleep(0.1)


def test_snapshot_clone_and_extents_routes_over_the_agent_api(
    pools: dict[str, Path], tmp_path: Path
) -> None:
    with processes(tmp_path) as procs:
        procs.start_management()
        agent = procs.start_agent("snap-node", pools)
        vid = fill(agent, "fast", 8 * MiB)
        sid = new_snapshot_id()
        snap = agent.create_snapshot(sid, "fast", vid)
        assert snap.method == SnapshotMethod.REFLINK and snap.source_volume_id == vid
        assert agent.create_snapshot(sid, "fast", vid) == snap
        assert [s.id for s in agent.list_snapshots()] == [sid]
        page = agent.snapshot_extents(sid)
        assert page.size_bytes == 64 * MiB and sum(e.length for e in page.extents) == 8 * MiB
        assert agent.snapshot_extents(sid, sid).extents == []  # a snapshot against itself
        clone = agent.create_volume(
            new_volume_id(),
            "fast",
            128 * MiB,
            source=AgentSource(kind=AgentSourceKind.SNAPSHOT, id=sid),
        )
        assert clone.size_bytes == 128 * MiB
        with open(clone.path, "rb") as f:
            assert hashlib.sha256(f.read(64 * MiB)).hexdigest() == digest(snap.path)
        with pytest.raises(NotFound):
            agent.snapshot_extents(new_snapshot_id())
        with pytest.raises(InvalidArgument):
            agent.delete_snapshot("not-a-snapshot")
        agent.delete_snapshot(sid)
        agent.delete_snapshot(sid)  # absent is fine
        assert agent.list_snapshots() == []
        with pytest.raises(FailedPrecondition) as err:
            agent.create_snapshot(new_snapshot_id(), "plain", fill(agent, "plain", MiB))
        assert "--copy-fallback" in str(err.value)


def test_copy_fallback_flag_makes_copies_and_says_so(
    pools: dict[str, Path], tmp_path: Path
) -> None:
    with processes(tmp_path) as procs:
        mgmt = procs.start_management()
        agent = procs.start_agent("snap-node", {"plain": pools["plain"]}, "--copy-fallback")
        assert pool_named(mgmt, "plain").snapshot_method == SnapshotMethod.COPY
        vid = fill(agent, "plain", 4 * MiB)
        snap = agent.create_snapshot(new_snapshot_id(), "plain", vid)
        assert snap.method == SnapshotMethod.COPY
        assert digest(snap.path) == digest(agent.get_volume(vid).path)


def test_freeze_and_thaw_of_a_volume_not_mounted_here_freeze_nothing(
    pools: dict[str, Path], tmp_path: Path
) -> None:
    with processes(tmp_path) as procs:
        procs.start_management()
        agent = procs.start_agent("snap-node", pools)
        vid = fill(agent, "fast", MiB)
        state = agent.freeze(vid, 5)
        assert state.volume_id == vid and not state.frozen and state.mountpoints == []
        assert not agent.thaw(vid).frozen


def test_an_agent_that_stops_leaves_no_filesystem_frozen(
    pools: dict[str, Path], tmp_path: Path
) -> None:
    with processes(tmp_path) as procs:
        procs.start_management()
        agent = procs.start_agent("snap-node", pools)
        vid = fill(agent, "fast", 0)
        device = agent.attach(vid).device
        filesystems.make_filesystem(device, "ext4", [])
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        mounts.mount(device, str(mnt), "ext4", [])
        try:
            state = agent.freeze(vid, 120)
            assert state.frozen and state.mountpoints == [str(mnt)]
            assert is_frozen(str(mnt))
            procs.procs["snap-node"].send_signal(signal.SIGTERM)
            procs.procs["snap-node"].wait(timeout=30)
            assert not is_frozen(str(mnt))
        finally:
            fs_freeze.thaw(str(mnt))
            mounts.unmount(str(mnt))
