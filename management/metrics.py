"""Management's inventory as Prometheus gauges, read from the database at scrape time.

Nothing is counted as it happens: a count kept in memory would drift from
the database after a restart, a crash between two steps or a second
replica. Each scrape runs a handful of aggregate queries (GROUP BY, no row
per volume), cheap even with many thousand volumes.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import distinct, func, select, union
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from management import liveness
from management.context import Context
from management.schema import AttachmentRow, NodeRow, PoolRow, VolumeLegRow, VolumeRow
from tessera.models import NodeState, VolumeState

log = logging.getLogger("management")

#: a volume whose data path is broken (Volume.condition non-empty): an available volume
#: with a leg on, or attached to, a node that is unreachable or fenced
DEGRADED = "degraded"
ATTACHMENT_STATES = ("pending", "ready")


class InventoryCollector(Collector):
    """tessera_pool_*, tessera_volumes, tessera_attachments, tessera_nodes."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        try:
            with self.ctx.db.read() as s:
                metrics = [*_pools(s), *_nodes_and_volumes(self.ctx, s), _attachments(s)]
        except SQLAlchemyError as exc:
            # /metrics still answers (process and request metrics); /readyz says why
            log.warning("metrics: the database did not answer: %s", exc)
            return
        yield from metrics


def _pools(s: Session) -> list[GaugeMetricFamily]:
    capacity = GaugeMetricFamily(
        "tessera_pool_capacity_bytes",
        "Bytes a pool offers to volumes (after its reserve and overcommit)",
        labels=["node", "pool"],
    )
    allocated = GaugeMetricFamily(
        "tessera_pool_allocated_bytes",
        "Bytes of a pool promised to volumes (the sum of the sizes of the legs placed in it)",
        labels=["node", "pool"],
    )
    used = dict(
        ((node, pool), total)
        for node, pool, total in s.execute(
            select(
                VolumeLegRow.node_id, VolumeLegRow.pool, func.sum(VolumeLegRow.size_bytes)
            ).group_by(VolumeLegRow.node_id, VolumeLegRow.pool)
        )
    )
    for node, pool, size in s.execute(
        select(PoolRow.node_id, PoolRow.name, PoolRow.capacity_bytes)
    ):
        capacity.add_metric([node, pool], size)
        allocated.add_metric([node, pool], used.get((node, pool), 0) or 0)
    return [capacity, allocated]


def _nodes_and_volumes(ctx: Context, s: Session) -> list[GaugeMetricFamily]:
    states: Counter[str] = Counter()
    down = []
    for node in s.execute(select(NodeRow.id, NodeRow.last_heartbeat, NodeRow.fenced_at)):
        state = liveness.node_state(ctx, node)
        states[state.value] += 1
        if state != NodeState.ONLINE:
            down.append(node.id)
    nodes = GaugeMetricFamily(
        "tessera_nodes",
        "Registered nodes by liveness (online, unreachable, fenced)",
        labels=["state"],
    )
    for state in NodeState:
        nodes.add_metric([state.value], states[state.value])
    return [nodes, _volumes(s, down)]


def _volumes(s: Session, down_nodes: list[str]) -> GaugeMetricFamily:
    counts: Counter[str] = Counter(
        dict(s.execute(select(VolumeRow.state, func.count()).group_by(VolumeRow.state)).all())
    )
    if down_nodes:
        touching = union(
            select(VolumeLegRow.volume_id).where(VolumeLegRow.node_id.in_(down_nodes)),
            select(AttachmentRow.volume_id).where(AttachmentRow.node_id.in_(down_nodes)),
        ).subquery()
        degraded = s.execute(
            select(func.count(distinct(VolumeRow.id))).where(
                VolumeRow.state == VolumeState.AVAILABLE.value,
                VolumeRow.id.in_(select(touching.c.volume_id)),
            )
        ).scalar_one()
        counts[VolumeState.AVAILABLE.value] -= degraded
        counts[DEGRADED] = degraded
    volumes = GaugeMetricFamily(
        "tessera_volumes",
        "Volumes by condition: their lifecycle state, or degraded (available, but a node "
        "holding or using it is unreachable or fenced)",
        labels=["condition"],
    )
    for condition in [*(state.value for state in VolumeState), DEGRADED]:
        volumes.add_metric([condition], counts[condition])
    return volumes


def _attachments(s: Session) -> GaugeMetricFamily:
    counts = dict(
        s.execute(select(AttachmentRow.state, func.count()).group_by(AttachmentRow.state)).all()
    )
    attachments = GaugeMetricFamily(
        "tessera_attachments",
        "Attachments (a volume published to a node) by state: pending until the owner's "
        "export and the consumer's key are in place, then ready",
        labels=["state"],
    )
    for state in sorted({*ATTACHMENT_STATES, *counts}):
        attachments.add_metric([state], counts.get(state, 0))
    return attachments
