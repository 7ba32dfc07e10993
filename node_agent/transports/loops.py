"""Loop devices as the last layer of every file-backed transport.

`loop` binds one on the volume's file in a pool; `nbd` without the kernel
module binds one on the file nbdfuse presents. Both find their devices
the same way after a restart (sysfs: what each loop device is bound to)
and tag read-only views in the device's label. Everything goes through
the kernel directly (`tessera.system.loopdev`): attaching is on the
NodeStageVolume path, and each losetup process cost 5-10 ms.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable

from node_agent.transports import BlockDevice
from tessera.errors import Internal, InvalidArgument, Unavailable
from tessera.system import blockdev, loopdev
from tessera.system.udev import wait_for_device

log = logging.getLogger(__name__)

_LOOP_DEVICE = re.compile(r"/dev/loop[0-9]+")
# A view's lo_file_name (loopdev.attach's label): how a restarted agent tells
# a read-only view from a read-only primary on the same file.
VIEW_LABEL = "tessera-view:"
# A composed volume's local leg (its label): md or dm sits on it, so it is never
# a device of the loop transport (or an attachment's primary) itself.
LEG_LABEL = "tessera-leg:"
# The loop device an nvme-tcp export serves (node_agent/nvme_exports.py): nvmet
# sits on it, so it is no attachment of this node either.
EXPORT_LABEL = "tessera-nvmet:"

# LOOP_CTL_GET_FREE names the lowest free device without claiming it; two
# attaches at once in one process would be given the same one, so find-free +
# configure is serialized per process. Other processes doing the same are
# answered by EBUSY and another free device (loopdev.attach).
_FIND_LOCK = threading.Lock()


def check_loop_device(device: str) -> str:
    """Only `/dev/loopN` ever reaches a loop ioctl as a device argument."""
    if not _LOOP_DEVICE.fullmatch(device):  # match() with $ let '/dev/loop3\n' through
        raise InvalidArgument(f"{device!r} is not a loop device", field="device")
    return device


def bind(
    volume_id: str,
    file: str,
    readonly: bool,
    transport: str,
    view_key: str = "",
    leg: bool = False,
) -> BlockDevice:
    """A new loop device on `file`; a view (with `view_key`) is read-only by definition;
    a composed volume's `leg` is labelled so that `bound` never lists it."""
    readonly = readonly or bool(view_key)
    label = VIEW_LABEL + view_key if view_key else LEG_LABEL + volume_id if leg else ""
    try:
        with _FIND_LOCK:
            device, direct_io = loopdev.attach(file, readonly=readonly, direct_io=True, label=label)
    except loopdev.LoopBusy as exc:
        raise Unavailable(f"could not attach {file}: {exc}") from exc
    except OSError as exc:
        raise Internal(f"could not attach {file}: {exc}") from exc
    wait_for_device(device)
    log.info(
        "attached %s as %s%s%s",
        file,
        device,
        f" (read-only view {view_key})" if view_key else " (read-only)" if readonly else "",
        "" if direct_io else " (buffered: no direct I/O on this filesystem)",
    )
    return BlockDevice(volume_id, device, file, readonly, transport, view_key)


def bound(volume_of: Callable[[str], str | None], transport: str) -> list[BlockDevice]:
    """Every bound loop device whose backing file `volume_of` maps to a volume id."""
    try:
        found = loopdev.bound_devices()
    except OSError as exc:
        raise Internal(f"could not list loop devices: {exc}") from exc
    devices = []
    for b in found:
        volume_id = volume_of(b.backing)
        if volume_id is not None and not is_leg(b.path):
            devices.append(
                BlockDevice(volume_id, b.path, b.backing, b.readonly, transport, _view_key(b))
            )
    return devices


def is_leg(device: str) -> bool:
    """Whether the loop device is a composed volume's leg or an nvme-tcp export's device
    (its label), never an attachment; gone is neither."""
    try:
        return loopdev.read_label(device).startswith((LEG_LABEL, EXPORT_LABEL))
    except OSError:
        return False


def unbind(device: BlockDevice) -> None:
    check_loop_device(device.path)
    try:
        unbound = loopdev.detach(device.path)
    except OSError as exc:
        raise Internal(f"could not detach {device.path}: {exc}") from exc
    if unbound:
        log.info("detached %s", device.path)
    else:
        log.warning("%s is still open elsewhere; the kernel detaches it on last close", device.path)


def refresh(device: BlockDevice) -> None:
    """Let the device see its backing file's size again (after the file grew)."""
    try:
        loopdev.set_capacity(check_loop_device(device.path))
    except OSError as exc:
        raise Internal(f"could not refresh the size of {device.path}: {exc}") from exc


def refresh_if_grown(device: BlockDevice) -> None:
    """Refresh when the backing file is larger than the device (a no-op otherwise)."""
    try:
        file_size = os.stat(device.backing).st_size
    except OSError as exc:  # a remote client gone: the attachment's condition says so
        log.warning("cannot see the size of %s behind %s: %s", device.backing, device.path, exc)
        return
    if size_bytes(device) < file_size:
        refresh(device)


def size_bytes(device: BlockDevice) -> int:
    return blockdev.size_bytes(device.path)


def _view_key(b: loopdev.Bound) -> str:
    """The key of a view (from its label); "" for anything else.

    Views are read-only, so writable devices are never opened to ask. A
    device unbound or unreadable meanwhile is no view of ours.
    """
    if not b.readonly:
        return ""
    try:
        label = loopdev.read_label(b.path)
    except OSError:
        return ""
    return label.removeprefix(VIEW_LABEL) if label.startswith(VIEW_LABEL) else ""
