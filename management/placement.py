"""Where a volume goes, and how much room pools have.

Free space is derived, never stored: capacity minus the sizes of the
volume legs in the pool, written or not, and minus what the pool's
snapshots may pin (their `allocated_bytes`). The capacity is what the agent
measured the pool's filesystem can really give to volumes (see
node_agent.pools.Pool.capacity_bytes), so every placed byte can be written.

Callers that place or grow run inside `Database.write()` (BEGIN IMMEDIATE
on SQLite) and these queries lock pool rows FOR UPDATE on PostgreSQL, so
the space they see stays theirs until commit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Select, bindparam, func, select
from sqlalchemy.orm import Session

from management.schema import DiscardedLegRow, NodeRow, PoolRow, SnapshotRow, VolumeLegRow
from tessera.errors import OutOfRange, ResourceExhausted
from tessera.models import Locality
from tessera.units import format_size


@dataclass(frozen=True)
class PoolSpace:
    node_id: str
    name: str
    capacity_bytes: int
    allocated_bytes: int
    agent_url: str = ""
    #: physical use and snapshot method as the agent reported them (shown, not placed by)
    used_bytes: int = 0
    snapshot_method: str = "none"

    @property
    def free_bytes(self) -> int:
        return max(self.capacity_bytes - self.allocated_bytes, 0)


def allocated_by_pool(session: Session, node_id: str | None = None) -> dict[tuple[str, str], int]:
    """Logical allocation per pool: the legs placed there (live or waiting to be deleted)
    plus what its snapshots may pin."""
    out: dict[tuple[str, str], int] = {}
    for table, size in (
        (VolumeLegRow, VolumeLegRow.size_bytes),
        (DiscardedLegRow, DiscardedLegRow.size_bytes),
        (SnapshotRow, SnapshotRow.allocated_bytes),
    ):
        stmt = select(table.node_id, table.pool, func.sum(size)).group_by(table.node_id, table.pool)
        if node_id is not None:
            stmt = stmt.where(table.node_id == node_id)
        for n, p, total in session.execute(stmt):
            out[(n, p)] = out.get((n, p), 0) + int(total or 0)
    return out


# A snapshot pins at most the bytes its source had written when it was cut: copy-on-write
# writes to the source (or the snapshot's clones) may need that much again, so it is
# promised like a leg and a write the pool accepted never meets ENOSPC.
_ALLOCATED = (
    (
        select(func.coalesce(func.sum(VolumeLegRow.size_bytes), 0))
        .where(VolumeLegRow.node_id == PoolRow.node_id, VolumeLegRow.pool == PoolRow.name)
        .correlate(PoolRow)
        .scalar_subquery()
    )
    + (
        # a discarded leg's file is still there until its node deletes it
        select(func.coalesce(func.sum(DiscardedLegRow.size_bytes), 0))
        .where(DiscardedLegRow.node_id == PoolRow.node_id, DiscardedLegRow.pool == PoolRow.name)
        .correlate(PoolRow)
        .scalar_subquery()
    )
    + (
        select(func.coalesce(func.sum(SnapshotRow.allocated_bytes), 0))
        .where(SnapshotRow.node_id == PoolRow.node_id, SnapshotRow.pool == PoolRow.name)
        .correlate(PoolRow)
        .scalar_subquery()
    )
)


def _pool_space_statement(by_node: bool, lock: bool) -> Select[Any]:
    stmt = (
        select(PoolRow.node_id, PoolRow.name, PoolRow.capacity_bytes, _ALLOCATED, NodeRow.agent_url)
        .join(NodeRow, NodeRow.id == PoolRow.node_id)
        .where(NodeRow.last_heartbeat >= bindparam("online_since"), NodeRow.fenced_at == 0)
        .order_by(PoolRow.node_id, PoolRow.name)
    )
    if by_node:
        stmt = stmt.where(PoolRow.node_id.in_(bindparam("node_ids", expanding=True)))
    if lock:
        stmt = stmt.with_for_update(of=PoolRow)
    return stmt


# Built once: placement runs one of these for every volume create, and
# building and cache-keying a statement costs more than SQLite running it.
_POOL_SPACE = {by_node: _pool_space_statement(by_node, False) for by_node in (False, True)}
_LOCK_POOLS = {
    by_node: _pool_space_statement(by_node, True).with_only_columns(PoolRow.node_id)
    for by_node in (False, True)
}


def pool_space(
    conn: Session | Connection,
    *,
    online_since: float | None = None,
    node_ids: Sequence[str] | None = None,
    lock: bool = False,
) -> list[PoolSpace]:
    """Pools (optionally only of online nodes / given nodes) with their allocation.

    A fenced node's pools are never listed: nothing new goes to a node that
    was cut off until it beats again.

    With `lock`, PostgreSQL first locks the pool rows FOR UPDATE and only
    then sums their volumes, in a second statement: under READ COMMITTED
    that statement's snapshot sees what a transaction we waited for
    committed, so two creates can never both count the same free space.
    SQLite needs no lock: BEGIN IMMEDIATE already serialises writers.
    """
    params: dict[str, Any] = {"online_since": -math.inf if online_since is None else online_since}
    if node_ids is not None:
        params["node_ids"] = list(node_ids)
    bind = conn if isinstance(conn, Connection) else conn.get_bind()
    if lock and bind.dialect.name != "sqlite":
        conn.execute(_LOCK_POOLS[node_ids is not None], params)
    stmt = _POOL_SPACE[node_ids is not None]
    return [
        PoolSpace(node_id, name, capacity, int(allocated), agent_url)
        for node_id, name, capacity, allocated, agent_url in conn.execute(stmt, params)
    ]


def choose_pool(
    candidates: list[PoolSpace],
    size_bytes: int,
    locality: Locality,
    preferred_nodes: Sequence[str],
) -> PoolSpace:
    """The pool for a new volume among `candidates` (already narrowed by `candidate_nodes`).

    `any` spreads by free space: the pool with most free space wins and the
    preferred order is ignored. `preferred` tries the preferred nodes in
    their order, then the other candidates by free space. `required` has
    at most one node left, so order does not matter there.

    Too big for any pool even when empty is OutOfRange (retrying cannot help);
    fits in principle but nothing has room now is ResourceExhausted.
    """
    if not candidates:
        raise ResourceExhausted(
            "no online node with a pool matches the placement request "
            "(check node heartbeats and requisite_nodes)",
            field="requisite_nodes",
        )
    largest = max(c.capacity_bytes for c in candidates)
    if size_bytes > largest:
        raise OutOfRange(
            f"size_bytes {format_size(size_bytes)} is larger than the largest eligible pool; "
            f"the maximum volume size is {format_size(largest)} ({largest} bytes)",
            field="size_bytes",
        )
    fitting = [c for c in candidates if c.free_bytes >= size_bytes]
    if not fitting:
        best = max(c.free_bytes for c in candidates)
        raise ResourceExhausted(
            f"no pool has {format_size(size_bytes)} free right now "
            f"(most free: {format_size(best)}); free space or add capacity",
            field="size_bytes",
        )
    order = preferred_nodes if locality == Locality.PREFERRED else ()
    rank = {node: i for i, node in reversed(list(enumerate(order)))}
    return min(
        fitting,
        key=lambda c: (rank.get(c.node_id, len(rank)), -c.free_bytes, c.node_id, c.name),
    )


def place_legs(
    pools: list[PoolSpace],
    *,
    legs: int,
    leg_bytes: int,
    zones: dict[str, str],
    first_nodes: Sequence[str] | None = None,
    locality: Locality = Locality.ANY,
    preferred_nodes: Sequence[str] = (),
    exclude_nodes: Sequence[str] = (),
) -> list[PoolSpace]:
    """One pool for each of `legs` legs of `leg_bytes`, each on a distinct node.

    `pools` are every online pool; `zones` maps a node to its zone label
    (nodes without one are absent: together they count as one unknown zone).
    The first leg honours the request's topology (`first_nodes`: None for any
    node; the locality and preferred order as choose_pool does); the others
    go to the nodes with the most free space, in zones no earlier leg took
    as long as there are such zones. Nodes in `exclude_nodes` (those already holding a leg of the
    volume, for a repair) get none.

    Too big for every pool even when empty is OutOfRange; fewer eligible
    nodes (online, not fenced, with a pool that has room) than legs is
    ResourceExhausted naming both numbers: retrying may help once a node
    joins or space is freed.
    """
    excluded = set(exclude_nodes)
    usable = [p for p in pools if p.node_id not in excluded]
    if usable and leg_bytes > max(p.capacity_bytes for p in usable):
        largest = max(p.capacity_bytes for p in usable)
        raise OutOfRange(
            f"each of the {legs} legs needs {format_size(leg_bytes)}, more than the largest "
            f"eligible pool ({format_size(largest)}); pick a smaller size",
            field="size_bytes",
        )
    fitting = [p for p in usable if p.free_bytes >= leg_bytes]
    eligible = {p.node_id for p in fitting}
    if len(eligible) < legs:
        raise ResourceExhausted(
            f"the volume needs {legs} distinct nodes with a pool of {format_size(leg_bytes)} "
            f"free (one per leg) and {len(eligible)} are eligible (online, not fenced, with "
            "room" + (", holding no leg of the volume" if excluded else "") + "); add nodes "
            "or free space",
            field="size_bytes",
        )
    first_pools = (
        fitting if first_nodes is None else [p for p in fitting if p.node_id in set(first_nodes)]
    )
    if not first_pools:
        raise ResourceExhausted(
            f"no node allowed by the request's topology ({', '.join(first_nodes or [])}) has "
            f"an online pool with {format_size(leg_bytes)} free for the first leg",
            field="requisite_nodes",
        )
    chosen = [choose_pool(first_pools, leg_bytes, locality, preferred_nodes)]
    while len(chosen) < legs:
        used_nodes = {c.node_id for c in chosen}
        # nodes without a zone label are one unknown zone "", not each a zone of its own
        used_zones = {zones.get(c.node_id, "") for c in chosen}
        rest = [p for p in fitting if p.node_id not in used_nodes]
        chosen.append(
            min(
                rest,
                key=lambda p: (
                    zones.get(p.node_id, "") in used_zones,
                    -p.free_bytes,
                    p.node_id,
                    p.name,
                ),
            )
        )
    return chosen
