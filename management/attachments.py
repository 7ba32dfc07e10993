"""Attachments (ControllerPublish) and the cross-node access-mode rules.

The rules are checked and the record inserted in one write transaction
(BEGIN IMMEDIATE on SQLite, the volume row locked FOR UPDATE elsewhere) so
two nodes attaching at once cannot both pass a single-writer check.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from management.context import Context
from management.inventory import get_node_row
from management.schema import AttachmentRow, VolumeRow
from tessera import ids
from tessera.access_modes import READ_ONLY_MODES, SINGLE_NODE_MODES
from tessera.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from tessera.models import AccessMode, Attachment, AttachmentCreate, VolumeState


def attachment_model(row: AttachmentRow) -> Attachment:
    return Attachment(
        volume_id=row.volume_id,
        node_id=row.node_id,
        access_mode=AccessMode(row.access_mode),
        readonly=row.readonly,
        created_at=row.created_at,
    )


def check_mode_rules(
    mode: AccessMode, readonly: bool, node_id: str, others: list[AttachmentRow]
) -> None:
    """Whether a new attachment on `node_id` may join the volume's attachments elsewhere."""
    if mode in READ_ONLY_MODES and not readonly:
        raise InvalidArgument(f"access mode {mode.value} requires readonly=true", field="readonly")
    if not others:
        return
    mixed = sorted({o.access_mode for o in others if o.access_mode != mode.value})
    if mixed:
        raise FailedPrecondition(
            f"volume is attached with access mode {', '.join(mixed)}; "
            f"it cannot also be attached as {mode.value}",
            field="access_mode",
        )
    holders = ", ".join(o.node_id for o in others)
    if mode in SINGLE_NODE_MODES:
        raise FailedPrecondition(
            f"access mode {mode.value} allows one node and the volume is attached to {holders}; "
            f"unpublish it there before attaching to {node_id}",
            field="node_id",
        )
    if mode == AccessMode.MULTI_NODE_SINGLE_WRITER and not readonly:
        writers = [o.node_id for o in others if not o.readonly]
        if writers:
            raise FailedPrecondition(
                f"access mode {mode.value} allows one writer and node {writers[0]} already "
                "writes; attach read-only or unpublish the writer first",
                field="readonly",
            )


def attach(ctx: Context, volume_id: str, node_id: str, req: AttachmentCreate) -> Attachment:
    ids.check_volume_id(volume_id)
    ids.check_node_id(node_id)
    with ctx.db.write() as s:
        volume = _lock_volume(s, volume_id)
        node = get_node_row(s, node_id)
        existing = s.get(AttachmentRow, (volume_id, node_id))
        if existing is not None:
            if existing.access_mode == req.access_mode.value and existing.readonly == req.readonly:
                return attachment_model(existing)
            raise AlreadyExists(
                f"volume {volume_id} is already attached to {node_id} as "
                f"{existing.access_mode} readonly={existing.readonly}",
                field="access_mode",
            )
        if volume.state != VolumeState.AVAILABLE:
            raise FailedPrecondition(
                f"volume {volume_id} is {volume.state}, not available", field="volume_id"
            )
        others = list(
            s.scalars(
                select(AttachmentRow)
                .where(AttachmentRow.volume_id == volume_id)
                .order_by(AttachmentRow.node_id)
            )
        )
        check_mode_rules(req.access_mode, req.readonly, node_id, others)
        _check_node_limit(s, node_id, node.max_volumes)
        row = AttachmentRow(
            volume_id=volume_id,
            node_id=node_id,
            access_mode=req.access_mode.value,
            readonly=req.readonly,
            created_at=ctx.clock(),
        )
        s.add(row)
        return attachment_model(row)


def _lock_volume(s: Session, volume_id: str) -> VolumeRow:
    row = s.scalar(select(VolumeRow).where(VolumeRow.id == volume_id).with_for_update())
    if row is None:
        raise NotFound(f"volume {volume_id} does not exist", field="volume_id")
    return row


def _check_node_limit(s: Session, node_id: str, max_volumes: int) -> None:
    if not max_volumes:
        return
    count = s.scalar(
        select(func.count()).select_from(AttachmentRow).where(AttachmentRow.node_id == node_id)
    )
    if (count or 0) >= max_volumes:
        raise ResourceExhausted(
            f"node {node_id} already has {count} volumes attached, its limit (max_volumes)",
            field="node_id",
        )


def detach(ctx: Context, volume_id: str, node_id: str) -> None:
    """Idempotent: an attachment that is not there is already detached."""
    ids.check_volume_id(volume_id)
    ids.check_node_id(node_id)
    with ctx.db.write() as s:
        row = s.get(AttachmentRow, (volume_id, node_id))
        if row is not None:
            s.delete(row)


def list_attachments(ctx: Context, volume_id: str) -> list[Attachment]:
    ids.check_volume_id(volume_id)
    with ctx.db.read() as s:
        if s.get(VolumeRow, volume_id) is None:
            raise NotFound(f"volume {volume_id} does not exist", field="volume_id")
        rows = s.scalars(
            select(AttachmentRow)
            .where(AttachmentRow.volume_id == volume_id)
            .order_by(AttachmentRow.node_id)
        )
        return [attachment_model(r) for r in rows]
