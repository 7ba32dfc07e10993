"""Fencing: cut a node off so its single-writer volumes can move, never with two writers.

`POST /v1/nodes/{id}/fence` marks the node fenced first (from then on
nothing new is attached to it and nothing is placed on it), then releases
each of its attachments through the detach path: the owner of each remote
volume closes that node's export and revokes its key before the row goes.
Only then may another node attach a SINGLE_NODE or single-writer volume.
A node that still heartbeats is refused unless `force`: it may be writing.
Idempotent, and a crash or a failing owner midway is finished by a retry
(the node stays fenced; the remaining rows are released next time). One
owner that cannot close its export does not hold up the others: every
attachment is tried, and the answer names those still held.

Fencing is sticky: only `unfence` (management.inventory.unfence_node)
lifts it, never the node's own heartbeat.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from management import liveness
from management.attachments import detach
from management.context import Context
from management.inventory import get_node_row
from management.schema import AttachmentRow, NodeRow, VolumeRow
from tessera import ids
from tessera.errors import FailedPrecondition, OutcomeUnknown, TesseraError, Unavailable
from tessera.models import FenceReport, FenceRequest, NodeState

log = logging.getLogger(__name__)


def fence(ctx: Context, node_id: str, req: FenceRequest) -> FenceReport:
    ids.check_node_id(node_id)
    with ctx.db.write() as s:
        node = get_node_row(s, node_id)
        state = liveness.node_state(ctx, node)
        if state == NodeState.ONLINE and not req.force:
            raise FailedPrecondition(
                f"node {node_id} is online ({liveness.last_seen(ctx, node)}): it may still be "
                "writing to its volumes. Fence only a node that is down or cut off; to fence it "
                "anyway, pass force (tessera node fence --force)",
                field="force",
            )
        if state != NodeState.FENCED:
            node.fenced_at = ctx.clock()
            log.warning("node %s fenced (it was %s)", node_id, state.value)
        volume_ids = list(
            s.scalars(
                select(AttachmentRow.volume_id)
                .where(AttachmentRow.node_id == node_id)
                .order_by(AttachmentRow.volume_id)
            )
        )
    released, held = _release_all(ctx, node_id, volume_ids)
    if held:
        raise Unavailable(
            f"node {node_id} is fenced and {len(released)} of its attachments were released, "
            f"but not {'; '.join(held)}; retry the fence once those owners answer (or fence "
            "them too)",
            field="node_id",
        )
    return FenceReport(node_id=node_id, state=NodeState.FENCED, released=released)


def _release_all(ctx: Context, node_id: str, volume_ids: list[str]) -> tuple[list[str], list[str]]:
    """Detach every attachment of the node: (released volumes, why each held one is held)."""
    released: list[str] = []
    held: list[str] = []
    for volume_id in volume_ids:
        try:
            if detach(ctx, volume_id, node_id):
                released.append(volume_id)
        except (Unavailable, OutcomeUnknown) as err:  # the owner did not close the export
            log.warning("fence of %s: volume %s not released: %s", node_id, volume_id, err)
            held.append(f"volume {volume_id} ({_owner_of(ctx, volume_id)})")
        except TesseraError as err:  # any other refusal: still try the rest, then say why
            log.warning("fence of %s: volume %s not released: %s", node_id, volume_id, err)
            held.append(f"volume {volume_id} ({err.message})")
    return released, held


def _owner_of(ctx: Context, volume_id: str) -> str:
    with ctx.db.read() as s:
        volume = s.get(VolumeRow, volume_id)
        if volume is None:
            return "its owner"
        owner = s.get(NodeRow, volume.node_id)
        state = liveness.describe(ctx, owner, "owner node") if owner is not None else ""
        return state or f"owner node {volume.node_id} did not close the export"
