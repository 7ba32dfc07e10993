"""Legs that must go: stale legs a repair replaced, legs of deleted volumes on nodes that were down.

Their rows (schema.DiscardedLegRow) keep the space counted and keep the
node from getting a new leg of the same volume until the file is gone.
A leg is deleted by its node's agent as soon as the node heartbeats
again; a failure (the agent still closing the stale leg's export, say)
is simply tried again at the next beat. The agent's delete is
idempotent, so a crash between the delete and forgetting the row only
repeats it.
"""

from __future__ import annotations

import logging

from sqlalchemy import delete, select

from management.context import Context
from management.schema import DiscardedLegRow, NodeRow, VolumeLegRow
from tessera.errors import TesseraError

log = logging.getLogger(__name__)


def raid10_pairs(legs: int) -> list[tuple[int, int]]:
    """Leg indexes of a raid10 holding the same chunks: md's near-2 layout puts chunk k on
    legs 2k and 2k+1 mod n, so (0,1), (2,3) for 4 legs and every adjacent pair for an odd
    count. md runs while each pair keeps one leg."""
    found = {(2 * k % legs, (2 * k + 1) % legs) for k in range(legs)}
    return sorted((min(p), max(p)) for p in found)


def sweep_discarded(ctx: Context, node_id: str) -> list[str]:
    """Delete the discarded legs on `node_id` (a node that just beat); the volumes done.

    Never touches a volume that (again) has a live leg on the node: the
    file is then that leg's (cannot happen, placement skips nodes with a
    discarded leg, but data is sacred).
    """
    with ctx.db.read() as s:
        pending = list(
            s.scalars(select(DiscardedLegRow.volume_id).where(DiscardedLegRow.node_id == node_id))
        )
        if not pending:
            return []
        agent_url = s.scalar(select(NodeRow.agent_url).where(NodeRow.id == node_id))
        live = set(
            s.scalars(
                select(VolumeLegRow.volume_id).where(
                    VolumeLegRow.node_id == node_id, VolumeLegRow.volume_id.in_(pending)
                )
            )
        )
    if agent_url is None:
        return []
    done = []
    for volume_id in sorted(set(pending) - live):
        try:
            ctx.agents.get(agent_url).delete_volume(volume_id)
        except TesseraError as err:
            log.warning(
                "node %s: the discarded leg of volume %s is not deleted yet (next heartbeat "
                "tries again): %s", node_id, volume_id, err.message,
            )  # fmt: skip
            continue
        with ctx.db.write() as s:
            s.execute(
                delete(DiscardedLegRow).where(
                    DiscardedLegRow.volume_id == volume_id, DiscardedLegRow.node_id == node_id
                )
            )
        log.info("node %s: discarded leg of volume %s deleted", node_id, volume_id)
        done.append(volume_id)
    return done
