"""Repair of mirrored volumes: replace failed legs, follow their resync (docs/layouts.md).

`POST /v1/volumes/{id}/repair` (`tessera volume repair`, or the
`--auto-repair` loop) runs `repair()`, which is idempotent and may be
called again at any time; each call moves the volume forward:

1. It asks every consumer's agent for the volume's condition (the composed
   transport says `degraded: leg 1 (n2) failed` and `resyncing leg 1 (n4):
   43%`) and keeps what it said per leg (VolumeLegRow.report).
2. A live leg whose node is fenced, or that an online consumer reported
   failed, missing or stale in this same call, is made stale (never a leg
   on a consumer that is not online, nor the last copy: _failed and
   _require_survivors say why) (moved to
   DiscardedLegRow: never listed in a connection again, deleted on its node
   when the node returns) and a new leg with the same index is placed on a
   node that holds no leg of the volume, `rebuilding`. One transaction, so
   a crash leaves either the old leg or the new one, never neither.
3. For every `rebuilding` leg: its file is made (idempotent), exported to
   every consumer with that attachment's key, and the consumer's agent is
   sent the new connection (an attach of what is already attached), which
   adds the leg to the md array: md resyncs it from the others.
4. A rebuilding leg that a consumer has in its connection and no longer
   reports resyncing (or failed) is `in_sync`.

Only mirrored layouts can be repaired: a raid0 leg holds the only copy of
its stripes, so its node must return.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from management import attachments, liveness
from management.context import Context
from management.legs import raid10_pairs
from management.periodic import PeriodicLoop
from management.placement import PoolSpace, place_legs, pool_space
from management.schema import (
    AttachmentLegRow,
    AttachmentRow,
    DiscardedLegRow,
    NodeRow,
    VolumeLegRow,
    VolumeRow,
)
from management.volumes import get_volume, node_zones
from tessera import ids, layouts
from tessera.errors import Aborted, FailedPrecondition, NotFound, TesseraError
from tessera.models import AgentAttachment, LegState, NodeState, Volume, VolumeState

log = logging.getLogger(__name__)

#: what the composed transport says of a leg that does not serve: failed, missing, stale
_BROKEN = re.compile(r"leg (\d+) \(([^)]+)\) (failed|missing|is stale)")
#: a leg md is copying to: "resyncing leg 2 (n3): 43%"
_RESYNC_LEG = re.compile(r"resyncing leg (\d+) \(([^)]+)\): (\d+)%")
#: what _BROKEN calls a leg that must be replaced
_FAILED = ("failed", "missing", "is stale")
#: a resync md reports without naming the leg
_RESYNC_ANY = re.compile(r"resyncing: (\d+)%")


@dataclass(frozen=True)
class _Consumer:
    node_id: str
    agent_url: str
    online: bool
    readonly: bool = False


def repair(ctx: Context, volume_id: str) -> Volume:
    """Drive the volume's repair one step further (see the module docstring)."""
    ids.check_volume_id(volume_id)
    consumers = _consumers(ctx, volume_id)
    heard = _ask_consumers(ctx, volume_id, consumers)
    _record_reports(ctx, volume_id, heard)
    replaced = _replace_failed(ctx, volume_id, consumers, _reported_broken(heard))
    if replaced:
        log.warning("volume %s: legs %s replaced by a repair", volume_id, replaced)
    # a leg placed now is judged at the next call, once its consumers had it for a while:
    # "in sync" is only believed of a leg a consumer has and does not report resyncing
    _drive_rebuilding(ctx, volume_id, consumers)
    return get_volume(ctx, volume_id)


def refresh_reports(ctx: Context, volume_id: str) -> None:
    """Ask the consumers of a multi-leg volume how its legs are, so that its condition
    says what they see (a leg md failed while its node still beats). Nothing for a
    one-leg volume or one attached nowhere; a consumer that does not answer is skipped."""
    ids.check_volume_id(volume_id)
    with ctx.db.read() as s:
        found = s.execute(
            select(VolumeRow.layout).where(VolumeRow.id == volume_id)
        ).scalar_one_or_none()
        if found in (None, "", "concat"):
            return
        rows = s.execute(
            select(NodeRow)
            .join(AttachmentRow, AttachmentRow.node_id == NodeRow.id)
            .where(AttachmentRow.volume_id == volume_id, AttachmentRow.state == "ready")
        ).scalars()
        consumers = [
            _Consumer(n.id, n.agent_url, liveness.node_state(ctx, n) == NodeState.ONLINE)
            for n in rows
        ]
    if consumers:
        _record_reports(ctx, volume_id, _ask_consumers(ctx, volume_id, consumers))


def _consumers(ctx: Context, volume_id: str) -> list[_Consumer]:
    with ctx.db.read() as s:
        volume = s.get(VolumeRow, volume_id)
        if volume is None:
            raise NotFound(f"volume {volume_id} does not exist", field="volume_id")
        if not layouts.is_mirrored(volume.layout or "concat"):
            raise FailedPrecondition(
                f"volume {volume_id} has layout {volume.layout}: only mirrored volumes (raid1, "
                "raid10) can be repaired; a raid0 leg holds the only copy of its stripes, so "
                "its node must return, and a concat volume has one leg",
                field="volume_id",
            )
        if volume.state != VolumeState.AVAILABLE:
            raise FailedPrecondition(
                f"volume {volume_id} is {volume.state}, not available", field="volume_id"
            )
        rows = s.execute(
            select(NodeRow, AttachmentRow.readonly)
            .join(AttachmentRow, AttachmentRow.node_id == NodeRow.id)
            .where(AttachmentRow.volume_id == volume_id)
            .order_by(NodeRow.id)
        ).all()
        return [
            _Consumer(n.id, n.agent_url, liveness.node_state(ctx, n) == NodeState.ONLINE, ro)
            for n, ro in rows
        ]


def _ask_consumers(
    ctx: Context, volume_id: str, consumers: list[_Consumer]
) -> dict[str, AgentAttachment]:
    """Each online consumer's view of the volume (one that cannot answer is left out)."""
    heard = {}
    for consumer in consumers:
        if not consumer.online:
            continue
        try:
            heard[consumer.node_id] = ctx.agents.get(consumer.agent_url).get_attachment(volume_id)
        except TesseraError as err:
            log.warning(
                "volume %s: consumer %s did not say how the legs are: %s",
                volume_id, consumer.node_id, err.message,
            )  # fmt: skip
    return heard


def _leg_reports(condition: str, index: int, node_id: str) -> str:
    """What a consumer's condition says of one leg: failed/missing/stale, progress or ""."""
    for found in _BROKEN.finditer(condition):
        if int(found.group(1)) == index and found.group(2) == node_id:
            return found.group(3)
    for found in _RESYNC_LEG.finditer(condition):
        if int(found.group(1)) == index and found.group(2) == node_id:
            return found.group(0)
    found_any = _RESYNC_ANY.search(condition)
    return f"resyncing: {found_any.group(1)}%" if found_any else ""


def _record_reports(ctx: Context, volume_id: str, heard: dict[str, AgentAttachment]) -> None:
    """Keep what the consumers said; a rebuilding leg they all have and none reports is in sync.

    Nobody answering is not news: what was said before stays.
    """
    if not heard:
        return
    with ctx.db.write() as s:
        legs = s.scalars(select(VolumeLegRow).where(VolumeLegRow.volume_id == volume_id))
        for leg in legs:
            said = [
                (_leg_reports(a.condition, leg.position, leg.node_id), a) for a in heard.values()
            ]
            leg.report = next((text for text, _ in said if text), "")[:255]
            has_it = bool(said) and all(
                any(c.index == leg.position and c.node_id == leg.node_id
                    for c in a.connection.legs)
                for _, a in said
            )  # fmt: skip
            if leg.state == LegState.REBUILDING and has_it and not leg.report:
                leg.state = LegState.IN_SYNC.value
                log.info("volume %s: leg %d on %s is in sync", volume_id, leg.position, leg.node_id)


def _reported_broken(heard: dict[str, AgentAttachment]) -> dict[tuple[int, str], str]:
    """(index, node) -> failed/missing/is stale, of each leg an online consumer said in
    THIS call does not serve: only such a word (or a fence) may discard a leg."""
    broken: dict[tuple[int, str], str] = {}
    for answer in heard.values():
        for found in _BROKEN.finditer(answer.condition):
            broken.setdefault((int(found.group(1)), found.group(2)), found.group(3))
    return broken


def _replace_failed(
    ctx: Context,
    volume_id: str,
    consumers: list[_Consumer],
    broken: dict[tuple[int, str], str],
) -> list[int]:
    """Make failed legs stale and place their replacements (one transaction)."""
    with ctx.db.write() as s:
        volume = s.get(VolumeRow, volume_id, with_for_update=True)
        if volume is None:
            raise NotFound(f"volume {volume_id} does not exist", field="volume_id")
        if volume.state != VolumeState.AVAILABLE:  # a delete began since _consumers looked
            raise FailedPrecondition(
                f"volume {volume_id} is {volume.state}, not available", field="volume_id"
            )
        legs = list(
            s.scalars(
                select(VolumeLegRow)
                .where(VolumeLegRow.volume_id == volume_id)
                .order_by(VolumeLegRow.position)
            )
        )
        nodes = {n.id: n for n in s.scalars(select(NodeRow).where(
            NodeRow.id.in_([leg.node_id for leg in legs])
        ))}  # fmt: skip
        offline = {c.node_id for c in consumers if not c.online}
        failed = [
            leg
            for leg in legs
            if leg.node_id not in offline and _failed(ctx, nodes.get(leg.node_id), leg, broken)
        ]
        if not failed:
            return []
        _require_survivors(volume_id, volume.layout or "", legs, failed)
        if consumers and all(c.readonly for c in consumers):
            # md on a read-only consumer never adds a leg: every call would place another
            raise FailedPrecondition(
                f"volume {volume_id}: no read-write consumer to resync the new leg; publish "
                "it read-write",
                field="volume_id",
            )
        taken = {leg.node_id for leg in legs}
        taken.update(
            s.scalars(select(DiscardedLegRow.node_id).where(DiscardedLegRow.volume_id == volume_id))
        )
        pools = pool_space(s, online_since=ctx.online_since(), lock=True)
        zones = node_zones(s, {p.node_id for p in pools} | taken)
        kept_zones = {zones.get(x.node_id, "") for x in legs if x not in failed}
        for leg in failed:
            _make_stale(s, volume_id, leg)
            chosen = _place_one(pools, leg.size_bytes, zones, taken, kept_zones)
            taken.add(chosen.node_id)
            kept_zones.add(zones.get(chosen.node_id, ""))
            s.add(
                VolumeLegRow(
                    volume_id=volume_id,
                    position=leg.position,
                    node_id=chosen.node_id,
                    pool=chosen.name,
                    size_bytes=leg.size_bytes,
                    state=LegState.REBUILDING.value,
                    report="",
                )
            )
            s.flush()
        volume.legs_generation = (volume.legs_generation or 0) + 1  # publish_contexts age
        if volume.node_id != legs[0].node_id or any(leg.position == 0 for leg in failed):
            first = s.get(VolumeLegRow, (volume_id, 0))
            if first is not None:  # the owner columns repeat leg 0
                volume.node_id, volume.pool = first.node_id, first.pool
        return [leg.position for leg in failed]


def _failed(
    ctx: Context, node: NodeRow | None, leg: VolumeLegRow, broken: dict[tuple[int, str], str]
) -> bool:
    """Whether the leg is to be discarded: its node is fenced (the admin's word that it is
    down, as single-writer attachments need), or an online consumer said just now that md
    does not use it. A node that is merely unreachable may be the one still writing (a
    partition cuts the consumer off with its local leg): its leg may be the only current
    copy. A rebuilding leg the consumer has not added yet is `missing`, not failed."""
    if node is None or liveness.node_state(ctx, node) == NodeState.FENCED:
        return True
    said = broken.get((leg.position, leg.node_id), "")
    if said == "missing" and leg.state == LegState.REBUILDING:
        return False
    return said in _FAILED


def _require_survivors(
    volume_id: str, layout: str, legs: list[VolumeLegRow], failed: list[VolumeLegRow]
) -> None:
    """FailedPrecondition unless md keeps a whole copy once `failed` are gone: raid1 an
    in-sync leg, raid10 one in-sync leg of every pair holding the same chunks
    (legs.raid10_pairs). Never discard the last current copy of anything."""
    good = [leg.position for leg in legs if leg not in failed and leg.state == LegState.IN_SYNC]
    named = ", ".join(f"leg {leg.position} on {leg.node_id}" for leg in failed)
    if not good:
        raise FailedPrecondition(
            f"volume {volume_id}: no in-sync leg is left to rebuild from (failed: {named}); "
            "bring one of their nodes back",
            field="volume_id",
        )
    if layout != "raid10":
        return
    for i, j in raid10_pairs(len(legs)):
        if i not in good and j not in good:
            raise FailedPrecondition(
                f"volume {volume_id}: legs {i} and {j} of the raid10 hold the same chunks and "
                f"neither is in sync (failed: {named}); bring leg {i} or {j} back first",
                field="volume_id",
            )


def _make_stale(s: Session, volume_id: str, leg: VolumeLegRow) -> None:
    """The leg's row moves to the discarded legs (its file goes when its node answers)."""
    s.add(
        DiscardedLegRow(
            volume_id=volume_id,
            node_id=leg.node_id,
            pool=leg.pool,
            size_bytes=leg.size_bytes,
            position=leg.position,
        )
    )
    s.execute(
        delete(AttachmentLegRow).where(
            AttachmentLegRow.volume_id == volume_id, AttachmentLegRow.leg_node == leg.node_id
        )
    )
    s.delete(leg)
    s.flush()


def _place_one(
    pools: list[PoolSpace], size: int, zones: dict[str, str], taken: set[str], used: set[str]
) -> PoolSpace:
    """A pool for one new leg on a node holding no leg of the volume, in a zone the
    surviving legs do not use when there is one; errors as placement's."""
    place_legs(pools, legs=1, leg_bytes=size, zones=zones, exclude_nodes=sorted(taken))
    fitting = [p for p in pools if p.node_id not in taken and p.free_bytes >= size]
    return min(
        fitting,
        key=lambda p: (zones.get(p.node_id, "") in used, -p.free_bytes, p.node_id, p.name),
    )


def _drive_rebuilding(ctx: Context, volume_id: str, consumers: list[_Consumer]) -> None:
    """Make, export and hand to every consumer each rebuilding leg (idempotent)."""
    with ctx.db.read() as s:
        rebuilding = list(
            s.execute(
                select(
                    VolumeLegRow.node_id,
                    VolumeLegRow.pool,
                    VolumeLegRow.size_bytes,
                    NodeRow.agent_url,
                )
                .join(NodeRow, NodeRow.id == VolumeLegRow.node_id)
                .where(
                    VolumeLegRow.volume_id == volume_id,
                    VolumeLegRow.state == LegState.REBUILDING.value,
                )
            )
        )
    if not rebuilding:
        return
    for node_id, pool, size, url in rebuilding:
        ctx.agents.get(url).create_volume(volume_id, pool, size)
        _require_not_deleted(ctx, volume_id, node_id, url)
    for consumer in consumers:
        if consumer.online:
            attachments.refresh_connection(ctx, volume_id, consumer.node_id)


def _require_not_deleted(ctx: Context, volume_id: str, node_id: str, url: str) -> None:
    """A delete that ran while the new leg's file was made swept the legs before the
    file existed: take it back and stop (Aborted). A delete starting after this check
    marks the volume deleting first and then deletes every leg, this file included."""
    with ctx.db.write() as s:
        volume = s.get(VolumeRow, volume_id, with_for_update=True)
        if volume is not None and volume.state == VolumeState.AVAILABLE:
            return
    ctx.agents.get(url).delete_volume(volume_id)
    log.warning("volume %s: deleted during its repair; new leg on %s removed", volume_id, node_id)
    raise Aborted(
        f"volume {volume_id} was deleted while its repair ran; the new leg's file on "
        f"{node_id} was removed again",
        field="volume_id",
    )


class AutoRepair(PeriodicLoop):
    """`--auto-repair`: repair every degraded or rebuilding mirrored volume, every interval."""

    thread_name = "auto-repair"

    def round(self) -> None:
        for volume_id in attached_mirrors(self.ctx):
            try:  # what their consumers see: a leg md failed while its node still beats
                refresh_reports(self.ctx, volume_id)
            except TesseraError as err:
                log.warning("auto-repair: volume %s: %s", volume_id, err.message)
        for volume_id in needing_repair(self.ctx):
            try:
                repair(self.ctx, volume_id)
            except TesseraError as err:
                log.warning("auto-repair of volume %s: %s", volume_id, err.message)
            except Exception:  # noqa: BLE001 - one volume's failure must not stop the rest
                log.exception("auto-repair of volume %s failed", volume_id)


def attached_mirrors(ctx: Context) -> list[str]:
    """Mirrored volumes attached somewhere (their consumers know how the legs are)."""
    with ctx.db.read() as s:
        return sorted(
            set(
                s.scalars(
                    select(AttachmentRow.volume_id)
                    .join(VolumeRow, VolumeRow.id == AttachmentRow.volume_id)
                    .where(VolumeRow.layout.in_(["raid1", "raid10"]))
                )
            )
        )


def needing_repair(ctx: Context) -> list[str]:
    """Mirrored volumes with a rebuilding leg, a leg a consumer reported failed, or a leg
    on a node that is not online."""
    with ctx.db.read() as s:
        rows = s.execute(
            select(
                VolumeLegRow.volume_id,
                VolumeLegRow.state,
                VolumeLegRow.report,
                NodeRow.last_heartbeat,
                NodeRow.fenced_at,
            )
            .join(VolumeRow, VolumeRow.id == VolumeLegRow.volume_id)
            .join(NodeRow, NodeRow.id == VolumeLegRow.node_id)
            .where(
                VolumeRow.layout.in_(["raid1", "raid10"]),
                VolumeRow.state == VolumeState.AVAILABLE.value,
            )
        ).all()
    since = ctx.online_since()
    return sorted(
        {
            vid
            for vid, state, report, beat, fenced in rows
            if state == LegState.REBUILDING or report in _FAILED or fenced or beat < since
        }
    )
