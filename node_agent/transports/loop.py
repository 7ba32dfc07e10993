"""The loop transport: a volume file on this node, attached at kernel speed.

Direct I/O is requested so the page cache is not doubled (file + device);
filesystems that refuse it (tmpfs) get a buffered device instead. Existing
devices are found by backing file, so a restarted agent never attaches a
volume a second time.
"""

from __future__ import annotations

import json
import logging
import re
import threading

from node_agent import blockdev
from node_agent.commands import run
from node_agent.transports import BlockDevice
from node_agent.udev import wait_for_device
from tessera.errors import Internal, InvalidArgument

log = logging.getLogger(__name__)

_LOOP_DEVICE = re.compile(r"^/dev/loop[0-9]+$")
_DELETED = " (deleted)"


def check_loop_device(device: str) -> str:
    """Only `/dev/loopN` ever reaches losetup as a device argument."""
    if not _LOOP_DEVICE.match(device):
        raise InvalidArgument(f"{device!r} is not a loop device", field="device")
    return device


class LoopTransport:
    name = "loop"

    def __init__(self) -> None:
        # `losetup --find` picks a free device and then claims it; two at once
        # in one process could race for the same one, so serialize them here.
        self._find_lock = threading.Lock()

    def attach(self, volume_file: str, readonly: bool) -> BlockDevice:
        with self._find_lock:
            device = self._losetup_find(volume_file, readonly)
        wait_for_device(device)
        log.info("attached %s as %s%s", volume_file, device, " (read-only)" if readonly else "")
        return BlockDevice(device, volume_file, readonly, self.name)

    def _losetup_find(self, volume_file: str, readonly: bool) -> str:
        ro = ["--read-only"] if readonly else []
        res = run(["losetup", "--find", "--show", "--direct-io=on", *ro, volume_file], check=False)
        if res.returncode != 0:
            log.info("direct I/O refused for %s (%s); retrying buffered", volume_file, res.stderr)
            res = run(["losetup", "--find", "--show", *ro, volume_file], check=False)
        device = res.stdout.strip()
        if res.returncode != 0 or not _LOOP_DEVICE.match(device):
            raise Internal(f"losetup could not attach {volume_file}: {res.stderr.strip()}")
        return device

    def find(self, volume_file: str) -> BlockDevice | None:
        matches = [d for d in self.list_devices() if d.backing == volume_file]
        if len(matches) > 1:
            log.warning("%s is attached more than once: %s", volume_file, matches)
        return matches[0] if matches else None

    def list_devices(self) -> list[BlockDevice]:
        res = run(["losetup", "--json", "--list", "--output", "NAME,BACK-FILE,RO"])
        if not res.stdout.strip():
            return []
        try:
            rows = json.loads(res.stdout).get("loopdevices", [])
        except ValueError as exc:
            raise Internal(f"unreadable losetup output: {exc}") from exc
        devices = [self._row(row) for row in rows if row.get("back-file")]
        return sorted(devices, key=lambda d: int(d.path.removeprefix("/dev/loop")))

    def _row(self, row: dict[str, object]) -> BlockDevice:
        backing = str(row["back-file"]).removesuffix(_DELETED)
        return BlockDevice(str(row["name"]), backing, _as_bool(row.get("ro")), self.name)

    def detach(self, device: str) -> None:
        check_loop_device(device)
        res = run(["losetup", "-d", device], check=False)
        if res.returncode != 0 and self._is_bound(device):
            raise Internal(f"losetup -d {device} failed: {res.stderr.strip()}")
        log.info("detached %s", device)

    def _is_bound(self, device: str) -> bool:
        return any(d.path == device for d in self.list_devices())

    def refresh_size(self, device: str) -> None:
        run(["losetup", "--set-capacity", check_loop_device(device)])

    def size_bytes(self, device: str) -> int:
        return blockdev.size_bytes(device)


def _as_bool(value: object) -> bool:
    """losetup's JSON gives booleans (util-linux >= 2.33) or "0"/"1" strings (older)."""
    if isinstance(value, str):
        return value.strip() in ("1", "true")
    return bool(value)
