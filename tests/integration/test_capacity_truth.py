"""Capacity is a promise the pool keeps: every byte management placed can be written.

A small real pool (a loop-mounted image, xfs and ext4) behind real
management and agent processes is filled with volumes up to the last byte
`/v1/capacity` offered; every byte of every volume is then written through
its loop device with O_DIRECT and fsync (so ENOSPC cannot hide in a page
cache), and one more byte is refused by placement.
"""

from __future__ import annotations

import mmap
import os
import random
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.pools import Pool, Reserve
from node_agent.registration import Registrar
from tessera.clients import ManagementClient
from tessera.errors import ResourceExhausted
from tessera.ids import new_volume_id
from tessera.models import VolumeCreate
from tessera.system.loopdev import bound_under
from tessera.system.mounts import mounts_at
from tests.conftest import needs_root
from tests.integration.processes import TOKEN, mounted_pool, processes
from tests.integration.test_node_agent_loop import release_loops

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2
POOL_SIZE = 384 * MiB  # mkfs.xfs refuses less than 300 MB
CHUNK = 4 * MiB
VOLUMES = 4
#: the reserve these tests run with: 1% of the filesystem, at least 4 MiB
RESERVE = ["--capacity-reserve", "1", "--capacity-reserve-min", "4MiB"]


class Writer:
    """O_DIRECT writes of a non-zero pattern from one page-aligned buffer."""

    def __init__(self) -> None:
        self.buf = mmap.mmap(-1, CHUNK)  # page aligned, as O_DIRECT needs

    def close(self) -> None:
        self.buf.close()

    def write(self, fd: int, offset: int, length: int, fill: int) -> None:
        self.buf[:length] = bytes([fill]) * length
        with memoryview(self.buf) as view:
            written = os.pwrite(fd, view[:length], offset)
        assert written == length


def write_every_byte(devices: dict[str, int], seed: int) -> None:
    """Write every byte of every device (path -> size), chunks interleaved in random order.

    Interleaving fragments the volume files as pods writing at once would,
    so the filesystem allocates the extent metadata a real pool needs.
    O_DIRECT plus a final fsync: an ENOSPC raises here, not later.
    """
    fds = {dev: os.open(dev, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC) for dev in devices}
    writer = Writer()
    try:
        chunks = [(dev, off) for dev, size in devices.items() for off in range(0, size, CHUNK)]
        random.Random(seed).shuffle(chunks)
        for dev, off in chunks:
            writer.write(fds[dev], off, min(CHUNK, devices[dev] - off), fill_of(dev))
        for fd in fds.values():
            os.fsync(fd)
    finally:
        writer.close()
        for fd in fds.values():
            os.close(fd)


def fill_of(device: str) -> int:
    return sum(device.encode()) % 251 + 1


def kernel_log() -> set[str]:
    return set(
        subprocess.run(["dmesg"], capture_output=True, text=True, check=True).stdout.split("\n")
    )


def complaints(since: set[str], devices: list[str]) -> list[str]:
    """New kernel log lines about these devices that report an error or a lack of space
    (a full XFS says "critical space allocation error"; a loop device, "I/O error")."""
    names = re.compile(r"\b(" + "|".join(Path(d).name for d in devices) + r")\b")
    trouble = re.compile(r"error|space|ENOSPC", re.IGNORECASE)
    return sorted(ln for ln in kernel_log() - since if names.search(ln) and trouble.search(ln))


def last_byte(device: str, size: int) -> bytes:
    with open(device, "rb") as f:
        f.seek(size - 1)
        return f.read(1)


def split(total: int, parts: int) -> list[int]:
    """`parts` sizes in whole MiB that add up to `total` (itself whole MiB)."""
    base = total // parts // MiB * MiB
    return [base] * (parts - 1) + [total - base * (parts - 1)]


@pytest.fixture(params=["xfs", "ext4"])
def pool_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    with mounted_pool(tmp_path, request.param, POOL_SIZE) as directory:
        try:
            yield directory
        finally:
            release_loops(directory)
    assert bound_under(directory) == []


def fill(mgmt: ManagementClient, prefix: str) -> list[tuple[str, int]]:
    promised = mgmt.capacity().available_bytes
    assert promised > POOL_SIZE // 2, "the pool offers implausibly little"
    created = []
    for i, size in enumerate(split(promised, VOLUMES)):
        vol = mgmt.create_volume(VolumeCreate(name=f"{prefix}-{i}", size_bytes=size))
        assert vol.size_bytes == size
        created.append((vol.id, size))
    assert sum(size for _, size in created) == promised
    return created


def test_every_byte_of_a_full_pool_can_be_written_and_one_more_is_refused(
    pool_dir: Path, tmp_path: Path
) -> None:
    with processes(tmp_path) as procs:
        mgmt = procs.start_management()
        agent = procs.start_agent("cap-node", {"small": pool_dir}, *RESERVE)
        volumes = fill(mgmt, "fill")

        assert mgmt.capacity().available_bytes == 0
        with pytest.raises(ResourceExhausted):
            mgmt.create_volume(VolumeCreate(name="one-more", size_bytes=1))

        attached = [(agent.attach(vid), size) for vid, size in volumes]
        devices = {a.device: size for a, size in attached}
        before = kernel_log()
        write_every_byte(devices, seed=1)
        watched = [mounts_at(str(pool_dir))[-1].source, *(a.backing_device for a, _ in attached)]
        assert complaints(before, watched) == []
        for device, size in devices.items():
            assert last_byte(device, size) == bytes([fill_of(device)])
        for vid, _ in volumes:
            agent.detach(vid)


def test_the_pool_offers_the_same_space_after_its_volumes_are_written(
    pool_dir: Path, tmp_path: Path
) -> None:
    # Writing a volume moves blocks from f_bavail into the volume file:
    # capacity must not count them as gone (or placement would shrink) nor
    # as free twice (or it would overcommit once a volume is deleted).
    pool = Pool.open("small", pool_dir, reserve=Reserve(1, 4 * MiB))
    before = pool.capacity_bytes()
    with processes(tmp_path) as procs:
        procs.start_management()
        agent = procs.start_agent("cap-node", {"small": pool_dir}, *RESERVE)
        vid = new_volume_id()
        agent.create_volume(vid, "small", 128 * MiB)
        # a sparse file takes no data blocks (an inode chunk may cross a MiB boundary)
        assert before - MiB <= pool.capacity_bytes() <= before
        write_every_byte({agent.attach(vid).device: 128 * MiB}, seed=2)
        agent.detach(vid)
        after = pool.capacity_bytes()
        # metadata the writes allocated may cost a little; never more than the reserve
        assert before - pool.reserve.bytes_for(POOL_SIZE) <= after <= before
        agent.delete_volume(vid)
        # XFS frees an unlinked file's blocks in the background (inodegc):
        # until then the pool reports less, never more
        deadline = time.monotonic() + 10
        while pool.capacity_bytes() < after:
            assert time.monotonic() < deadline, "a deleted volume's space never came back"
            time.sleep(0.05)


def test_overcommit_ratio_promises_exactly_that_multiple(pool_dir: Path, tmp_path: Path) -> None:
    exact = Pool.open("small", pool_dir, reserve=Reserve(1, 4 * MiB)).capacity_bytes()
    with processes(tmp_path) as procs:
        mgmt = procs.start_management()
        procs.start_agent("cap-node", {"small": pool_dir}, *RESERVE, "--overcommit", "small=2")
        offered = mgmt.capacity().available_bytes
    # both are rounded down to whole MiB, the doubled one after doubling
    assert exact * 2 <= offered < (exact + MiB) * 2


def test_space_taken_by_other_files_is_reported_at_the_next_heartbeat(
    pool_dir: Path, tmp_path: Path
) -> None:
    pool = Pool.open("small", pool_dir, reserve=Reserve(1, 4 * MiB))
    with processes(tmp_path) as procs:
        mgmt = procs.start_management()
        client = ManagementClient(procs.management_url, TOKEN)
        registrar = Registrar(
            client, "hb-node", "unix:///nowhere.sock", lambda: {"small": pool.capacity_bytes()},
            heartbeat_seconds=0.05,
        )  # fmt: skip
        registrar.start()
        try:
            assert registrar.registered.wait(10)
            before = mgmt.capacity().available_bytes
            hog = pool_dir / "not-a-volume"
            with open(hog, "wb") as f:  # an operator's file, really written
                f.write(b"x" * 64 * MiB)
                os.fsync(f.fileno())
            deadline = time.monotonic() + 10
            while mgmt.capacity().available_bytes > before - 64 * MiB:
                assert time.monotonic() < deadline, "the smaller capacity never reached management"
                time.sleep(0.05)
        finally:
            registrar.stop()
            client.close()
