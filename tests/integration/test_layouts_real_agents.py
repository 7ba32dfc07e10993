"""Multi-leg volumes driven through real node-agent processes (directory pools, no root).

Management and three agents run as their own processes on unix sockets, as in
the dev stack: a raid1 and a raid0 volume get a sparse file per leg in each
chosen node's pool with the leg's size, expanding grows every file, and
deleting removes them all, including the leg of a node whose agent was down
at the delete (removed once it heartbeats again). The composed data path
(nvme-tcp, md, dm) needs kernel modules this sandbox lacks and is tested in
the VM suite (tests/vm).
"""

from __future__ import annotations

import time
from pathlib import Path

from tessera import layouts
from tessera.models import VolumeCreate, VpgCreate
from tests.integration.processes import processes

MiB = 1024**2
NODES = ("n1", "n2", "n3")
# beats every 0.3 s; a node is unreachable after 3 missed ones
FAST = ("--heartbeat-interval", "0.3")
MGMT_FAST = ("--heartbeat-interval", "0.3", "--heartbeat-misses", "3")


def _leg_file(pools: dict[str, Path], node: str, volume_id: str) -> Path:
    return pools[node] / "volumes" / f"{volume_id}.img"


def _until(what: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not reached in {timeout} s"
        time.sleep(0.1)


def test_leg_files_are_made_grown_and_deleted_on_every_real_agent(tmp_path: Path) -> None:
    pools = {n: tmp_path / f"pool-{n}" for n in NODES}
    for path in pools.values():
        path.mkdir()
    with processes(tmp_path) as procs:
        mgmt = procs.start_management(
            *MGMT_FAST, "--vpg", "safe=raid1", "--vpg", "wide=raid0,legs=3"
        )
        procs.start_agents({n: {"p": pools[n]} for n in NODES}, *FAST)
        mirror = mgmt.create_volume(VolumeCreate(name="m", size_bytes=64 * MiB, vpg="safe"))
        stripe = mgmt.create_volume(VolumeCreate(name="s", size_bytes=96 * MiB, vpg="wide"))
        assert len({leg.node_id for leg in mirror.legs}) == 2
        assert sorted(leg.node_id for leg in stripe.legs) == list(NODES)
        for vol, leg_bytes in ((mirror, 64 * MiB + layouts.MD_DATA_OFFSET), (stripe, 32 * MiB)):
            for leg in vol.legs:
                assert leg.size_bytes == leg_bytes
                assert _leg_file(pools, leg.node_id, vol.id).stat().st_size == leg_bytes

        grown = mgmt.expand_volume(mirror.id, 128 * MiB)
        for leg in grown.legs:
            size = 128 * MiB + layouts.MD_DATA_OFFSET
            assert _leg_file(pools, leg.node_id, mirror.id).stat().st_size == size

        mgmt.delete_volume(stripe.id)
        assert not any(_leg_file(pools, n, stripe.id).exists() for n in NODES)

        down = mirror.legs[1].node_id
        procs.procs[down].terminate()
        procs.procs[down].wait(timeout=15)
        _until(lambda: mgmt.get_node(down).state == "unreachable")
        mgmt.delete_volume(mirror.id)  # answered now; the down node's leg waits for it
        assert not _leg_file(pools, mirror.legs[0].node_id, mirror.id).exists()
        assert _leg_file(pools, down, mirror.id).exists()
        procs.start_agent(down, {"p": pools[down]}, *FAST)
        _until(lambda: not _leg_file(pools, down, mirror.id).exists())
        _until(lambda: all(p.allocated_bytes == 0 for p in mgmt.list_pools().items))


def test_a_vpg_given_as_a_flag_keeps_its_legs_and_chunk(tmp_path: Path) -> None:
    with processes(tmp_path) as procs:
        mgmt = procs.start_management("--vpg", "wide=raid10,legs=6,chunk=128K")
        wide = next(v for v in mgmt.list_vpgs().items if v.name == "wide")
        assert (wide.layout, wide.legs, wide.chunk_bytes) == ("raid10", 6, 128 * 1024)
        again = mgmt.create_vpg(VpgCreate(name="wide", layout="raid10", legs=6, chunk_bytes=131072))
        assert again == wide
