"""Waiting for a block device node to be usable.

After a loop device is bound the kernel announces it with a uevent and
udev (or devtmpfs) makes the node. We listen for that event with pyudev
instead of guessing a sleep. Hosts without udevd (containers, this dev
box) still get kernel uevents; where netlink is unavailable at all, a
short, bounded existence check is the fallback.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from tessera.errors import Unavailable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 10.0
FALLBACK_STEP = 0.05


def wait_for_device(device: str, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Return once `device` exists; Unavailable if it does not appear in time."""
    if os.path.exists(device):
        return
    deadline = time.monotonic() + timeout
    monitor = _monitor()
    if monitor is not None:
        _wait_with_monitor(monitor, device, deadline)
    else:
        _wait_bounded(device, deadline)
    if not os.path.exists(device):
        raise Unavailable(f"device {device} did not appear within {timeout:.1f}s")


def _monitor():  # type: ignore[no-untyped-def]  # pyudev has no type hints
    """A started block-subsystem monitor, or None where netlink is not permitted."""
    try:
        import pyudev

        context = pyudev.Context()
        source = "udev" if Path("/run/udev/control").exists() else "kernel"
        monitor = pyudev.Monitor.from_netlink(context, source=source)
        monitor.filter_by(subsystem="block")
        monitor.start()
        return monitor
    except Exception as exc:  # noqa: BLE001 - any failure means: use the fallback
        log.debug("pyudev monitor unavailable (%s); using bounded fallback", exc)
        return None


def _wait_with_monitor(monitor, device: str, deadline: float) -> None:  # type: ignore[no-untyped-def]
    """Wait for an event naming our device (re-checking first: it may have raced us)."""
    name = os.path.basename(device)
    while not os.path.exists(device):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        event = monitor.poll(timeout=min(remaining, 1.0))
        if event is not None and event.sys_name == name:
            log.debug("udev: %s %s", event.action, device)


def _wait_bounded(device: str, deadline: float) -> None:
    while not os.path.exists(device) and time.monotonic() < deadline:
        time.sleep(FALLBACK_STEP)
