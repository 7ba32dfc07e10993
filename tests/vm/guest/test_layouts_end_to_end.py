"""Striped and mirrored volumes through the whole stack, on the VM's real kernel.

Three nodes are network namespaces (tessera_dev.multinode, as in
tests/multihost), each with its file pool, agent and CSI node plugin;
management runs with two multi-leg vpgs. Everything is driven the way
Kubernetes and an admin drive it: CSI RPCs to the controller and node
plugins, the management REST API and the `tessera` CLI. Legs on other nodes
travel over nvme-tcp (nvmet in configfs, DH-HMAC-CHAP) or, with the
StorageClass parameter `transport: nbd`, over NBD into the kernel nbd client
(a local TLS-PSK bridge); the consumer composes them with dm `striped`
(raid0) or md (raid1).

The module's teardown asserts nothing is left: no namespaces, mounts, loop
devices, processes, nvme controllers, nvmet subsystems, md arrays or dm
devices, connected nbd devices.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from csi_driver._gen import csi_pb2
from tessera.models import LegState, Volume
from tessera_dev import multinode
from tessera_dev.multinode import MultiNodeStack
from tests.multihost.support import (
    BLOCK,
    RPC_TIMEOUT,
    Cluster,
    Kube,
    MiB,
    block_cap,
    logged,
    running_cluster,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the whole data path")

STRIPE = "stripe3"
MIRROR = "mirror2"
VPGS = [f"{STRIPE}=raid0,legs=3", f"{MIRROR}=raid1,legs=2"]
POOL_SIZE = 1024 * MiB
SIZE = 64 * MiB
#: the writer cycles over the first 8 MiB
BLOCKS = 8 * MiB // BLOCK
#: generous: TCG is ~10x slower than the hardware these deadlines were made for
SLOW = 240.0
#: five Python processes starting at once on two emulated CPUs
STACK_READY_TIMEOUT = 600.0
#: heartbeats (1 s apart) a node may miss before management calls it unreachable: the
#: multihost default of 3 is too few for agents on two emulated CPUs, which then
#: drop out of a test that never cut them off
HEARTBEAT_MISSES = "15"
#: `tessera volume repair --wait`: a new leg placed, exported, added and resynced
REPAIR_TIMEOUT = 600.0
NVMET_SUBSYSTEMS = Path("/sys/kernel/config/nvmet/subsystems")


class LayoutKube(Kube):
    """Kube whose volumes come from a named vpg (a StorageClass's `vpg` parameter)."""

    def create_in(self, vpg: str, size: int = SIZE, transport: str = "") -> str:
        """A volume of `vpg`; `transport` forces how remote legs come (nbd, nvme-tcp)."""
        parameters = {"vpg": vpg} | ({"transport": transport} if transport else {})
        reply = self.c.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=f"vm-{secrets.token_hex(6)}",
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capabilities=[block_cap()],
                parameters=parameters,
            ),
            timeout=RPC_TIMEOUT,
        )
        vid = reply.volume.volume_id
        self._undo[("volume", vid)] = lambda: self.c.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=RPC_TIMEOUT
        )
        return vid


def kernel_leftovers() -> dict[str, list[str]]:
    """The kernel's data-path objects of this stack: none may outlive the module."""
    ctrls = Path("/sys/class/nvme")
    dm = subprocess.run(["dmsetup", "ls"], capture_output=True, text=True, check=False).stdout
    md = Path("/proc/mdstat").read_text() if Path("/proc/mdstat").exists() else ""
    return {
        "nvme controllers": sorted(p.name for p in ctrls.iterdir()) if ctrls.is_dir() else [],
        "nvmet subsystems": (
            sorted(p.name for p in NVMET_SUBSYSTEMS.iterdir()) if NVMET_SUBSYSTEMS.is_dir() else []
        ),
        "md arrays": [ln.split()[0] for ln in md.splitlines() if ln.startswith("md")],
        "dm devices": [ln.split()[0] for ln in dm.splitlines() if ln.startswith("tessera")],
        "connected nbd devices": connected_nbd(),
    }


def connected_nbd() -> list[str]:
    """/dev/nbdN the kernel has a client for (its pid in sysfs)."""
    return sorted(p.parent.name for p in Path("/sys/block").glob("nbd*/pid"))


def keep_logs(state: Path) -> None:
    """The stack's logs into the results share, where the host can read them."""
    results = os.environ.get("TESSERA_VM_RESULTS")
    if results and (state / "logs").is_dir():
        shutil.copytree(
            state / "logs", Path(results) / f"stack-logs-{state.name}", dirs_exist_ok=True
        )


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    before = kernel_leftovers()
    ready_timeout, multinode.READY_TIMEOUT = multinode.READY_TIMEOUT, STACK_READY_TIMEOUT
    state = Path(tempfile.mkdtemp(prefix="tvm-"))
    work = Path(tempfile.mkdtemp(prefix="tvm-k-"))
    mgmt_args = [arg for vpg in VPGS for arg in ("--vpg", vpg)]
    mgmt_args += ["--heartbeat-misses", HEARTBEAT_MISSES]  # the last of a repeated flag wins
    extra = {"management": mgmt_args}
    stack = MultiNodeStack(state, nodes=3, pool_size=POOL_SIZE, extra_args=extra)

    def after_close() -> None:
        multinode.READY_TIMEOUT = ready_timeout
        keep_logs(state)

    with running_cluster(stack, state, work, after_close) as cluster:
        yield cluster
    assert kernel_leftovers() == before, "the kernel still holds the tests' devices"


@pytest.fixture
def kube(cluster: Cluster) -> Iterator[LayoutKube]:
    k = LayoutKube(cluster)
    try:
        yield k
    finally:
        k.cleanup()


def legs_of(cluster: Cluster, vid: str) -> Volume:
    return cluster.mgmt.get_volume(vid)


def tessera_cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """`cluster.tessera` with the patience a resync on emulated CPUs needs."""
    return subprocess.run(
        [sys.executable, "-m", "tessera.cli", *args, "--management",
         cluster.info.management_url, "--token-file", str(cluster.info.token_file)],
        capture_output=True, text=True, timeout=REPAIR_TIMEOUT, check=False,
    )  # fmt: skip


def fsynced(log: Path) -> int:
    return sum(1 for line in logged(log) if line.isdigit())


def errors_in(log: Path) -> list[str]:
    return [line for line in logged(log) if not line.isdigit()]


# ---- the kernel ----------------------------------------------------------------------

MODULES = ["nvme_tcp", "nvmet_tcp", "nvme_auth", "nvmet", "raid0", "raid1", "raid10", "dm_mod",
           "nbd"]  # fmt: skip


@pytest.mark.parametrize("module", MODULES)
def test_the_vm_kernel_loads_the_data_path_module(module: str) -> None:
    res = subprocess.run(["modprobe", module], capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"modprobe {module}: {res.stderr}"
    assert Path("/sys/module", module).is_dir(), f"{module} loaded but not in /sys/module"


TOOLS = [["nvme", "version"], ["mdadm", "--version"], ["dmsetup", "version"]]


@pytest.mark.parametrize("argv", TOOLS, ids=lambda a: a[0])
def test_the_vm_has_the_data_path_tools(argv: list[str]) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"{argv}: {res.stdout}{res.stderr}"


def test_mdadm_builds_a_mirror_the_kernel_runs(tmp_path: Path) -> None:
    """md itself (independent of Tessera): if this fails, the image is broken, not our code."""
    legs = []
    for i in range(2):
        img = tmp_path / f"leg{i}.img"
        with open(img, "wb") as f:
            f.truncate(32 * MiB)
        out = subprocess.run(["losetup", "--find", "--show", str(img)],
                             capture_output=True, text=True, check=True)  # fmt: skip
        legs.append(out.stdout.strip())
    md = "/dev/md/vmcheck"
    try:
        subprocess.run(["mdadm", "--create", md, "--run", "--level=1", "--raid-devices=2",
                        "--metadata=1.2", "--assume-clean", *legs],
                       capture_output=True, text=True, check=True)  # fmt: skip
        wait_until(lambda: os.path.exists(md), "udev's /dev/md link", timeout=30)
        assert "raid1" in Path("/proc/mdstat").read_text()
    finally:
        subprocess.run(["mdadm", "--stop", md], capture_output=True, check=False)
        for leg in legs:
            subprocess.run(["losetup", "-d", leg], check=False)


# ---- volumes through the stack -------------------------------------------------------


@pytest.mark.parametrize(
    ("vpg", "legs", "transport"),
    [(STRIPE, 3, ""), (MIRROR, 2, ""), (STRIPE, 3, "nbd"), (MIRROR, 2, "nbd")],
    ids=["raid0", "raid1", "raid0-nbd-legs", "raid1-nbd-legs"],
)
def test_a_multi_leg_volume_keeps_its_data_across_restage_and_reattach_on_another_node(
    cluster: Cluster, kube: LayoutKube, vpg: str, legs: int, transport: str
) -> None:
    vid = kube.create_in(vpg, transport=transport)
    volume = legs_of(cluster, vid)
    nodes = [leg.node_id for leg in volume.legs]
    assert len(set(nodes)) == legs, f"{vpg}: legs not on {legs} distinct nodes: {nodes}"
    nbd_before = connected_nbd()
    pub = kube.publish(vid, "n1", block_cap())
    remote = len([n for n in nodes if n != "n1"])
    if transport == "nbd":  # every remote leg is a kernel nbd device, none is nvme
        assert len(connected_nbd()) == len(nbd_before) + remote, connected_nbd()
    # the layout rounds up to whole stripes: what management says, never less than asked
    assert int(cluster.io("n1", "size", pub.target)) == volume.size_bytes >= SIZE
    head = cluster.io("n1", "write", pub.target, 0, 4 * MiB, 1)
    tail = cluster.io("n1", "write", pub.target, SIZE - 4 * MiB, 4 * MiB, 2)
    # unstage and stage again on the same node: the composed device is rebuilt from its legs
    kube.unpublish(pub)
    pub = kube.publish(vid, "n1", block_cap())
    assert cluster.io("n1", "read", pub.target, 0, 4 * MiB) == head
    assert cluster.io("n1", "read", pub.target, SIZE - 4 * MiB, 4 * MiB) == tail
    # detach, re-attach on another node: the same bytes, every leg remote or local by turns
    kube.unpublish(pub)
    pub = kube.publish(vid, "n2", block_cap())
    assert cluster.io("n2", "read", pub.target, 0, 4 * MiB, timeout=SLOW) == head
    assert cluster.io("n2", "read", pub.target, SIZE - 4 * MiB, 4 * MiB, timeout=SLOW) == tail
    kube.unpublish(pub)


def test_a_striped_volume_grows_and_keeps_its_data(cluster: Cluster, kube: LayoutKube) -> None:
    vid = kube.create_in(STRIPE)
    pub = kube.publish(vid, "n1", block_cap())
    head = cluster.io("n1", "write", pub.target, 0, 4 * MiB, 3)
    small = {leg.index: leg.size_bytes for leg in legs_of(cluster, vid).legs}
    grown = 2 * SIZE
    cluster.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=vid, capacity_range=csi_pb2.CapacityRange(required_bytes=grown),
            volume_capability=block_cap(),
        ),
        timeout=RPC_TIMEOUT,
    )  # fmt: skip
    cluster.node_csi["n1"].NodeExpandVolume(
        csi_pb2.NodeExpandVolumeRequest(
            volume_id=vid, volume_path=str(pub.target), staging_target_path=str(pub.staging),
            capacity_range=csi_pb2.CapacityRange(required_bytes=grown),
            volume_capability=block_cap(),
        ),
        timeout=RPC_TIMEOUT,
    )  # fmt: skip
    assert int(cluster.io("n1", "size", pub.target)) == legs_of(cluster, vid).size_bytes >= grown
    assert cluster.io("n1", "read", pub.target, 0, 4 * MiB) == head
    end = cluster.io("n1", "write", pub.target, grown - 4 * MiB, 4 * MiB, 4)
    assert cluster.io("n1", "read", pub.target, grown - 4 * MiB, 4 * MiB) == end
    big = {leg.index: leg.size_bytes for leg in legs_of(cluster, vid).legs}
    assert all(big[i] > small[i] for i in small), f"every leg grows: {small} -> {big}"
    kube.unpublish(pub)


@pytest.mark.parametrize("transport", ["", "nbd"], ids=["nvme-tcp-legs", "nbd-legs"])
def test_a_mirror_keeps_writing_when_a_leg_node_dies_and_repair_restores_it(
    cluster: Cluster, kube: LayoutKube, tmp_path: Path, transport: str
) -> None:
    vid = kube.create_in(MIRROR, transport=transport)
    legs = legs_of(cluster, vid).legs
    leg_nodes = {leg.node_id for leg in legs}
    consumer = next(n for n in cluster.info.node_ids if n not in leg_nodes)
    victim = legs[1].node_id
    pub = kube.publish(vid, consumer, block_cap())
    log = tmp_path / "writes.log"
    writer = cluster.start_writer(consumer, str(pub.target), log, BLOCKS)
    restored = False
    try:
        wait_until(lambda: fsynced(log) >= 20, "the writer's first fsync'd writes", SLOW)
        cluster.stack.cut_off(victim)
        before = fsynced(log)
        wait_until(lambda: fsynced(log) >= before + 50 or writer.poll() is not None,
                   f"writes to go on with leg node {victim} dead", SLOW)  # fmt: skip
        assert writer.poll() is None and not errors_in(log), f"the writer failed: {errors_in(log)}"
        wait_until(lambda: "degraded" in (legs_of(cluster, vid).condition or ""),
                   "the volume to report itself degraded", SLOW)  # fmt: skip

        repair = tessera_cli(cluster, "volume", "repair", vid, "--wait")
        assert repair.returncode == 0, repair.stdout + repair.stderr
        after = legs_of(cluster, vid)
        assert victim not in {leg.node_id for leg in after.legs if leg.state != LegState.STALE}
        assert all(leg.state == LegState.IN_SYNC for leg in after.legs if leg.node_id != victim)
        assert not after.condition, f"still not clean after repair: {after.condition}"
        stop_process(writer)
        assert cluster.io(consumer, "verify", pub.target, log, BLOCKS, timeout=SLOW) == "ok"

        # the dead node comes back: its stale leg is deleted there, never re-added
        cluster.stack.restore(victim)
        restored = True
        stale_file = Path(cluster.node(victim).pool_dir) / "volumes" / f"{vid}.img"
        wait_until(lambda: not stale_file.exists(), f"{victim} to delete its stale leg", SLOW)
        assert victim not in {leg.node_id for leg in legs_of(cluster, vid).legs}
        assert cluster.io(consumer, "verify", pub.target, log, BLOCKS, timeout=SLOW) == "ok"
        kube.unpublish(pub)
    finally:
        stop_process(writer)
        if not restored:
            cluster.stack.restore(victim)


def test_a_one_leg_volume_over_nbd_is_a_kernel_nbd_device_that_keeps_its_data(
    cluster: Cluster, kube: LayoutKube
) -> None:
    """The default vpg (one leg) reached from another node with `transport: nbd`: the
    kernel nbd client through the local TLS bridge (nbdfuse only where there is none)."""
    vid = kube.create_in("default", transport="nbd")
    owner = legs_of(cluster, vid).node_id
    consumer = next(n for n in cluster.info.node_ids if n != owner)
    before = connected_nbd()
    pub = kube.publish(vid, consumer, block_cap())
    assert len(connected_nbd()) == len(before) + 1, "not attached through the kernel nbd client"
    data = cluster.io(consumer, "write", pub.target, 0, 4 * MiB, 5)
    kube.unpublish(pub)
    assert connected_nbd() == before, "the kernel nbd device outlived its unpublish"
    pub = kube.publish(vid, consumer, block_cap())
    assert cluster.io(consumer, "read", pub.target, 0, 4 * MiB, timeout=SLOW) == data
    kube.unpublish(pub)
