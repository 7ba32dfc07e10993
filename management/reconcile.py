"""Compare what every node-agent holds with management's rows; repair only what is provably safe.

Rows and files can disagree after a crash or a power loss: a create whose
row was lost leaves a file no one lists, a pool that was not mounted hides
files whose rows say `available`, a create or delete interrupted between
its steps leaves a row `creating` or `deleting`. `reconcile` reports each
difference; with `fix` it repairs exactly two kinds, both of which finish
what a user already asked for and cannot lose data:

- a row `creating` whose file is there with the row's size becomes
  `available` (the agent made the file; only the last commit was lost),
  after the agent confirmed it durable with the create a retry would send;
- a row `deleting` is finished: the file is deleted through the agent
  (which refuses while the volume is attached) and the row removed.

Everything else is reported, never repaired: a file without a row may hold
a user's data (management never deletes a file without a `deleting` row
for it), a missing file needs a human, and attached devices are never
detached (a pod may be using them).

A node's files are its volume legs (a concat volume has one, on its
owner); its devices are its own attachments, local or remote (a remote
attachment's device is on the consumer, its export on the owner).

Each node is read agent first, rows second: a volume's row is committed
before its file is made, so a file the agent listed without a row is not a
create in flight. A candidate orphan file or attachment is confirmed by a
second look (agent, then rows) before it is reported, so a delete that
finished meanwhile is not reported; a second look the agent cannot answer
(busy, failing) is reported as `unchecked` and the run goes on. Rows and
attachment records younger than `GRACE_SECONDS` are not judged: their agent
call may still be running.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import Select, delete, select, update

from management.context import Context
from management.periodic import PeriodicLoop
from management.schema import AttachmentRow, DiscardedLegRow, NodeRow, VolumeLegRow, VolumeRow
from tessera.clients import AgentClient
from tessera.errors import NotFound, TesseraError
from tessera.models import (
    AgentAttachment,
    AgentVolume,
    FindingKind,
    ReconcileFinding,
    ReconcileReport,
    VolumeState,
)

log = logging.getLogger(__name__)

#: rows and attachment records younger than this are left alone (agent call may be running)
GRACE_SECONDS = 60.0


@dataclass(frozen=True)
class NodeView:
    """One node as its agent and management's rows describe it."""

    node_id: str
    agent: AgentClient
    files: dict[str, AgentVolume]
    devices: dict[str, AgentAttachment]
    rows: dict[str, VolumeRow]
    attached: dict[str, float]  # volume id -> attachment record's created_at
    judged_before: float
    #: volume id -> (pool, size) of this node's leg (a multi-leg volume's file here is its leg)
    legs: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: volumes whose leg here is discarded: its file is known and goes at the node's next beat
    discarded: frozenset[str] = frozenset()


def reconcile(ctx: Context, fix: bool = False) -> ReconcileReport:
    """Compare every registered node; with `fix`, repair what is provably safe."""
    with ctx.db.read() as s:
        nodes = list(s.execute(select(NodeRow.id, NodeRow.agent_url).order_by(NodeRow.id)))
    report = ReconcileReport(fix=fix)
    for node_id, agent_url in nodes:
        try:
            view = _read_node(ctx, node_id, agent_url)
        except TesseraError as err:
            report.findings.append(
                ReconcileFinding(
                    kind=FindingKind.NODE_UNREACHABLE,
                    node_id=node_id,
                    detail=f"its agent ({agent_url}) did not answer, nothing compared: {err}",
                )
            )
            continue
        report.nodes_checked.append(node_id)
        report.findings += _volume_findings(ctx, view, fix)
        report.findings += _attachment_findings(ctx, view)
    return report


def _read_node(ctx: Context, node_id: str, agent_url: str) -> NodeView:
    agent = ctx.agents.get(agent_url)
    judged_before = ctx.clock() - GRACE_SECONDS
    files = {v.id: v for v in agent.list_volumes()}
    devices = {a.volume_id: a for a in agent.list_attachments()}
    with ctx.db.read() as s:
        rows = {r.id: r for r in s.scalars(_volumes_with_a_leg_on(node_id))}
        records = select(AttachmentRow.volume_id, AttachmentRow.created_at).where(
            AttachmentRow.node_id == node_id
        )
        attached = {volume_id: created_at for volume_id, created_at in s.execute(records)}
        legs = {
            vid: (pool, size)
            for vid, pool, size in s.execute(
                select(VolumeLegRow.volume_id, VolumeLegRow.pool, VolumeLegRow.size_bytes).where(
                    VolumeLegRow.node_id == node_id
                )
            )
        }
        discarded = frozenset(
            s.scalars(select(DiscardedLegRow.volume_id).where(DiscardedLegRow.node_id == node_id))
        )
    return NodeView(node_id, agent, files, devices, rows, attached, judged_before, legs, discarded)


def _volumes_with_a_leg_on(node_id: str) -> Select[tuple[VolumeRow]]:
    legs = select(VolumeLegRow.volume_id).where(VolumeLegRow.node_id == node_id)
    return select(VolumeRow).where(VolumeRow.id.in_(legs))


# ---- volume files ----------------------------------------------------------------------


def _volume_findings(ctx: Context, view: NodeView, fix: bool) -> list[ReconcileFinding]:
    found = []
    for row in view.rows.values():
        if row.created_at <= view.judged_before:
            leg = view.legs.get(row.id, (row.pool, row.size_bytes))
            finding = _judge_row(row, view.files.get(row.id), leg)
            if finding is not None:
                if fix and _fixable(finding, row, view.files.get(row.id)):
                    finding.fixed = _fix(ctx, view, row)
                found.append(finding)
    for volume_id in sorted(set(view.files) - set(view.rows) - view.discarded):
        finding = _confirm_orphan_file(ctx, view, view.files[volume_id])
        if finding is not None:
            found.append(finding)
    return found


def _finding(kind: FindingKind, row: VolumeRow, detail: str) -> ReconcileFinding:
    return ReconcileFinding(
        kind=kind, node_id=row.node_id, volume_id=row.id, pool=row.pool, detail=detail
    )


def _judge_row(
    row: VolumeRow, file: AgentVolume | None, leg: tuple[str, int]
) -> ReconcileFinding | None:
    """`leg`: the pool and size of this node's leg (a concat volume's: the row's own)."""
    state = row.state
    pool, size = leg
    if state == VolumeState.CREATING:
        have = "no file yet" if file is None else f"a file of {file.size_bytes} bytes"
        return _finding(
            FindingKind.STUCK_CREATING,
            row,
            f"row is creating ({size} bytes here) and the pool holds {have}; "
            "a retry of the create (same name) finishes it",
        )
    if state == VolumeState.DELETING:
        have = "its file is gone" if file is None else "its file is still there"
        return _finding(
            FindingKind.STUCK_DELETING, row, f"row is deleting and {have}; --fix finishes it"
        )
    if state != VolumeState.AVAILABLE:
        return None
    if file is None:
        return _finding(
            FindingKind.MISSING_FILE,
            row,
            f"row is available but pool {pool!r} has no file for it (pool not mounted? "
            "data lost?); never repaired automatically",
        )
    if file.size_bytes != size:
        owed = row.agent_size_bytes < row.size_bytes and (
            file.size_bytes == row.agent_size_bytes or row.layout not in ("", "concat")
        )
        pending = " (an expand is owed to the agent: retry the expand)" if owed else ""
        return _finding(
            FindingKind.SIZE_MISMATCH,
            row,
            f"the leg here should have {size} bytes, the file has {file.size_bytes}{pending}",
        )
    return None


def _fixable(finding: ReconcileFinding, row: VolumeRow, file: AgentVolume | None) -> bool:
    if row.layout not in ("", "concat"):
        # one node sees one leg: finishing a create or delete needs every leg's node, which a
        # retry of the create (same name) or of the delete does (legs on down nodes included)
        return False
    if finding.kind == FindingKind.STUCK_CREATING:
        return file is not None and file.size_bytes == row.size_bytes
    return finding.kind == FindingKind.STUCK_DELETING


def _fix(ctx: Context, view: NodeView, row: VolumeRow) -> bool:
    """Repair one stuck row; True if this run repaired it (the row had not moved on)."""
    try:
        if row.state == VolumeState.CREATING:
            return _finish_create(ctx, view, row)
        view.agent.delete_volume(row.id)  # refused (409) while attached on the node
    except TesseraError as err:
        log.warning("reconcile: could not finish %s of %s: %s", row.state, row.id, err)
        return False
    with ctx.db.write_connection() as conn:
        done = conn.execute(
            delete(VolumeRow).where(
                VolumeRow.id == row.id, VolumeRow.state == VolumeState.DELETING.value
            )
        )
    log.info("reconcile: finished deleting volume %s", row.id)
    return bool(done.rowcount)


def _finish_create(ctx: Context, view: NodeView, row: VolumeRow) -> bool:
    """Confirm the file durable, then call the row available.

    The row was read a while ago; a delete may have started or finished
    since (management marks a row `deleting` before it calls the agent), so
    it is read again just before the agent call. The call itself only
    fsyncs a file that is there and never makes one (`must_exist`): a delete
    completing between the re-read and the call leaves nothing behind.
    """
    if not _still_creating(ctx, row):
        return False
    view.agent.create_volume(row.id, row.pool, row.size_bytes, must_exist=True)
    return _mark_available(ctx, row)


def _still_creating(ctx: Context, row: VolumeRow) -> bool:
    with ctx.db.read() as s:
        current = s.get(VolumeRow, row.id)
        return (
            current is not None
            and current.state == VolumeState.CREATING
            and current.size_bytes == row.size_bytes
            and current.node_id == row.node_id
            and current.pool == row.pool
        )


def _mark_available(ctx: Context, row: VolumeRow) -> bool:
    with ctx.db.write_connection() as conn:
        done = conn.execute(
            update(VolumeRow)
            .where(
                VolumeRow.id == row.id,
                VolumeRow.state == VolumeState.CREATING.value,
                VolumeRow.size_bytes == row.size_bytes,
            )
            .values(state=VolumeState.AVAILABLE.value, agent_size_bytes=row.size_bytes)
        )
    log.info("reconcile: volume %s is available (its file was complete)", row.id)
    return bool(done.rowcount)


def _confirm_orphan_file(
    ctx: Context, view: NodeView, file: AgentVolume
) -> ReconcileFinding | None:
    """A file no row of this node names, still there on a second look."""
    try:
        file = view.agent.get_volume(file.id)
    except NotFound:
        return None  # deleted meanwhile
    except TesseraError as err:  # busy, failing: one file must not sink the whole report
        return _unchecked(view, file.id, f"its file {file.path} has no row", err)
    with ctx.db.read() as s:
        row = s.get(VolumeRow, file.id)
        here = s.scalar(_volumes_with_a_leg_on(view.node_id).where(VolumeRow.id == file.id))
        placed_here = here is not None
    if placed_here:
        return None  # created meanwhile; not an orphan
    held = (
        f"holds {file.allocated_bytes} bytes of data" if file.allocated_bytes else "holds no data"
    )
    where = "" if row is None else f"; its row says node {row.node_id!r}, pool {row.pool!r}"
    return ReconcileFinding(
        kind=FindingKind.ORPHAN_FILE,
        node_id=view.node_id,
        volume_id=file.id,
        pool=file.pool,
        detail=(
            f"{file.path} ({file.size_bytes} bytes) {held} and no volume row names it{where}; "
            "never deleted automatically"
        ),
    )


# ---- attachments -----------------------------------------------------------------------


def _attachment_findings(ctx: Context, view: NodeView) -> list[ReconcileFinding]:
    found = []
    for volume_id in sorted(set(view.devices) - set(view.attached)):
        finding = _confirm_orphan_device(ctx, view, volume_id)
        if finding is not None:
            found.append(finding)
    for volume_id, created_at in sorted(view.attached.items()):
        if volume_id not in view.devices and created_at <= view.judged_before:
            found.append(
                ReconcileFinding(
                    kind=FindingKind.STALE_ATTACHMENT,
                    node_id=view.node_id,
                    volume_id=volume_id,
                    detail=(
                        "management records an attachment on this node but the node has no "
                        "device for the volume: expected between ControllerPublish and "
                        "NodeStage; stale if no pod there uses it (ControllerUnpublish "
                        "removes it)"
                    ),
                )
            )
    return found


def _confirm_orphan_device(ctx: Context, view: NodeView, volume_id: str) -> ReconcileFinding | None:
    try:
        device = view.agent.get_attachment(volume_id)
    except NotFound:
        return None  # detached meanwhile
    except TesseraError as err:
        return _unchecked(view, volume_id, "it is attached with no attachment record", err)
    with ctx.db.read() as s:
        if s.get(AttachmentRow, (volume_id, view.node_id)) is not None:
            return None
    return ReconcileFinding(
        kind=FindingKind.ORPHAN_ATTACHMENT,
        node_id=view.node_id,
        volume_id=volume_id,
        detail=(
            f"attached on this node as {device.backing_device} with no attachment record "
            "for this node; never detached automatically (a pod may be using it)"
        ),
    )


def _unchecked(view: NodeView, volume_id: str, why: str, err: TesseraError) -> ReconcileFinding:
    """The second look failed: say so, judge nothing, and go on with the other volumes."""
    return ReconcileFinding(
        kind=FindingKind.UNCHECKED,
        node_id=view.node_id,
        volume_id=volume_id,
        detail=f"{why} on the first look; the agent could not confirm it ({err}); "
        "not judged this time, the next run looks again",
    )


# ---- the periodic check ------------------------------------------------------------------


def log_report(report: ReconcileReport) -> None:
    for f in report.findings:
        log.warning(
            "reconcile: %s on node %s%s: %s%s",
            f.kind.value,
            f.node_id,
            f" volume {f.volume_id}" if f.volume_id else "",
            f.detail,
            " (fixed)" if f.fixed else "",
        )


class PeriodicReconciler(PeriodicLoop):
    """Report differences every `interval` seconds in the log; never fixes anything itself.

    Repairs stay an operator's decision (`tessera reconcile --fix`): a
    background thread acting on a passing glitch (a pool mounted late)
    must not change state.
    """

    thread_name = "reconciler"

    def round(self) -> None:
        try:
            log_report(reconcile(self.ctx, fix=False))
        except Exception:  # noqa: BLE001 - a failed round must not end the checks
            log.exception("reconcile: the periodic check failed")
