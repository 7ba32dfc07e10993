"""Transports: how a volume becomes a block device on this node, keyed by volume id.

The initiator half of the attach contract (docs/data-path.md): `connect`
takes the connection info management answered at ControllerPublish and
gives back a block device; `disconnect`, `extend` and `devices` are keyed
by the same volume id. `loop` is a volume file in one of this node's
pools; `nbd` is another node's export. Only this package branches on the
transport: attachments, the API and the CSI plugin pass `Connection`
through untouched.

What is connected must be recoverable after any restart of the agent:
`loop` asks the kernel (bound loop devices and their backing files), `nbd`
keeps a small record next to its FUSE mount and re-adopts the processes
that outlived the agent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from tessera.errors import FailedPrecondition, InvalidArgument
from tessera.models import Connection
from tessera.system import blockdev

if TYPE_CHECKING:
    from node_agent.pools import Pool


@dataclass(frozen=True)
class BlockDevice:
    """A device a transport made: the volume it serves, its node, what backs it, and how.

    `view_key` is empty for a volume's primary device (the one behind
    /dev/tessera/<id>); a read-only view (an extra device on the same
    volume, for one read-only publish) carries its key, which the
    transport reads back from the kernel after a restart.
    """

    volume_id: str
    path: str
    backing: str
    readonly: bool
    transport: str
    view_key: str = ""


@runtime_checkable
class Transport(Protocol):
    name: str

    def connect(self, volume_id: str, connection: Connection, readonly: bool) -> BlockDevice:
        """Make the volume's primary device (callers check what exists first)."""
        ...

    def add_view(self, primary: BlockDevice, view_key: str) -> BlockDevice:
        """A read-only device on the same data as `primary`, tagged with its key."""
        ...

    def devices(self) -> list[BlockDevice]:
        """Every device this transport has on the node, primaries and views."""
        ...

    def connection_of(self, device: BlockDevice) -> Connection:
        """The connection info the primary device was made from."""
        ...

    def is_current(self, device: BlockDevice, connection: Connection) -> bool:
        """Whether the device was made from this publish (not an older one whose export,
        or key, has since been replaced)."""
        ...

    def release(self, device: BlockDevice) -> None:
        """Release one device (a view, or a primary before `disconnect`); gone is fine."""
        ...

    def disconnect(self, volume_id: str) -> None:
        """Tear down what is left under the volume's devices (processes, mounts, records).

        Called after every device of the volume was released; nothing left is fine.
        """
        ...

    def extend(self, device: BlockDevice, min_size_bytes: int = 0) -> None:
        """Let the device show the volume's current size where that is cheap; with
        `min_size_bytes` above its size, whatever it takes (a remote device reconnects)."""
        ...

    def size_bytes(self, device: BlockDevice) -> int:
        """The device's size as the kernel currently sees it."""
        ...

    def condition(self, device: BlockDevice, probe: bool = False) -> str:
        """Empty when the data path works; else why not, naming the node at fault.

        `probe`: also ask the far end (a network round trip, up to a second
        against a host that drops packets): for one volume's stats, never
        for listing every attachment.
        """
        ...

    def connections(self) -> dict[str, float]:
        """Volume id -> when it was connected, for what management may take back.

        Only connections to another node's export: a local volume is never
        taken back from its own node. Includes half-made ones (state but no
        device, after a crash between two steps).
        """
        ...


def refuse_reconnect_while_held(device: BlockDevice, views: list[BlockDevice], how: str) -> None:
    """NBD fixes an export's size when its client connects, so a device over NBD shows a
    grown volume only after a reconnect, which takes the device (and the views on it)
    away: refused, saying when the size will show, while anything uses them.

    `how` says what the volume is attached over ("is attached over nbdfuse").
    """
    held = blockdev.holders(device.path) + [f"read-only view {v.path}" for v in views]
    if held:
        raise FailedPrecondition(
            f"volume {device.volume_id} {how}, which shows a grown volume only after "
            f"reconnecting, and {device.path} is in use ({'; '.join(held)}); the new size "
            "appears once the volume is unstaged and staged again",
            field="volume_id",
        )


TransportFactory = Callable[["dict[str, Pool]", Path, Callable[[str], Path]], Transport]
_REGISTRY: dict[str, TransportFactory] = {}


def register_transport(name: str, factory: TransportFactory) -> None:
    _REGISTRY[name] = factory


def available_transports() -> list[str]:
    return sorted(_REGISTRY)


def build_transports(
    pools: dict[str, Pool], state_dir: Path, key_path: Callable[[str], Path]
) -> dict[str, Transport]:
    """One of each registered transport: `state_dir` is where they keep records,
    `key_path(volume_id)` where the TLS-PSK key of a remote volume is."""
    return {name: factory(pools, state_dir, key_path) for name, factory in _REGISTRY.items()}


def check_transport(name: str, transports: dict[str, Transport]) -> Transport:
    try:
        return transports[name]
    except KeyError:
        known = ", ".join(sorted(transports)) or "none"
        raise InvalidArgument(
            f"connection.transport {name!r} is not offered by this node-agent (offered: {known})",
            field="connection.transport",
        ) from None


def _register_builtins() -> None:
    from node_agent.transports.composed import ComposedTransport
    from node_agent.transports.loop import LoopTransport
    from node_agent.transports.nbd import NbdTransport
    from node_agent.transports.nvme_tcp import NvmeTcpTransport

    register_transport(LoopTransport.name, lambda pools, _state, _keys: LoopTransport(pools))
    register_transport(NbdTransport.name, NbdTransport.from_state_dir)
    register_transport(NvmeTcpTransport.name, NvmeTcpTransport.from_state_dir)
    register_transport(ComposedTransport.name, ComposedTransport.from_state_dir)


_register_builtins()
