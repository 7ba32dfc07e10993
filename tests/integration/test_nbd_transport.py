"""The nbd transport on real parts: an nbdkit TLS-PSK export, nbdfuse, a loop device.

The export here is started by hand, as the owner node's agent would
(tests/integration/test_exports.py covers the owner side); this file is
about the consumer: connect, re-adopt after a restart, report a dead
connection, grow, and leave nothing behind.
"""

from __future__ import annotations

import mmap
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node_agent.attachments import AttachmentManager
from node_agent.transports.nbd import NbdTransport
from tessera.errors import FailedPrecondition, Unavailable
from tessera.models import Connection, Transport
from tessera.system import loopdev, mounts, processes
from tests.conftest import needs_root

pytestmark = [
    needs_root,
    pytest.mark.root,
    pytest.mark.skipif(
        not (shutil.which("nbdkit") and shutil.which("nbdfuse")), reason="needs nbdkit and nbdfuse"
    ),
]
MiB = 1024**2
VOLUME = "vol-0123456789abcdef"
KEY = "5e" * 32


@dataclass
class Export:
    """An owner's export of one volume file, as its agent runs it."""

    volume_file: Path
    psk_file: Path
    pid_file: Path
    port: int

    def start(self) -> None:
        subprocess.run(
            [
                "nbdkit", "--pidfile", str(self.pid_file), "-i", "127.0.0.1",
                "-p", str(self.port), "--tls=require", f"--tls-psk={self.psk_file}",
                "file", str(self.volume_file),
            ],
            check=True, timeout=30,
        )  # fmt: skip

    def kill(self) -> None:
        pid = processes.read_pid(self.pid_file)
        if pid is not None:
            processes.terminate(pid, "nbdkit", grace=0)

    def connection(self) -> Connection:
        return Connection(
            transport=Transport.NBD,
            owner_node="n1",
            host="127.0.0.1",
            port=self.port,
            psk_identity="n2",
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path: Path) -> Iterator[None]:
    """Torn down last: after the export and the transport fixtures."""
    yield
    assert_nothing_left(tmp_path)


@pytest.fixture
def export(tmp_path: Path) -> Iterator[Export]:
    volume_file = tmp_path / "owner" / f"{VOLUME}.img"
    volume_file.parent.mkdir()
    with open(volume_file, "xb") as f:
        f.truncate(32 * MiB)
    psk = tmp_path / "owner" / "export.psk"
    psk.write_text(f"n2:{KEY}\n")
    psk.chmod(0o600)
    export = Export(volume_file, psk, tmp_path / "owner" / "nbdkit.pid", free_port())
    export.start()
    try:
        yield export
    finally:
        export.kill()


@pytest.fixture
def transport(tmp_path: Path) -> Iterator[NbdTransport]:
    keys = tmp_path / "consumer" / "keys"
    keys.mkdir(parents=True)
    (keys / f"{VOLUME}.psk").write_text(f"n2:{KEY}\n")
    nbd = NbdTransport(tmp_path / "consumer" / "connections", lambda v: keys / f"{v}.psk")
    try:
        yield nbd
    finally:
        for device in nbd.devices():
            nbd.release(device)
        for volume_id in nbd.connections():
            nbd.disconnect(volume_id)


def assert_nothing_left(root: Path) -> None:
    assert loopdev.bound_under(root) == []
    assert mounts.mounts_under(root) == []
    leftover = processes.matching(lambda args: str(root) in " ".join(args))
    assert leftover == [], "processes left behind"


def write_block(device: str, data: bytes, offset: int = 0) -> None:
    buf = mmap.mmap(-1, 4096)
    buf.write(data.ljust(4096, b"\0"))
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    try:
        os.pwrite(fd, buf, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path, n: int, offset: int = 0) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def test_writes_on_the_consumer_land_in_the_owners_volume_file(
    export: Export, transport: NbdTransport
) -> None:
    device = transport.connect(VOLUME, export.connection(), readonly=False)
    assert device.transport == "nbd" and device.volume_id == VOLUME
    assert transport.size_bytes(device) == 32 * MiB
    write_block(device.path, b"across the network", 8192)
    assert read_file(export.volume_file, 18, 8192) == b"across the network"
    assert transport.condition(device) == ""


def test_a_restarted_agent_finds_the_connection_and_what_it_came_from(
    export: Export, transport: NbdTransport, tmp_path: Path
) -> None:
    device = transport.connect(VOLUME, export.connection(), readonly=False)
    restarted = NbdTransport(transport.dir, transport.key_path)  # nothing in memory
    assert restarted.devices() == [device]
    assert restarted.connection_of(device) == export.connection()
    assert list(restarted.connections()) == [VOLUME]
    write_block(device.path, b"still serving")  # the client outlived the "agent"
    assert read_file(export.volume_file, 13) == b"still serving"


def test_a_wrong_key_cannot_connect_and_leaves_nothing_behind(
    export: Export, transport: NbdTransport, tmp_path: Path
) -> None:
    transport.key_path(VOLUME).write_text(f"n2:{'00' * 32}\n")
    with pytest.raises(Unavailable) as err:
        transport.connect(VOLUME, export.connection(), readonly=False)
    assert "n1" in err.value.message and "00" * 32 not in err.value.message
    assert transport.devices() == []
    assert mounts.mounts_under(tmp_path) == []


def test_connecting_without_a_key_says_to_publish_again(
    export: Export, transport: NbdTransport
) -> None:
    transport.key_path(VOLUME).unlink()
    with pytest.raises(FailedPrecondition, match="publish"):
        transport.connect(VOLUME, export.connection(), readonly=False)


def test_a_closed_export_shows_as_an_abnormal_condition_naming_the_owner(
    export: Export, transport: NbdTransport
) -> None:
    device = transport.connect(VOLUME, export.connection(), readonly=False)
    export.kill()  # what revocation does on the owner
    with pytest.raises(OSError):
        write_block(device.path, b"after the fence")
    condition = transport.condition(device, probe=True)
    assert "n1" in condition and str(export.port) in condition


def test_disconnect_tears_down_every_layer(export: Export, transport: NbdTransport) -> None:
    device = transport.connect(VOLUME, export.connection(), readonly=False)
    transport.release(device)
    transport.disconnect(VOLUME)
    transport.disconnect(VOLUME)  # again: nothing left is fine
    assert transport.devices() == [] and transport.connections() == {}
    assert not (transport.dir / VOLUME).exists()


def test_growing_reconnects_an_idle_device_and_refuses_a_held_one(
    export: Export, transport: NbdTransport
) -> None:
    device = transport.connect(VOLUME, export.connection(), readonly=False)
    os.truncate(export.volume_file, 48 * MiB)
    transport.extend(device)  # a plain re-stage never reconnects
    assert transport.devices() == [device] and transport.size_bytes(device) == 32 * MiB
    held = os.open(device.path, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(FailedPrecondition, match="unstaged and staged again"):
            transport.extend(device, 48 * MiB)
    finally:
        os.close(held)
    transport.extend(device, 48 * MiB)
    (grown,) = transport.devices()
    assert transport.size_bytes(grown) == 48 * MiB


def test_a_read_only_connection_refuses_writes(export: Export, transport: NbdTransport) -> None:
    device = transport.connect(VOLUME, export.connection(), readonly=True)
    assert device.readonly
    with pytest.raises(OSError):
        write_block(device.path, b"no")


def test_a_new_publish_replaces_the_client_of_an_older_one(
    export: Export, transport: NbdTransport, tmp_path: Path
) -> None:
    """Re-published to this node (the owner exported anew on another port): a client
    left from the old publish (a crash after its loop device went) is never reused."""
    transport.release(transport.connect(VOLUME, export.connection(), readonly=False))
    stale = processes.read_pid(transport.dir / VOLUME / "nbdfuse.pid")
    assert stale is not None and processes.cmdline(stale)
    again = Export(export.volume_file, export.psk_file, tmp_path / "owner" / "2.pid", free_port())
    again.start()
    try:
        device = transport.connect(VOLUME, again.connection(), readonly=False)
        assert transport.connection_of(device) == again.connection()
        assert not processes.cmdline(stale), "the old publish's client still runs"
        write_block(device.path, b"new publish")
        assert read_file(export.volume_file, 11) == b"new publish"
        transport.release(device)
        transport.disconnect(VOLUME)
    finally:
        again.kill()


def test_staging_a_remote_volume_again_reuses_its_connection_and_views_work(
    export: Export, transport: NbdTransport, tmp_path: Path
) -> None:
    """kubelet stages again after it restarts: same device, same client, no reconnect."""
    manager = AttachmentManager({}, tmp_path / "dev", {"nbd": transport})
    first = manager.attach(VOLUME, False, export.connection())
    client = processes.read_pid(transport.dir / VOLUME / "nbdfuse.pid")
    held = os.open(first.backing_device, os.O_RDONLY | os.O_EXCL)  # mounted, say
    try:
        again = manager.attach(VOLUME, False, export.connection())
        assert again.backing_device == first.backing_device
        assert processes.read_pid(transport.dir / VOLUME / "nbdfuse.pid") == client
        view = manager.attach_view(VOLUME, "pod-a")
        assert manager.get(VOLUME).views == {"pod-a": view.device}
        manager.release_view(VOLUME, "pod-a")
    finally:
        os.close(held)
    manager.detach(VOLUME)
    assert transport.devices() == [] and not (transport.dir / VOLUME).exists()


def test_a_device_of_an_older_publish_in_use_is_refused_never_reused(
    export: Export, transport: NbdTransport, tmp_path: Path
) -> None:
    """Unpublished (or fenced) and published here again, maybe on the same port, with a
    new key: the old device reaches a closed export, so a stage must not take it."""
    manager = AttachmentManager({}, tmp_path / "dev", {"nbd": transport})
    attached = manager.attach(VOLUME, False, export.connection())
    (device,) = transport.devices()
    assert transport.is_current(device, export.connection())
    other_port = export.connection().model_copy(update={"port": free_port()})
    assert not transport.is_current(device, other_port)
    transport.key_path(VOLUME).write_text(f"n2:{'7a' * 32}\n")  # the new publish's key
    assert not transport.is_current(device, export.connection())
    held = os.open(attached.backing_device, os.O_RDONLY | os.O_EXCL)
    try:
        with pytest.raises(FailedPrecondition, match="older publish"):
            manager.attach(VOLUME, False, export.connection())
    finally:
        os.close(held)
    assert transport.devices() == [device], "the device in use stays"
    manager.detach(VOLUME)


def test_growing_a_remote_volume_with_a_read_only_view_keeps_every_device(
    export: Export, transport: NbdTransport, tmp_path: Path
) -> None:
    """A view sits on the same NBD client: a reconnect would pull it from under its pod."""
    manager = AttachmentManager({}, tmp_path / "dev", {"nbd": transport})
    attached = manager.attach(VOLUME, False, export.connection())
    view = manager.attach_view(VOLUME, "pod-ro")
    os.truncate(export.volume_file, 48 * MiB)
    with pytest.raises(FailedPrecondition, match=view.device):
        manager.attach(VOLUME, False, export.connection(), min_size_bytes=48 * MiB)
    assert manager.get(VOLUME).backing_device == attached.backing_device
    assert manager.get(VOLUME).views == {"pod-ro": view.device}
    manager.release_view(VOLUME, "pod-ro")
    grown = manager.attach(VOLUME, False, export.connection(), min_size_bytes=48 * MiB)
    assert grown.size_bytes == 48 * MiB
    manager.detach(VOLUME)
