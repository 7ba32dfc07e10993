"""`tessera dev up`'s file-backed pool: the node agent's `--file-pool`, one copy.

The image, its loop device, XFS and the mount are made by
`node_agent.file_pools` (what `tessera-node-agent --file-pool` runs), so a
dev stack's pool and a cluster node's file pool are made the same way.
"""

from __future__ import annotations

from node_agent.file_pools import ensure_file_pool as ensure_pool
from node_agent.file_pools import is_mounted
from node_agent.file_pools import release_file_pool as release_pool
from tessera.errors import TesseraError as PoolError

__all__ = ["PoolError", "ensure_pool", "is_mounted", "release_pool"]
