"""The loop transport: the volume's file is in one of this node's pools.

A loop device straight on the file: kernel speed, no extra process.
Direct I/O is requested so the page cache is not doubled (file + device);
filesystems that cannot do it get a buffered device instead. The kernel is
the record: bound loop devices and their backing files say what is
attached, so a restarted agent never attaches a volume a second time.
"""

from __future__ import annotations

import os
from pathlib import Path

from node_agent.pools import Pool
from node_agent.transports import BlockDevice, loops
from tessera.errors import NotFound
from tessera.models import Connection, Transport


class LoopTransport:
    name = Transport.LOOP.value

    def __init__(self, pools: dict[str, Pool]) -> None:
        self.pools = pools

    def connect(self, volume_id: str, connection: Connection, readonly: bool) -> BlockDevice:
        return loops.bind(volume_id, str(self._volume_file(volume_id)), readonly, self.name)

    def add_view(self, primary: BlockDevice, view_key: str) -> BlockDevice:
        return loops.bind(primary.volume_id, primary.backing, True, self.name, view_key)

    def devices(self) -> list[BlockDevice]:
        return loops.bound(self._volume_of, self.name)

    def connection_of(self, device: BlockDevice) -> Connection:
        return Connection(transport=Transport.LOOP)

    def is_current(self, device: BlockDevice, connection: Connection) -> bool:
        return True  # the file is the file: nothing of a publish to go stale

    def release(self, device: BlockDevice) -> None:
        loops.unbind(device)

    def disconnect(self, volume_id: str) -> None:
        """Nothing lives under a loop device but the file, which stays."""

    def extend(self, device: BlockDevice, min_size_bytes: int = 0) -> None:
        loops.refresh_if_grown(device)

    def size_bytes(self, device: BlockDevice) -> int:
        return loops.size_bytes(device)

    def condition(self, device: BlockDevice, probe: bool = False) -> str:
        if not os.path.exists(device.backing):
            return f"the volume file {device.backing} is gone"
        return ""

    def connections(self) -> dict[str, float]:
        return {}  # the data is here: nothing to take back

    def _volume_file(self, volume_id: str) -> Path:
        for pool in self.pools.values():
            path = pool.volume_path(volume_id)
            if path.is_file():
                return path
        raise NotFound(f"volume {volume_id} is not in any pool on this node")

    def _volume_of(self, backing: str) -> str | None:
        for pool in self.pools.values():
            volume_id = pool.volume_id_of(backing)
            if volume_id is not None:
                return volume_id
        return None
