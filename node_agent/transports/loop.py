"""The loop transport: a volume file on this node, attached at kernel speed.

Direct I/O is requested so the page cache is not doubled (file + device);
filesystems that cannot do it get a buffered device instead. Existing
devices are found by backing file, so a restarted agent never attaches a
volume a second time.

Everything goes through the kernel directly (`tessera.system.loopdev`: ioctls on
/dev/loop-control and /dev/loopN, sysfs for what is bound): attaching is on
the NodeStageVolume path, and each losetup process cost 5-10 ms.
"""

from __future__ import annotations

import logging
import re
import threading

from node_agent.transports import BlockDevice
from tessera.errors import Internal, InvalidArgument, Unavailable
from tessera.system import blockdev, loopdev
from tessera.system.udev import wait_for_device

log = logging.getLogger(__name__)

_LOOP_DEVICE = re.compile(r"/dev/loop[0-9]+")
# A view's lo_file_name (loopdev.attach's label): how a restarted agent tells
# a read-only view from a read-only primary on the same file.
VIEW_LABEL = "tessera-view:"


def check_loop_device(device: str) -> str:
    """Only `/dev/loopN` ever reaches a loop ioctl as a device argument."""
    if not _LOOP_DEVICE.fullmatch(device):  # match() with $ let '/dev/loop3\n' through
        raise InvalidArgument(f"{device!r} is not a loop device", field="device")
    return device


class LoopTransport:
    name = "loop"

    def __init__(self) -> None:
        # LOOP_CTL_GET_FREE names the lowest free device without claiming it;
        # two attaches at once in one process would be given the same one, so
        # serialize find-free + configure here. Other processes doing the same
        # are answered by EBUSY and another free device (loopdev.attach).
        self._find_lock = threading.Lock()

    def attach(self, volume_file: str, readonly: bool, view_key: str = "") -> BlockDevice:
        readonly = readonly or bool(view_key)  # a view is read-only by definition
        label = VIEW_LABEL + view_key if view_key else ""
        try:
            with self._find_lock:
                device, direct_io = loopdev.attach(
                    volume_file, readonly=readonly, direct_io=True, label=label
                )
        except loopdev.LoopBusy as exc:
            raise Unavailable(f"could not attach {volume_file}: {exc}") from exc
        except OSError as exc:
            raise Internal(f"could not attach {volume_file}: {exc}") from exc
        wait_for_device(device)
        log.info(
            "attached %s as %s%s%s",
            volume_file,
            device,
            f" (read-only view {view_key})" if view_key else " (read-only)" if readonly else "",
            "" if direct_io else " (buffered: no direct I/O on this filesystem)",
        )
        return BlockDevice(device, volume_file, readonly, self.name, view_key)

    def list_devices(self) -> list[BlockDevice]:
        """Every bound loop device, by number, from sysfs (what losetup --list reads)."""
        try:
            bound = loopdev.bound_devices()
        except OSError as exc:
            raise Internal(f"could not list loop devices: {exc}") from exc
        return [BlockDevice(b.path, b.backing, b.readonly, self.name, _view_key(b)) for b in bound]

    def detach(self, device: str) -> None:
        check_loop_device(device)
        try:
            unbound = loopdev.detach(device)
        except OSError as exc:
            raise Internal(f"could not detach {device}: {exc}") from exc
        if unbound:
            log.info("detached %s", device)
        else:
            log.warning("%s is still open elsewhere; the kernel detaches it on last close", device)

    def refresh_size(self, device: str) -> None:
        try:
            loopdev.set_capacity(check_loop_device(device))
        except OSError as exc:
            raise Internal(f"could not refresh the size of {device}: {exc}") from exc

    def size_bytes(self, device: str) -> int:
        return blockdev.size_bytes(device)


def _view_key(bound: loopdev.Bound) -> str:
    """The key of a view (from its label); "" for anything else.

    Views are read-only, so writable devices are never opened to ask. A
    device unbound or unreadable meanwhile is no view of ours.
    """
    if not bound.readonly:
        return ""
    try:
        label = loopdev.read_label(bound.path)
    except OSError:
        return ""
    return label.removeprefix(VIEW_LABEL) if label.startswith(VIEW_LABEL) else ""
