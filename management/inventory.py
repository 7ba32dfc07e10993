"""Nodes, pools, volume provisioning groups and capacity.

Node-agents register themselves and their pools (upserts, so an agent can
simply re-register after every restart) and heartbeat; a node counts as
online while its heartbeat is fresh and it is not fenced (management.liveness),
and only online nodes get new volumes. A fence is lifted only by an admin
(`unfence_node`): neither a heartbeat nor a registration clears it.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from management.context import Context
from management.db import again_on_conflict, read_epoch
from management.limits import check_bytes, check_count, check_text
from management.liveness import node_state
from management.pagination import fetch_page
from management.placement import PoolSpace, allocated_by_pool, pool_space
from management.schema import AttachmentRow, NodeRow, PoolRow, VolumeLegRow, VpgRow
from tessera import ids, layouts
from tessera.errors import AlreadyExists, InvalidArgument, NotFound
from tessera.models import (
    Capacity,
    ExportRef,
    HeartbeatReply,
    Layout,
    Locality,
    Node,
    NodeRegistration,
    NodeState,
    Page,
    Pool,
    PoolRegistration,
    SnapshotMethod,
    Transport,
    Vpg,
    VpgCreate,
)
from tessera.units import format_size, parse_size

DEFAULT_VPG = "default"
#: the StorageClass parameter (stored with the volume) that forces a remote transport
TRANSPORT_PARAMETER = "transport"
TRANSPORT_CHOICES = (Transport.NBD.value, Transport.NVME_TCP.value)

log = logging.getLogger(__name__)


# ---- nodes ---------------------------------------------------------------------------


def node_model(ctx: Context, row: NodeRow) -> Node:
    state = node_state(ctx, row)
    return Node(
        id=row.id,
        agent_url=row.agent_url,
        topology=dict(row.topology or {}),
        max_volumes=row.max_volumes,
        transports=node_transports(row),
        kernel_nbd=bool(row.kernel_nbd),
        last_heartbeat=row.last_heartbeat,
        online=state == NodeState.ONLINE,
        state=state,
        fenced_at=row.fenced_at or 0.0,
    )


def node_transports(row: NodeRow | Any) -> list[str]:
    """What the node's agent said it can serve and attach over (loop and nbd before it said)."""
    return [t for t in (row.transports or "loop,nbd").split(",") if t]


def register_node(ctx: Context, node_id: str, reg: NodeRegistration) -> Node:
    ids.check_node_id(node_id)
    _check_agent_url(reg.agent_url)
    check_count(reg.max_volumes, "max_volumes")
    for key, value in reg.topology.items():
        check_text(key, "topology")
        check_text(value, "topology")
    return again_on_conflict(lambda: _upsert_node(ctx, node_id, reg))


def _upsert_node(ctx: Context, node_id: str, reg: NodeRegistration) -> Node:
    with ctx.db.write() as s:
        row = s.get(NodeRow, node_id)
        if row is None:
            row = NodeRow(id=node_id)
            s.add(row)
        row.agent_url = reg.agent_url
        row.topology = dict(reg.topology)
        row.max_volumes = reg.max_volumes
        # in the order of tessera.models.Transport, once each, whatever the agent sent
        row.transports = ",".join(t.value for t in Transport if t in reg.transports)
        row.kernel_nbd = reg.kernel_nbd
        row.last_heartbeat = ctx.clock()
        # fenced_at stays: fencing is lifted only by an admin (unfence_node), never by
        # the node itself, which may come back with a pod still writing to a local volume
        s.flush()
        return node_model(ctx, row)


def unfence_node(ctx: Context, node_id: str) -> Node:
    """Lift a fence (an admin's decision, once the node was repaired or rebooted). Idempotent.

    Only after this may the node attach, host new volumes and export again.
    Its old attachments were released by the fence, so its heartbeat reply
    keeps telling it to hold nothing of them.
    """
    ids.check_node_id(node_id)
    with ctx.db.write() as s:
        row = get_node_row(s, node_id)
        if row.fenced_at:
            log.warning("node %s unfenced (it was fenced at %s)", node_id, row.fenced_at)
            row.fenced_at = 0.0
        return node_model(ctx, row)


def _check_agent_url(url: str) -> None:
    check_text(url, "agent_url")
    if not url.startswith(("unix:///", "http://", "https://")):
        raise InvalidArgument(
            f"agent_url {url[:80]!r} must start with unix:///, http:// or https://",
            field="agent_url",
        )


def heartbeat(ctx: Context, node_id: str) -> HeartbeatReply:
    """Record the beat and tell the node what management still wants of it.

    A node that was fenced (or cut off long enough for its attachments to
    be released) holds devices and exports nothing wants any more; the reply
    lists what is still wanted, so the agent tears down the rest. The lists
    come from the same transaction that records the beat, so an attachment
    made after it is never missing from a later reply.

    A fenced node stays fenced when it beats (only unfence_node lifts it):
    its reply says `fenced` and lists no attachment, so its agent drops every
    remote connection it still has. It still lists the exports of volumes
    the node owns to other nodes: fencing cuts the fenced node off, not the
    healthy nodes that reach their data through it. The epoch tells the
    agent which database said so (management.db.ensure_epoch).
    """
    ids.check_node_id(node_id)
    with ctx.db.write() as s:
        row = s.get(NodeRow, node_id)
        if row is None:
            raise NotFound(f"node {node_id!r} is not registered", field="node_id")
        row.last_heartbeat = ctx.clock()
        epoch = read_epoch(s)
        # every remote attachment of a volume with a live leg here (a one-leg volume's
        # owner, or a leg of a composed one): a stale leg's export is not listed, so goes
        exports = [
            ExportRef(volume_id=v, client_node=n)
            for v, n in s.execute(
                select(AttachmentRow.volume_id, AttachmentRow.node_id)
                .join(VolumeLegRow, VolumeLegRow.volume_id == AttachmentRow.volume_id)
                .where(
                    VolumeLegRow.node_id == node_id,
                    AttachmentRow.node_id != node_id,
                    AttachmentRow.transport != Transport.LOOP.value,
                )
                .distinct()
                .order_by(AttachmentRow.volume_id, AttachmentRow.node_id)
            )
        ]
        if row.fenced_at:
            return HeartbeatReply(state=NodeState.FENCED, epoch=epoch, exports=exports)
        attached = s.scalars(
            select(AttachmentRow.volume_id)
            .where(AttachmentRow.node_id == node_id)
            .order_by(AttachmentRow.volume_id)
        )
        return HeartbeatReply(
            state=NodeState.ONLINE, epoch=epoch, attachments=list(attached), exports=exports
        )


def get_node_row(s: Session, node_id: str, *, lock: bool = False) -> NodeRow:
    """The node's row; NotFound when it is not registered.

    `lock` (in a write transaction): on PostgreSQL the row stays locked
    (FOR NO KEY UPDATE) until commit, so checks that count what the node
    holds (max_volumes) or read its fence are not passed by two concurrent
    transactions at once. It does not block inserts that merely reference
    the node (their foreign key takes a KEY SHARE lock). SQLite omits it:
    BEGIN IMMEDIATE already serialises writers.
    """
    ids.check_node_id(node_id)
    row = s.get(NodeRow, node_id, with_for_update={"key_share": True} if lock else None)
    if row is None:
        raise NotFound(f"node {node_id!r} is not registered", field="node_id")
    return row


def get_node(ctx: Context, node_id: str) -> Node:
    with ctx.db.read() as s:
        return node_model(ctx, get_node_row(s, node_id))


def list_nodes(ctx: Context, page_token: str, max_entries: int) -> Page[Node]:
    with ctx.db.read() as s:
        rows, token = fetch_page(s, NodeRow, [NodeRow.id], page_token, max_entries)
    return Page[Node](items=[node_model(ctx, r) for r in rows], next_token=token)


# ---- pools ---------------------------------------------------------------------------


def pool_model(space: PoolSpace) -> Pool:
    return Pool(
        node_id=space.node_id,
        name=space.name,
        capacity_bytes=space.capacity_bytes,
        allocated_bytes=space.allocated_bytes,
        free_bytes=space.free_bytes,
        used_bytes=space.used_bytes,
        snapshot_method=SnapshotMethod(space.snapshot_method),
    )


def register_pool(ctx: Context, node_id: str, pool: str, reg: PoolRegistration) -> Pool:
    ids.check_node_id(node_id)
    ids.check_name(pool, "pool")
    check_bytes(reg.capacity_bytes, "capacity_bytes")
    return again_on_conflict(lambda: _upsert_pool(ctx, node_id, pool, reg))


def _upsert_pool(ctx: Context, node_id: str, pool: str, reg: PoolRegistration) -> Pool:
    with ctx.db.write() as s:
        get_node_row(s, node_id)
        row = s.get(PoolRow, (node_id, pool))
        if row is None:
            row = PoolRow(node_id=node_id, name=pool)
            s.add(row)
        row.capacity_bytes = reg.capacity_bytes
        row.used_bytes = reg.used_bytes
        row.snapshot_method = reg.snapshot_method.value
        s.flush()
        allocated = allocated_by_pool(s, node_id).get((node_id, pool), 0)
        return pool_model(_space(row, allocated))


def list_pools(ctx: Context, page_token: str, max_entries: int) -> Page[Pool]:
    keys = [PoolRow.node_id, PoolRow.name]
    with ctx.db.read() as s:
        rows, token = fetch_page(s, PoolRow, keys, page_token, max_entries)
        used = allocated_by_pool(s)
    items = [pool_model(_space(r, used.get((r.node_id, r.name), 0))) for r in rows]
    return Page[Pool](items=items, next_token=token)


def _space(row: PoolRow, allocated: int) -> PoolSpace:
    return PoolSpace(
        row.node_id,
        row.name,
        row.capacity_bytes,
        allocated,
        used_bytes=row.used_bytes or 0,
        snapshot_method=row.snapshot_method or SnapshotMethod.NONE.value,
    )


# ---- volume provisioning groups ------------------------------------------------------


def ensure_default_vpg(ctx: Context) -> None:
    """Every installation has a `default` concat vpg, so a bare StorageClass works."""
    try:
        with ctx.db.write() as s:
            if s.get(VpgRow, DEFAULT_VPG) is None:
                s.add(VpgRow(name=DEFAULT_VPG, layout="concat"))
    except IntegrityError:
        pass  # another replica created it first


def parse_vpg_flag(text: str) -> VpgCreate:
    """`NAME=LAYOUT[,legs=N][,chunk=SIZE]` of `tessera-management --vpg`.

    InvalidArgument naming what is wrong; the values are checked as the
    REST create checks them (resolve_vpg), so a bad flag stops the start.
    """
    name, sep, rest = text.partition("=")
    layout, *options = rest.split(",")
    if not sep or not layout:
        raise InvalidArgument(
            f"--vpg {text[:80]!r}: expected NAME=LAYOUT[,legs=N][,chunk=SIZE] "
            "(e.g. fast=concat, safe=raid1,legs=2, wide=raid0,legs=4,chunk=128K)",
            field="vpg",
        )
    fields: dict[str, int] = {}
    for option in options:
        key, eq, value = option.partition("=")
        target = {"legs": "legs", "chunk": "chunk_bytes"}.get(key.strip())
        if not eq or target is None or target in fields:
            raise InvalidArgument(
                f"--vpg {text[:80]!r}: {option[:40]!r} is not legs=N or chunk=SIZE (each once)",
                field="vpg",
            )
        try:
            fields[target] = int(value) if target == "legs" else parse_size(value)
        except ValueError:
            raise InvalidArgument(
                f"--vpg {text[:80]!r}: {key.strip()}={value[:40]!r} is not a "
                f"{'number' if target == 'legs' else 'size (e.g. 64K)'}",
                field="vpg",
            ) from None
    try:
        req = VpgCreate(name=name, layout=layout, **fields)
    except ValidationError as err:
        where = str(err.errors()[0]["loc"][0]) if err.errors()[0]["loc"] else "name"
        rule = {
            "legs": "legs must be 0-16",
            "chunk_bytes": "chunk must be at most 16 MiB",
        }.get(where, "the name must be 1-63 letters, digits, '.', '_' or '-'")
        raise InvalidArgument(f"--vpg {text[:80]!r}: {rule}", field="vpg") from None
    try:
        resolve_vpg(req)
    except InvalidArgument as err:
        raise InvalidArgument(f"--vpg {text[:80]!r}: {err.message}", field="vpg") from None
    return req


def ensure_vpgs(ctx: Context, wanted: list[VpgCreate]) -> list[Vpg]:
    """Create the vpgs `--vpg` names at start; those that exist with the same layout stay.

    Idempotent, so every start (and every replica) may run it. A vpg that
    exists with another layout, leg count or chunk is not changed (its
    volumes were made for the old one): AlreadyExists, which stops the
    start with a message saying which vpg and both values.
    """
    ensured = []
    for req in wanted:
        try:
            ensured.append(create_vpg(ctx, req)[0])
        except AlreadyExists as err:
            raise AlreadyExists(
                f"--vpg {req.name}={req.layout}: {err.message}; a vpg's layout cannot change "
                "(its volumes were placed for it): pick another name, or pass the existing layout",
                field="vpg",
            ) from None
    return ensured


def check_layout(layout: str) -> Layout:
    try:
        return Layout(layout)
    except ValueError:
        raise InvalidArgument(
            f"layout {layout[:40]!r} is not one of {', '.join(v.value for v in Layout)}",
            field="layout",
        ) from None


def resolve_vpg(req: VpgCreate) -> Vpg:
    """The vpg a request makes: its layout checked, legs and chunk resolved to their defaults.

    legs within tessera.layouts.LEG_RANGE; chunk a power of two of at least
    4 KiB, and only for layouts that stripe (raid1 and concat have none).
    """
    layout = check_layout(req.layout)
    legs = req.legs or layouts.DEFAULT_LEGS[layout]
    low, high = layouts.LEG_RANGE[layout]
    if not low <= legs <= high:
        raise InvalidArgument(
            f"legs {legs} is outside {low}-{high}, the range layout {layout.value} takes",
            field="legs",
        )
    chunk = req.chunk_bytes
    if not layouts.is_striped(layout):
        if chunk:
            raise InvalidArgument(
                f"chunk_bytes applies to striped layouts (raid0, raid10), not {layout.value}",
                field="chunk_bytes",
            )
    elif not chunk:
        chunk = layouts.DEFAULT_CHUNK
    elif chunk < layouts.MIN_CHUNK or chunk & (chunk - 1):
        raise InvalidArgument(
            f"chunk_bytes {chunk} must be a power of two of at least "
            f"{format_size(layouts.MIN_CHUNK)}",
            field="chunk_bytes",
        )
    return Vpg(name=req.name, layout=layout.value, legs=legs, chunk_bytes=chunk)


def vpg_model(row: VpgRow) -> Vpg:
    return Vpg(name=row.name, layout=row.layout, legs=row.legs or 1, chunk_bytes=row.chunk_bytes)


def create_vpg(ctx: Context, req: VpgCreate) -> tuple[Vpg, bool]:
    """Create a vpg; idempotent by name and resolved values. Returns (vpg, created)."""
    ids.check_name(req.name, "name")
    wanted = resolve_vpg(req)
    return again_on_conflict(lambda: _get_or_insert_vpg(ctx, wanted))


def _get_or_insert_vpg(ctx: Context, wanted: Vpg) -> tuple[Vpg, bool]:
    with ctx.db.write() as s:
        row = s.get(VpgRow, wanted.name)
        if row is None:
            s.add(VpgRow(**wanted.model_dump()))
            return wanted, True
        found = vpg_model(row)
        for field in ("layout", "legs", "chunk_bytes"):
            if getattr(found, field) != getattr(wanted, field):
                raise AlreadyExists(
                    f"vpg {wanted.name!r} exists with {field} {getattr(found, field)!r}, "
                    f"not {getattr(wanted, field)!r}",
                    field=field,
                )
        return found, False


def get_vpg_row(conn: Session | Connection, name: str) -> Any:
    """The vpg's (layout, legs, chunk_bytes); NotFound as check_vpg_exists."""
    check_vpg_exists(conn, name)
    stmt = select(VpgRow.layout, VpgRow.legs, VpgRow.chunk_bytes).where(VpgRow.name == name)
    return conn.execute(stmt).one()


_VPG_EXISTS = select(VpgRow.name).where(VpgRow.name == bindparam("name"))


def check_vpg_exists(conn: Session | Connection, name: str) -> None:
    """NotFound unless the vpg exists (a Core statement: volume create runs it every time).

    A name no vpg could have (vpg names pass ids.check_name) is not looked
    up: PostgreSQL refuses a NUL in a query parameter with an error, where
    the answer is simply that no such vpg exists.
    """
    if (
        not name
        or not _could_be_name(name)
        or conn.execute(_VPG_EXISTS, {"name": name}).first() is None
    ):
        raise NotFound(f"volume provisioning group {name[:80]!r} does not exist", field="vpg")


def _could_be_name(name: str) -> bool:
    try:
        ids.check_name(name)
    except InvalidArgument:
        return False
    return True


def list_vpgs(ctx: Context, page_token: str, max_entries: int) -> Page[Vpg]:
    with ctx.db.read() as s:
        rows, token = fetch_page(s, VpgRow, [VpgRow.name], page_token, max_entries)
    return Page[Vpg](items=[vpg_model(r) for r in rows], next_token=token)


# ---- capacity ------------------------------------------------------------------------


def capacity(ctx: Context, vpg: str, node_id: str, locality: Locality = Locality.ANY) -> Capacity:
    """What a new volume reachable from `node_id` could get now: the most free space in one pool.

    With locality `required` the volume must be on `node_id` itself, so only
    its pools count. Otherwise (`any`, `preferred`) a volume placed on any
    online node is reachable from every node over the network, so every
    online pool counts; `node_id` must still be a node management knows
    (an unknown one gets 0, as it would get no attachment).

    A concat volume lives in a single pool, so the sum over pools would
    promise space no single volume can have. Free space is exactly what
    placement checks (`PoolSpace.free_bytes`): the capacity the agent
    measured (what the pool's filesystem can really give, less its reserve;
    node_agent.pools.Pool.capacity_bytes) minus the sizes of the volumes
    placed there, so GetCapacity never offers what a create would refuse.
    """
    with ctx.db.read() as s:
        layout, legs, chunk = get_vpg_row(s, vpg)
        node_ids = [ids.check_node_id(node_id)] if node_id else None
        if node_id and locality != Locality.REQUIRED:
            node_ids = None if s.get(NodeRow, node_id) is not None else []
        if layout != Layout.CONCAT and node_ids is not None and node_ids:
            node_ids = None  # the other legs go to other nodes; the first is pinned below
        pools = pool_space(s, online_since=ctx.online_since(), node_ids=node_ids)
    if layout != Layout.CONCAT:
        first = node_id if node_id and locality == Locality.REQUIRED else None
        best = _layout_capacity(pools, Layout(layout), legs, chunk, first)
    else:
        best = max((p.free_bytes for p in pools), default=0)
    return Capacity(available_bytes=best, maximum_volume_bytes=best)


def _layout_capacity(
    pools: list[PoolSpace], layout: Layout, legs: int, chunk: int, first: str | None
) -> int:
    """The largest multi-leg volume placement would accept now: each of `legs` distinct
    nodes needs one pool with a leg's room (`first`, when given, must be one of them)."""
    best: dict[str, int] = {}
    for p in pools:
        best[p.node_id] = max(best.get(p.node_id, 0), p.free_bytes)
    if first is not None:
        if first not in best:
            return 0
        pinned = [best.pop(first)]
    else:
        pinned = []
    rest = sorted(best.values(), reverse=True)[: legs - len(pinned)]
    if len(pinned) + len(rest) < legs:
        return 0
    leg_room = min(pinned + rest)  # what the smallest of the chosen legs may hold
    data = leg_room - (layouts.MD_DATA_OFFSET if layouts.is_mirrored(layout) else 0)
    if data <= 0:
        return 0
    size = {Layout.RAID0: data * legs, Layout.RAID10: data * legs // 2}.get(layout, data)
    unit = layouts.volume_size(layout, 1, legs, chunk)  # the size every volume is a multiple of
    return size // unit * unit
