"""What the sanity tests share: capabilities, the system probes, data checks
and `Csi`, a per-test facade that remembers everything a test created so
the fixture can tear it down in the right order even when the test failed.

Kept free of pytest fixtures (those live in conftest.py) so it reads as a
small CSI client: this is what kubelet and the sidecars would send.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

try:
    from csi_driver._gen import csi_pb2, csi_pb2_grpc
except ImportError as exc:  # pragma: no cover - only when the package is not built
    raise ImportError(
        "the CSI stubs are missing: run `pip install -e .` (it generates "
        "csi_driver/_gen from proto/csi.proto)"
    ) from exc

DRIVER_NAME = "csi.tessera.io"
TOPOLOGY_KEY = "topology.tessera.io/node"
NODE_ID = "sanity-node"
SECOND_NODE_ID = "sanity-node-2"
MAX_VOLUMES_PER_NODE = 8
POOL_SIZE = 4 * 1024**3

MiB = 1024**2
GiB = 1024**3
#: big enough for ext4 and the block tests; mkfs.xfs refuses anything under 300 MiB
SMALL = 128 * MiB
XFS_MIN = 512 * MiB
PAYLOAD = 4 * MiB

#: mkfs, mount and resize of a fresh volume on a slow CI box
RPC_TIMEOUT = 180.0

Mode = csi_pb2.VolumeCapability.AccessMode.Mode
ControllerCap = csi_pb2.ControllerServiceCapability.RPC.Type
NodeCap = csi_pb2.NodeServiceCapability.RPC.Type
PluginCap = csi_pb2.PluginCapability.Service.Type
Code = grpc.StatusCode


# ---- volume kinds and capabilities -------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """How a test uses a volume: a filesystem (ext4, xfs) or a raw block device."""

    name: str  # "ext4" | "xfs" | "block"

    def __str__(self) -> str:
        return self.name

    @property
    def is_block(self) -> bool:
        return self.name == "block"

    @property
    def access_type(self) -> str:
        return "block" if self.is_block else "mount"

    @property
    def size(self) -> int:
        return XFS_MIN if self.name == "xfs" else SMALL

    def cap(
        self, mode: str = "SINGLE_NODE_WRITER", flags: Iterable[str] = ()
    ) -> csi_pb2.VolumeCapability:
        if self.is_block:
            return block_cap(mode)
        return mount_cap(self.name, mode, flags)


def access_mode(mode: str) -> csi_pb2.VolumeCapability.AccessMode:
    return csi_pb2.VolumeCapability.AccessMode(mode=Mode.Value(mode))


def mount_cap(
    fs_type: str = "ext4", mode: str = "SINGLE_NODE_WRITER", flags: Iterable[str] = ()
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=access_mode(mode),
    )


def block_cap(mode: str = "SINGLE_NODE_WRITER") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(), access_mode=access_mode(mode)
    )


def capacity(required: int = 0, limit: int = 0) -> csi_pb2.CapacityRange:
    return csi_pb2.CapacityRange(required_bytes=required, limit_bytes=limit)


def node_topology(node_id: str = NODE_ID) -> csi_pb2.Topology:
    return csi_pb2.Topology(segments={TOPOLOGY_KEY: node_id})


def unique_name(tag: str = "vol") -> str:
    """A CO-style volume name (external-provisioner sends pvc-<uuid>)."""
    return f"sanity-{tag}-{uuid.uuid4().hex[:12]}"


# ---- error checks ------------------------------------------------------------------


def call_error(call: Callable[[], Any]) -> grpc.RpcError:
    """Run `call`, which must fail with a gRPC error; return the error."""
    try:
        reply = call()
    except grpc.RpcError as err:
        return err
    raise AssertionError(f"expected the call to fail, it answered OK: {reply!r}")


def assert_code(err: grpc.RpcError, codes: Code | Iterable[Code], *mentions: str) -> None:
    """The error has one of `codes`, and its message names each of `mentions`."""
    allowed = (codes,) if isinstance(codes, Code) else tuple(codes)
    details = err.details() or ""
    assert err.code() in allowed, (
        f"expected {' or '.join(c.name for c in allowed)}, got {err.code().name}: {details!r}"
    )
    for word in mentions:
        assert word.lower() in details.lower(), (
            f"the {err.code().name} message should name {word!r} so a user knows what to fix; "
            f"it says {details!r}"
        )


# ---- the machine: mounts, loop devices, block devices --------------------------------


def _unescape(field_: str) -> str:
    return (
        field_.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
        .replace("\\134", "\\")
    )  # fmt: skip


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fstype: str
    source: str
    options: frozenset[str]  # per-mount and superblock options together

    @property
    def read_only(self) -> bool:
        return "ro" in self.options


def mounts() -> list[Mount]:
    rows = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            parts = left.split()
            rparts = right.split()
            opts = set(parts[5].split(","))
            if len(rparts) >= 3:
                opts |= set(rparts[2].split(","))
            rows.append(
                Mount(
                    mount_point=_unescape(parts[4]),
                    fstype=rparts[0] if rparts else "",
                    source=_unescape(rparts[1]) if len(rparts) > 1 else "",
                    options=frozenset(opts),
                )
            )
    return rows


def mounts_at(path: Path | str) -> list[Mount]:
    where = os.path.realpath(path)
    return [m for m in mounts() if m.mount_point == where]


def mounts_under(root: Path | str) -> list[Mount]:
    base = os.path.realpath(root)
    return [m for m in mounts() if m.mount_point == base or m.mount_point.startswith(base + os.sep)]


def loop_devices_backed_by(root: Path | str) -> list[tuple[str, str]]:
    """(loop device, backing file) for every loop device backed by a file under root."""
    res = subprocess.run(
        ["losetup", "--json", "--list"], capture_output=True, text=True, timeout=30, check=True
    )
    if not res.stdout.strip():
        return []
    base = os.path.realpath(root)
    found = []
    for dev in json.loads(res.stdout).get("loopdevices", []):
        back = (dev.get("back-file") or "").removesuffix(" (deleted)")
        if back == base or back.startswith(base + os.sep):
            found.append((dev.get("name", "?"), back))
    return found


def block_device_size(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def is_block_device(path: Path) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


def filesystem_size(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


def blkid_type(device: Path | str) -> str:
    res = subprocess.run(
        ["blkid", "-p", "-o", "value", "-s", "TYPE", str(device)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return res.stdout.strip()


# ---- data ---------------------------------------------------------------------------


CAP_SYS_RESOURCE = 24


def can_grow_ext4_online() -> bool:
    """Online ext4 growth (EXT4_IOC_RESIZE_FS) needs CAP_SYS_RESOURCE.

    Some sandboxes drop it even for root; the plugin answers a clear error
    there, and the growth test has nothing to check.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_SYS_RESOURCE & 1)
    return False


def payload(size: int = PAYLOAD) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, hashlib.sha256(data).hexdigest()


def write_data(kind: Kind, target: Path, data: bytes, name: str = "payload.bin") -> None:
    """Write data the way a pod would, and make it durable."""
    if kind.is_block:
        fd = os.open(target, os.O_WRONLY)
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    path = target / name
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    dfd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def read_digest(kind: Kind, target: Path, size: int = PAYLOAD, name: str = "payload.bin") -> str:
    if kind.is_block:
        fd = os.open(target, os.O_RDONLY)
        try:
            data = os.pread(fd, size, 0)
        finally:
            os.close(fd)
    else:
        data = (target / name).read_bytes()
    return hashlib.sha256(data).hexdigest()


READ_ONLY_ERRNOS = {errno.EROFS, errno.EPERM, errno.EACCES}


def write_error(kind: Kind, target: Path) -> int | None:
    """Try to write through a published volume; return the errno, or None if it worked."""
    try:
        if kind.is_block:
            fd = os.open(target, os.O_WRONLY)
            try:
                os.pwrite(fd, b"x" * 4096, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            with open(target / "must-not-exist", "wb") as f:
                f.write(b"x")
    except OSError as exc:
        return exc.errno
    return None


# ---- the per-test facade -----------------------------------------------------------


@dataclass
class Published:
    """A volume made usable on the node: what a pod sees at `target`."""

    volume: csi_pb2.Volume
    kind: Kind
    cap: csi_pb2.VolumeCapability
    staging: Path
    target: Path
    publish_context: dict[str, str]
    node_id: str = NODE_ID

    @property
    def volume_id(self) -> str:
        return self.volume.volume_id


@dataclass
class Stack:
    """The running `tessera dev up`: what stack.json says, plus an open channel."""

    info: dict[str, str]
    channel: grpc.Channel
    identity: csi_pb2_grpc.IdentityStub = field(init=False)
    controller: csi_pb2_grpc.ControllerStub = field(init=False)
    node: csi_pb2_grpc.NodeStub = field(init=False)
    group_controller: csi_pb2_grpc.GroupControllerStub = field(init=False)
    snapshot_metadata: csi_pb2_grpc.SnapshotMetadataStub = field(init=False)

    def __post_init__(self) -> None:
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)
        self.group_controller = csi_pb2_grpc.GroupControllerStub(self.channel)
        self.snapshot_metadata = csi_pb2_grpc.SnapshotMetadataStub(self.channel)

    @property
    def state_dir(self) -> Path:
        return Path(self.info["state_dir"])

    @property
    def node_id(self) -> str:
        return self.info["node_id"]

    @property
    def token(self) -> str:
        return Path(self.info["token_file"]).read_text().strip()


class Csi:
    """One test's view of the plugin.

    Every resource made through it is remembered; `cleanup()` undoes them
    newest first (NodeUnpublish, NodeUnstage, ControllerUnpublish, Delete),
    whether or not the test got to do it itself.
    """

    def __init__(self, stack: Stack, workdir: Path) -> None:
        self.stack = stack
        self.identity = stack.identity
        self.controller = stack.controller
        self.node = stack.node
        self.node_id = stack.node_id
        self.workdir = workdir
        self._undo: dict[tuple[str, ...], Callable[[], Any]] = {}
        self._deleted: list[str] = []
        self._counter = 0

    # -- paths the CO would choose

    def path(self, prefix: str) -> Path:
        """A fresh path whose parent exists; nothing is created at the path itself."""
        self._counter += 1
        return self.workdir / f"{prefix}-{self._counter}"

    def staging_dir(self) -> Path:
        """The CO creates the staging directory (CSI spec, NodeStageVolume)."""
        p = self.path("staging")
        p.mkdir()
        return p

    # -- controller

    def create_volume(
        self,
        kind: Kind | None = None,
        *,
        name: str | None = None,
        size: int | None = None,
        caps: list[csi_pb2.VolumeCapability] | None = None,
        mode: str = "SINGLE_NODE_WRITER",
        parameters: dict[str, str] | None = None,
        **extra: Any,
    ) -> csi_pb2.Volume:
        kind = kind or Kind("ext4")
        req = csi_pb2.CreateVolumeRequest(
            name=name or unique_name(kind.name),
            capacity_range=capacity(size or kind.size),
            volume_capabilities=caps or [kind.cap(mode)],
            parameters=parameters or {},
            **extra,
        )
        return self.create(req).volume

    def create(self, req: csi_pb2.CreateVolumeRequest) -> csi_pb2.CreateVolumeResponse:
        reply = self.controller.CreateVolume(req, timeout=RPC_TIMEOUT)
        self._remember_volume(reply.volume.volume_id)
        return reply

    def _remember_volume(self, volume_id: str) -> None:
        if volume_id:
            self._undo.setdefault(("volume", volume_id), lambda: self._delete(volume_id))

    def _delete(self, volume_id: str) -> None:
        self.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=RPC_TIMEOUT
        )
        self._deleted.append(volume_id)

    def delete_volume(self, volume_id: str) -> csi_pb2.DeleteVolumeResponse:
        reply = self.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=RPC_TIMEOUT
        )
        self._undo.pop(("volume", volume_id), None)
        self._deleted.append(volume_id)
        return reply

    def controller_publish(
        self,
        volume_id: str,
        cap: csi_pb2.VolumeCapability,
        *,
        node_id: str | None = None,
        readonly: bool = False,
        volume_context: dict[str, str] | None = None,
    ) -> dict[str, str]:
        node_id = node_id or self.node_id
        # Remember first: a publish that timed out may still have happened.
        self._undo.setdefault(
            ("cpublish", volume_id, node_id),
            lambda: self._controller_unpublish(volume_id, node_id),
        )
        reply = self.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=volume_id,
                node_id=node_id,
                volume_capability=cap,
                readonly=readonly,
                volume_context=volume_context or {},
            ),
            timeout=RPC_TIMEOUT,
        )
        return dict(reply.publish_context)

    def _controller_unpublish(self, volume_id: str, node_id: str) -> None:
        self.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id),
            timeout=RPC_TIMEOUT,
        )

    def controller_unpublish(self, volume_id: str, node_id: str | None = None) -> None:
        node_id = node_id or self.node_id
        self._controller_unpublish(volume_id, node_id)
        self._undo.pop(("cpublish", volume_id, node_id), None)

    # -- node

    def stage(
        self,
        volume: csi_pb2.Volume,
        cap: csi_pb2.VolumeCapability,
        publish_context: dict[str, str],
        staging: Path | None = None,
    ) -> Path:
        staging = staging or self.staging_dir()
        self._undo.setdefault(
            ("stage", volume.volume_id, str(staging)),
            lambda: self._unstage(volume.volume_id, staging),
        )
        self.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume.volume_id,
                publish_context=publish_context,
                staging_target_path=str(staging),
                volume_capability=cap,
                volume_context=dict(volume.volume_context),
            ),
            timeout=RPC_TIMEOUT,
        )
        return staging

    def _unstage(self, volume_id: str, staging: Path) -> None:
        self.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=volume_id, staging_target_path=str(staging)),
            timeout=RPC_TIMEOUT,
        )

    def unstage(self, volume_id: str, staging: Path) -> None:
        self._unstage(volume_id, staging)
        self._undo.pop(("stage", volume_id, str(staging)), None)

    def node_publish(
        self,
        volume: csi_pb2.Volume,
        cap: csi_pb2.VolumeCapability,
        publish_context: dict[str, str],
        staging: Path,
        target: Path | None = None,
        *,
        readonly: bool = False,
    ) -> Path:
        target = target or self.path("target")
        self._undo.setdefault(
            ("publish", volume.volume_id, str(target)),
            lambda: self._unpublish(volume.volume_id, target),
        )
        self.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume.volume_id,
                publish_context=publish_context,
                staging_target_path=str(staging),
                target_path=str(target),
                volume_capability=cap,
                readonly=readonly,
                volume_context=dict(volume.volume_context),
            ),
            timeout=RPC_TIMEOUT,
        )
        return target

    def _unpublish(self, volume_id: str, target: Path) -> None:
        self.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)),
            timeout=RPC_TIMEOUT,
        )

    def unpublish(self, volume_id: str, target: Path) -> None:
        self._unpublish(volume_id, target)
        self._undo.pop(("publish", volume_id, str(target)), None)

    # -- the whole path, as kubelet and the attacher drive it

    def publish_all(
        self,
        volume: csi_pb2.Volume,
        kind: Kind,
        mode: str = "SINGLE_NODE_WRITER",
        *,
        readonly: bool = False,
        flags: Iterable[str] = (),
        cap: csi_pb2.VolumeCapability | None = None,
    ) -> Published:
        """ControllerPublish → NodeStage → NodePublish."""
        cap = cap or (kind.cap(mode, flags) if flags else kind.cap(mode))
        ctx = self.controller_publish(volume.volume_id, cap, readonly=readonly)
        staging = self.stage(volume, cap, ctx)
        target = self.node_publish(volume, cap, ctx, staging, readonly=readonly)
        return Published(volume, kind, cap, staging, target, ctx, self.node_id)

    def unpublish_all(self, pub: Published) -> None:
        """NodeUnpublish → NodeUnstage → ControllerUnpublish."""
        self.unpublish(pub.volume_id, pub.target)
        self.unstage(pub.volume_id, pub.staging)
        self.controller_unpublish(pub.volume_id, pub.node_id)

    def provision(
        self, kind: Kind, mode: str = "SINGLE_NODE_WRITER", **kwargs: Any
    ) -> tuple[csi_pb2.Volume, Published]:
        volume = self.create_volume(kind, mode=mode)
        return volume, self.publish_all(volume, kind, mode, **kwargs)

    # -- errors, with whatever an unexpected success made remembered for cleanup

    def error(self, call: Callable[..., Any], request: Any) -> grpc.RpcError:
        """Send `request`, which must fail; return the error."""
        try:
            reply = call(request, timeout=RPC_TIMEOUT)
        except grpc.RpcError as err:
            return err
        self._adopt(request, reply)
        raise AssertionError(
            f"expected {type(request).__name__} to fail, it answered OK: {reply!r}"
        )

    def expect(self, call: Callable[..., Any], request: Any, code: Any, *mentions: str) -> str:
        """Send `request`; it must fail with `code` (or one of them) naming `mentions`."""
        err = self.error(call, request)
        assert_code(err, code, *mentions)
        return err.details() or ""

    def _adopt(self, request: Any, reply: Any) -> None:
        if isinstance(reply, csi_pb2.CreateVolumeResponse):
            self._remember_volume(reply.volume.volume_id)
        elif isinstance(request, csi_pb2.ControllerPublishVolumeRequest):
            vid, nid = request.volume_id, request.node_id
            self._undo.setdefault(
                ("cpublish", vid, nid), lambda: self._controller_unpublish(vid, nid)
            )
        elif isinstance(request, csi_pb2.NodeStageVolumeRequest) and request.staging_target_path:
            vid, path = request.volume_id, Path(request.staging_target_path)
            self._undo.setdefault(("stage", vid, str(path)), lambda: self._unstage(vid, path))
        elif isinstance(request, csi_pb2.NodePublishVolumeRequest) and request.target_path:
            vid, path = request.volume_id, Path(request.target_path)
            self._undo.setdefault(("publish", vid, str(path)), lambda: self._unpublish(vid, path))

    # -- teardown

    def remember(self, key: tuple[str, ...], undo: Callable[[], Any]) -> None:
        """Undo `key` at cleanup (newest first) unless `forget(key)` is called before."""
        self._undo.setdefault(key, undo)

    def forget(self, key: tuple[str, ...]) -> None:
        self._undo.pop(key, None)

    def cleanup(self) -> list[str]:
        """Undo everything still recorded, newest first; return what failed."""
        problems = []
        for key, undo in reversed(list(self._undo.items())):
            try:
                undo()
            except grpc.RpcError as err:
                problems.append(f"{key}: {err.code().name}: {err.details()}")
        self._undo.clear()
        return problems

    def owns(self, volume_id: str) -> bool:
        """Whether this test created the volume and has not deleted it yet."""
        return ("volume", volume_id) in self._undo

    @property
    def deleted_volumes(self) -> list[str]:
        return list(self._deleted)
