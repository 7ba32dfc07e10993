"""nvme-tcp for real, inside the VM: nvmet in configfs, DH-HMAC-CHAP, the namespace in sysfs.

Nodes are network namespaces on one bridge (tessera_dev.netns) sharing the
VM's one kernel: the owner's configfs changes run in its namespace (the
nvmet port listens where the subsystem is first linked to it), the
consumer's connect in its own (nvme-tcp opens its sockets there). Both
sides are the project's code: node_agent/nvme_exports.py (owner) and
node_agent/transports/nvme_tcp.py (consumer), over tessera/system/nvmet.py
and tessera/system/nvme_host.py.

Every test leaves no controller, subsystem, host entry, port, namespace
or record behind; the fixture checks that, and cleans up after a failure.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from node_agent import capabilities
from node_agent.agent import Agent
from node_agent.nvme_exports import NvmeExports
from node_agent.pools import Pool
from node_agent.transports import BlockDevice
from node_agent.transports.nvme_tcp import NvmeTcpTransport
from tessera.errors import TesseraError, Unavailable
from tessera.ids import new_volume_id
from tessera.models import AgentExportCreate, AgentKey, Connection, Transport
from tessera.nvme_names import (
    NQN_PREFIX,
    dhchap_ctrl_secret,
    dhchap_secret,
    host_nqn,
    subsystem_nqn,
)
from tessera.system import blockdev, loopdev, nvme_host, nvmet
from tessera_dev import netns
from tests.vm.guest.direct_io import read_direct

MiB = 1024**2
SIZE = 64 * MiB
PORT = 4420
NVMET = nvmet.CONFIGFS / "nvmet"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
T = TypeVar("T")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: configfs, nvme, namespaces"),
    # in the VM a missing module is a failure of the image, not a reason to skip
    pytest.mark.skipif(
        bool(capabilities.nvme_tcp_missing()) and os.environ.get("TESSERA_VM") != "1",
        reason=f"this kernel cannot: {', '.join(capabilities.nvme_tcp_missing())}",
    ),
]


def in_netns(name: str, fn: Callable[..., T], *args: object) -> T:
    """fn(*args) in a thread that joined network namespace `name` (setns is per thread)."""
    out: dict[str, object] = {}

    def run() -> None:
        fd = os.open(netns.NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                out["error"] = OSError(ctypes.get_errno(), "setns")
                return
        finally:
            os.close(fd)
        try:
            out["value"] = fn(*args)
        except BaseException as err:  # re-raised in the caller
            out["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out.get("value")  # type: ignore[return-value]


@dataclass
class Owner:
    node: str
    netns: str
    address: str
    exports: NvmeExports
    pool: Path

    def volume(self, volume_id: str, size: int = SIZE) -> Path:
        path = self.pool / f"{volume_id}.img"
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def export(self, volume_id: str, client: str, key: str) -> None:
        req = AgentExportCreate(transport=Transport.NVME_TCP, psk_identity=client, psk_key=key)
        in_netns(
            self.netns, self.exports.open, volume_id, client, self.pool / f"{volume_id}.img", req
        )

    def close(self, volume_id: str, client: str) -> None:
        in_netns(self.netns, self.exports.close, volume_id, client)


@dataclass
class Consumer:
    node: str
    netns: str
    keys: Path
    state: Path

    def transport(self) -> NvmeTcpTransport:
        """A transport as a (re)started agent has it: nothing in memory."""
        return NvmeTcpTransport(self.state, lambda v: self.keys / f"{v}.psk")

    def give_key(self, volume_id: str, key: str) -> None:
        self.keys.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.keys / f"{volume_id}.psk").write_text(f"{self.node}:{key}\n")

    def attach(self, volume_id: str, owner: Owner) -> BlockDevice:
        connection = Connection(
            transport=Transport.NVME_TCP,
            owner_node=owner.node,
            host=owner.address,
            port=PORT,
            psk_identity=self.node,
            subsystem_nqn=subsystem_nqn(volume_id, owner.node),
        )
        return in_netns(self.netns, self.transport().connect, volume_id, connection, False)

    def detach(self, volume_id: str) -> None:
        in_netns(self.netns, self.transport().disconnect, volume_id)


@dataclass
class Rig:
    a: Owner
    b: Consumer
    c: Owner
    #: every volume a test made: what the teardown checks and cleans
    volume_ids: set[str] = field(default_factory=set)


def _ours(text: str, volume_ids: set[str]) -> bool:
    return any(v in text for v in volume_ids)


def _leftovers(volume_ids: set[str]) -> list[str]:
    """Controllers, subsystems, hosts and port links of these volumes the kernel still has."""
    found = [c.name for c in nvme_host.all_controllers() if _ours(c.subsystem_nqn, volume_ids)]
    for kind in ("subsystems", "hosts"):
        directory = NVMET / kind
        if directory.is_dir():
            found += [f"{kind}/{p.name}" for p in directory.iterdir() if _ours(p.name, volume_ids)]
    ports = NVMET / "ports"
    for port in ports.iterdir() if ports.is_dir() else []:
        links = (port / "subsystems").iterdir()
        found += [f"port {port.name}: {s.name}" for s in links if _ours(s.name, volume_ids)]
    return found


def _cleanup(rig: Rig, volume_ids: set[str]) -> None:
    """After a failure: the kernel state a test made, removed (never another test's)."""
    for ctrl in nvme_host.all_controllers():
        if _ours(ctrl.subsystem_nqn, volume_ids):
            nvme_host.delete_controller(ctrl.name)
    for owner in (rig.a, rig.c):
        target = nvmet.Nvmet(owner.node, NVMET)
        for found in target.subsystems():
            if found.volume_id in volume_ids:
                target.remove_subsystem(found.nqn)
                for host in found.hosts:
                    target.remove_host_if_unused(host)
        target.remove_port_if_unused(owner.address, PORT)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    (tmp_path / "net").mkdir()
    network = netns.network_for(tmp_path / "net")
    made: list[str] = []

    def owner(index: int, node: str) -> Owner:
        pool = tmp_path / node / "pool"
        pool.mkdir(parents=True)
        exports = NvmeExports(tmp_path / node / "nvme-exports", node, network.address(index), PORT)
        return Owner(node, network.netns(index), network.address(index), exports, pool)

    rig = Rig(
        a=owner(1, "node-a"),
        b=Consumer("node-b", network.netns(2), tmp_path / "b" / "keys", tmp_path / "b" / "conn"),
        c=owner(3, "node-c"),
    )
    try:
        netns.create(network, 3)
        yield rig
        made = _leftovers(rig.volume_ids)
        for each in (rig.a, rig.c):  # a port serving nothing goes too
            port = nvmet.Nvmet(each.node, NVMET).find_port(each.address, PORT)
            made += [f"port {port.name} of {each.node}"] if port is not None else []
    finally:
        _cleanup(rig, rig.volume_ids)
        netns.destroy(network.tag)
    assert made == [], f"left behind: {made}"


def new_volume(rig: Rig) -> str:
    volume_id = new_volume_id()
    rig.volume_ids.add(volume_id)
    return volume_id


def write_then_checksum(device: str, data: bytes, offset: int) -> None:
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.1)


# ---- the tests ---------------------------------------------------------------------------


def test_this_kernel_offers_nvme_tcp() -> None:
    assert Transport.NVME_TCP in capabilities.host_transports()


def test_what_the_consumer_writes_lands_in_the_owners_file_and_reads_back(rig: Rig) -> None:
    vid, key = new_volume(rig), secrets.token_hex(32)
    file = rig.a.volume(vid)
    rig.a.export(vid, "node-b", key)
    subsystem = nvmet.Nvmet("node-a", NVMET).subsystem(subsystem_nqn(vid, "node-a"))
    assert subsystem is not None and subsystem.hosts == (host_nqn("node-b", vid),)
    assert (NVMET / "subsystems" / subsystem.nqn / "attr_allow_any_host").read_text().strip() == "0"
    rig.b.give_key(vid, key)
    device = rig.b.attach(vid, rig.a)
    assert device.path.startswith("/dev/nvme") and blockdev.size_bytes(device.path) == SIZE
    # found by NQNs in sysfs: the same answer as the kernel's controller for this host
    target = nvme_host.Target(
        rig.a.address, PORT, subsystem_nqn(vid, "node-a"), host_nqn("node-b", vid)
    )
    assert nvme_host.namespace_device(target) == device.path
    data = secrets.token_bytes(4 * MiB)
    write_then_checksum(device.path, data, 8 * MiB)
    with open(file, "rb") as f:
        f.seek(8 * MiB)
        assert hashlib.sha256(f.read(len(data))).digest() == hashlib.sha256(data).digest()
    # and the other way: the owner writes, the consumer reads it past its cache
    more = secrets.token_bytes(MiB)
    with open(file, "r+b") as f:
        f.seek(32 * MiB)
        f.write(more)
        f.flush()
        os.fsync(f.fileno())
    assert read_direct(device.path, 32 * MiB, MiB) == more
    rig.b.detach(vid)
    assert not os.path.exists(device.path) and nvme_host.find_controllers(target) == []
    rig.a.close(vid, "node-b")


def test_a_wrong_key_is_refused_and_leaves_no_controller(rig: Rig) -> None:
    vid = new_volume(rig)
    rig.a.volume(vid)
    rig.a.export(vid, "node-b", secrets.token_hex(32))
    wrong = secrets.token_hex(32)
    rig.b.give_key(vid, wrong)
    with pytest.raises(TesseraError) as err:
        rig.b.attach(vid, rig.a)
    assert isinstance(err.value, Unavailable), err.value
    assert "could not connect" in str(err.value) and subsystem_nqn(vid, "node-a") in str(err.value)
    assert "authentication failed" in str(err.value)  # EKEYREJECTED, said as such
    assert wrong not in str(err.value) and dhchap_secret(wrong) not in str(err.value)
    assert [c for c in nvme_host.all_controllers() if vid in c.subsystem_nqn] == []
    assert rig.b.transport().connections() == {}
    rig.a.close(vid, "node-b")


def test_a_revoked_host_is_cut_off_and_cannot_connect_again(rig: Rig) -> None:
    vid, key = new_volume(rig), secrets.token_hex(32)
    rig.a.volume(vid)
    rig.a.export(vid, "node-b", key)
    rig.b.give_key(vid, key)
    device = rig.b.attach(vid, rig.a)
    rig.a.close(vid, "node-b")
    assert not (NVMET / "hosts" / host_nqn("node-b", vid)).exists()
    transport = rig.b.transport()
    primary = next(d for d in transport.devices() if d.volume_id == vid)
    wait_for(lambda: transport.condition(primary) != "", "the consumer sees its export gone")
    assert "node-a" in transport.condition(primary) or vid in transport.condition(primary)
    rig.b.detach(vid)
    assert not os.path.exists(device.path)
    with pytest.raises(Unavailable):
        rig.b.attach(vid, rig.a)  # the same key, once more: nothing serves it


def test_an_agent_restart_re_adopts_both_ends_and_an_owner_reboot_is_repaired(rig: Rig) -> None:
    vid, key = new_volume(rig), secrets.token_hex(32)
    rig.a.volume(vid)
    rig.a.export(vid, "node-b", key)
    rig.b.give_key(vid, key)
    device = rig.b.attach(vid, rig.a)
    data = secrets.token_bytes(MiB)
    write_then_checksum(device.path, data, 0)
    # restarted agents: new objects, the same state directories and kernel
    restarted = rig.b.transport()
    assert [d.path for d in restarted.devices() if d.volume_id == vid] == [device.path]
    assert restarted.condition(device) == "" and vid in restarted.connections()
    owner = NvmeExports(rig.a.exports.directory, "node-a", rig.a.address, PORT)
    kept = in_netns(rig.a.netns, owner.recover, lambda v: rig.a.pool / f"{v}.img")
    assert [(e.volume_id, e.client_node, e.transport) for e in kept] == [
        (vid, "node-b", Transport.NVME_TCP)
    ]
    # a reboot empties configfs: the records serve it again, the consumer reconnects
    target = nvmet.Nvmet("node-a", NVMET)
    target.remove_subsystem(subsystem_nqn(vid, "node-a"))
    target.remove_host_if_unused(host_nqn("node-b", vid))
    wait_for(lambda: restarted.condition(device) != "", "the consumer notices the target gone")
    in_netns(rig.a.netns, owner.recover, lambda v: rig.a.pool / f"{v}.img")
    wait_for(lambda: restarted.condition(device) == "", "the consumer reconnects", timeout=60)
    assert read_direct(device.path, 0, MiB) == data
    rig.b.detach(vid)
    rig.a.close(vid, "node-b")
    assert list(rig.a.exports.directory.rglob("*.*")) == []
    assert restarted.connections() == {}


def test_a_grown_volume_shows_its_new_size_after_a_rescan(rig: Rig) -> None:
    vid, key = new_volume(rig), secrets.token_hex(32)
    file = rig.a.volume(vid)
    rig.a.export(vid, "node-b", key)
    rig.b.give_key(vid, key)
    device = rig.b.attach(vid, rig.a)
    with open(file, "r+b") as f:
        f.truncate(2 * SIZE)
    rig.a.exports.resized(vid)  # what the owner agent's resize does after growing the file
    in_netns(rig.b.netns, rig.b.transport().extend, device, 2 * SIZE)
    assert blockdev.size_bytes(device.path) == 2 * SIZE
    rig.b.detach(vid)
    rig.a.close(vid, "node-b")


def test_two_owners_share_a_host_entry_and_the_last_one_removes_it(rig: Rig) -> None:
    vid, key = new_volume(rig), secrets.token_hex(32)
    rig.a.volume(vid)
    rig.c.volume(vid)
    rig.a.export(vid, "node-b", key)
    rig.c.export(vid, "node-b", key)  # the other leg of the volume, the same key
    host = NVMET / "hosts" / host_nqn("node-b", vid)
    rig.a.close(vid, "node-b")
    assert host.is_dir(), "node-c's subsystem still allows the host"
    assert not (NVMET / "subsystems" / subsystem_nqn(vid, "node-a")).exists()
    rig.b.give_key(vid, key)
    device = rig.b.attach(vid, rig.c)  # node-c's leg still serves
    assert blockdev.size_bytes(device.path) == SIZE
    rig.b.detach(vid)
    rig.c.close(vid, "node-b")
    assert not host.exists()
    assert not any(
        p.name.startswith(f"{NQN_PREFIX}:{vid}") for p in (NVMET / "subsystems").iterdir()
    )


def test_agents_export_attach_view_and_detach_an_nvme_tcp_volume_and_re_adopt_it(
    rig: Rig, tmp_path: Path
) -> None:
    """The same through the node-agent's operations (what its API calls)."""
    vid, key = new_volume(rig), secrets.token_hex(32)

    def agent(node: str, address: str) -> Agent:
        (tmp_path / "agents" / node / "pool").mkdir(parents=True, exist_ok=True)
        pools = {"default": Pool.open("default", tmp_path / "agents" / node / "pool")}
        return Agent(
            node, pools, tmp_path / "agents" / node / "dev", state_dir=tmp_path / "agents" / node,
            export_address=address, nvme_port=PORT,
        )  # fmt: skip

    owner, consumer = agent("node-a", rig.a.address), agent("node-b", "")
    owner.create_volume(vid, "default", SIZE)
    req = AgentExportCreate(transport=Transport.NVME_TCP, psk_identity="node-b", psk_key=key)
    exported = in_netns(rig.a.netns, owner.export, vid, "node-b", req)
    assert (exported.transport, exported.subsystem_nqn) == (
        Transport.NVME_TCP,
        subsystem_nqn(vid, "node-a"),
    )
    assert [e.subsystem_nqn for e in owner.exports.list()] == [subsystem_nqn(vid, "node-a")]
    consumer.put_key(vid, AgentKey(psk_identity="node-b", psk_key=key))
    connection = Connection(
        transport=Transport.NVME_TCP, owner_node="node-a", host=exported.host,
        port=exported.port, psk_identity="node-b", subsystem_nqn=exported.subsystem_nqn,
    )  # fmt: skip
    attached = in_netns(rig.b.netns, consumer.attach, vid, False, connection)
    assert attached.transport == "nvme-tcp" and attached.size_bytes == SIZE
    assert os.readlink(consumer.dev_dir / vid) == attached.backing_device
    ctrl = (
        Path("/sys/class/nvme")
        / nvme_host.find_controllers(
            nvme_host.Target(exported.host, PORT, exported.subsystem_nqn, host_nqn("node-b", vid))
        )[0].name
    )
    # a single-leg volume waits for its owner rather than failing I/O
    assert (ctrl / "ctrl_loss_tmo").read_text().strip() == "600"
    assert (ctrl / "fast_io_fail_tmo").read_text().strip() == "off"
    view = consumer.attach_view(vid, "snap-view")
    assert view.device != attached.backing_device
    again = in_netns(rig.b.netns, consumer.attach, vid, False, connection)  # a retried stage
    assert again.backing_device == attached.backing_device
    # a restarted consumer agent finds the same devices and a healthy connection
    restarted = agent("node-b", "")
    restarted.recover()
    found = restarted.get_attachment(vid)
    assert (found.backing_device, found.condition) == (attached.backing_device, "")
    assert found.views == {"snap-view": view.device}
    restarted.release_view(vid, "snap-view")
    restarted.detach(vid)
    assert not os.path.exists(attached.backing_device)
    assert not (consumer.dev_dir / vid).is_symlink()
    in_netns(rig.a.netns, owner.close_export, vid, "node-b")
    assert owner.exports.list() == []
    owner.delete_volume(vid)


def test_an_nvme_tcp_export_management_no_longer_wants_is_reaped_but_not_a_newer_one(
    rig: Rig, tmp_path: Path
) -> None:
    old, new, key = new_volume(rig), new_volume(rig), secrets.token_hex(32)
    (tmp_path / "pool").mkdir()
    owner = Agent(
        "node-a", {"default": Pool.open("default", tmp_path / "pool")}, tmp_path / "dev",
        state_dir=tmp_path / "state", export_address=rig.a.address, nvme_port=PORT,
    )  # fmt: skip
    req = AgentExportCreate(transport=Transport.NVME_TCP, psk_identity="node-b", psk_key=key)
    for vid in (old, new):
        owner.create_volume(vid, "default", SIZE)
    in_netns(rig.a.netns, owner.export, old, "node-b", req)
    mark = owner.exports.mark()  # a heartbeat is sent; then an attach races it
    in_netns(rig.a.netns, owner.export, new, "node-b", req)
    closed = in_netns(rig.a.netns, owner.reap_exports, set(), mark)
    assert closed == [(old, "node-b")]
    assert [e.volume_id for e in owner.exports.list()] == [new]
    assert not (NVMET / "subsystems" / subsystem_nqn(old, "node-a")).exists()
    in_netns(rig.a.netns, owner.close_export, new, "node-b")
    for vid in (old, new):
        owner.delete_volume(vid)


def _logical_block_size(device: str) -> int:
    name = os.path.basename(os.path.realpath(device))
    return int(Path(f"/sys/class/block/{name}/queue/logical_block_size").read_text())


def test_a_small_ext4_made_over_a_loop_device_mounts_over_nvme_tcp(
    rig: Rig, tmp_path: Path
) -> None:
    """One geometry on every path: the namespace has the loop device's sector size."""
    vid, key = new_volume(rig), secrets.token_hex(32)
    file = rig.a.volume(vid, 32 * MiB)
    loop, _ = loopdev.attach(str(file), readonly=False, direct_io=True)  # as a local attach
    try:
        local_block = _logical_block_size(loop)
        subprocess.run(["mkfs.ext4", "-q", "-b", "1024", loop], check=True, capture_output=True)
    finally:
        loopdev.detach(loop)
    rig.a.export(vid, "node-b", key)
    served = nvmet.Nvmet("node-a", NVMET).subsystem(subsystem_nqn(vid, "node-a"))
    assert served is not None and served.device_path.startswith("/dev/loop")
    rig.b.give_key(vid, key)
    device = rig.b.attach(vid, rig.a)
    assert _logical_block_size(device.path) == local_block
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "ext4", device.path, str(mnt)], check=True, capture_output=True)
    try:
        (mnt / "hello").write_text("over nvme-tcp")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    rig.b.detach(vid)
    rig.a.close(vid, "node-b")
    # the export's loop device goes with the export
    assert [b.path for b in loopdev.bound_devices() if b.backing == str(file)] == []


def _readable_by_nobody(path: Path) -> bool:
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", str(path)],
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def test_dh_hmac_chap_keys_are_root_only_and_the_target_must_prove_it_has_the_key(
    rig: Rig,
) -> None:
    vid, key = new_volume(rig), secrets.token_hex(32)
    rig.a.volume(vid)
    rig.a.export(vid, "node-b", key)
    host = NVMET / "hosts" / host_nqn("node-b", vid)
    rig.b.give_key(vid, key)
    rig.b.attach(vid, rig.a)
    target = nvme_host.Target(
        rig.a.address, PORT, subsystem_nqn(vid, "node-a"), host_nqn("node-b", vid)
    )
    ctrl = Path("/sys/class/nvme") / nvme_host.find_controllers(target)[0].name
    # bidirectional: the consumer was given the controller key too
    assert (ctrl / "dhchap_ctrl_secret").read_text().strip() == dhchap_ctrl_secret(key)
    for secret in (
        ctrl / "dhchap_secret",
        ctrl / "dhchap_ctrl_secret",
        host / "dhchap_key",
        host / "dhchap_ctrl_key",
    ):
        assert not _readable_by_nobody(secret), f"{secret} is readable by nobody"
    rig.b.detach(vid)
    # a target that does not know the controller key is refused by the consumer
    (host / "dhchap_ctrl_key").write_text(dhchap_ctrl_secret(secrets.token_hex(32)))
    with pytest.raises(Unavailable) as err:
        rig.b.attach(vid, rig.a)
    assert key not in str(err.value)
    assert [c for c in nvme_host.all_controllers() if vid in c.subsystem_nqn] == []
    rig.a.close(vid, "node-b")


class _Racing(nvmet.Nvmet):
    """nvmet where another owner sharing the kernel removes the host entry (unused
    yet) between our ensure_host and allow_host, once: what its close does."""

    raced = False

    def allow_host(self, nqn: str, host_nqn: str) -> None:
        if not _Racing.raced:
            _Racing.raced = True
            assert nvmet.Nvmet("node-c", self.root).remove_host_if_unused(host_nqn)
        super().allow_host(nqn, host_nqn)


class _RacedExports(NvmeExports):
    def _target(self) -> nvmet.Nvmet:
        return _Racing(self.owner, nvmet.ensure_loaded(self.configfs))


def test_an_export_whose_host_entry_another_owner_removed_meanwhile_is_made_again(
    rig: Rig,
) -> None:
    vid, key = new_volume(rig), secrets.token_hex(32)
    rig.a.volume(vid)
    racing = _RacedExports(rig.a.exports.directory, "node-a", rig.a.address, PORT)
    req = AgentExportCreate(transport=Transport.NVME_TCP, psk_identity="node-b", psk_key=key)
    in_netns(rig.a.netns, racing.open, vid, "node-b", rig.a.pool / f"{vid}.img", req)
    assert _Racing.raced
    rig.b.give_key(vid, key)
    device = rig.b.attach(vid, rig.a)
    assert blockdev.size_bytes(device.path) == SIZE
    rig.b.detach(vid)
    rig.a.close(vid, "node-b")
