"""Volume lifecycle: create (idempotent by name), get, list, expand, delete.

Database state changes commit BEFORE the node-agent is called and the
agent call happens outside any transaction: a slow or dead agent must not
hold the database write lock. The row records what is still owed to the
agent (`state`, `agent_size_bytes`), so a retry of the same request - which
kubelet and the CSI sidecars do forever - re-drives the idempotent agent
call and converges.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import Connection, Row, bindparam, case, insert, literal, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from management import liveness, snapshots
from management.context import Context
from management.inventory import TRANSPORT_CHOICES, TRANSPORT_PARAMETER, get_vpg_row
from management.limits import check_text, sized_within_limit
from management.pagination import fetch_page
from management.placement import PoolSpace, choose_pool, place_legs, pool_space
from management.schema import (
    AttachmentRow,
    DiscardedLegRow,
    NodeRow,
    PoolRow,
    SnapshotRow,
    VolumeLegRow,
    VolumeRow,
)
from tessera import ids, layouts
from tessera.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutOfRange,
    ResourceExhausted,
    TesseraError,
    Unavailable,
)
from tessera.models import (
    AgentSource,
    AgentSourceKind,
    ContentSource,
    Layout,
    Leg,
    LegState,
    NodeState,
    Page,
    QosLimits,
    SnapshotMethod,
    SnapshotState,
    Volume,
    VolumeCreate,
    VolumeExpand,
    VolumeState,
)
from tessera.topology import ZONE_KEY, candidate_nodes
from tessera.units import format_size

log = logging.getLogger(__name__)


def volume_model(
    row: VolumeRow | Row[Any], published: list[str], legs: list[Leg], condition: str = ""
) -> Volume:
    """The wire model of an ORM row or a Core row (they share attribute names)."""
    return Volume(
        id=row.id,
        name=row.name,
        size_bytes=row.size_bytes,
        vpg=row.vpg,
        node_id=row.node_id,
        pool=row.pool,
        state=VolumeState(row.state),
        parameters=dict(row.parameters or {}),
        created_at=row.created_at,
        published_nodes=published,
        legs=legs,
        condition=condition,
        content_source=_content_source(row),
        qos=QosLimits(
            max_read_bytes_per_second=row.qos_read_bps or 0,
            max_write_bytes_per_second=row.qos_write_bps or 0,
            max_read_iops=row.qos_read_iops or 0,
            max_write_iops=row.qos_write_iops or 0,
        ),
    )


def _content_source(row: VolumeRow | Row[Any]) -> ContentSource | None:
    if row.content_source_kind == AgentSourceKind.SNAPSHOT:
        return ContentSource(snapshot_id=row.content_source_id)
    if row.content_source_kind == AgentSourceKind.VOLUME:
        return ContentSource(volume_id=row.content_source_id)
    return None


def _source_columns(req: VolumeCreate) -> dict[str, Any]:
    """The row's columns for a request's content source and QoS limits."""
    src = req.content_source
    kind = ""
    if src is not None:
        kind = AgentSourceKind.SNAPSHOT.value if src.snapshot_id else AgentSourceKind.VOLUME.value
    return {
        "content_source_kind": kind,
        "content_source_id": (src.snapshot_id or src.volume_id) if src is not None else "",
        "qos_read_bps": req.qos.max_read_bytes_per_second,
        "qos_write_bps": req.qos.max_write_bytes_per_second,
        "qos_read_iops": req.qos.max_read_iops,
        "qos_write_iops": req.qos.max_write_iops,
    }


def _published(s: Session | Connection, volume_ids: list[str]) -> dict[str, list[str]]:
    if not volume_ids:
        return {}
    stmt = (
        select(AttachmentRow.volume_id, AttachmentRow.node_id)
        .where(AttachmentRow.volume_id.in_(volume_ids))
        .order_by(AttachmentRow.volume_id, AttachmentRow.node_id)
    )
    out: dict[str, list[str]] = {}
    for vid, nid in s.execute(stmt):
        out.setdefault(vid, []).append(nid)
    return out


def _legs(
    s: Session | Connection, volume_ids: list[str]
) -> tuple[dict[str, list[Leg]], dict[tuple[str, int], str]]:
    """Each volume's legs in index order (the live ones, then the stale ones still on
    disk), and what a consumer last reported of each live leg, by (volume, index)."""
    out: dict[str, list[Leg]] = {}
    reports: dict[tuple[str, int], str] = {}
    if not volume_ids:
        return out, reports
    for table, live in ((VolumeLegRow, True), (DiscardedLegRow, False)):
        stmt = (
            select(table.volume_id, table.position, table.node_id, table.pool, table.size_bytes)
            .add_columns(table.state if live else literal(LegState.STALE.value))
            .add_columns(table.report if live else literal(""))
            .where(table.volume_id.in_(volume_ids))
            .order_by(table.volume_id, table.position)
        )
        for vid, index, node_id, pool, size, state, report in s.execute(stmt):
            leg = Leg(node_id=node_id, pool=pool, size_bytes=size, index=index, state=state)
            out.setdefault(vid, []).append(leg)
            if report:
                reports[(vid, index)] = report
    return out, reports


def live_legs(legs: list[Leg]) -> list[Leg]:
    """The legs that hold the volume's data (in_sync or rebuilding), in index order."""
    return [leg for leg in legs if leg.state != LegState.STALE]


def _condition(
    ctx: Context,
    nodes: dict[str, Row[Any]],
    legs: list[Leg],
    attached: list[str],
    reports: dict[int, str],
) -> str:
    """What keeps the volume's data path from working, naming each node; "" when nothing.

    A volume of several legs says which leg: `degraded: leg 1 on n2 ...` when
    its node is unreachable or fenced or a consumer reported it failed, and
    `rebuilding: leg 1 on n4 ...` (with the consumer's progress) after a repair.
    """
    problems = []
    if len(legs) == 1:
        node = nodes.get(legs[0].node_id)
        if node is not None:
            problems.append(liveness.describe(ctx, node, "owner node"))
    for leg in live_legs(legs) if len(legs) > 1 else []:
        problems.append(_leg_condition(ctx, nodes.get(leg.node_id), leg, reports.get(leg.index)))
    for node_id in attached:
        node = nodes.get(node_id)
        if node is not None and all(leg.node_id != node_id for leg in legs):
            problems.append(liveness.describe(ctx, node, "attached node"))
    return "; ".join(p for p in problems if p)


def _leg_condition(ctx: Context, node: Row[Any] | None, leg: Leg, report: str | None) -> str:
    where = f"leg {leg.index} on {leg.node_id}"
    down = liveness.describe(ctx, node, "node") if node is not None else ""
    if down:
        return f"degraded: {where}: {down}"
    if report and not report.startswith("resyncing"):
        return f"degraded: {where}: {report}"
    if leg.state == LegState.REBUILDING:
        return f"rebuilding: {where}" + (f" ({report})" if report else "")
    return ""


def _models(ctx: Context, s: Session | Connection, rows: list[Any]) -> list[Volume]:
    """Wire models of volume rows with their attachments, legs and condition."""
    volume_ids = [r.id for r in rows]
    published = _published(s, volume_ids)
    legs, reports = _legs(s, volume_ids)
    wanted = {leg.node_id for ls in legs.values() for leg in ls}
    wanted.update(n for ns in published.values() for n in ns)
    nodes: dict[str, Row[Any]] = {}
    if wanted:
        stmt = select(NodeRow.id, NodeRow.last_heartbeat, NodeRow.fenced_at).where(
            NodeRow.id.in_(sorted(wanted))
        )
        nodes = {n.id: n for n in s.execute(stmt)}
    out = []
    for r in rows:
        attached, pieces = published.get(r.id, []), legs.get(r.id, [])
        said = {i: text for (vid, i), text in reports.items() if vid == r.id}
        condition = _condition(ctx, nodes, pieces, attached, said)
        out.append(volume_model(r, attached, pieces, condition))
    return out


def _load(s: Session, volume_id: str, *, lock: bool = False) -> VolumeRow:
    """`lock`: PostgreSQL keeps the row locked to commit (see management.db), so a delete,
    an attach and expands of one volume take turns instead of overwriting each other."""
    ids.check_volume_id(volume_id)
    row = s.get(VolumeRow, volume_id, with_for_update=lock or None)
    if row is None:
        raise NotFound(f"volume {volume_id} does not exist", field="volume_id")
    return row


def _snapshot(ctx: Context, s: Session, row: VolumeRow) -> Volume:
    return _models(ctx, s, [row])[0]


def get_volume(ctx: Context, volume_id: str) -> Volume:
    with ctx.db.read() as s:
        return _snapshot(ctx, s, _load(s, volume_id))


def list_volumes(ctx: Context, page_token: str, max_entries: int, name: str = "") -> Page[Volume]:
    """One page of volumes in ID order; with `name`, just the volume of that name, if any."""
    with ctx.db.read() as s:
        if name:
            # Names are unique, so the answer is one short page (no next_token):
            # this is how clients turn a user's name into an ID.
            check_text(name, "name")
            rows, token = list(s.scalars(select(VolumeRow).where(VolumeRow.name == name))), ""
        else:
            rows, token = fetch_page(s, VolumeRow, [VolumeRow.id], page_token, max_entries)
        items = _models(ctx, s, list(rows))
    return Page[Volume](items=items, next_token=token)


# ---- create --------------------------------------------------------------------------


def _check_create(req: VolumeCreate) -> int:
    check_text(req.name, "name")
    for key, value in req.parameters.items():
        check_text(key, "parameters")
        check_text(value, "parameters")
    forced = req.parameters.get(TRANSPORT_PARAMETER)
    if forced is not None and forced not in TRANSPORT_CHOICES:
        raise InvalidArgument(
            f"parameters.{TRANSPORT_PARAMETER} {forced[:40]!r} is not one of "
            f"{', '.join(TRANSPORT_CHOICES)}",
            field="parameters",
        )
    for field in ("requisite_nodes", "preferred_nodes"):
        for node in getattr(req, field):
            ids.check_node_id(node, field)
    return sized_within_limit(req.size_bytes, req.limit_bytes)


def _check_compatible(row: VolumeRow | Row[Any], req: VolumeCreate) -> None:
    """Same name is the same volume only if it satisfies this request too."""
    if row.vpg != req.vpg:
        raise AlreadyExists(
            f"volume {req.name!r} already exists in vpg {row.vpg!r}, not {req.vpg!r}", field="vpg"
        )
    if row.size_bytes < req.size_bytes or (req.limit_bytes and row.size_bytes > req.limit_bytes):
        wanted = f"[{req.size_bytes}, {req.limit_bytes or 'unlimited'}]"
        raise AlreadyExists(
            f"volume {req.name!r} already exists with size {row.size_bytes}, "
            f"outside the requested range {wanted}",
            field="size_bytes",
        )
    if _content_source(row) != req.content_source:
        raise AlreadyExists(
            f"volume {req.name!r} already exists with another content source",
            field="content_source",
        )
    if row.state == VolumeState.DELETING:
        raise Aborted(f"volume {req.name!r} is being deleted; retry later", field="name")


def _place(
    ctx: Context, conn: Connection, req: VolumeCreate, size: int
) -> tuple[Volume, dict[str, str]]:
    """Choose pools and record the volume there; returns it and its leg nodes' agent URLs."""
    layout, nlegs, chunk = get_vpg_row(conn, req.vpg)
    nodes = candidate_nodes(req.locality, req.requisite_nodes, req.preferred_nodes)
    geometry: dict[str, Any] = {"layout": layout, "chunk_bytes": chunk, "array_uuid": ""}
    if layout == Layout.CONCAT:
        if req.content_source is not None:
            chosen = [_clone_pool(ctx, conn, req, size, nodes)]
        else:
            pools = pool_space(conn, online_since=ctx.online_since(), node_ids=nodes, lock=True)
            chosen = [choose_pool(pools, size, req.locality, req.preferred_nodes)]
        leg_bytes = size
    else:
        size, leg_bytes, chosen = _place_legs(ctx, conn, req, size, (layout, nlegs, chunk), nodes)
        if layouts.is_mirrored(layout):
            geometry["array_uuid"] = str(uuid.uuid4())  # md assembles exactly this array
    legs = [
        Leg(node_id=c.node_id, pool=c.name, size_bytes=leg_bytes, index=i)
        for i, c in enumerate(chosen)
    ]
    volume = Volume(
        id=ids.new_volume_id(),
        name=req.name,
        size_bytes=size,
        vpg=req.vpg,
        node_id=legs[0].node_id,
        pool=legs[0].pool,
        state=VolumeState.CREATING,
        parameters=dict(req.parameters),
        created_at=ctx.clock(),
        legs=legs,
        content_source=req.content_source,
        qos=req.qos,
    )
    row = volume.model_dump(include=_INSERTED, mode="json")
    conn.execute(_INSERT, [{**row, **_source_columns(req), **geometry, "agent_size_bytes": 0}])
    conn.execute(_INSERT_LEG, [_leg_columns(volume.id, leg) for leg in legs])
    return volume, {c.node_id: c.agent_url for c in chosen}


def _leg_columns(volume_id: str, leg: Leg) -> dict[str, Any]:
    return {
        "volume_id": volume_id,
        "position": leg.index,
        "node_id": leg.node_id,
        "pool": leg.pool,
        "size_bytes": leg.size_bytes,
        "state": leg.state.value,
    }


def _place_legs(
    ctx: Context,
    conn: Connection,
    req: VolumeCreate,
    size: int,
    vpg: tuple[str, int, int],
    nodes: list[str] | None,
) -> tuple[int, int, list[PoolSpace]]:
    """(volume size, leg size, a pool per leg) of a raid0/raid1/raid10 volume."""
    layout, nlegs, chunk = vpg
    if req.content_source is not None:
        raise FailedPrecondition(
            f"vpg {req.vpg!r} has layout {layout}: clones are made of one-leg (concat) "
            "volumes only for now",
            field="content_source",
        )
    size = layouts.volume_size(layout, size, nlegs, chunk)
    if req.limit_bytes and size > req.limit_bytes:
        raise OutOfRange(
            f"layout {layout} over {nlegs} legs rounds the size up to {format_size(size)} "
            f"({size} bytes, whole chunks on every leg), above limit_bytes {req.limit_bytes}",
            field="limit_bytes",
        )
    leg_bytes = layouts.leg_size(layout, size, nlegs)
    pools = pool_space(conn, online_since=ctx.online_since(), lock=True)
    chosen = place_legs(
        pools,
        legs=nlegs,
        leg_bytes=leg_bytes,
        zones=node_zones(conn, {p.node_id for p in pools}),
        first_nodes=nodes,
        locality=req.locality,
        preferred_nodes=req.preferred_nodes,
    )
    return size, leg_bytes, chosen


def node_zones(conn: Session | Connection, node_ids: set[str]) -> dict[str, str]:
    """The zone label (topology.kubernetes.io/zone) of each node that has one."""
    if not node_ids:
        return {}
    stmt = select(NodeRow.id, NodeRow.topology).where(NodeRow.id.in_(sorted(node_ids)))
    return {
        node_id: (topology or {})[ZONE_KEY]
        for node_id, topology in conn.execute(stmt)
        if (topology or {}).get(ZONE_KEY)
    }


# The statements every create runs, built once; Core, not ORM (see Database.write_connection).
_BY_NAME = select(VolumeRow.__table__).where(VolumeRow.name == bindparam("name"))
_AGENT_URLS = select(NodeRow.id, NodeRow.agent_url).where(
    NodeRow.id.in_(bindparam("node_ids", expanding=True))
)
_INSERT = insert(VolumeRow)
_INSERT_LEG = insert(VolumeLegRow)
_INSERTED = {column.key for column in VolumeRow.__table__.columns} - {"agent_size_bytes"}
_CREATED = (
    update(VolumeRow)
    .where(VolumeRow.id == bindparam("volume_id"), VolumeRow.state == VolumeState.CREATING.value)
    .values(
        state=VolumeState.AVAILABLE.value,
        # Never lower what an expand (or a racing retry) already recorded.
        agent_size_bytes=case(
            (VolumeRow.agent_size_bytes > bindparam("size"), VolumeRow.agent_size_bytes),
            else_=bindparam("size"),
        ),
    )
)


def create_volume(ctx: Context, req: VolumeCreate) -> tuple[Volume, bool]:
    """Create or return the volume named `req.name`. Returns (volume, created).

    One write transaction decides (existing / placed), the agent call runs
    after it commits, and one more short transaction records success: few
    round trips, because this is the latency users wait on for every PVC.
    """
    size = _check_create(req)
    try:
        with ctx.db.write_connection() as conn:
            row = conn.execute(_BY_NAME, {"name": req.name}).first()
            created = row is None
            if row is None:
                volume, urls = _place(ctx, conn, req, size)
            else:
                _check_compatible(row, req)
                volume = _models(ctx, conn, [row])[0]
                urls = agent_urls(conn, [leg.node_id for leg in volume.legs])
    except IntegrityError:
        # A concurrent create of the same name won the race (PostgreSQL; on
        # SQLite BEGIN IMMEDIATE serialises us): answer as for an existing name.
        return create_volume(ctx, req)[0], False
    if volume.state == VolumeState.CREATING:
        volume = _drive_create(ctx, urls, volume)
    return volume, created


def agent_urls(conn: Session | Connection, node_ids: list[str]) -> dict[str, str]:
    """Each node's agent URL; FailedPrecondition for one that is not registered."""
    found = dict(conn.execute(_AGENT_URLS, {"node_ids": sorted(set(node_ids))}).all())
    for node_id in node_ids:
        if node_id not in found:  # nodes are never deleted while they hold legs
            raise FailedPrecondition(f"node {node_id!r} is not registered", field="node_id")
    return found


def _drive_create(ctx: Context, urls: dict[str, str], volume: Volume) -> Volume:
    """Make every leg's file on its node (the agent's create is idempotent), then available."""
    src = volume.content_source
    if src is not None and src.volume_id:
        _clone_volume(ctx, urls[volume.node_id], volume, src.volume_id)
    else:
        source = None
        if src is not None:
            source = AgentSource(kind=AgentSourceKind.SNAPSHOT, id=src.snapshot_id)
        for leg in live_legs(volume.legs):
            ctx.agents.get(urls[leg.node_id]).create_volume(
                volume.id, leg.pool, leg.size_bytes, source=source
            )
    with ctx.db.write_connection() as conn:
        done = conn.execute(_CREATED, {"volume_id": volume.id, "size": volume.size_bytes})
        if not done.rowcount:  # the row moved on meanwhile (deleting): report what it is now
            row = conn.execute(select(VolumeRow.__table__).where(VolumeRow.id == volume.id))
            current = row.first()
            if current is None:
                raise NotFound(f"volume {volume.id} does not exist", field="volume_id")
            return _models(ctx, conn, [current])[0]
    return volume.model_copy(update={"state": VolumeState.AVAILABLE})


# ---- clones --------------------------------------------------------------------------


def _clone_volume(ctx: Context, agent_url: str, volume: Volume, source_id: str) -> None:
    """Clone a live volume as a snapshot is cut: at one instant of its filesystems.

    The source is frozen wherever it is mounted (held by the clone's ID)
    for the copy, taking its turn with the source's other cuts; a `copy`
    pool's long copy of a mounted filesystem is therefore not torn. A
    freeze that may have ended before the copy did: the clone is deleted
    (FreezeLapsed, 503), and a retry of the create starts it over.
    """
    source = AgentSource(kind=AgentSourceKind.VOLUME, id=source_id)
    try:
        with (
            snapshots.CUT_LOCKS.hold([source_id], "content_source"),
            snapshots.frozen(ctx, [source_id], volume.id),
        ):
            ctx.agents.get(agent_url).create_volume(
                volume.id, volume.pool, volume.size_bytes, source=source
            )
    except snapshots.FreezeLapsed:
        try:
            delete_volume(ctx, volume.id)  # copied while perhaps thawed: never handed out
        except TesseraError as err:  # left `deleting`: a delete of it finishes the job
            log.warning(
                "deleting clone %s after its lost freeze failed: %s", volume.id, err.message
            )
        raise


def _clone_pool(
    ctx: Context, conn: Connection, req: VolumeCreate, size: int, nodes: list[str] | None
) -> PoolSpace:
    """A clone goes where its source is: a reflink needs the same filesystem.

    Normal placement is skipped; the source's pool must still be online,
    allowed by the request's topology, able to clone and have room.
    """
    src = req.content_source
    assert src is not None
    if src.snapshot_id:
        stmt = select(
            SnapshotRow.node_id, SnapshotRow.pool, SnapshotRow.size_bytes, SnapshotRow.state
        )
        found = conn.execute(stmt.where(SnapshotRow.id == src.snapshot_id)).first()
        what, ready = f"snapshot {src.snapshot_id}", SnapshotState.READY.value
    else:
        stmt = select(VolumeRow.node_id, VolumeRow.pool, VolumeRow.size_bytes, VolumeRow.state)
        found = conn.execute(stmt.where(VolumeRow.id == src.volume_id)).first()
        what, ready = f"volume {src.volume_id}", VolumeState.AVAILABLE.value
    if found is None:
        raise NotFound(f"content source {what} does not exist", field="content_source")
    node_id, pool, source_size, state = found
    if state != ready:
        raise FailedPrecondition(
            f"content source {what} is {state}, not {ready}", field="content_source"
        )
    if size < source_size:
        raise OutOfRange(
            f"size_bytes {format_size(size)} is smaller than the content source {what} "
            f"({format_size(source_size)}): a clone is at least as large as its source",
            field="size_bytes",
        )
    if nodes is not None and node_id not in nodes:
        raise ResourceExhausted(
            f"the content source {what} is on node {node_id!r}, which the request's topology "
            f"excludes ({', '.join(nodes)}); a clone is made on its source's node",
            field="requisite_nodes",
        )
    method = conn.execute(
        select(PoolRow.snapshot_method).where(PoolRow.node_id == node_id, PoolRow.name == pool)
    ).scalar()
    if method in (None, SnapshotMethod.NONE.value):
        raise FailedPrecondition(
            f"pool {pool!r} on node {node_id!r} cannot make clones: its filesystem cannot "
            "reflink; put the pool on a reflink filesystem (XFS with reflink=1, btrfs) or "
            "start its node-agent with --copy-fallback to make full copies",
            field="content_source",
        )
    pools = pool_space(conn, online_since=ctx.online_since(), node_ids=[node_id], lock=True)
    chosen = next((p for p in pools if p.name == pool), None)
    if chosen is None:
        raise Unavailable(
            f"node {node_id!r}, which holds the content source {what}, is offline or fenced",
            field="content_source",
        )
    if size > chosen.free_bytes:
        raise ResourceExhausted(
            f"pool {pool!r} on node {node_id!r} (the content source's) has "
            f"{format_size(chosen.free_bytes)} free; the clone needs {format_size(size)}",
            field="size_bytes",
        )
    return chosen


# ---- delete --------------------------------------------------------------------------


def delete_volume(ctx: Context, volume_id: str) -> None:
    """Refused while attached; otherwise mark, drive the agent, then forget the row."""
    with ctx.db.write() as s:
        row = _load(s, volume_id, lock=True)
        attached = _published(s, [row.id]).get(row.id, [])
        if attached:
            raise FailedPrecondition(
                f"volume {volume_id} is still attached to node(s) {', '.join(attached)}; "
                "unpublish it first",
                field="volume_id",
            )
        row.state = VolumeState.DELETING.value
        multi_leg = row.layout not in ("", Layout.CONCAT.value)
        legs = list(s.scalars(select(VolumeLegRow).where(VolumeLegRow.volume_id == volume_id)))
        nodes = {n.id: n for n in s.scalars(select(NodeRow).where(NodeRow.id.in_(
            sorted({leg.node_id for leg in legs})
        )))}  # fmt: skip
        plan = [(leg.node_id, leg.pool, leg.size_bytes, leg.position) for leg in legs]
    later = []
    for node_id, pool, size, position in plan:
        node = nodes.get(node_id)
        if node is None:
            continue  # never registered: nothing of it can be on disk
        if multi_leg and liveness.node_state(ctx, node) != NodeState.ONLINE:
            # A leg on a node that is down: the others go now, this one when it returns
            # (management.legs.sweep_discarded); a concat volume's only leg waits instead.
            later.append(DiscardedLegRow(
                volume_id=volume_id, node_id=node_id, pool=pool, size_bytes=size,
                position=position,
            ))  # fmt: skip
            continue
        ctx.agents.get(node.agent_url).delete_volume(volume_id)
    with ctx.db.write() as s:
        row = s.get(VolumeRow, volume_id)
        if row is not None and row.state == VolumeState.DELETING:
            for leg in later:
                if s.get(DiscardedLegRow, (leg.volume_id, leg.node_id)) is None:
                    s.add(leg)
            s.delete(row)
            if later:
                log.info(
                    "volume %s deleted; its legs on %s go when their nodes return",
                    volume_id, ", ".join(leg.node_id for leg in later),
                )  # fmt: skip


# ---- expand --------------------------------------------------------------------------


def expand_volume(ctx: Context, volume_id: str, req: VolumeExpand) -> Volume:
    """Grow only. The new size is reserved in the pool before the agent grows the file."""
    ids.check_volume_id(volume_id)
    new_size = sized_within_limit(req.size_bytes, req.limit_bytes)
    with ctx.db.write() as s:
        row = _load(s, volume_id, lock=True)
        if row.state != VolumeState.AVAILABLE:
            raise FailedPrecondition(
                f"volume {volume_id} is {row.state}, not available", field="volume_id"
            )
        if req.size_bytes > row.size_bytes:
            _reserve_growth(ctx, s, row, new_size, req.limit_bytes)
        if row.agent_size_bytes >= row.size_bytes:
            return _snapshot(ctx, s, row)
        target = row.size_bytes
        legs = list(s.scalars(select(VolumeLegRow).where(VolumeLegRow.volume_id == volume_id)))
        urls = agent_urls(s, [leg.node_id for leg in legs])
        plan = [(urls[leg.node_id], leg.size_bytes) for leg in legs]
    for url, leg_bytes in plan:  # every leg grows (idempotent: a file never shrinks)
        ctx.agents.get(url).resize_volume(volume_id, leg_bytes)
    with ctx.db.write() as s:
        row = _load(s, volume_id, lock=True)
        row.agent_size_bytes = max(row.agent_size_bytes, target)
        return _snapshot(ctx, s, row)


def _reserve_growth(
    ctx: Context, s: Session, row: VolumeRow, new_size: int, limit_bytes: int = 0
) -> None:
    """Grow every live leg into its pool's free space (a concat volume has one leg).

    Each leg's new size follows the layout (tessera.layouts.leg_size), so a
    striped volume's size is first rounded to whole chunks on every leg.
    """
    legs = list(
        s.scalars(
            select(VolumeLegRow)
            .where(VolumeLegRow.volume_id == row.id)
            .order_by(VolumeLegRow.position)
        )
    )
    layout = row.layout or Layout.CONCAT.value
    if layout != Layout.CONCAT:
        new_size = layouts.volume_size(layout, new_size, len(legs), row.chunk_bytes)
        if limit_bytes and new_size > limit_bytes:  # as create: rounding may pass the limit
            raise OutOfRange(
                f"layout {layout} over {len(legs)} legs rounds the size up to "
                f"{format_size(new_size)} ({new_size} bytes, whole chunks on every leg), "
                f"above limit_bytes {limit_bytes}",
                field="limit_bytes",
            )
    leg_bytes = layouts.leg_size(layout, new_size, len(legs))
    for leg in legs:
        _check_leg_growth(s, leg, leg_bytes, new_size)
    for leg in legs:
        leg.size_bytes = max(leg.size_bytes, leg_bytes)
    row.size_bytes = new_size


def _check_leg_growth(s: Session, leg: VolumeLegRow, leg_bytes: int, new_size: int) -> None:
    pools = pool_space(s, node_ids=[leg.node_id], lock=True)
    pool = next((p for p in pools if p.name == leg.pool), None)
    if pool is None:  # only a fenced node's pools are left out
        raise Unavailable(
            f"node {leg.node_id!r}, which holds the volume, is fenced: it cannot grow the "
            "volume's file until its agent heartbeats again",
            field="volume_id",
        )
    growth = leg_bytes - leg.size_bytes
    if leg_bytes > pool.capacity_bytes:
        # Retrying cannot help: the pool could never hold it, even empty.
        raise OutOfRange(
            f"size_bytes {format_size(new_size)} is larger than pool {leg.pool!r} on node "
            f"{leg.node_id!r} ({format_size(pool.capacity_bytes)}) can hold; "
            "a volume cannot outgrow its pool",
            field="size_bytes",
        )
    if growth > pool.free_bytes:
        raise ResourceExhausted(
            f"pool {leg.pool!r} on node {leg.node_id!r} has {format_size(pool.free_bytes)} free; "
            f"growing to {format_size(new_size)} needs {format_size(growth)} more",
            field="size_bytes",
        )
