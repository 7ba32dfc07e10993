"""Snapshots, clones, changed-block metadata and freezes on the node, on real filesystems.

Pools are loop-mounted images: XFS (reflink, the production filesystem)
and ext4 (no reflink: refused, or full copies with --copy-fallback).
Volume files are written directly (pwrite + fsync): what a loop device
does to them, without one per test.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node_agent import extents
from node_agent.agent import Agent
from node_agent.pools import Pool, Reserve
from tessera.errors import AlreadyExists, FailedPrecondition, NotFound, OutOfRange
from tessera.ids import new_snapshot_id, new_volume_id
from tessera.models import AgentSource, AgentSourceKind, SnapshotMethod
from tessera.system import fiemap, filesystems, mounts
from tessera.system import freeze as fs_freeze
from tessera.system.loopdev import bound_under
from tests.conftest import needs_root
from tests.integration.processes import mounted_pool
from tests.integration.test_node_agent_loop import release_loops

pytestmark = [needs_root, pytest.mark.root]
KiB, MiB = 1024, 1024**2
POOL_SIZE = 512 * MiB  # mkfs.xfs refuses less than 300 MB; an XFS volume needs 300 MiB
BLOCK = 4 * KiB


def make_agent(tmp: Path, pool_dir: Path, *, copy_fallback: bool = False) -> Agent:
    pool = Pool.open("p", pool_dir, reserve=Reserve(1, 4 * MiB), copy_fallback=copy_fallback)
    return Agent("snap-node", {"p": pool}, tmp / "dev", state_dir=tmp / "state")


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Agent]:
    with mounted_pool(tmp_path, "xfs", POOL_SIZE) as directory:
        try:
            yield make_agent(tmp_path, directory)
        finally:
            release_loops(directory)
    assert bound_under(tmp_path) == []


@pytest.fixture
def ext4_dir(tmp_path: Path) -> Iterator[Path]:
    with mounted_pool(tmp_path, "ext4", POOL_SIZE) as directory:
        yield directory


def write(path: str | Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def digest(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def volume_with_data(agent: Agent, size: int = 64 * MiB, written: int = 16 * MiB) -> str:
    vid = new_volume_id()
    path = agent.create_volume(vid, "p", size).path
    for off in range(0, written, 4 * MiB):
        write(path, off * 2, os.urandom(4 * MiB))  # every other 4 MiB: holes stay in between
    return vid


def used(agent: Agent) -> int:
    return agent.pools["p"].used_bytes()


def steady_used(agent: Agent) -> int:
    """The pool's use once XFS's background frees (inodegc) are done: two equal readings.

    An agent probes its pool for reflink when it opens it (a scratch file,
    written and unlinked): right after, up to a block of it may not be freed yet.
    """
    os.sync()
    before = used(agent)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = used(agent)
        if now == before:
            break
        before = now
    return before


def settle_used(agent: Agent, below: int) -> int:
    """XFS frees an unlinked file's blocks in the background (inodegc): wait for it."""
    deadline = time.monotonic() + 10
    while (now := used(agent)) >= below and time.monotonic() < deadline:
        time.sleep(0.05)
    return now


# ---- snapshots ---------------------------------------------------------------------


def test_a_snapshot_shares_every_block_with_its_volume_instead_of_copying_it(xfs: Agent) -> None:
    vid = volume_with_data(xfs)
    vol_path = xfs.get_volume(vid).path
    before = used(xfs)
    snap = xfs.create_snapshot(new_snapshot_id(), "p", vid)
    assert snap.method == SnapshotMethod.REFLINK and snap.source_volume_id == vid
    assert snap.size_bytes == 64 * MiB and snap.path.startswith(str(xfs.pools["p"].snapshots_dir))
    written = [e for e in fiemap.extents(snap.path)]
    assert written and all(e.shared for e in written)
    assert {(e.logical, e.physical) for e in written} == {
        (e.logical, e.physical) for e in fiemap.extents(vol_path)
    }
    assert used(xfs) - before < MiB  # 16 MiB of data, not copied
    assert xfs.pools["p"].snapshot_method() == SnapshotMethod.REFLINK


def test_a_snapshot_keeps_the_content_of_its_instant_while_the_volume_is_written(
    xfs: Agent,
) -> None:
    vid = volume_with_data(xfs)
    vol_path = xfs.get_volume(vid).path
    at_cut = digest(vol_path)
    snap = xfs.create_snapshot(new_snapshot_id(), "p", vid)
    assert digest(snap.path) == at_cut
    write(vol_path, 0, b"\xab" * MiB)
    write(vol_path, 40 * MiB, b"\xcd" * MiB)
    assert digest(snap.path) == at_cut != digest(vol_path)


def test_snapshot_create_is_idempotent_and_refuses_the_same_id_for_another_volume(
    xfs: Agent,
) -> None:
    vid, other = volume_with_data(xfs), volume_with_data(xfs, written=4 * MiB)
    sid = new_snapshot_id()
    first = xfs.create_snapshot(sid, "p", vid)
    write(xfs.get_volume(vid).path, 0, b"\x01" * MiB)
    again = xfs.create_snapshot(sid, "p", vid)
    assert again == first and digest(again.path) != digest(xfs.get_volume(vid).path)
    with pytest.raises(AlreadyExists) as err:
        xfs.create_snapshot(sid, "p", other)
    assert err.value.field == "source_volume_id"
    assert [s.id for s in xfs.list_snapshots()] == [sid]
    with pytest.raises(NotFound):
        xfs.create_snapshot(new_snapshot_id(), "p", new_volume_id())


def test_a_crash_while_cutting_leaves_no_snapshot_and_its_temporary_is_swept(
    xfs: Agent,
) -> None:
    pool = xfs.pools["p"]
    sid = new_snapshot_id()
    tmp = pool.snapshots_dir / f".tmp-{sid}-deadbeef"
    tmp.write_bytes(b"half")
    probe = pool.directory / ".reflink-probe-0badcafe.a"
    probe.write_bytes(b"probe")
    assert xfs.list_snapshots() == []
    xfs.recover()
    assert not tmp.exists() and not probe.exists()


# ---- clones ------------------------------------------------------------------------


def test_clones_of_a_snapshot_and_of_a_volume_hold_their_source_and_grow(xfs: Agent) -> None:
    vid = volume_with_data(xfs)
    vol_path = xfs.get_volume(vid).path
    snap = xfs.create_snapshot(new_snapshot_id(), "p", vid)
    at_cut = digest(snap.path)
    write(vol_path, 0, b"\x77" * MiB)  # the volume moves on; the snapshot does not
    from_snap = new_volume_id()
    source = AgentSource(kind=AgentSourceKind.SNAPSHOT, id=snap.id)
    clone = xfs.create_volume(from_snap, "p", 96 * MiB, source=source)
    assert clone.size_bytes == 96 * MiB
    with open(clone.path, "rb") as f:
        assert hashlib.sha256(f.read(64 * MiB)).hexdigest() == at_cut
        assert f.read() == bytes(32 * MiB)  # the grown tail reads as zeroes
    assert xfs.create_volume(from_snap, "p", 96 * MiB, source=source) == clone  # idempotent
    from_vol = xfs.create_volume(
        new_volume_id(), "p", 64 * MiB, source=AgentSource(kind=AgentSourceKind.VOLUME, id=vid)
    )
    assert digest(from_vol.path) == digest(vol_path)
    write(from_vol.path, 0, b"\x99" * MiB)  # a clone's writes stay its own
    assert digest(snap.path) == at_cut and digest(from_vol.path) != digest(vol_path)


def test_a_clone_smaller_than_its_source_is_refused_and_leaves_nothing(xfs: Agent) -> None:
    snap = xfs.create_snapshot(new_snapshot_id(), "p", volume_with_data(xfs))
    cid = new_volume_id()
    source = AgentSource(kind=AgentSourceKind.SNAPSHOT, id=snap.id)
    with pytest.raises(OutOfRange) as err:
        xfs.create_volume(cid, "p", 32 * MiB, source=source)
    assert err.value.field == "size_bytes"
    with pytest.raises(NotFound):
        xfs.get_volume(cid)
    assert [p.name for p in xfs.pools["p"].volumes_dir.iterdir() if p.name.startswith(".")] == []
    missing = AgentSource(kind=AgentSourceKind.SNAPSHOT, id=new_snapshot_id())
    with pytest.raises(NotFound):
        xfs.create_volume(cid, "p", 64 * MiB, source=missing)


@pytest.mark.parametrize("order", ["volume-first", "snapshot-first", "clone-first"])
def test_space_returns_only_when_nothing_shares_it_whatever_the_delete_order(
    xfs: Agent, order: str
) -> None:
    empty = steady_used(xfs)
    vid = volume_with_data(xfs, written=32 * MiB)
    snap = xfs.create_snapshot(new_snapshot_id(), "p", vid)
    clone = xfs.create_volume(
        new_volume_id(),
        "p",
        64 * MiB,
        source=AgentSource(kind=AgentSourceKind.SNAPSHOT, id=snap.id),
    )
    full = used(xfs)
    assert full - empty >= 32 * MiB
    deletes = {
        "volume": lambda: xfs.delete_volume(vid),
        "snapshot": lambda: xfs.delete_snapshot(snap.id),
        "clone": lambda: xfs.delete_volume(clone.id),
    }
    first = order.split("-")[0]
    steps = [first, *(k for k in deletes if k != first)]
    for step in steps[:-1]:
        deletes[step]()
        time.sleep(0.2)  # let inodegc run: nothing it could free may come back
        assert used(xfs) > full - 2 * MiB, f"shared blocks freed after deleting the {step}"
    deletes[steps[-1]]()
    assert settle_used(xfs, empty + 2 * MiB) < empty + 2 * MiB
    xfs.delete_snapshot(snap.id)  # absent is fine
    assert xfs.list_snapshots() == []


def test_pool_capacity_counts_blocks_shared_by_snapshots_and_clones_once(xfs: Agent) -> None:
    pool = xfs.pools["p"]
    vid = volume_with_data(xfs, written=32 * MiB)
    before = pool.capacity_bytes()
    snap = xfs.create_snapshot(new_snapshot_id(), "p", vid)
    xfs.create_volume(
        new_volume_id(), "p", 64 * MiB, source=AgentSource(kind=AgentSourceKind.VOLUME, id=vid)
    )
    # counted per file, 64 MiB more would be promised that the filesystem does not have
    assert before - MiB <= pool.capacity_bytes() <= before
    write(xfs.get_volume(vid).path, 0, os.urandom(8 * MiB))  # copy-on-write: new blocks
    assert before - MiB <= pool.capacity_bytes() <= before
    assert snap.allocated_bytes >= 32 * MiB


# ---- fallback ----------------------------------------------------------------------


def test_a_pool_that_cannot_reflink_refuses_snapshots_and_clones_naming_the_fix(
    tmp_path: Path, ext4_dir: Path
) -> None:
    agent = make_agent(tmp_path, ext4_dir)
    assert agent.pools["p"].snapshot_method() == SnapshotMethod.NONE
    vid = volume_with_data(agent, written=4 * MiB)
    with pytest.raises(FailedPrecondition) as err:
        agent.create_snapshot(new_snapshot_id(), "p", vid)
    assert "pool p" in str(err.value) and "--copy-fallback" in str(err.value)
    assert "reflink" in str(err.value)
    with pytest.raises(FailedPrecondition):
        agent.create_volume(
            new_volume_id(), "p", 64 * MiB, source=AgentSource(kind=AgentSourceKind.VOLUME, id=vid)
        )
    assert agent.list_snapshots() == []
    assert [p.name for p in agent.pools["p"].snapshots_dir.iterdir()] == []


def test_copy_fallback_makes_full_sparse_copies_on_ext4(tmp_path: Path, ext4_dir: Path) -> None:
    agent = make_agent(tmp_path, ext4_dir, copy_fallback=True)
    assert agent.pools["p"].snapshot_method() == SnapshotMethod.COPY
    vid = volume_with_data(agent, written=8 * MiB)
    vol_path = agent.get_volume(vid).path
    snap = agent.create_snapshot(new_snapshot_id(), "p", vid)
    assert snap.method == SnapshotMethod.COPY and digest(snap.path) == digest(vol_path)
    assert 8 * MiB <= snap.allocated_bytes < 9 * MiB  # holes stayed holes
    clone = agent.create_volume(
        new_volume_id(),
        "p",
        80 * MiB,
        source=AgentSource(kind=AgentSourceKind.SNAPSHOT, id=snap.id),
    )
    with open(clone.path, "rb") as f:
        assert hashlib.sha256(f.read(64 * MiB)).hexdigest() == digest(snap.path)
    write(vol_path, 0, b"\x05" * MiB)
    assert digest(snap.path) != digest(vol_path)
    page = agent.snapshot_extents(snap.id)
    assert sum(e.length for e in page.extents) == 8 * MiB


# ---- changed-block metadata ----------------------------------------------------------

FILE_BLOCKS = 48
Write = tuple[int, int, int]  # first block, blocks, fill byte (0: punch a hole)
writes = st.lists(
    st.tuples(st.integers(0, FILE_BLOCKS - 1), st.integers(1, 6), st.sampled_from([0, 1, 2, 0xAA])),
    max_size=12,
)


def apply(path: str, batch: list[Write]) -> set[int]:
    """Write (or punch) the batch; the blocks it touched."""
    touched: set[int] = set()
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for first, count, fill in batch:
            count = min(count, FILE_BLOCKS - first)
            if fill:
                os.pwrite(fd, bytes([fill]) * (count * BLOCK), first * BLOCK)
            else:
                punch(fd, first * BLOCK, count * BLOCK)
            touched.update(range(first, first + count))
        os.fsync(fd)
    finally:
        os.close(fd)
    return touched


def punch(fd: int, offset: int, length: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    mode = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE
    if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        raise OSError(ctypes.get_errno(), "fallocate")


def blocks_of(page_extents: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for offset, length in page_extents:
        assert offset % BLOCK == 0 and length % BLOCK == 0
        out.update(range(offset // BLOCK, (offset + length) // BLOCK))
    return out


def read_blocks(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    return [data[i : i + BLOCK] for i in range(0, len(data), BLOCK)]


def paged(agent: Agent, sid: str, base: str = "") -> list[tuple[int, int]]:
    """Every extent, fetched 3 at a time through next_offset."""
    found, offset = [], 0
    while True:
        page = agent.snapshot_extents(sid, base, offset, 3)
        assert len(page.extents) <= 3
        found += [(e.offset, e.length) for e in page.extents]
        if page.next_offset is None:
            return found
        assert page.next_offset > offset
        offset = page.next_offset


@pytest.fixture(scope="module")
def xfs_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agent]:
    tmp = tmp_path_factory.mktemp("extents")
    with mounted_pool(tmp, "xfs", POOL_SIZE) as directory:
        yield make_agent(tmp, directory)
    assert bound_under(tmp) == []


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(before=writes, between=writes, window=st.sampled_from([BLOCK, 3 * BLOCK, 256 * MiB]))
def test_changed_block_metadata_covers_every_changed_block_and_only_written_ones(
    xfs_module: Agent, before: list[Write], between: list[Write], window: int
) -> None:
    agent = xfs_module
    default_window, extents.FIRST_WINDOW = extents.FIRST_WINDOW, window  # pages cross windows
    vid = new_volume_id()
    path = agent.create_volume(vid, "p", FILE_BLOCKS * BLOCK).path
    try:
        written = apply(path, before)
        a = agent.create_snapshot(new_snapshot_id(), "p", vid)
        rewritten = apply(path, between)
        b = agent.create_snapshot(new_snapshot_id(), "p", vid)
        old, new = read_blocks(a.path), read_blocks(b.path)

        allocated = blocks_of(paged(agent, a.id))
        nonzero = {i for i, blk in enumerate(old) if blk != bytes(BLOCK)}
        assert nonzero <= allocated <= written

        delta = blocks_of(paged(agent, b.id, a.id))
        differ = {i for i in range(FILE_BLOCKS) if old[i] != new[i]}
        assert differ <= delta <= rewritten
        assert agent.snapshot_extents(b.id, a.id).size_bytes == FILE_BLOCKS * BLOCK
    finally:
        extents.FIRST_WINDOW = default_window
        for snap in agent.list_snapshots():
            agent.delete_snapshot(snap.id)
        agent.delete_volume(vid)


def test_delta_between_snapshots_of_different_volumes_is_refused(xfs: Agent) -> None:
    a = xfs.create_snapshot(new_snapshot_id(), "p", volume_with_data(xfs, written=4 * MiB))
    b = xfs.create_snapshot(new_snapshot_id(), "p", volume_with_data(xfs, written=4 * MiB))
    with pytest.raises(FailedPrecondition) as err:
        xfs.snapshot_extents(b.id, a.id)
    assert a.id in str(err.value) and b.id in str(err.value)
    with pytest.raises(NotFound):
        xfs.snapshot_extents(new_snapshot_id())


# ---- freezes -----------------------------------------------------------------------


def is_frozen(mountpoint: str) -> bool:
    """FIFREEZE answers EBUSY on a frozen filesystem (and freezes a thawed one: undo that)."""
    if fs_freeze.freeze(mountpoint):
        fs_freeze.thaw(mountpoint)
        return False
    return True


@pytest.fixture(params=["ext4", "xfs"])
def mounted_volume(
    xfs: Agent, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[Agent, str, str]]:
    """A volume attached (loop) with ext4 or XFS on it, mounted; torn down whatever happens."""
    fs_type = request.param
    vid = new_volume_id()
    xfs.create_volume(vid, "p", 300 * MiB if fs_type == "xfs" else 64 * MiB)
    att = xfs.attach(vid, readonly=False)
    filesystems.make_filesystem(att.device, fs_type, [])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounts.mount(att.device, str(mnt), fs_type, [])
    try:
        yield xfs, vid, str(mnt)
    finally:
        xfs.freezes.thaw_all()
        mounts.unmount(str(mnt))
        xfs.detach(vid)
        xfs.delete_volume(vid)


def test_freeze_blocks_writes_until_thaw(mounted_volume: tuple[Agent, str, str]) -> None:
    agent, vid, mnt = mounted_volume
    state = agent.freeze(vid, 30)
    assert state.frozen and state.mountpoints == [mnt]
    assert is_frozen(mnt)
    assert agent.freeze(vid, 30).mountpoints == [mnt]  # again: a new lease, still frozen
    done = threading.Event()

    def writer() -> None:
        with open(os.path.join(mnt, "f"), "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        done.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    assert not done.wait(0.5), "a write went through a frozen filesystem"
    thawed = agent.thaw(vid)
    assert not thawed.frozen and thawed.mountpoints == [mnt]
    assert done.wait(10)
    assert not is_frozen(mnt)
    assert not agent.thaw(vid).frozen  # thaw again is fine


def test_the_agent_thaws_by_itself_when_the_lease_runs_out(
    mounted_volume: tuple[Agent, str, str],
) -> None:
    agent, vid, mnt = mounted_volume
    agent.freeze(vid, 30)  # FIFREEZE may take half a lease: a fresh XFS needs more than 0.25 s
    agent.freeze(vid, 0.5, renew=True)  # then a short lease
    assert is_frozen(mnt)
    deadline = time.monotonic() + 10
    while agent.freezes.is_frozen(vid):
        assert time.monotonic() < deadline, "the lease never ran out"
        time.sleep(0.05)
    assert not is_frozen(mnt)


def test_a_restarted_agent_thaws_what_a_crashed_one_left_frozen(
    mounted_volume: tuple[Agent, str, str], tmp_path: Path
) -> None:
    agent, vid, mnt = mounted_volume
    agent.freeze(vid, 60)
    crashed = agent.freezes._volumes.pop(vid)  # the crash: its timer and fds die with it
    assert crashed.timer is not None
    crashed.timer.cancel()
    for fd, _ in crashed.fds.values():
        os.close(fd)  # closing the fd does not thaw: the filesystem stays frozen
    assert is_frozen(mnt)
    restarted = make_agent(tmp_path, agent.pools["p"].directory)
    restarted.recover()
    assert not is_frozen(mnt)


def test_an_unmounted_or_block_volume_freezes_nothing(xfs: Agent) -> None:
    vid = new_volume_id()
    xfs.create_volume(vid, "p", 64 * MiB)
    assert xfs.freeze(vid, 5).model_dump() == {"volume_id": vid, "frozen": False, "mountpoints": []}
    xfs.attach(vid, readonly=False)
    try:
        assert not xfs.freeze(vid, 5).frozen
    finally:
        xfs.detach(vid)
