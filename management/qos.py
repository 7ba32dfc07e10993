"""PATCH /v1/volumes/{id}: a volume's QoS limits, stored, then pushed to its data path.

The limits are committed first, then every node on the volume's data path
is told (AgentClient.set_qos, outside any transaction): each consumer node
with an attachment (its agent writes the pods' cgroup rules) and, when the
volume is attached remotely, the owner (its exports' rate limit, so a
client that bypasses its cgroup still meets the limit). Attaching later
pushes the stored limits too (management.attachments), so a new attachment
starts limited.

A node that cannot be told now does not lose the change: the limits are
stored, and the call answers Unavailable (503, CSI UNAVAILABLE) naming the
node, so the caller's retry (the external-resizer retries
ControllerModifyVolume until it succeeds) delivers them once the node is
back. A fenced node is skipped: its attachments are being released. Every
push is idempotent, so a retry after a crash at any point converges.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from management import liveness
from management.context import Context
from management.schema import AttachmentRow, NodeRow, VolumeRow
from management.volumes import get_volume
from tessera import ids
from tessera.errors import (
    FailedPrecondition,
    Misconfigured,
    NotFound,
    TesseraError,
    Unavailable,
)
from tessera.models import NodeState, QosLimits, Transport, Volume, VolumeModify, VolumeState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Target:
    node_id: str
    agent_url: str
    state: NodeState
    role: str


def modify_volume(ctx: Context, volume_id: str, req: VolumeModify) -> Volume:
    """Store the limits, then push them to every node on the data path."""
    ids.check_volume_id(volume_id)
    with ctx.db.write() as s:
        row = s.scalar(select(VolumeRow).where(VolumeRow.id == volume_id).with_for_update())
        if row is None:
            raise NotFound(f"volume {volume_id} does not exist", field="volume_id")
        if row.state == VolumeState.DELETING:
            raise FailedPrecondition(f"volume {volume_id} is being deleted", field="volume_id")
        s.execute(update(VolumeRow).where(VolumeRow.id == volume_id).values(**columns(req.qos)))
        targets = data_path(ctx, s, row)
    push(ctx, volume_id, req.qos, targets)
    return get_volume(ctx, volume_id)


def columns(limits: QosLimits) -> dict[str, int]:
    """The volume row's QoS columns for `limits`."""
    return {
        "qos_read_bps": limits.max_read_bytes_per_second,
        "qos_write_bps": limits.max_write_bytes_per_second,
        "qos_read_iops": limits.max_read_iops,
        "qos_write_iops": limits.max_write_iops,
    }


def data_path(ctx: Context, s: Session, volume: VolumeRow) -> list[_Target]:
    """Consumer nodes with an attachment, and the owner when any attachment is remote."""
    rows = s.execute(
        select(AttachmentRow.node_id, AttachmentRow.transport)
        .where(AttachmentRow.volume_id == volume.id)
        .order_by(AttachmentRow.node_id)
    ).all()
    roles = {node_id: "consumer node" for node_id, _ in rows}
    if any(transport == Transport.NBD.value for _, transport in rows):
        roles.setdefault(volume.node_id, "owner node")
    if not roles:
        return []
    nodes = s.scalars(select(NodeRow).where(NodeRow.id.in_(sorted(roles))))
    return [
        _Target(n.id, n.agent_url, liveness.node_state(ctx, n), roles[n.id])
        for n in sorted(nodes, key=lambda n: n.id)
    ]


def push(ctx: Context, volume_id: str, limits: QosLimits, targets: list[_Target]) -> None:
    """Tell every target; Unavailable naming each one that could not be told.

    An agent of a version without QoS (Misconfigured: no such route) holds no
    limits, so "unlimited" is already true there; limits it cannot enforce
    are an error like any other.
    """
    missed = []
    for target in targets:
        if target.state == NodeState.FENCED:
            continue  # cut off: its attachments are released, nothing of it serves the volume
        if target.state == NodeState.UNREACHABLE:
            missed.append(f"{target.role} {target.node_id} is unreachable")
            continue
        try:
            ctx.agents.get(target.agent_url).set_qos(volume_id, limits)
        except Misconfigured:
            if not limits.unlimited():
                raise
        except TesseraError as err:
            missed.append(f"{target.role} {target.node_id}: {err.message}")
    if missed:
        log.warning("volume %s: QoS limits stored, not yet applied: %s", volume_id, missed)
        raise Unavailable(
            f"the QoS limits of volume {volume_id} are stored but not yet in force on every "
            f"node that uses it ({'; '.join(missed)}); retry to apply them there",
            field="volume_id",
        )


def push_to_attachment(ctx: Context, volume_id: str, node_id: str) -> None:
    """After an attach: the consumer (and, remote, the owner) get the stored limits.

    Always, unlimited too: the consumer's agent may still hold limits from an
    earlier attachment of the volume, changed since while it was not on the
    data path. Every retry of the attach sends them again (idempotent).
    """
    with ctx.db.read() as s:
        volume = s.get(VolumeRow, volume_id)
        row = s.get(AttachmentRow, (volume_id, node_id))
        if volume is None or row is None:
            return  # detached meanwhile: nothing to limit
        limits = QosLimits(
            max_read_bytes_per_second=volume.qos_read_bps or 0,
            max_write_bytes_per_second=volume.qos_write_bps or 0,
            max_read_iops=volume.qos_read_iops or 0,
            max_write_iops=volume.qos_write_iops or 0,
        )
        targets = [t for t in data_path(ctx, s, volume) if t.node_id in (node_id, volume.node_id)]
    push(ctx, volume_id, limits, targets)
