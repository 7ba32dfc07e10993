"""Pluggable transports: how a volume becomes a block device on this node.

`loop` (a volume file on this node) is built now. `nbd` (a remote volume
through an NBD export) and `nvme-tcp` (kernel NVMe/TCP) plug in later by
implementing `Transport` and calling `register_transport`; nothing else in
the agent needs to change, because attachments only talk to this protocol.

Transports keep no state of their own: the kernel is asked every time, so
a restarted agent sees exactly what is attached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from tessera.errors import InvalidArgument


@dataclass(frozen=True)
class BlockDevice:
    """A device a transport made: its node, what backs it, and how.

    `view_key` is empty for a volume's primary device (the one behind
    /dev/tessera/<id>); a read-only view (an extra device on the same
    volume, for one read-only publish) carries its key, which the
    transport can read back from the kernel after a restart.
    """

    path: str
    backing: str
    readonly: bool
    transport: str
    view_key: str = ""


@runtime_checkable
class Transport(Protocol):
    name: str

    def attach(self, volume_file: str, readonly: bool, view_key: str = "") -> BlockDevice:
        """Make a new block device for the volume (callers check what exists first).

        With a `view_key`: a read-only view, tagged so `list_devices` tells it
        from the primary device even after a restart.
        """
        ...

    def list_devices(self) -> list[BlockDevice]:
        """Every device this transport has on the node (for recovery after restart)."""
        ...

    def detach(self, device: str) -> None:
        """Release the device; already gone is fine."""
        ...

    def refresh_size(self, device: str) -> None:
        """Make the device pick up a grown volume."""
        ...

    def size_bytes(self, device: str) -> int:
        """The device's size as the kernel currently sees it."""
        ...


_REGISTRY: dict[str, Callable[[], Transport]] = {}


def register_transport(name: str, factory: Callable[[], Transport]) -> None:
    _REGISTRY[name] = factory


def create_transport(name: str) -> Transport:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise InvalidArgument(
            f"unknown transport {name!r} (known: {known})", field="transport"
        ) from None
    return factory()


def available_transports() -> list[str]:
    return sorted(_REGISTRY)


def _register_builtins() -> None:
    from node_agent.transports.loop import LoopTransport

    register_transport(LoopTransport.name, LoopTransport)


_register_builtins()
