"""Fencing: cut a node off so its single-writer volumes can move, never with two writers.

`POST /v1/nodes/{id}/fence` marks the node fenced first (from then on
nothing new is attached to it and nothing is placed on it), then releases
each of its attachments through the detach path: the owner of each remote
volume closes that node's export and revokes its key before the row goes.
Only then may another node attach a SINGLE_NODE or single-writer volume.
A node that still heartbeats is refused unless `force`: it may be writing.
Idempotent, and a crash or a failing owner midway is finished by a retry
(the node stays fenced; the remaining rows are released next time).
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from management import liveness
from management.attachments import detach
from management.context import Context
from management.inventory import get_node_row
from management.schema import AttachmentRow
from tessera import ids
from tessera.errors import FailedPrecondition
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
    released = [v for v in volume_ids if detach(ctx, v, node_id)]
    return FenceReport(node_id=node_id, state=NodeState.FENCED, released=released)
