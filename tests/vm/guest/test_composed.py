"""The composed transport against the real kernel (in the VM): md, device-mapper, nvme-tcp, nbd.

One kernel plays every node: the consumer's own leg is a loop device on a
file in its pool; each other node's leg is a file exported by nvmet
(tessera.system.nvmet, as that node's agent does) on 127.0.0.1 and reached
over nvme-tcp with DH-HMAC-CHAP, exactly as a remote leg is in production;
or, for the nodes a test names in `nbd_nodes`, exported by nbdkit with
TLS-PSK (node_agent/exports.py) and reached through the kernel nbd client.
Every test tears everything down and checks that nothing is left: no md
array, no dm device, no labelled loop, no nvme controller, no nvmet
subsystem, no record.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from node_agent.exports import Exports
from node_agent.keys import psk_line
from node_agent.pools import Pool
from node_agent.transports import BlockDevice, loops
from node_agent.transports.composed import ComposedTransport
from tessera import layouts
from tessera.errors import FailedPrecondition, Unavailable
from tessera.ids import new_volume_id
from tessera.models import AgentExportCreate, Connection, Layout, LegConnection, Transport
from tessera.nvme_names import dhchap_secret, host_nqn, subsystem_nqn
from tessera.system import blockdev, dm, md, nbd_kernel, nvme_host, nvmet, processes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="md, dm and nvmet need root")

MiB = 1024 * 1024
ME = "node-a"
ADDRESS = "127.0.0.1"
SIZE = 16 * MiB  # small: TCG is slow, and every leg is written through
#: what tests that need data, not all of it, write: chunks on every leg of every layout
SAMPLE = 2 * MiB


@dataclass
class Cluster:
    """The consumer's pool and state, and the other nodes' exports of their legs."""

    root: Path
    pool: Pool
    state: Path
    key: str = field(default_factory=lambda: secrets.token_hex(32))
    nodes: dict[str, Path] = field(default_factory=dict)
    exported: list[tuple[str, str, str]] = field(default_factory=list)  # (owner, vol, host)
    _ports: dict[str, int] = field(default_factory=dict)
    #: nodes whose legs are exported over NBD (TLS-PSK) instead of nvmet
    nbd_nodes: set[str] = field(default_factory=set)
    nbd_ports: dict[tuple[str, str], int] = field(default_factory=dict)  # (node, vol) -> port
    last_volume_id: str = ""

    def key_path(self, volume_id: str) -> Path:
        return self.state / "keys" / f"{volume_id}.psk"

    def transport(self) -> ComposedTransport:
        """A fresh transport object: what an agent restart builds."""
        return ComposedTransport.from_state_dir({"p": self.pool}, self.state, self.key_path)

    def port(self, node: str) -> int:
        """Each node's nvmet port: its own service id on the shared loopback address."""
        self.node_dir(node)
        return self._ports[node]

    def node_dir(self, node: str) -> Path:
        if node not in self.nodes:
            self.nodes[node] = self.root / node
            self.nodes[node].mkdir()
            self._ports[node] = 4421 + len(self._ports)
        return self.nodes[node]

    def leg_file(self, node: str, volume_id: str) -> Path:
        if node == ME:
            return self.pool.volume_path(volume_id, missing_is_not_found=False)
        return self.node_dir(node) / f"{volume_id}.img"

    def make_volume(self, layout: Layout, nodes: list[str], chunk: int = 64 * 1024) -> Connection:
        volume_id = self.last_volume_id = new_volume_id()
        size = layouts.volume_size(layout, SIZE, len(nodes), chunk)
        self.key_path(volume_id).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.key_path(volume_id).write_bytes(psk_line(ME, self.key))
        legs = []
        for index, node in enumerate(nodes):
            self.make_leg(volume_id, node, layouts.leg_size(layout, size, len(nodes)))
            legs.append(self.leg(volume_id, index, node))
        return Connection(
            transport=Transport.COMPOSED,
            psk_identity=ME,
            layout=layout,
            chunk_bytes=chunk if layouts.is_striped(layout) else 0,
            array_uuid=str(uuid.uuid4()) if layouts.is_mirrored(layout) else "",
            data_bytes=size,
            legs=legs,
        )

    def make_leg(self, volume_id: str, node: str, size: int) -> None:
        path = self.leg_file(node, volume_id)
        with open(path, "wb") as f:
            f.truncate(size)
        if node in self.nbd_nodes:
            self.nbd_ports[(node, volume_id)] = (
                self.exports(node)
                .open(
                    volume_id,
                    ME,
                    path,
                    AgentExportCreate(transport=Transport.NBD, psk_identity=ME, psk_key=self.key),
                )
                .port
            )
        elif node != ME:
            self.export(node, volume_id, path)

    def exports(self, node: str) -> Exports:
        """The node's NBD exports (its own state directory, the shared loopback address)."""
        return Exports(self.node_dir(node) / "exports", ADDRESS)

    def export(self, node: str, volume_id: str, path: Path) -> None:
        target = nvmet.Nvmet(node)
        port = target.ensure_port(ADDRESS, self.port(node))
        nqn = subsystem_nqn(volume_id, node)
        target.ensure_subsystem(nqn, path)
        target.ensure_host(host_nqn(ME, volume_id), dhchap_secret(self.key))
        target.allow_host(nqn, host_nqn(ME, volume_id))
        target.link_port(port, nqn)
        self.exported.append((node, volume_id, host_nqn(ME, volume_id)))

    def leg(self, volume_id: str, index: int, node: str) -> LegConnection:
        if node == ME:
            return LegConnection(index=index, node_id=node, transport=Transport.LOOP)
        if node in self.nbd_nodes:
            return LegConnection(
                index=index,
                node_id=node,
                transport=Transport.NBD,
                host=ADDRESS,
                port=self.nbd_ports[(node, volume_id)],
            )
        return LegConnection(
            index=index,
            node_id=node,
            transport=Transport.NVME_TCP,
            host=ADDRESS,
            port=self.port(node),
            subsystem_nqn=subsystem_nqn(volume_id, node),
        )

    def kill_node(self, node: str) -> None:
        """The node's target stops answering (its subsystems leave its port; its nbdkit
        exports die)."""
        for owner, volume_id in self.nbd_ports:
            if owner == node:
                for pid in processes.matching(
                    lambda a, f=str(self.leg_file(node, volume_id)): (
                        a[0].endswith("nbdkit") and f"file={f}" in a
                    )
                ):
                    os.kill(pid, 9)
        target = nvmet.Nvmet(node)
        for owner, volume_id, _ in self.exported:
            if owner == node:
                target.unlink_ports(subsystem_nqn(volume_id, node))

    def grow(self, connection: Connection, volume_id: str, size: int) -> None:
        """Management's resize: every leg file grows; each owner revalidates its namespace."""
        n = len(connection.legs)
        for leg in connection.legs:
            os.truncate(self.leg_file(leg.node_id, volume_id), layouts.leg_size(
                connection.layout, size, n))  # fmt: skip
            if leg.transport == Transport.NVME_TCP:
                nvmet.Nvmet(leg.node_id).revalidate(subsystem_nqn(volume_id, leg.node_id))

    def unexport_all(self) -> None:
        for owner, volume_id in self.nbd_ports:
            self.exports(owner).close(volume_id, ME)
        self.nbd_ports.clear()
        for owner, volume_id, host in self.exported:
            target = nvmet.Nvmet(owner)
            nqn = subsystem_nqn(volume_id, owner)
            target.remove_subsystem(nqn)
            target.remove_host_if_unused(host)
        self.exported.clear()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    nvmet.ensure_loaded()
    nvme_host.ensure_modules()
    (tmp_path / "pool").mkdir()
    c = Cluster(tmp_path, Pool.open("p", tmp_path / "pool"), tmp_path / "state")
    try:
        yield c
    finally:
        transport = c.transport()
        for device in sorted(transport.devices(), key=lambda d: not d.view_key):
            transport.release(device)
        for volume_id in list(transport.connections()) + _recorded(c.state):
            transport.disconnect(volume_id)
        c.unexport_all()
        assert_nothing_left(c)


def _recorded(state: Path) -> list[str]:
    directory = state / "composed"
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def assert_nothing_left(c: Cluster) -> None:
    assert md.arrays() == [], "an md array is left"
    assert dm.named(dm.NAME_PREFIX) == {}, "a dm device is left"
    assert [b.path for b in loops.loopdev.bound_devices() if loops.is_leg(b.path)] == []
    # exactly this node's host NQNs ("...:host:node-a:<volume>"), not node-aX's
    assert nvme_host.controllers(host_nqn(ME, "")) == [], "an nvme controller is left"
    ours = [d for d, args in nbd_kernel.connected().items() if any(str(c.root) in a for a in args)]
    assert ours == [], "a kernel nbd device is left"
    assert _recorded(c.state) == [], "a record is left"
    assert not [p for p in Path("/dev/md").glob("vol-*")] if Path("/dev/md").is_dir() else True


def write_pattern(device: str, size: int, seed: bytes) -> str:
    """Fill the device with a reproducible pattern; its sha256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(seed).digest() * (MiB // 32)
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for offset in range(0, size, MiB):
            chunk = block[: min(MiB, size - offset)]
            os.pwrite(fd, chunk, offset)
            digest.update(chunk)
        os.fsync(fd)
    finally:
        os.close(fd)
    return digest.hexdigest()


def read_digest(device: str, size: int) -> str:
    digest = hashlib.sha256()
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read the legs, not the cache
        for offset in range(0, size, MiB):
            digest.update(os.pread(fd, min(MiB, size - offset), offset))
    finally:
        os.close(fd)
    return digest.hexdigest()


def detach(transport: ComposedTransport, device: BlockDevice) -> None:
    transport.release(device)
    transport.disconnect(device.volume_id)


LAYOUTS = {
    Layout.RAID0: [ME, "node-b", "node-c"],
    Layout.RAID1: [ME, "node-b"],
    Layout.RAID10: [ME, "node-b", "node-c", "node-d"],
}


# ---- compose, write, checksum, again ----------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=lambda layout: layout.value)
def test_data_written_to_a_composed_volume_reads_back_after_detach_and_reattach(
    cluster: Cluster, layout: Layout
) -> None:
    conn = cluster.make_volume(layout, LAYOUTS[layout])
    volume_id = _volume_of(conn)
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    assert blockdev.size_bytes(device.path) == conn.data_bytes
    assert transport.condition(device) == ""
    written = write_pattern(device.path, conn.data_bytes, b"first")
    detach(transport, device)
    assert transport.devices() == []
    assert_nothing_left(cluster)

    device = transport.connect(volume_id, conn, readonly=False)  # assembled, not created
    assert read_digest(device.path, conn.data_bytes) == written
    assert transport.condition(device) == ""


def test_a_restarted_agent_adopts_the_composed_device_and_its_legs(cluster: Cluster) -> None:
    conn = cluster.make_volume(Layout.RAID1, [ME, "node-b"])
    volume_id = _volume_of(conn)
    device = cluster.transport().connect(volume_id, conn, readonly=False)
    written = write_pattern(device.path, SAMPLE, b"adopt")

    restarted = cluster.transport()
    assert restarted.devices() == [device]
    assert restarted.connection_of(device) == conn
    assert restarted.is_current(device, conn)
    assert restarted.condition(device) == ""
    again = restarted.connect(volume_id, conn, readonly=False)  # a crash before the link
    assert again.path == device.path
    assert read_digest(device.path, SAMPLE) == written


def test_the_md_uuid_on_the_legs_is_the_one_management_chose(cluster: Cluster) -> None:
    conn = cluster.make_volume(Layout.RAID1, [ME, "node-b"])
    volume_id = _volume_of(conn)
    device = cluster.transport().connect(volume_id, conn, readonly=False)
    leg = loops.loopdev.bound_devices()
    members = md.member_names(os.path.basename(device.path))
    assert len(members) == 2
    for member in members:
        sb = md.examine(f"/dev/{member}")
        assert sb is not None and sb.array_uuid == conn.array_uuid
        assert sb.data_offset_bytes == layouts.MD_DATA_OFFSET
    assert any(b.path.endswith(m) for b in leg for m in members)
    assert md.array_uuid(os.path.basename(device.path)) == conn.array_uuid
    detail = subprocess.run(
        ["mdadm", "--detail", "--export", device.path], capture_output=True, text=True, check=True
    ).stdout
    mdadm_uuid = dict(line.split("=", 1) for line in detail.splitlines() if "=" in line)["MD_UUID"]
    assert mdadm_uuid.replace(":", "") == conn.array_uuid.replace("-", "")  # mdadm agrees


# ---- degraded, stale, repair ------------------------------------------------------------------


def test_a_dead_mirror_leg_degrades_the_volume_and_io_continues(cluster: Cluster) -> None:
    conn = cluster.make_volume(Layout.RAID1, [ME, "node-b"])
    volume_id = _volume_of(conn)
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    cluster.kill_node("node-b")
    written = write_pattern(device.path, conn.data_bytes, b"degraded")  # fails over in ~5 s
    deadline = time.monotonic() + 120
    while "failed" not in transport.condition(device) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert transport.condition(device).startswith("degraded: leg 1 (node-b)")
    assert read_digest(device.path, conn.data_bytes) == written


def test_a_stale_leg_is_left_out_and_never_read(cluster: Cluster) -> None:
    conn = cluster.make_volume(Layout.RAID1, [ME, "node-b", "node-c"])
    volume_id = _volume_of(conn)
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    write_pattern(device.path, SAMPLE, b"old")
    array = os.path.basename(device.path)
    stale_member = os.path.basename(
        nvme_host.namespace_device(_target(cluster, volume_id, conn.legs[2])) or ""
    )
    (md.SYS_BLOCK / array / "md" / f"dev-{stale_member}" / "state").write_text("faulty")
    newer = write_pattern(device.path, conn.data_bytes, b"new")  # leg 2 misses this
    detach(transport, device)

    device = transport.connect(volume_id, conn, readonly=False)  # all three listed
    assert transport.condition(device) == "degraded: leg 2 (node-c) is stale: not assembled"
    assert stale_member not in md.member_names(os.path.basename(device.path))
    assert read_digest(device.path, conn.data_bytes) == newer


def test_a_repaired_leg_resyncs_with_progress_then_the_volume_is_clean(cluster: Cluster) -> None:
    conn = cluster.make_volume(Layout.RAID1, [ME, "node-b"])
    volume_id = _volume_of(conn)
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    written = write_pattern(device.path, conn.data_bytes, b"repair")
    # management: leg 1 moves to node-c (a new, blank file exported to us)
    cluster.make_leg(volume_id, "node-c", layouts.leg_size(conn.layout, conn.data_bytes, 2))
    repaired = conn.model_copy(update={"legs": [conn.legs[0], cluster.leg(volume_id, 1, "node-c")]})
    limit = Path("/proc/sys/dev/raid/speed_limit_max")
    before = limit.read_text()
    limit.write_text("2000\n")  # KiB/s: slow enough to see progress
    try:
        transport.reconcile(device, repaired)
        seen = transport.condition(device)
        assert seen.startswith("resyncing leg 1 (node-c): "), seen
    finally:
        limit.write_text(before)
    deadline = time.monotonic() + 300
    while transport.condition(device) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert transport.condition(device) == ""
    assert transport.connection_of(device) == repaired
    assert nvme_host.controllers(host_nqn(ME, volume_id)) and not nvme_host.find_controllers(
        _target(cluster, volume_id, conn.legs[1])
    )  # the old leg was disconnected
    # the new leg alone holds the data: take the local one out and read
    local = os.path.basename(loops_of(volume_id)[0])
    md.fail_and_remove(os.path.basename(device.path), local)
    assert read_digest(device.path, conn.data_bytes) == written


# ---- extend, read-only ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=lambda layout: layout.value)
def test_a_grown_volume_shows_its_new_size_and_keeps_its_data(
    cluster: Cluster, layout: Layout
) -> None:
    conn = cluster.make_volume(layout, LAYOUTS[layout])
    volume_id = _volume_of(conn)
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    written = write_pattern(device.path, SAMPLE, b"grow")
    new_size = layouts.volume_size(layout, 2 * conn.data_bytes, len(conn.legs), conn.chunk_bytes)
    cluster.grow(conn, volume_id, new_size)
    transport.extend(device, new_size)
    assert transport.size_bytes(device) == new_size
    assert read_digest(device.path, SAMPLE) == written
    assert transport.condition(device) == ""


@pytest.mark.parametrize("layout", [Layout.RAID0, Layout.RAID1], ids=lambda layout: layout.value)
def test_a_read_only_attachment_refuses_writes(cluster: Cluster, layout: Layout) -> None:
    conn = cluster.make_volume(layout, LAYOUTS[layout])
    volume_id = _volume_of(conn)
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    written = write_pattern(device.path, SAMPLE, b"ro")
    detach(transport, device)
    device = transport.connect(volume_id, conn, readonly=True)
    with pytest.raises(OSError):
        write_pattern(device.path, MiB, b"must not land")
    assert read_digest(device.path, SAMPLE) == written


def test_a_read_only_view_follows_the_composed_device(cluster: Cluster) -> None:
    conn = cluster.make_volume(Layout.RAID0, LAYOUTS[Layout.RAID0])
    volume_id = _volume_of(conn)
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    written = write_pattern(device.path, SAMPLE, b"view")
    view = transport.add_view(device, "k1")
    assert view in transport.devices()
    assert read_digest(view.path, SAMPLE) == written
    transport.release(view)


# ---- through the agent's attachments (what NodeStage and a repair's re-publish reach) ----------


def test_the_agent_links_the_composed_device_and_a_republish_with_a_new_leg_repairs_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    from node_agent.attachments import AttachmentManager
    from node_agent.transports import build_transports

    conn = cluster.make_volume(Layout.RAID1, [ME, "node-b"])
    volume_id = _volume_of(conn)
    pools = {"p": cluster.pool}
    manager = AttachmentManager(
        pools, tmp_path / "dev", build_transports(pools, cluster.state, cluster.key_path)
    )
    attached = manager.attach(volume_id, False, conn)
    assert attached.transport == "composed" and attached.condition == ""
    assert os.readlink(attached.device) == attached.backing_device
    assert attached.backing_device.startswith("/dev/md")
    assert attached.size_bytes == conn.data_bytes
    written = write_pattern(attached.device, conn.data_bytes, b"agent")
    assert manager.attach(volume_id, False, conn) == attached  # again: nothing changes

    cluster.make_leg(volume_id, "node-c", layouts.leg_size(conn.layout, conn.data_bytes, 2))
    repaired = conn.model_copy(update={"legs": [conn.legs[0], cluster.leg(volume_id, 1, "node-c")]})
    manager.attach(volume_id, False, repaired)
    deadline = time.monotonic() + 300
    while manager.get(volume_id).condition and time.monotonic() < deadline:
        time.sleep(0.5)
    assert manager.get(volume_id).condition == ""
    assert manager.get(volume_id).connection == repaired
    assert read_digest(attached.device, conn.data_bytes) == written

    manager.detach(volume_id)
    assert not os.path.lexists(attached.device)
    assert manager.list() == []
    assert_nothing_left(cluster)


# ---- review fixes -------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [Layout.RAID0, Layout.RAID1], ids=lambda layout: layout.value)
def test_a_grown_volume_restaged_with_its_original_publish_context_keeps_its_grown_size(
    cluster: Cluster, layout: Layout
) -> None:
    conn = cluster.make_volume(layout, LAYOUTS[layout])
    volume_id = _volume_of(conn)
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    written = write_pattern(device.path, SAMPLE, b"grow-restage")
    new_size = layouts.volume_size(layout, 2 * conn.data_bytes, len(conn.legs), conn.chunk_bytes)
    cluster.grow(conn, volume_id, new_size)
    transport.extend(device, new_size)
    tail = write_pattern_at(device.path, new_size - MiB, b"grown tail")
    detach(transport, device)  # a node reboot: unstaged, then staged with the frozen context

    device = cluster.transport().connect(volume_id, conn, readonly=False)
    assert blockdev.size_bytes(device.path) == new_size
    assert read_digest(device.path, SAMPLE) == written
    assert read_at(device.path, new_size - MiB) == tail


def test_a_mirror_whose_leg_node_is_dead_is_staged_degraded(cluster: Cluster) -> None:
    conn = cluster.make_volume(Layout.RAID1, [ME, "node-b"])
    volume_id = _volume_of(conn)
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    written = write_pattern(device.path, SAMPLE, b"dead-leg")
    detach(transport, device)
    cluster.kill_node("node-b")

    device = transport.connect(volume_id, conn, readonly=False)
    assert transport.condition(device) == "degraded: leg 1 (node-b) missing"
    assert read_digest(device.path, SAMPLE) == written


def test_a_stripe_with_a_dead_leg_node_is_not_staged(cluster: Cluster) -> None:
    conn = cluster.make_volume(Layout.RAID0, LAYOUTS[Layout.RAID0])
    volume_id = _volume_of(conn)
    cluster.kill_node("node-c")
    with pytest.raises(Unavailable):
        cluster.transport().connect(volume_id, conn, readonly=False)
    assert dm.named(dm.NAME_PREFIX) == {}


def test_a_read_only_attach_of_a_never_written_mirror_writes_nothing(cluster: Cluster) -> None:
    conn = cluster.make_volume(Layout.RAID1, [ME, "node-b"])
    volume_id = _volume_of(conn)
    with pytest.raises(FailedPrecondition, match="publish it read-write first"):
        cluster.transport().connect(volume_id, conn, readonly=True)
    assert md.arrays() == []
    for leg in conn.legs:
        assert md.examine(str(cluster.leg_file(leg.node_id, volume_id))) is None


def test_a_republish_dropping_the_last_in_sync_leg_is_refused_and_changes_nothing(
    cluster: Cluster,
) -> None:
    conn = cluster.make_volume(Layout.RAID1, [ME, "node-b"])
    volume_id = _volume_of(conn)
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    array = os.path.basename(device.path)
    local = os.path.basename(loops_of(volume_id)[0])
    (md.SYS_BLOCK / array / "md" / f"dev-{local}" / "state").write_text("faulty")
    before = md.member_names(array)
    cluster.make_leg(volume_id, "node-c", layouts.leg_size(conn.layout, conn.data_bytes, 2))
    dropping_b = conn.model_copy(
        update={"legs": [conn.legs[0], cluster.leg(volume_id, 1, "node-c")]}
    )
    with pytest.raises(FailedPrecondition, match=r"leg 1 \(node node-b\)"):
        transport.reconcile(device, dropping_b)
    assert md.member_names(array) == before
    assert transport.connection_of(device) == conn
    assert not nvme_host.find_controllers(_target(cluster, volume_id, dropping_b.legs[1]))


def test_an_older_publish_context_does_not_undo_a_repair(cluster: Cluster) -> None:
    conn = cluster.make_volume(Layout.RAID1, [ME, "node-b"])
    conn = conn.model_copy(update={"generation": 2})
    volume_id = _volume_of(conn)
    cluster.make_leg(volume_id, "node-c", layouts.leg_size(conn.layout, conn.data_bytes, 2))
    older = conn.model_copy(
        update={"generation": 1, "legs": [conn.legs[0], cluster.leg(volume_id, 1, "node-c")]}
    )
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    transport.reconcile(device, older)
    again = transport.connect(volume_id, older, readonly=False)  # a retried stage
    assert again.path == device.path
    assert transport.connection_of(device) == conn
    assert not nvme_host.find_controllers(_target(cluster, volume_id, older.legs[1]))
    assert transport.condition(device) == ""


def test_a_connect_with_other_legs_disconnects_the_old_ones_and_guards_the_key(
    cluster: Cluster,
) -> None:
    conn = cluster.make_volume(Layout.RAID1, [ME, "node-b"])
    volume_id = _volume_of(conn)
    transport = cluster.transport()
    transport.connect(volume_id, conn, readonly=False)
    ctrl = nvme_host.controller_of(_target(cluster, volume_id, conn.legs[1]))
    assert ctrl is not None
    secret = nvme_host.SYSFS_NVME / ctrl.name / "dhchap_secret"
    os.chmod(secret, 0o444)
    cluster.transport().connect(volume_id, conn, readonly=False)  # adopted after a restart
    assert secret.stat().st_mode & 0o077 == 0

    cluster.make_leg(volume_id, "node-c", layouts.leg_size(conn.layout, conn.data_bytes, 2))
    moved = conn.model_copy(
        update={"generation": 1, "legs": [conn.legs[0], cluster.leg(volume_id, 1, "node-c")]}
    )
    cluster.transport().connect(volume_id, moved, readonly=False)
    assert not nvme_host.find_controllers(_target(cluster, volume_id, conn.legs[1]))
    assert nvme_host.find_controllers(_target(cluster, volume_id, moved.legs[1]))


def write_pattern_at(device: str, offset: int, seed: bytes) -> str:
    """One MiB of a pattern at `offset`; its sha256."""
    data = hashlib.sha256(seed).digest() * (MiB // 32)
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(data).hexdigest()


def read_at(device: str, offset: int) -> str:
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return hashlib.sha256(os.pread(fd, MiB, offset)).hexdigest()
    finally:
        os.close(fd)


# ---- helpers ------------------------------------------------------------------------------------


def _volume_of(conn: Connection) -> str:
    nqn = next(leg.subsystem_nqn for leg in conn.legs if leg.subsystem_nqn)
    return nqn.split(":")[1]


def _target(cluster: Cluster, volume_id: str, leg: LegConnection) -> nvme_host.Target:
    from node_agent.transports.nvme_tcp import target_of

    return target_of(volume_id, leg.node_id, leg.host, leg.port, ME)


def loops_of(volume_id: str) -> list[str]:
    label = loops.LEG_LABEL + volume_id
    return [
        b.path for b in loops.loopdev.bound_devices() if loops.loopdev.read_label(b.path) == label
    ]


# ---- remote legs over nbd (the kernel nbd client through a local TLS bridge) ----------------


@pytest.mark.parametrize("layout", [Layout.RAID0, Layout.RAID1], ids=lambda layout: layout.value)
def test_legs_over_nbd_compose_and_read_back_after_reattach_and_an_agent_restart(
    cluster: Cluster, layout: Layout
) -> None:
    cluster.nbd_nodes = {"node-b", "node-c"}
    conn = cluster.make_volume(layout, LAYOUTS[layout])
    volume_id = cluster.last_volume_id
    assert {leg.transport for leg in conn.legs} == {Transport.LOOP, Transport.NBD}
    device = cluster.transport().connect(volume_id, conn, readonly=False)
    assert blockdev.size_bytes(device.path) == conn.data_bytes
    written = write_pattern(device.path, conn.data_bytes, b"nbd legs")

    restarted = cluster.transport()  # nothing in memory: legs found by their bridge sockets
    assert restarted.devices() == [device]
    assert restarted.condition(device) == ""
    assert restarted.connect(volume_id, conn, readonly=False).path == device.path
    detach(restarted, device)
    assert_nothing_left(cluster)

    device = restarted.connect(volume_id, conn, readonly=False)  # assembled, not created
    assert read_digest(device.path, conn.data_bytes) == written


def test_a_dead_nbd_mirror_leg_degrades_the_volume_and_io_continues(cluster: Cluster) -> None:
    cluster.nbd_nodes = {"node-b"}
    conn = cluster.make_volume(Layout.RAID1, [ME, "node-b"])
    volume_id = cluster.last_volume_id
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    cluster.kill_node("node-b")
    written = write_pattern(device.path, conn.data_bytes, b"degraded")  # the bridge fails at once
    deadline = time.monotonic() + 120
    while "failed" not in transport.condition(device) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert transport.condition(device).startswith("degraded: leg 1 (node-b)")
    assert read_digest(device.path, conn.data_bytes) == written


def test_a_stripe_over_nbd_legs_grows_by_reconnecting_when_nothing_holds_it(
    cluster: Cluster,
) -> None:
    cluster.nbd_nodes = {"node-b", "node-c"}
    conn = cluster.make_volume(Layout.RAID0, LAYOUTS[Layout.RAID0])
    volume_id = cluster.last_volume_id
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    written = write_pattern(device.path, SAMPLE, b"grow nbd")
    new_size = layouts.volume_size(Layout.RAID0, 2 * conn.data_bytes, 3, conn.chunk_bytes)
    cluster.grow(conn, volume_id, new_size)

    view = transport.add_view(device, "k1")  # something holds it: NBD cannot grow in place
    with pytest.raises(FailedPrecondition, match="unstaged and staged again"):
        transport.extend(device, new_size)
    assert transport.size_bytes(device) == conn.data_bytes
    transport.release(view)

    transport.extend(device, new_size)
    grown = next(d for d in transport.devices() if d.volume_id == volume_id)
    assert transport.size_bytes(grown) == new_size
    assert read_digest(grown.path, SAMPLE) == written
    assert transport.condition(grown) == ""


def test_a_mirror_whose_nbd_leg_died_under_a_live_client_is_staged_degraded(
    cluster: Cluster,
) -> None:
    """An agent that crashed in a detach (md stopped, legs still attached) finds a leg
    whose owner died meanwhile: its client is up but every read fails. That leg is left
    out (md runs degraded) instead of failing the stage on its superblock."""
    cluster.nbd_nodes = {"node-b"}
    conn = cluster.make_volume(Layout.RAID1, [ME, "node-b"])
    volume_id = cluster.last_volume_id
    transport = cluster.transport()
    device = transport.connect(volume_id, conn, readonly=False)
    written = write_pattern(device.path, SAMPLE, b"left out")
    transport.release(device)  # the crash: the array is stopped, the legs stay attached
    cluster.kill_node("node-b")

    device = transport.connect(volume_id, conn, readonly=False)
    assert transport.condition(device).startswith("degraded"), transport.condition(device)
    assert read_digest(device.path, SAMPLE) == written
