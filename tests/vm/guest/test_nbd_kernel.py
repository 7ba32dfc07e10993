"""The kernel nbd client for real, inside the VM: owner export, local TLS bridge, /dev/nbdN.

The owner is the project's own export code (node_agent/exports.py: nbdkit,
TLS-PSK required, on loopback); the consumer is
node_agent/transports/nbd_kernel.py (an nbdkit bridge on a unix socket,
nbd-client in ioctl mode, the kernel's nbd driver) and the one-leg nbd
transport on top of it (node_agent/transports/nbd.py). Nothing is faked:
a test that passes here read its bytes back through the kernel.

State lives under a short /tmp directory, not pytest's tmp_path: the
bridge's unix socket path must fit in 108 bytes. Every test leaves no
process, file, loop device or connected nbd device behind; the fixture
checks that (and cleans up after a failure).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node_agent import capabilities
from node_agent.exports import Exports
from node_agent.transports.nbd import NbdTransport
from node_agent.transports.nbd_kernel import (
    MIRROR,
    SINGLE,
    KernelNbdClient,
    NbdTimeouts,
)
from tessera.errors import FailedPrecondition, ResourceExhausted, Unavailable
from tessera.ids import new_volume_id
from tessera.models import AgentExportCreate, Connection, Transport
from tessera.system import blockdev, loopdev, mounts, nbd_kernel, processes
from tests.vm.guest.direct_io import read_direct, write_direct

MiB = 1024**2
SIZE = 64 * MiB
OWNER = "node-a"
CONSUMER = "node-b"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the nbd module, block devices"),
    # in the VM a missing piece is a failure of the image, not a reason to skip
    pytest.mark.skipif(
        bool(capabilities.kernel_nbd_missing()) and os.environ.get("TESSERA_VM") != "1",
        reason=f"this host cannot: {', '.join(capabilities.kernel_nbd_missing())}",
    ),
]


@dataclass
class Rig:
    root: Path
    exports: Exports
    volume_id: str
    key: str

    @property
    def volume_file(self) -> Path:
        return self.root / "pool" / f"{self.volume_id}.img"

    @property
    def key_file(self) -> Path:
        """The consumer's copy of the attachment's key (`identity:hex`, 0600)."""
        return self.root / "keys" / f"{self.volume_id}.psk"

    def export(self) -> int:
        req = AgentExportCreate(transport=Transport.NBD, psk_identity=CONSUMER, psk_key=self.key)
        return self.exports.open(self.volume_id, CONSUMER, self.volume_file, req).port

    def owner_pid(self) -> int | None:
        found = processes.matching(
            lambda a: os.path.basename(a[0]) == "nbdkit" and f"file={self.volume_file}" in a
        )
        return found[0] if found else None

    def kill_owner(self) -> None:
        """The owner node dies: its nbdkit is gone at once (SIGKILL), its record stays."""
        pid = self.owner_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: self.owner_pid() is None, "the owner's nbdkit is gone")

    def restart_owner(self) -> None:
        """The owner's agent starts again: it restarts the export on its recorded port."""
        assert self.exports.recover(lambda v: self.volume_file if v == self.volume_id else None)

    def client(self, name: str = "kernel") -> KernelNbdClient:
        """A client object as a (re)started agent has it: nothing in memory."""
        return KernelNbdClient(self.root / "conn" / name)

    def connect(self, client: KernelNbdClient, port: int, timeouts: NbdTimeouts) -> str:
        return client.connect(
            "127.0.0.1",
            port,
            self.key_file,
            CONSUMER,
            readonly=False,
            timeouts=timeouts,
            what=f"volume {self.volume_id}",
        )

    def transport(self) -> NbdTransport:
        """The one-leg nbd transport as a (re)started agent has it: it asks the host which
        client to use, and has nothing in memory."""
        return NbdTransport(self.root / "conn", lambda v: self.key_file)

    def connection(self, port: int) -> Connection:
        return Connection(
            transport=Transport.NBD,
            owner_node=OWNER,
            host="127.0.0.1",
            port=port,
            psk_identity=CONSUMER,
        )


def _ours(root: Path) -> list[str]:
    """What of this test the host still has: processes, connected nbd devices, loops."""
    left = [f"pid {p}" for p in processes.matching(lambda a: any(str(root) in x for x in a))]
    left += [f"loop {b.path}" for b in loopdev.bound_under(root)]
    for device in nbd_kernel.devices():
        pid = nbd_kernel.client_pid(device)
        args = processes.cmdline(pid) if pid is not None else None
        if args and any(str(root) in a for a in args):
            left.append(f"connected {device}")
    left += [f"claim on {d} ({o})" for d, o in nbd_kernel.claims().items() if str(root) in o]
    left += [f"mount {m.mountpoint}" for m in mounts.mount_table() if str(root) in m.mountpoint]
    return left


def _cleanup(root: Path) -> None:
    for m in reversed(mounts.mount_table()):
        if m.mountpoint.startswith(str(root)):
            mounts.unmount(m.mountpoint)
    (root / "pod-dev").unlink(missing_ok=True)  # a pod's device node, unmounted above
    for view in loopdev.bound_devices():
        if view.backing.startswith("/dev/nbd") and _client_under(view.backing, root):
            loopdev.detach(view.path)
    conn = root / "conn"
    for home in conn.iterdir() if conn.is_dir() else []:
        for sub in [home, *(p for p in home.iterdir() if p.is_dir())]:
            client = KernelNbdClient(sub)
            if client.socket.exists() or (sub / "client.log").exists() or client.claimed():
                client.disconnect()
    for device, owner in nbd_kernel.claims().items():
        if str(root) in owner:  # a claim whose home is gone already
            nbd_kernel.detach(device, None)
            nbd_kernel.release_claim(device, owner)
    for pid in processes.matching(lambda a: any(str(root) in x for x in a)):
        processes.terminate(pid, os.path.basename(processes.cmdline(pid)[0]), grace=1)  # type: ignore[index]


def _client_under(device: str, root: Path) -> bool:
    pid = nbd_kernel.client_pid(device)
    args = processes.cmdline(pid) if pid is not None else None
    return bool(args) and any(str(root) in a for a in args)  # type: ignore[union-attr]


@pytest.fixture
def rig() -> Iterator[Rig]:
    root = Path(tempfile.mkdtemp(prefix="nbdk-", dir="/tmp"))
    for sub in ("pool", "keys", "conn"):
        (root / sub).mkdir(mode=0o700)
    volume_id, key = new_volume_id(), secrets.token_hex(32)
    rig = Rig(root, Exports(root / "exports", "127.0.0.1"), volume_id, key)
    with open(rig.volume_file, "wb") as f:
        f.truncate(SIZE)
    rig.key_file.write_text(f"{CONSUMER}:{key}\n")
    rig.key_file.chmod(0o600)
    left: list[str] = []
    try:
        yield rig
        rig.exports.close(volume_id, CONSUMER)  # the owner's nbdkit is the fixture's
        left = _ours(root)
    finally:
        _cleanup(root)
        rig.exports.close(volume_id, CONSUMER)
        shutil.rmtree(root / "exports", ignore_errors=True)
        for sub in ("pool", "keys"):
            shutil.rmtree(root / sub)
        for directory in (root / "conn", root):
            try:
                directory.rmdir()
            except OSError as err:
                left.append(f"{directory}: {err.strerror} ({sorted(os.listdir(directory))})")
    assert left == [], f"left behind: {left}"


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


def kill_client(device: str) -> None:
    """The device's nbd-client dies (SIGKILL): the kernel drops the device's connection."""
    pid = nbd_kernel.clients()[device][0]
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: processes.cmdline(pid) is None and device not in nbd_kernel.clients(),
        f"{device}'s client is gone",
    )


def file_digest(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return hashlib.sha256(f.read(length)).digest()


# ---- the client ----------------------------------------------------------------------------


def test_this_vm_has_the_kernel_nbd_client() -> None:
    assert capabilities.kernel_nbd_missing() == []
    assert capabilities.has_kernel_nbd()


def test_writes_through_the_kernel_nbd_device_land_in_the_owners_file_and_read_back(
    rig: Rig,
) -> None:
    port = rig.export()
    client = rig.client()
    device = rig.connect(client, port, SINGLE)
    assert nbd_kernel.check_device(device) == device
    assert blockdev.size_bytes(device) == SIZE
    name = os.path.basename(device)
    # 512-byte sectors: any filesystem made over loop, nbdfuse or nvme-tcp mounts here
    assert Path(f"/sys/block/{name}/queue/logical_block_size").read_text().strip() == "512"
    assert client.condition() == ""
    # the home and the sockets' directory are private: a bridge socket serves the volume
    # without a key
    assert (client.home.stat().st_mode & 0o777) == 0o700
    assert (client.socket.parent.stat().st_mode & 0o777) == 0o700
    data = secrets.token_bytes(4 * MiB)
    write_direct(device, data, 8 * MiB)
    assert file_digest(rig.volume_file, 8 * MiB, len(data)) == hashlib.sha256(data).digest()
    more = secrets.token_bytes(MiB)
    with open(rig.volume_file, "r+b") as f:
        f.seek(32 * MiB)
        f.write(more)
    assert read_direct(device, 32 * MiB, MiB) == more
    for log in ("bridge.log", "client.log"):
        assert rig.key not in (client.home / log).read_text()
    client.disconnect()


def test_a_restarted_agent_finds_its_device_again_and_connecting_twice_keeps_it(
    rig: Rig,
) -> None:
    port = rig.export()
    other = Path(tempfile.mkdtemp(prefix="x", dir=rig.root / "conn"))  # a neighbour on the host
    device = rig.connect(rig.client(), port, MIRROR)
    pid = nbd_kernel.client_pid(device)
    # a new object (a restarted agent) finds it by the bridge socket in the client's cmdline
    again = rig.client()
    assert again.device() == device and again.condition() == ""
    assert rig.connect(again, port, MIRROR) == device
    assert nbd_kernel.client_pid(device) == pid  # the same client: nothing reconnected
    assert KernelNbdClient(other).device() is None  # another home never finds ours
    other.rmdir()
    again.disconnect()


def test_disconnect_leaves_no_process_socket_file_or_connected_device(rig: Rig) -> None:
    port = rig.export()
    client = rig.client()
    device = rig.connect(client, port, SINGLE)
    client_pid, bridge_pid = nbd_kernel.client_pid(device), client.bridge_pid()
    assert client_pid is not None and bridge_pid is not None
    rig.client().disconnect()  # a restarted agent disconnects what it did not connect
    assert not client.home.exists()
    assert processes.cmdline(client_pid) is None and processes.cmdline(bridge_pid) is None
    assert nbd_kernel.client_pid(device) is None and nbd_kernel.size_bytes(device) == 0
    assert client.device() is None
    rig.client().disconnect()  # nothing there is fine


def test_a_wrong_key_is_refused_without_echoing_it_and_leaves_nothing(rig: Rig) -> None:
    port = rig.export()
    wrong = secrets.token_hex(32)
    rig.key_file.write_text(f"{CONSUMER}:{wrong}\n")
    client = rig.client()
    with pytest.raises(Unavailable) as err:
        rig.connect(client, port, MIRROR)
    assert f"127.0.0.1:{port}" in str(err.value) and rig.volume_id in str(err.value)
    assert wrong not in str(err.value) and rig.key not in str(err.value)
    assert not client.home.exists() and client.device() is None


def test_a_mirror_legs_reads_fail_within_seconds_once_its_owner_is_killed(rig: Rig) -> None:
    port = rig.export()
    client = rig.client()
    device = rig.connect(client, port, MIRROR)
    assert len(read_direct(device, 0, 4096)) == 4096
    rig.kill_owner()
    started = time.monotonic()
    with pytest.raises(OSError) as err:
        read_direct(device, 16 * MiB, 4096)
    took = time.monotonic() - started
    assert err.value.errno == errno.EIO
    # md sees the failed leg at once: the bridge answers with errors, nothing waits 30 s
    assert took < 10, f"the read failed only after {took:.1f} s"
    client.disconnect()


def test_a_volume_whose_owner_restarted_fails_with_eio_and_never_silently_reconnects(
    rig: Rig,
) -> None:
    """The owner crashed and lost what it had not flushed: a bridge that reconnected would
    let the consumer's next FLUSH succeed and its filesystem commit lost data."""
    port = rig.export()
    client = rig.client()
    device = rig.connect(client, port, SINGLE)
    write_direct(device, secrets.token_bytes(MiB), 0)
    pid = nbd_kernel.client_pid(device)
    assert client.condition() == ""
    rig.kill_owner()
    rig.restart_owner()  # the owner is back, serving the export on the same port
    # the stats say so, though the owner answers on its port again
    wait_for(lambda: "lost the connection to the owner" in client.condition(), "the condition")
    data = secrets.token_bytes(MiB)
    for attempt in (lambda: write_direct(device, data, 8 * MiB),
                    lambda: read_direct(device, 16 * MiB, MiB)):  # fmt: skip
        with pytest.raises(OSError) as err:
            attempt()
        assert err.value.errno == errno.EIO
    assert file_digest(rig.volume_file, 8 * MiB, MiB) != hashlib.sha256(data).digest()
    assert nbd_kernel.client_pid(device) == pid  # the same connection: nothing reconnected
    client.disconnect()


def test_a_device_whose_client_died_is_not_given_to_another_volume(rig: Rig) -> None:
    """A pod's block device is a bind mount of /dev/nbdN, which does not hold it open: once
    its client dies the kernel frees the device, yet the pod can still write to it."""
    port = rig.export()
    client = rig.client()
    device = rig.connect(client, port, SINGLE)
    pod_node = rig.root / "pod-dev"
    pod_node.touch()
    mounts.bind_mount(device, str(pod_node), False)
    kill_client(device)
    # nothing holds it open: the kernel frees it, it looks like any unused device
    wait_for(lambda: nbd_kernel.client_pid(device) is None, f"the kernel freed {device}")
    assert nbd_kernel.size_bytes(device) == 0
    assert client.device() is None and client.claimed() == device
    assert "its kernel nbd client exited" in client.condition()
    # another volume gets another device, while the dead one is still held...
    other = rig.client("other")
    second = rig.connect(other, port, SINGLE)
    assert second != device
    # ...and connecting the same home again refuses to reconnect under the pod
    with pytest.raises(FailedPrecondition) as err:
        rig.connect(client, port, SINGLE)
    assert device in str(err.value) and str(pod_node) in str(err.value)
    other.disconnect()
    mounts.unmount(str(pod_node))
    client.disconnect()  # detaches the dead device and only then drops its claim
    assert client.claimed() is None and nbd_kernel.claims().get(device) is None
    assert not client.home.exists()


def test_a_failed_connect_of_any_kind_leaves_no_bridge_claim_or_state(rig: Rig) -> None:
    port = rig.export()
    taken = []
    try:
        # every device claimed (by another agent sharing the kernel): nothing to connect
        while True:
            try:
                taken.append(nbd_kernel.claim_device(f"{rig.root}/elsewhere"))
            except ResourceExhausted:
                break
        client = rig.client()
        with pytest.raises(ResourceExhausted) as err:
            rig.connect(client, port, SINGLE)
        assert "nbds_max" in str(err.value)
        assert not client.home.exists() and client.bridge_pid() is None
        assert not client.socket.exists() and client.claimed() is None
        assert not processes.matching(lambda a: str(client.socket) in a)
    finally:
        for device in taken:
            nbd_kernel.release_claim(device, f"{rig.root}/elsewhere")


def test_an_owner_that_never_answers_does_not_stall_other_attaches(rig: Rig) -> None:
    """The device is claimed briefly; the TLS handshake runs without the claims' lock, so
    one unreachable leg does not hold up every other attach on the node for minutes."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts TCP, never speaks TLS
    out: dict[str, BaseException] = {}
    client = rig.client()

    def connect() -> None:
        try:
            rig.connect(client, silent.getsockname()[1], SINGLE)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            out["error"] = exc

    pending = threading.Thread(target=connect)
    pending.start()
    try:
        wait_for(lambda: client.claimed() is not None, "the pending connect claimed a device")
        other = threading.Thread(
            target=lambda: nbd_kernel.release_claim(
                nbd_kernel.claim_device(f"{rig.root}/else"), f"{rig.root}/else"
            )
        )
        other.start()
        other.join(timeout=20)
        assert not other.is_alive(), "claiming a device waited for another's handshake"
    finally:
        silent.close()  # the handshake fails now
        pending.join(timeout=60)
    assert isinstance(out.get("error"), Unavailable), out
    assert not client.home.exists() and client.claimed() is None


# ---- the one-leg nbd transport on it --------------------------------------------------------


def test_a_remote_volume_attaches_over_the_kernel_client_with_views_and_survives_a_restart(
    rig: Rig,
) -> None:
    port = rig.export()

    nbd = rig.transport()
    connection = rig.connection(port)
    primary = nbd.connect(rig.volume_id, connection, False)
    assert primary.path.startswith("/dev/nbd") and nbd.size_bytes(primary) == SIZE
    assert nbd.uses_kernel() and not (rig.root / "conn" / rig.volume_id / "fuse").exists()
    data = secrets.token_bytes(MiB)
    write_direct(primary.path, data, 4 * MiB)
    view = nbd.add_view(primary, "pod-1")
    assert view.path.startswith("/dev/loop") and view.readonly
    assert read_direct(view.path, 4 * MiB, MiB) == data
    # the agent restarts: both devices are found again, and what they came from
    again = rig.transport()
    found = {(d.path, d.view_key, d.volume_id) for d in again.devices()}
    assert found == {(primary.path, "", rig.volume_id), (view.path, "pod-1", rig.volume_id)}
    assert again.connection_of(primary) == connection and again.is_current(primary, connection)
    assert again.condition(primary, probe=True) == ""
    assert again.connect(rig.volume_id, connection, False).path == primary.path
    # growing needs a reconnect: refused while the view is there, done once it is gone
    with open(rig.volume_file, "r+b") as f:
        f.truncate(2 * SIZE)
    with pytest.raises(FailedPrecondition) as err:
        again.extend(primary, 2 * SIZE)
    assert "kernel nbd client" in str(err.value) and view.path in str(err.value)
    again.release(view)
    again.extend(primary, 2 * SIZE)
    grown = next(d for d in again.devices() if not d.view_key)
    assert again.size_bytes(grown) == 2 * SIZE
    assert read_direct(grown.path, 4 * MiB, MiB) == data
    again.release(grown)
    again.disconnect(rig.volume_id)
    assert again.devices() == [] and not (rig.root / "conn" / rig.volume_id).exists()


def test_a_remote_volume_whose_kernel_client_died_is_still_listed_and_detached_only_when_free(
    rig: Rig,
) -> None:
    port = rig.export()

    nbd = rig.transport()
    primary = nbd.connect(rig.volume_id, rig.connection(port), False)
    view = nbd.add_view(primary, "pod-1")
    pod_node = rig.root / "pod-dev"
    pod_node.touch()
    mounts.bind_mount(primary.path, str(pod_node), False)
    kill_client(primary.path)
    # a restarted agent still has both: the dead primary by its claim, the view on it
    again = rig.transport()
    found = {(d.path, d.view_key, d.volume_id) for d in again.devices()}
    assert found == {(primary.path, "", rig.volume_id), (view.path, "pod-1", rig.volume_id)}
    dead = next(d for d in again.devices() if not d.view_key)
    assert "its kernel nbd client exited" in again.condition(dead)
    with pytest.raises(FailedPrecondition) as err:
        again.disconnect(rig.volume_id)  # the pod and the view still have it
    assert str(pod_node) in str(err.value)
    again.release(next(d for d in again.devices() if d.view_key))
    mounts.unmount(str(pod_node))
    again.release(dead)
    assert again.devices() == [] and primary.path not in nbd_kernel.claims()
    again.disconnect(rig.volume_id)
    assert not (rig.root / "conn" / rig.volume_id).exists()
