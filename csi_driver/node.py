"""CSI Node service: attach through the local node-agent, format, mount.

Every RPC validates its request, then acts under the volume's lock. What
is mounted where is read from the kernel each time, so a restarted plugin
picks up exactly where the last one stopped. Data is never put at risk: a
device is formatted only when libblkid's probe says it is blank, and a
target is removed only once it is no longer a mount, never recursively.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Mapping

import grpc

from csi_driver import validation
from csi_driver._gen import csi_pb2, csi_pb2_grpc
from csi_driver.capabilities import Capability
from csi_driver.config import PluginConfig
from csi_driver.kubernetes_topology import NodeTopology
from csi_driver.parameters import (
    CONTEXT_FS_TYPE,
    CONTEXT_MKFS_OPTIONS,
    consumer_pod,
    split_mkfs_options,
)
from tessera.clients import AgentClient
from tessera.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    TesseraError,
)
from tessera.locks import VolumeLocks
from tessera.models import AccessMode, AccessType, AgentAttachment
from tessera.system import blockdev, filesystems, mounts
from tessera.topology import TOPOLOGY_KEY, ZONE_KEY

log = logging.getLogger("tessera.csi.node")

_Rpc = csi_pb2.NodeServiceCapability.RPC
NODE_CAPABILITIES = (
    _Rpc.STAGE_UNSTAGE_VOLUME,
    _Rpc.GET_VOLUME_STATS,
    _Rpc.EXPAND_VOLUME,
    _Rpc.VOLUME_CONDITION,
    _Rpc.SINGLE_NODE_MULTI_WRITER,
)


class NodeServicer(csi_pb2_grpc.NodeServicer):
    def __init__(self, config: PluginConfig, agent: AgentClient) -> None:
        self.config = config
        self.agent = agent
        self.locks = VolumeLocks()
        self.kubernetes = NodeTopology(config.node_id) if config.kubernetes_topology else None

    # ---- stage ------------------------------------------------------------------

    def NodeStageVolume(
        self, request: csi_pb2.NodeStageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeStageVolumeResponse:
        args = validation.node_stage_volume(request)
        volume_id, staging, cap = args.volume_id, args.staging_target_path, args.capability
        staging = mounts.mount_point(staging, "staging_target_path")  # as mountinfo spells it
        readonly = args.readonly
        with self.locks.hold(volume_id):
            fresh = self._attachment_or_none(volume_id) is None
            attachment = self.agent.attach(volume_id, readonly, args.connection)
            try:
                if cap.access_type == AccessType.BLOCK and mounts.is_mount(staging):
                    raise AlreadyExists(
                        f"staging_target_path {staging} holds a filesystem mount; the volume was "
                        "staged with another access type",
                        field="volume_capability",
                    )
                if cap.access_type == AccessType.MOUNT:
                    fs_type = request.volume_capability.mount.fs_type or (
                        request.volume_context.get(CONTEXT_FS_TYPE, cap.fs_type)
                    )
                    mkfs_options = request.volume_context.get(CONTEXT_MKFS_OPTIONS, "")
                    self._stage_filesystem(
                        attachment, staging, cap, fs_type, mkfs_options, readonly
                    )
            except Exception:
                if fresh:
                    # kubelet takes a refusal such as FAILED_PRECONDITION as final and
                    # never unstages: an attachment this call made must not outlive it
                    _cleanup(f"detaching volume {volume_id}", lambda: self.agent.detach(volume_id))
                raise
        return csi_pb2.NodeStageVolumeResponse()

    def _stage_filesystem(
        self,
        attachment: AgentAttachment,
        staging: str,
        cap: Capability,
        fs_type: str,
        mkfs_options: str,
        readonly: bool,
    ) -> None:
        device = attachment.backing_device
        existing = mounts.mounts_at(staging)
        if existing:
            top = existing[-1]
            if mounts.uses_device(top, device) and top.fs_type == fs_type:
                # staged already: the retry converges, and finishes a growth that
                # failed once mounted (the pod must get the size it asked for)
                if not readonly and filesystems.needs_growth(device, fs_type):
                    filesystems.resize_filesystem(device, staging, fs_type)
                return
            raise AlreadyExists(
                f"staging_target_path {staging} already has a {top.fs_type} mount of "
                f"{top.source}, not this volume's {fs_type}",
                field="staging_target_path",
            )
        # `blank` is the agent's proof that nothing was ever written (no
        # allocated blocks behind a flushed device): stronger than a probe.
        found = None if attachment.blank else filesystems.probe_filesystem(device)
        if found is None:
            if readonly:
                raise FailedPrecondition(
                    f"volume {attachment.volume_id} is blank and published read-only; "
                    "a read-only volume cannot be formatted",
                    field="volume_capability",
                )
            filesystems.make_filesystem(device, fs_type, split_mkfs_options(mkfs_options))
        elif found != fs_type:
            raise FailedPrecondition(
                f"volume {attachment.volume_id} holds {found}, asked for {fs_type}; "
                "refusing to format over data",
                field="volume_capability.mount.fs_type",
            )
        # A clone or restore into a larger volume carries its source's smaller
        # filesystem: grown here, so the pod gets the capacity it asked for
        # (ext offline, before the mount; XFS only grows mounted).
        grow = found is not None and not readonly and filesystems.needs_growth(device, fs_type)
        if grow and fs_type != "xfs":
            filesystems.grow_unmounted_ext(device)
        os.makedirs(staging, exist_ok=True)
        options = list(cap.mount_flags) + (["ro"] if readonly else [])
        if fs_type == "xfs" and "nouuid" not in options:
            # a restored snapshot or clone carries its source's XFS UUID, and XFS
            # refuses a second mount of one UUID on a node (EINVAL) without this
            options.append("nouuid")
        mounts.mount(device, staging, fs_type, options)
        if grow and fs_type == "xfs":
            filesystems.resize_filesystem(device, staging, fs_type)

    def NodeUnstageVolume(
        self, request: csi_pb2.NodeUnstageVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnstageVolumeResponse:
        args = validation.node_unstage_volume(request)
        volume_id, staging = args.volume_id, args.staging_target_path
        staging = mounts.canonical(staging)  # as mountinfo spells it; a symlink is not followed
        with self.locks.hold(volume_id):
            attachment = self._attachment_or_none(volume_id)
            _check_only_its_mounts(volume_id, staging, "staging_target_path", attachment)
            if attachment is not None:
                published = _still_published(attachment, staging)
                if published:
                    raise FailedPrecondition(
                        f"volume {volume_id} is still published or in use: "
                        f"{'; '.join(published)}; NodeUnpublishVolume first",
                        field="volume_id",
                    )
            mounts.unmount(staging)
            if attachment is not None:
                self.agent.detach(volume_id)
        return csi_pb2.NodeUnstageVolumeResponse()

    # ---- publish ----------------------------------------------------------------

    def NodePublishVolume(
        self, request: csi_pb2.NodePublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodePublishVolumeResponse:
        args = validation.node_publish_volume(request)
        volume_id, target, staging = args.volume_id, args.target_path, args.staging_target_path
        cap, readonly = args.capability, args.readonly
        target = mounts.mount_point(target, "target_path")  # as mountinfo spells them
        staging = mounts.canonical(staging)
        # Validation compared the paths as given; under a symlinked kubelet
        # directory two spellings can name one place, so compare them resolved.
        validation.publish_paths_apart(target, staging)
        with self.locks.hold(volume_id):
            attachment = self._attachment_or_none(volume_id)
            if attachment is None:
                self.agent.get_volume(volume_id)  # NotFound for a volume that does not exist
                raise FailedPrecondition(
                    f"volume {volume_id} is not staged on this node; call NodeStageVolume first",
                    field="staging_target_path",
                )
            device = attachment.backing_device
            if cap.access_type == AccessType.BLOCK:
                device = self._block_source(attachment, target, readonly)
            try:
                # The volume's own mount at target is only "published already" when
                # it came from this request's staging path (found by the CSI fuzzer:
                # a target that was the staging mount answered OK, and unpublishing
                # it unstaged the pod's volume).
                if cap.access_type == AccessType.MOUNT:
                    _check_staged(device, staging)
                elif os.path.isdir(target) and mounts.is_mount(target):
                    raise AlreadyExists(
                        f"target_path {target} is a filesystem mount; a block volume is "
                        "published as a device file",
                        field="target_path",
                    )
                if self._already_published(device, target, readonly):
                    self._add_consumer(volume_id, request.volume_context, target)
                    return csi_pb2.NodePublishVolumeResponse()
                self._check_single_writer(cap, _devices(attachment), staging, target)
                if cap.access_type == AccessType.MOUNT:
                    self._publish_filesystem(device, staging, target, readonly)
                else:
                    self._publish_block(volume_id, device, target, readonly)
            except Exception:
                here = mounts.mounts_at(target)
                in_use = bool(here) and mounts.uses_device(here[-1], device)
                if device != attachment.backing_device and not in_use:
                    # a refused publish must not keep the read-only view it made
                    # (found by the CSI fuzzer): kubelet never unpublishes it
                    _cleanup(
                        f"releasing the read-only view of volume {volume_id} for {target}",
                        lambda: self._release_view(volume_id, target),
                    )
                raise
            self._add_consumer(volume_id, request.volume_context, target)
        return csi_pb2.NodePublishVolumeResponse()

    def _add_consumer(self, volume_id: str, context: Mapping[str, str], target: str) -> None:
        """The pod's cgroup gets the volume's QoS limits (docs/data-services.md, QoS)."""
        self.agent.add_consumer(volume_id, consumer_pod(context, target))

    def _already_published(self, device: str, target: str, readonly: bool) -> bool:
        existing = mounts.mounts_at(target)
        if not existing:
            return False
        top = existing[-1]
        if mounts.uses_device(top, device) and top.readonly == readonly:
            return True
        raise AlreadyExists(
            f"target_path {target} is already a mount ({top.source}, "
            f"{'read-only' if top.readonly else 'read-write'}) that does not match this request",
            field="target_path",
        )

    def _check_single_writer(
        self, cap: Capability, devices: list[str], staging: str, target: str
    ) -> None:
        if cap.access_mode != AccessMode.SINGLE_NODE_SINGLE_WRITER:
            return
        others = [m for m in mounts.mounts_of_devices(devices) if m not in (staging, target)]
        if others:
            raise FailedPrecondition(
                f"SINGLE_NODE_SINGLE_WRITER volume is already published at {others[0]}",
                field="target_path",
            )

    def _publish_filesystem(self, device: str, staging: str, target: str, readonly: bool) -> None:
        _check_staged(device, staging)
        os.makedirs(target, exist_ok=True)
        mounts.bind_mount(staging, target, readonly)

    def _block_source(self, attachment: AgentAttachment, target: str, readonly: bool) -> str:
        """The device to bind at a block target: the volume's own, or a read-only view.

        A read-only bind of a device node does not stop writes to the device
        (the pod opens the node and writes), so a read-only publish of a
        volume attached read-write gets a device the kernel keeps read-only:
        the agent's view for this target (made once; idempotent).
        """
        if not readonly or attachment.readonly:
            return attachment.backing_device
        return self.agent.attach_view(attachment.volume_id, view_key(target)).device

    def _publish_block(self, volume_id: str, device: str, target: str, readonly: bool) -> None:
        if not os.path.exists(device):
            raise FailedPrecondition(
                f"device {device} of volume {volume_id} is gone; call NodeStageVolume again",
                field="volume_id",
            )
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.isdir(target):
            os.rmdir(target)  # an empty directory only; rmdir never removes contents
        if not os.path.exists(target):
            with open(target, "x"):
                pass
        mounts.bind_mount(device, target, readonly)

    def NodeUnpublishVolume(
        self, request: csi_pb2.NodeUnpublishVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeUnpublishVolumeResponse:
        args = validation.node_unpublish_volume(request)
        volume_id, target = args.volume_id, args.target_path
        target = mounts.canonical(target)  # as mountinfo spells it; a symlink is not followed
        with self.locks.hold(volume_id):
            # A block target is a file (or gone already, after a crash past
            # its removal); a filesystem target is a directory.
            block = not os.path.isdir(target)
            if mounts.is_mount(target):
                attachment = self._attachment_or_none(volume_id)
                _check_only_its_mounts(volume_id, target, "target_path", attachment)
            mounts.unmount(target)
            _remove_target(target)
            if block:
                self._release_view(volume_id, target)
            try:  # best effort: a dying pod's cgroup with a rule left in it harms nobody
                self.agent.remove_consumer(volume_id, consumer_pod({}, target))
            except TesseraError as exc:
                log.warning("volume %s: QoS limits kept for %s: %s", volume_id, target, exc)
        return csi_pb2.NodeUnpublishVolumeResponse()

    def _release_view(self, volume_id: str, target: str) -> None:
        """Release the read-only view a block target had, if it had one (absent is fine)."""
        try:
            self.agent.release_view(volume_id, view_key(target))
        except NotFound:
            pass  # the volume is not on this node: it has no views here

    # ---- information -------------------------------------------------------------

    def NodeGetCapabilities(
        self, request: csi_pb2.NodeGetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetCapabilitiesResponse:
        return csi_pb2.NodeGetCapabilitiesResponse(
            capabilities=[
                csi_pb2.NodeServiceCapability(rpc=csi_pb2.NodeServiceCapability.RPC(type=rpc))
                for rpc in NODE_CAPABILITIES
            ]
        )

    def NodeGetInfo(
        self, request: csi_pb2.NodeGetInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetInfoResponse:
        segments = {TOPOLOGY_KEY: self.config.node_id}
        if self.config.zone:
            segments[ZONE_KEY] = self.config.zone
        if self.kubernetes is not None:  # raises until the Node's labels could be read
            segments.update(self.kubernetes.segments())
        return csi_pb2.NodeGetInfoResponse(
            node_id=self.config.node_id,
            max_volumes_per_node=self.config.max_volumes_per_node,
            accessible_topology=csi_pb2.Topology(segments=segments),
        )

    def NodeGetVolumeStats(
        self, request: csi_pb2.NodeGetVolumeStatsRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeGetVolumeStatsResponse:
        args = validation.node_get_volume_stats(request)
        volume_id, path = args.volume_id, mounts.canonical(args.volume_path)
        attachment = self._attached_here(volume_id, path)
        mount, device = self._check_path_belongs(volume_id, path, attachment)
        if mounts.binds_device(mount, device):
            total = _block_size(volume_id, path, device)
            usage = [csi_pb2.VolumeUsage(total=total, unit=csi_pb2.VolumeUsage.BYTES)]
        else:
            usage = _filesystem_usage(volume_id, path, device)
        return csi_pb2.NodeGetVolumeStatsResponse(
            usage=usage, volume_condition=self._condition(attachment)
        )

    def _attached_here(self, volume_id: str, path: str) -> AgentAttachment:
        """The volume's attachment on this node; without one, nothing at path can be it."""
        attachment = self._attachment_or_none(volume_id)
        if attachment is None:
            self.agent.get_volume(volume_id)  # NotFound for a volume that does not exist
            raise NotFound(
                f"volume {volume_id} is not staged on this node, so volume_path {path} "
                "is not this volume",
                field="volume_path",
            )
        return attachment

    def _check_path_belongs(
        self, volume_id: str, path: str, attachment: AgentAttachment
    ) -> tuple[mounts.Mount, str]:
        """The mount at path and its device, when it is this volume's: its filesystem,
        or a bind of its device or of one of its read-only views.

        Anything else (a plain directory, another filesystem's mount, a file
        that is no bind of this device, a mount that has gone) is NOT_FOUND:
        statvfs of such a path would report some other filesystem's numbers.
        """
        for device in _devices(attachment):
            mount = mounts.mount_of_device(path, device)
            if mount is not None:
                return mount, device
        raise NotFound(
            f"volume_path {path} is not a mount of volume {volume_id} (neither its "
            "staging mount, nor a publish of it, nor a bind of its device)",
            field="volume_path",
        )

    def _condition(self, attachment: AgentAttachment) -> csi_pb2.VolumeCondition:
        if not os.path.exists(attachment.backing_device):
            return csi_pb2.VolumeCondition(
                abnormal=True, message="the volume's block device is gone from this node"
            )
        if attachment.condition:
            return csi_pb2.VolumeCondition(abnormal=True, message=attachment.condition)
        return csi_pb2.VolumeCondition(abnormal=False, message="ok")

    # ---- expand ---------------------------------------------------------------------

    def NodeExpandVolume(
        self, request: csi_pb2.NodeExpandVolumeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.NodeExpandVolumeResponse:
        """Grow what is at volume_path to the device's size; codes per docs/contracts.md.

        Only "cannot grow this filesystem while it is in use" is
        FAILED_PRECONDITION: kubelet takes that code as final and stops
        retrying, so every condition that can clear (device not grown yet,
        a busy tool) stays retryable.
        """
        args = validation.node_expand_volume(request)
        volume_id, path = args.volume_id, mounts.canonical(args.volume_path)
        with self.locks.hold(volume_id):
            attachment = self._attached_here(volume_id, path)
            mount, device = self._check_path_belongs(volume_id, path, attachment)
            block = mounts.binds_device(mount, device)
            _check_expand_capability(args.capability, block, path)
            # Attaching again is how the agent lets the device see the new size.
            attachment = self.agent.attach(
                volume_id, attachment.readonly, attachment.connection, min_size_bytes=args.size
            )
            device = attachment.backing_device
            size = filesystems.device_size(device)
            _check_expand_range(volume_id, size, args.size, args.limit)
            if not block:
                grow_at = _writable_mount(volume_id, path, mount, attachment)
                filesystems.resize_filesystem(device, grow_at, mount.fs_type)
            return csi_pb2.NodeExpandVolumeResponse(capacity_bytes=size)

    # ---- helpers --------------------------------------------------------------------

    def _attachment_or_none(self, volume_id: str) -> AgentAttachment | None:
        try:
            return self.agent.get_attachment(volume_id)
        except NotFound:
            return None


def view_key(target: str) -> str:
    """The agent's key for the read-only view published at target: derived from the
    path, so an unpublish after a restart of anything still names the same view."""
    return hashlib.sha256(target.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _devices(attachment: AgentAttachment) -> list[str]:
    """The volume's devices on this node: its own and its read-only views."""
    return [attachment.backing_device, *attachment.views.values()]


def _still_published(attachment: AgentAttachment, staging: str) -> list[str]:
    """Whatever uses the volume's devices besides its own staging mount, described.

    Read from the kernel by device number (`blockdev.holders`): a bind of
    the device node anywhere counts, whatever the path is called.
    """
    found = blockdev.holders(attachment.backing_device, ignore_mountpoints=[staging])
    for view in attachment.views.values():
        found += blockdev.holders(view)
    return found


def _check_only_its_mounts(
    volume_id: str, path: str, field: str, attachment: AgentAttachment | None
) -> None:
    """Refuse to unmount a path holding anything but the volume's own mounts.

    Unpublish and unstage unmount everything stacked at the path: when that
    is another volume's staging mount or a pod's publish (a request naming
    the wrong volume, or a volume not attached here at all), unmounting it
    would take the data from under someone else. Nothing mounted is fine.
    """
    devices = _devices(attachment) if attachment is not None else []
    for mount in mounts.mounts_at(path):
        if any(mounts.uses_device(mount, d) for d in devices):
            continue
        why = "" if attachment is not None else f"; volume {volume_id} is not attached here"
        raise FailedPrecondition(
            f"{field} {path} holds a mount of {_describe(mount)}, which is not volume "
            f"{volume_id}{why}; nothing was unmounted",
            field=field,
        )


def _describe(mount: mounts.Mount) -> str:
    """What is mounted, for a message: "/dev/loop3 (ext4)" or "/loop3 of udev (devtmpfs)"."""
    inside = f"{mount.root} of " if mount.root != "/" else ""
    return f"{inside}{mount.source} ({mount.fs_type})"


def _cleanup(what: str, undo: Callable[[], None]) -> None:
    """An error path's cleanup: its own failure is logged, never raised.

    The caller re-raises the error that made it clean up, which is the code
    kubelet acts on (ALREADY_EXISTS is final; an UNAVAILABLE from an agent
    that could not detach would be retried for ever with a wrong diagnosis).
    """
    try:
        undo()
    except TesseraError as exc:
        log.warning("%s after a refused request failed: %s", what, exc)


def _open_as(volume_id: str, path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise NotFound(
            f"volume_path {path} of volume {volume_id} cannot be opened: {exc.strerror}",
            field="volume_path",
        ) from exc


def _gone(volume_id: str, path: str) -> NotFound:
    return NotFound(
        f"volume_path {path} stopped being a mount of volume {volume_id} while it was read",
        field="volume_path",
    )


def _check_staged(device: str, staging: str) -> None:
    staged = mounts.mounts_at(staging)
    if not staged or not mounts.uses_device(staged[-1], device):
        # After a reboot the staging mount is gone: binding the empty
        # directory would hand the pod a volume without its data.
        raise FailedPrecondition(
            f"the volume is not mounted at staging_target_path {staging}; "
            "call NodeStageVolume first",
            field="staging_target_path",
        )


def _filesystem_usage(volume_id: str, path: str, device: str) -> list[csi_pb2.VolumeUsage]:
    """statvfs of the volume's own filesystem, checked by device number on the open directory.

    The mount table said path is this volume's mount; the directory opened
    here must also be on the volume's device, or the mount went away in
    between and statvfs would describe whatever filesystem is underneath.
    """
    fd = _open_as(volume_id, path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if os.fstat(fd).st_dev != os.stat(device).st_rdev:
            raise _gone(volume_id, path)
        st = os.fstatvfs(fd)
    finally:
        os.close(fd)
    total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return [
        csi_pb2.VolumeUsage(available=free, total=total, used=used, unit=csi_pb2.VolumeUsage.BYTES),
        csi_pb2.VolumeUsage(
            available=st.f_favail,
            total=st.f_files,
            used=st.f_files - st.f_ffree,
            unit=csi_pb2.VolumeUsage.INODES,
        ),
    ]


def _block_size(volume_id: str, path: str, device: str) -> int:
    """The size of the device bound at path, once the node there is proven to be that device."""
    fd = _open_as(volume_id, path, os.O_PATH)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if not stat.S_ISBLK(st.st_mode) or st.st_rdev != os.stat(device).st_rdev:
        raise _gone(volume_id, path)
    return filesystems.device_size(device)


def _check_expand_capability(cap: Capability | None, block: bool, path: str) -> None:
    """A capability that contradicts what is at volume_path: the spec's INVALID_ARGUMENT."""
    if cap is None:
        return
    if (cap.access_type == AccessType.BLOCK) != block:
        have = "a block device" if block else "a filesystem"
        raise InvalidArgument(
            f"volume_capability asks for {cap.access_type.value} access, but volume_path "
            f"{path} holds {have}",
            field="volume_capability",
        )


def _writable_mount(
    volume_id: str, path: str, mount: mounts.Mount, attachment: AgentAttachment
) -> str:
    """Where the filesystem can be grown: volume_path, or its read-write staging mount.

    A pod's read-only bind (readonly=true) shares the filesystem with the
    read-write staging mount, which is grown instead. A volume attached
    read-only is mounted read-only everywhere: that cannot change while it
    is in use, which is the spec's FAILED_PRECONDITION ("MUST NOT retry").
    """
    if not mount.readonly and not attachment.readonly:
        return path
    if not attachment.readonly:
        for other in mounts.mounts_of_device(attachment.backing_device):
            if other.fs_type == mount.fs_type and not other.readonly:
                return other.mountpoint
    raise FailedPrecondition(
        f"volume {volume_id} is in use read-only on this node (at {path}); its filesystem "
        "cannot be grown until it is staged read-write",
        field="volume_path",
    )


def _check_expand_range(volume_id: str, size: int, required: int, limit: int) -> None:
    if limit and size > limit:
        # the device is already past the limit and never shrinks: fix the range
        raise OutOfRange(
            f"volume {volume_id} is {size} bytes, more than capacity_range.limit_bytes "
            f"({limit}); volumes never shrink",
            field="capacity_range",
        )
    if required > size:
        # The controller's expansion has not reached this node yet: an operation
        # pending for the volume (ABORTED, retried with backoff), never final.
        raise Aborted(
            f"volume {volume_id} is {size} bytes on this node, less than "
            f"capacity_range.required_bytes ({required}); ControllerExpandVolume has not "
            "grown it yet",
            field="capacity_range",
        )


def _remove_target(target: str) -> None:
    """Remove what kubelet asked us to publish at, only once nothing is mounted there."""
    if mounts.is_mount(target) or not os.path.lexists(target):
        return
    try:
        if os.path.isdir(target) and not os.path.islink(target):
            os.rmdir(target)  # empty only: never recursive
        else:
            os.unlink(target)
    except OSError as exc:
        if exc.errno != errno.ENOTEMPTY:
            raise
        log.warning("left %s in place: it is not empty and not a mount", target)
