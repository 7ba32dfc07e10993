"""Group snapshots: several volumes cut together (CSI's GroupController).

All members' attached nodes are frozen (each freeze held by the group's
ID), every member is cut, everything is thawed
(management.snapshots.drive). Members whose filesystems are mounted
somewhere are frozen for the whole time, so they are cut at one instant
of their filesystems. A member published as a raw block device cannot be
frozen (there is no filesystem to freeze): its writes are not stopped,
and the members are cut one after another, milliseconds apart with
reflinks (a `copy` pool takes as long as the copies), so a block member
is crash-consistent at its own cut, not at one instant shared with the
others; an application writing to several block members must quiesce
them itself.

Any failure deletes the members already cut and the group row: no
partial group is ever left. The group row and its member rows are
committed `creating`, each member already promising what its source has
written (a full pool refuses before anything is frozen), before any
agent is asked to cut, so a retry after a crash finds them and re-drives
(every agent call is idempotent); delete marks `deleting` first for the
same reason.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from management import snapshots
from management.context import Context
from management.limits import check_text
from management.schema import GroupSnapshotRow, SnapshotRow
from tessera import ids
from tessera.errors import AlreadyExists, NotFound, ResourceExhausted, TesseraError
from tessera.models import GroupSnapshot, GroupSnapshotCreate, Snapshot, SnapshotState

log = logging.getLogger(__name__)


def _model(row: GroupSnapshotRow, members: list[Snapshot]) -> GroupSnapshot:
    return GroupSnapshot(
        id=row.id,
        name=row.name,
        created_at=row.created_at,
        ready_to_use=row.state == SnapshotState.READY and all(m.ready_to_use for m in members),
        snapshots=members,
    )


def _members(s: Session, group_id: str) -> list[Snapshot]:
    rows = s.scalars(
        select(SnapshotRow)
        .where(SnapshotRow.group_snapshot_id == group_id)
        .order_by(SnapshotRow.source_volume_id, SnapshotRow.id)
    )
    return [snapshots.snapshot_model(r) for r in rows]


def _load(s: Session, group_id: str, *, lock: bool = False) -> GroupSnapshotRow:
    ids.check_group_snapshot_id(group_id)
    row = s.get(GroupSnapshotRow, group_id, with_for_update=lock or None)
    if row is None:
        raise NotFound(f"group snapshot {group_id} does not exist", field="group_snapshot_id")
    return row


def create_group_snapshot(ctx: Context, req: GroupSnapshotCreate) -> tuple[GroupSnapshot, bool]:
    """Create or return the group named `req.name`. Returns (group, created)."""
    check_text(req.name, "name")
    for key, value in req.parameters.items():
        check_text(key, "parameters")
        check_text(value, "parameters")
    sources = sorted(set(req.source_volume_ids))
    for volume_id in sources:
        ids.check_volume_id(volume_id, "source_volume_ids")
    written = _written_if_new(ctx, req.name, sources)
    try:
        with ctx.db.write() as s:
            row = s.scalars(
                select(GroupSnapshotRow).where(GroupSnapshotRow.name == req.name)
            ).first()
            created = row is None
            if row is None and written is not None:
                row = _insert(ctx, s, req.name, sources, written)
            group = _model(row, _members(s, row.id)) if row is not None else None
    except IntegrityError:  # a concurrent create of the name won (PostgreSQL)
        return create_group_snapshot(ctx, req)[0], False
    if row is None or group is None:  # the name was taken, then freed, meanwhile: again
        return create_group_snapshot(ctx, req)
    if sorted(m.source_volume_id for m in group.snapshots) != sources and not created:
        if row.state != SnapshotState.DELETING:
            raise AlreadyExists(
                f"group snapshot {req.name!r} already exists with other volumes "
                f"({', '.join(sorted(m.source_volume_id for m in group.snapshots))})",
                field="source_volume_ids",
            )
    if row.state == SnapshotState.DELETING:  # a failed or crashed attempt: finish, start over
        delete_group_snapshot(ctx, group.id)
        return create_group_snapshot(ctx, req)
    if row.state == SnapshotState.CREATING:
        group = _drive(ctx, group)
    return group, created


def _written_if_new(ctx: Context, name: str, sources: list[str]) -> dict[str, int] | None:
    """Each source's written bytes when the name is new and the sources fit; else None."""
    with ctx.db.read() as s:
        if s.scalars(select(GroupSnapshotRow.id).where(GroupSnapshotRow.name == name)).first():
            return None
        for volume_id in sources:
            vol = snapshots.check_source(s, volume_id, "source_volume_ids", lock=False)
            snapshots.check_method(s, vol.node_id, vol.pool)
    return snapshots.written_bytes(ctx, sources, "source_volume_ids")


def _insert(
    ctx: Context, s: Session, name: str, sources: list[str], written: dict[str, int]
) -> GroupSnapshotRow:
    """The group row and one `creating` member per source, checked as single snapshots are.

    Each member promises what its source has written (`written`); pools
    without room for them all: ResourceExhausted and nothing is inserted.
    """
    row = GroupSnapshotRow(
        id=ids.new_group_snapshot_id(),
        name=name,
        state=SnapshotState.CREATING.value,
        created_at=ctx.clock(),
    )
    members = []
    for volume_id in sources:
        vol = snapshots.check_source(s, volume_id, "source_volume_ids")
        method = snapshots.check_method(s, vol.node_id, vol.pool)
        member = snapshots.new_row(ctx, "", vol, method, written[volume_id], group_id=row.id)
        member.name = member.id  # unique, and says which group through group_snapshot_id
        members.append(member)
    short = snapshots.check_room(s, members, {m.id: m.allocated_bytes for m in members})
    if short:
        raise ResourceExhausted(short, field="source_volume_ids")
    s.add(row)
    s.add_all(members)
    s.flush()
    return row


def _drive(ctx: Context, group: GroupSnapshot) -> GroupSnapshot:
    """All frozen, all cut, all thawed; on any failure no member and no group row remain."""
    try:
        members = snapshots.drive(ctx, group.snapshots, group.id)
    except BaseException:
        try:
            _undo(ctx, group)
        except TesseraError as err:  # the rows stay `deleting`: the next create finishes it
            log.warning("undoing group snapshot %s failed: %s", group.id, err.message)
        raise
    with ctx.db.write() as s:
        row = s.get(GroupSnapshotRow, group.id)
        if row is None:
            raise NotFound(f"group snapshot {group.id} does not exist", field="group_snapshot_id")
        if row.state == SnapshotState.CREATING:
            row.state = SnapshotState.READY.value
        return _model(row, members)


def _undo(ctx: Context, group: GroupSnapshot) -> None:
    with ctx.db.write() as s:
        row = s.get(GroupSnapshotRow, group.id)
        if row is not None:
            row.state = SnapshotState.DELETING.value
    delete_group_snapshot(ctx, group.id, missing_ok=True)


def get_group_snapshot(ctx: Context, group_id: str) -> GroupSnapshot:
    with ctx.db.read() as s:
        row = _load(s, group_id)
        return _model(row, _members(s, row.id))


def delete_group_snapshot(ctx: Context, group_id: str, *, missing_ok: bool = False) -> None:
    """Mark `deleting`, delete every member, forget the group; a retry converges."""
    try:
        with ctx.db.write() as s:
            row = _load(s, group_id, lock=True)
            row.state = SnapshotState.DELETING.value
            members = [m.id for m in _members(s, row.id)]
    except NotFound:
        if missing_ok:
            return
        raise
    for snapshot_id in members:
        snapshots.delete_snapshot(ctx, snapshot_id, missing_ok=True)
    with ctx.db.write() as s:
        row = s.get(GroupSnapshotRow, group_id)
        if row is not None and row.state == SnapshotState.DELETING:
            if not _members(s, group_id):
                s.delete(row)
