"""Attachments (ControllerPublish / ControllerUnpublish) and the cross-node access-mode rules.

The rules are checked and the record inserted in one write transaction
(BEGIN IMMEDIATE on SQLite, the volume row locked FOR UPDATE elsewhere) so
two nodes attaching at once cannot both pass a single-writer check.

A consumer on the owner's node reaches the file directly (`loop`). Any
other consumer gets an export from the owner (NBD or nvme-tcp; a composed
volume one per remote leg, each over its own transport: leg_transport),
protected by a key per attachment (TLS-PSK, DH-HMAC-CHAP; docs/data-path.md):
the row is recorded `pending` with a fresh key first, the agent calls run
after that transaction commits (a slow agent must not hold the database
write lock), and a last short transaction marks it `ready` with the
export's address. A retry of a pending attachment re-drives the same
idempotent calls with the same key, so a crash at any point converges.
The key never leaves management except to the agents of the attachment's
nodes: not in an answer, a log line or an error.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from management import liveness, qos
from management.context import Context
from management.inventory import TRANSPORT_PARAMETER, get_node_row, node_transports
from management.legs import raid10_pairs
from management.schema import AttachmentLegRow, AttachmentRow, NodeRow, VolumeLegRow, VolumeRow
from tessera import ids
from tessera.access_modes import READ_ONLY_MODES, SINGLE_NODE_MODES
from tessera.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TesseraError,
    Unavailable,
)
from tessera.layouts import is_mirrored
from tessera.models import (
    AccessMode,
    AgentExportCreate,
    AgentKey,
    Attachment,
    AttachmentCreate,
    Connection,
    Layout,
    LegConnection,
    LegState,
    NodeState,
    Transport,
    VolumeState,
)

log = logging.getLogger(__name__)

PENDING = "pending"
READY = "ready"
#: a composed attachment whose detach began: a repair no longer re-sends it its legs
DETACHING = "detaching"


def attachment_model(s: Session, row: AttachmentRow, volume: VolumeRow) -> Attachment:
    """The wire model: the connection the consumer needs, never the key."""
    connection = Connection(transport=Transport(row.transport), owner_node=volume.node_id)
    if row.transport != Transport.LOOP:
        connection.host, connection.port = row.host, row.port
        connection.psk_identity = row.psk_identity
    if row.transport in (Transport.NVME_TCP, Transport.COMPOSED):
        exports = {
            e.leg_node: e
            for e in s.scalars(
                select(AttachmentLegRow).where(
                    AttachmentLegRow.volume_id == row.volume_id,
                    AttachmentLegRow.node_id == row.node_id,
                )
            )
        }
        if row.transport == Transport.NVME_TCP:
            found = exports.get(volume.node_id)
            connection.subsystem_nqn = found.subsystem_nqn if found is not None else ""
        else:
            _compose(s, connection, row, volume, exports)
    return Attachment(
        volume_id=row.volume_id,
        node_id=row.node_id,
        access_mode=AccessMode(row.access_mode),
        readonly=row.readonly,
        created_at=row.created_at,
        connection=connection,
    )


def _compose(
    s: Session,
    connection: Connection,
    row: AttachmentRow,
    volume: VolumeRow,
    exports: dict[str, AttachmentLegRow],
) -> None:
    """A composed connection: the layout and one LegConnection per live leg it can reach.

    A leg on the consumer is a loop device; any other comes over the
    export its owner made for this attachment, over the transport that
    export was made for (nvme-tcp or nbd, see leg_transport; a leg a repair
    placed but not yet exported is left out until it is). Stale legs are
    never listed: they missed writes.
    """
    connection.layout = Layout(volume.layout)
    connection.chunk_bytes = volume.chunk_bytes
    connection.array_uuid = volume.array_uuid
    # an expand half done has grown some legs only: compose no more than every leg holds
    connection.data_bytes = min(volume.size_bytes, volume.agent_size_bytes or volume.size_bytes)
    connection.generation = volume.legs_generation or 0
    connection.host, connection.port = "", 0
    legs = s.scalars(
        select(VolumeLegRow)
        .where(VolumeLegRow.volume_id == volume.id)
        .order_by(VolumeLegRow.position)
    )
    for leg in legs:
        state = LegState(leg.state)
        if leg.node_id == row.node_id:
            connection.legs.append(
                LegConnection(index=leg.position, node_id=leg.node_id, state=state)
            )
            continue
        export = exports.get(leg.node_id)
        if export is None:
            continue
        transport = Transport(export.transport or Transport.NVME_TCP.value)
        connection.legs.append(
            LegConnection(
                index=leg.position,
                node_id=leg.node_id,
                transport=transport,
                host=export.host,
                port=export.port,
                subsystem_nqn=export.subsystem_nqn if transport == Transport.NVME_TCP else "",
                state=state,
            )
        )


def check_mode_rules(
    mode: AccessMode,
    readonly: bool,
    node_id: str,
    others: list[AttachmentRow],
    layout: str | None = None,
) -> None:
    """Whether a new attachment on `node_id` may join the volume's attachments elsewhere.

    Mirrored layouts (raid1, raid10) also refuse a second node whenever any
    of the nodes writes; striped (raid0) volumes have no state beside the
    data and take several writers like a one-leg volume.
    """
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
    if (
        layout is not None
        and is_mirrored(layout)
        and not (readonly and all(o.readonly for o in others))
    ):
        writer = node_id if not readonly else next(o.node_id for o in others if not o.readonly)
        raise FailedPrecondition(
            f"volume has layout {layout}: a mirror is composed by md in one node's kernel, so "
            f"while node {writer} writes no other node may attach it ({holders} has it); two "
            "md instances writing the same legs would let the copies silently diverge",
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


# ---- attach ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ExportPlan:
    """The agent calls a remote attachment still owes (the key rides along, never shown)."""

    volume_id: str
    consumer: str
    owner: str
    owner_url: str
    consumer_url: str
    readonly: bool
    psk_identity: str
    psk_key: str
    transport: str = Transport.NBD.value
    #: (node, agent URL, transport) of every export: the owner's, or each remote leg's
    exports: tuple[tuple[str, str, str], ...] = ()

    def __repr__(self) -> str:  # a traceback or a debug log must not show the key
        return f"_ExportPlan({self.volume_id} on {self.consumer}, owner {self.owner})"


def attach(ctx: Context, volume_id: str, node_id: str, req: AttachmentCreate) -> Attachment:
    attachment = _attach(ctx, volume_id, node_id, req)
    qos.push_to_attachment(ctx, volume_id, node_id)  # a new attachment starts limited
    return attachment


def _attach(ctx: Context, volume_id: str, node_id: str, req: AttachmentCreate) -> Attachment:
    ids.check_volume_id(volume_id)
    ids.check_node_id(node_id)
    with ctx.db.write() as s:
        volume = _lock_volume(s, volume_id)
        consumer = get_node_row(s, node_id, lock=True)  # max_volumes and fence, PostgreSQL
        row = s.get(AttachmentRow, (volume_id, node_id))
        if row is None:
            row = _record(ctx, s, volume, consumer, req)
        else:
            _check_same_request(row, req)
            if row.state == DETACHING:  # published again: made again, as a pending one is
                row.state = PENDING
        if row.state == READY:  # local, or a remote one already made: nothing to drive
            return attachment_model(s, row, volume)
        plan = _plan(ctx, s, volume, consumer, row)
    return _drive_export(ctx, plan)


def _check_same_request(existing: AttachmentRow, req: AttachmentCreate) -> None:
    if existing.access_mode == req.access_mode.value and existing.readonly == req.readonly:
        return
    raise AlreadyExists(
        f"volume {existing.volume_id} is already attached to {existing.node_id} as "
        f"{existing.access_mode} readonly={existing.readonly}",
        field="access_mode",
    )


def _record(
    ctx: Context, s: Session, volume: VolumeRow, consumer: NodeRow, req: AttachmentCreate
) -> AttachmentRow:
    """Check everything and insert the row: ready for a local consumer, pending for a remote one."""
    liveness.require_online(
        ctx, consumer, "node", "nothing can be attached to it until it is online again"
    )
    if volume.state != VolumeState.AVAILABLE:
        raise FailedPrecondition(
            f"volume {volume.id} is {volume.state}, not available", field="volume_id"
        )
    others = list(
        s.scalars(
            select(AttachmentRow)
            .where(AttachmentRow.volume_id == volume.id)
            .order_by(AttachmentRow.node_id)
        )
    )
    try:
        check_mode_rules(req.access_mode, req.readonly, consumer.id, others, volume.layout)
    except FailedPrecondition as err:
        raise FailedPrecondition(
            err.message + _fence_hint(ctx, s, others), field=err.field
        ) from None
    _check_node_limit(s, consumer.id, consumer.max_volumes)
    transport = choose_transport(s, volume, consumer, req.readonly)
    remote = transport != Transport.LOOP
    row = AttachmentRow(
        volume_id=volume.id,
        node_id=consumer.id,
        access_mode=req.access_mode.value,
        readonly=req.readonly,
        created_at=ctx.clock(),
        transport=transport.value,
        state=PENDING if remote else READY,
        psk_identity=consumer.id if remote else "",
        psk_key=secrets.token_hex(32) if remote else "",
        host="",
        port=0,
    )
    s.add(row)
    s.flush()
    return row


def _fence_hint(ctx: Context, s: Session, others: list[AttachmentRow]) -> str:
    """Why a holder that stopped heartbeating still blocks, and what unblocks it."""
    hints = []
    for other in others:
        node = s.get(NodeRow, other.node_id)
        if node is not None and liveness.node_state(ctx, node) == NodeState.UNREACHABLE:
            hints.append(
                f"; node {node.id} is unreachable ({liveness.last_seen(ctx, node)}): once it "
                f"is really down or cut off, fence it (tessera node fence {node.id}) to release "
                "its attachments"
            )
    return "".join(hints)


def _plan(
    ctx: Context, s: Session, volume: VolumeRow, consumer: NodeRow, row: AttachmentRow
) -> _ExportPlan:
    """What a pending row still owes; the owner and consumer must be heartbeating for it.

    Raising here rolls back the caller's transaction, so a new attachment
    whose owner is silent leaves no pending row behind.
    """
    owner = get_node_row(s, volume.node_id)
    why = "the remote attachment cannot be completed until it is online again"
    liveness.require_online(ctx, consumer, "node", why)
    exports = []
    degraded = row.transport == Transport.COMPOSED and is_mirrored(volume.layout or "")
    missing: list[str] = []
    for node_id in export_nodes(s, row, volume):
        node = owner if node_id == owner.id else get_node_row(s, node_id)
        role = "owner node" if node_id == owner.id else "leg node"
        if degraded and liveness.node_state(ctx, node) != NodeState.ONLINE:
            missing.append(node_id)  # md runs without it, if the others hold a whole copy
            continue
        liveness.require_online(ctx, node, role, f"it holds the data of volume {volume.id}")
        transport = export_transport(s, row, volume, consumer, node)
        exports.append((node.id, node.agent_url, transport.value))
    if missing:
        _require_whole_copy(ctx, s, volume, missing)
    return _ExportPlan(
        volume_id=volume.id,
        consumer=consumer.id,
        owner=owner.id,
        owner_url=owner.agent_url,
        consumer_url=consumer.agent_url,
        readonly=row.readonly,
        psk_identity=row.psk_identity,
        psk_key=row.psk_key,
        transport=row.transport,
        exports=tuple(exports),
    )


def _require_whole_copy(ctx: Context, s: Session, volume: VolumeRow, missing: list[str]) -> None:
    """Unavailable unless the in-sync legs on reachable nodes hold every chunk: raid1 one
    of them, raid10 one of each pair holding the same chunks. A mirror with a dead leg
    node can then still be published (degraded, its condition names the leg missing)."""
    legs = list(
        s.scalars(
            select(VolumeLegRow)
            .where(VolumeLegRow.volume_id == volume.id)
            .order_by(VolumeLegRow.position)
        )
    )
    good = {
        leg.position for leg in legs if leg.node_id not in missing and leg.state == LegState.IN_SYNC
    }
    pairs = raid10_pairs(len(legs)) if volume.layout == "raid10" else []
    lost = [p for p in pairs if not good & set(p)]
    if good and not lost:
        log.warning("volume %s: published without the legs on %s", volume.id, ", ".join(missing))
        return
    nodes = [get_node_row(s, n) for n in missing]
    why = "; ".join(liveness.describe(ctx, n, "leg node") for n in nodes)
    held = f" (legs {lost[0][0]} and {lost[0][1]} hold the same chunks)" if lost else ""
    raise Unavailable(
        f"volume {volume.id} ({volume.layout}) has no whole in-sync copy on reachable nodes"
        f"{held}: {why}; bring one of them back",
        field="node_id",
    )


def export_nodes(s: Session, row: AttachmentRow, volume: VolumeRow) -> list[str]:
    """The nodes that export to a remote attachment: a one-leg volume's owner, or every
    live leg of a composed one that is not on the consumer."""
    if row.transport != Transport.COMPOSED:
        return [volume.node_id]
    legs = s.scalars(
        select(VolumeLegRow.node_id)
        .where(VolumeLegRow.volume_id == volume.id, VolumeLegRow.node_id != row.node_id)
        .order_by(VolumeLegRow.position)
    )
    return list(legs)


def export_transport(
    s: Session, row: AttachmentRow, volume: VolumeRow, consumer: NodeRow, node: NodeRow
) -> Transport:
    """What `node`'s export to the attachment is made for.

    One-leg volumes: the attachment's transport. A composed leg keeps the
    transport its export was made for (the consumer holds the leg over it:
    switching it under a live md array would swap the leg's device); a leg
    not exported yet (new, or placed by a repair) gets leg_transport's choice.
    """
    if row.transport != Transport.COMPOSED:
        return Transport(row.transport)
    made = s.get(AttachmentLegRow, (volume.id, row.node_id, node.id))
    if made is not None and made.transport:
        return Transport(made.transport)
    return leg_transport(volume, consumer, node)


def _client_address(agent_url: str) -> str:
    """The consumer's advertised host: the one address the owner's export lets in."""
    if agent_url.startswith("unix:"):
        return ""  # a node on this machine (tests, --nodes 1): no address to pin
    return urlsplit(agent_url).hostname or ""


def _drive_export(ctx: Context, plan: _ExportPlan) -> Attachment:
    """Owners export, consumer gets the key, then the row is ready. Idempotent throughout."""
    made = make_exports(ctx, plan)
    key = AgentKey(psk_identity=plan.psk_identity, psk_key=plan.psk_key)
    ctx.agents.get(plan.consumer_url).put_key(plan.volume_id, key)
    # a degraded mirror may have no reachable remote leg: its local leg is all there is
    first = made[0] if made else MadeExport(plan.consumer, "", 0, "")
    with ctx.db.write() as s:
        done = s.execute(
            update(AttachmentRow)
            .where(
                AttachmentRow.volume_id == plan.volume_id,
                AttachmentRow.node_id == plan.consumer,
                AttachmentRow.psk_key == plan.psk_key,
                AttachmentRow.state == PENDING,  # not a detach begun meanwhile
            )
            .values(host=first.host, port=first.port, state=READY)
        )
        row = s.get(AttachmentRow, (plan.volume_id, plan.consumer)) if done.rowcount else None
        if row is not None:
            record_exports(s, plan.volume_id, plan.consumer, made)
            volume = s.get(VolumeRow, plan.volume_id)
            log.info(
                "volume %s attached to %s over %s from %s",
                plan.volume_id, plan.consumer, plan.transport,
                ", ".join(f"{e.node_id} ({e.host}:{e.port})" for e in made),
            )  # fmt: skip
            if volume is not None:
                return attachment_model(s, row, volume)
    # Detached (or fenced) while the agents were called: take back what we just made.
    _close_export(ctx, plan.volume_id, plan.consumer, plan.owner_url, plan.consumer_url)
    raise Aborted(
        f"the attachment of volume {plan.volume_id} to {plan.consumer} was removed while it "
        "was being made (a detach or fence ran meanwhile); retry",
        field="node_id",
    )


@dataclass(frozen=True)
class MadeExport:
    """What one owner answered for an export."""

    node_id: str
    host: str
    port: int
    subsystem_nqn: str
    transport: str = Transport.NVME_TCP.value


def make_exports(ctx: Context, plan: _ExportPlan) -> list[MadeExport]:
    """Every owner exports to the consumer with the attachment's one key (idempotent)."""
    made = []
    for node_id, url, transport in plan.exports:
        request = AgentExportCreate(
            transport=Transport(transport),
            psk_identity=plan.psk_identity,
            psk_key=plan.psk_key,
            # nvmet has no per-host read-only: nvme-tcp exports are asked read-write and
            # the consumer keeps a read-only attachment read-only (docs/layouts.md); so
            # are a composed volume's nbd legs: md and dm need every leg as one view
            readonly=plan.readonly and plan.transport == Transport.NBD,
            client_address=_client_address(plan.consumer_url),
        )
        export = ctx.agents.get(url).export(plan.volume_id, plan.consumer, request)
        made.append(MadeExport(node_id, export.host, export.port, export.subsystem_nqn, transport))
    return made


def record_exports(s: Session, volume_id: str, consumer: str, made: list[MadeExport]) -> None:
    """Remember each owner's answer (replacing an older one of the same owner)."""
    for export in made:
        found = s.get(AttachmentLegRow, (volume_id, consumer, export.node_id))
        if found is None:
            found = AttachmentLegRow(volume_id=volume_id, node_id=consumer, leg_node=export.node_id)
            s.add(found)
        found.host, found.port = export.host, export.port
        found.subsystem_nqn = export.subsystem_nqn
        found.transport = export.transport


def choose_transport(s: Session, volume: VolumeRow, consumer: NodeRow, readonly: bool) -> Transport:
    """How `consumer` reaches the volume (docs/layouts.md, "Transports").

    The file on the consumer: loop. Several legs: composed, each remote leg
    over what leg_transport picks (checked here, so a node that cannot is
    refused before anything is made). One remote leg: the StorageClass
    parameter `transport` when given, else nvme-tcp when both nodes offer
    it, else nbd; read-only attachments use nbd (nvmet has no per-host
    read-only).
    """
    forced = (volume.parameters or {}).get(TRANSPORT_PARAMETER, "")
    if volume.layout not in ("", Layout.CONCAT.value):
        legs = s.scalars(select(VolumeLegRow.node_id).where(VolumeLegRow.volume_id == volume.id))
        for leg_node in sorted(set(legs) - {consumer.id}):
            leg_transport(volume, consumer, get_node_row(s, leg_node))
        return Transport.COMPOSED
    if consumer.id == volume.node_id:
        return Transport.LOOP
    owner = get_node_row(s, volume.node_id)
    both = set(node_transports(consumer)) & set(node_transports(owner))
    if readonly:
        want = Transport.NBD
    elif forced:
        want = Transport(forced)
    else:
        want = Transport.NVME_TCP if Transport.NVME_TCP.value in both else Transport.NBD
    _require_transport(volume, consumer, owner, want)
    return want


def _require_transport(
    volume: VolumeRow, consumer: NodeRow, owner: NodeRow, want: Transport
) -> None:
    """FailedPrecondition naming the node(s) that cannot do `want` and what each offers."""
    lacking = [n for n in (consumer, owner) if want.value not in node_transports(n)]
    if not lacking:
        return
    offers = "; ".join(_offers_lacking(want, *lacking))
    raise FailedPrecondition(
        f"volume {volume.id} on node {owner.id} would be reached from node {consumer.id} over "
        f"{want.value}, which {' and '.join(n.id for n in lacking)} cannot do ({offers}); "
        "install what it needs there (docs/layouts.md) or change parameters.transport",
        field="node_id",
    )


def leg_transport(volume: VolumeRow, consumer: NodeRow, leg_node: NodeRow) -> Transport:
    """How `consumer` reaches a composed volume's leg on `leg_node` (docs/layouts.md).

    The StorageClass parameter `transport` when given; else nvme-tcp when
    both nodes offer it (the kernel's own target and initiator: the
    production path), else nbd. An nbd leg needs nbd (nbdkit) on the leg's
    node and the kernel nbd client on the consumer: md and dm compose block
    devices in the kernel, which nbdfuse's loop device on a FUSE file would
    put behind a userspace round trip and an extra failure mode.
    FailedPrecondition names each node and what it offers or lacks.
    """
    forced = (volume.parameters or {}).get(TRANSPORT_PARAMETER, "")
    wanted = [Transport(forced)] if forced else [Transport.NVME_TCP, Transport.NBD]
    why = []
    for want in wanted:
        nvme = want == Transport.NVME_TCP
        lacks = _nvme_lacks(consumer, leg_node) if nvme else _nbd_lacks(consumer, leg_node)
        if not lacks:
            return want
        why.append(f"{want.value}: {'; '.join(lacks)}")
    over = f"over {forced} (parameters.transport)" if forced else "over nvme-tcp or nbd"
    change = " or change parameters.transport" if forced else ""
    raise FailedPrecondition(
        f"volume {volume.id} ({volume.layout}) has a leg on node {leg_node.id} that node "
        f"{consumer.id} cannot reach {over} ({' / '.join(why)}); install what it needs "
        f"there (docs/layouts.md){change}",
        field="node_id",
    )


def _offers_lacking(want: Transport, *nodes: NodeRow) -> list[str]:
    """`node X offers loop, nbd` for each of `nodes` that does not offer `want`."""
    return [
        f"node {n.id} offers {', '.join(node_transports(n))}"
        for n in nodes
        if want.value not in node_transports(n)
    ]


def _nvme_lacks(consumer: NodeRow, leg_node: NodeRow) -> list[str]:
    """Why nvme-tcp cannot join the two nodes: each one that does not offer it."""
    return _offers_lacking(Transport.NVME_TCP, consumer, leg_node)


def _nbd_lacks(consumer: NodeRow, leg_node: NodeRow) -> list[str]:
    """Why an nbd leg cannot join them: the leg's node serves no nbd, or the consumer
    has no kernel nbd client."""
    lacks = _offers_lacking(Transport.NBD, leg_node)
    if not consumer.kernel_nbd:
        lacks.append(
            f"node {consumer.id} has no kernel nbd client (the nbd module, nbd-client and nbdkit)"
        )
    return lacks


def refresh_connection(ctx: Context, volume_id: str, node_id: str) -> Attachment | None:
    """Export every live leg to a ready composed attachment and hand its consumer the
    connection again: how a repair's new leg reaches the consumer's md array (the agent
    adds a listed leg it lacks and drops one no longer listed). None when there is no
    ready composed attachment on the node. Idempotent."""
    with ctx.db.write() as s:
        volume = _lock_volume(s, volume_id)
        row = s.get(AttachmentRow, (volume_id, node_id))
        if row is None or row.state != READY or row.transport != Transport.COMPOSED:
            return None
        plan = _plan(ctx, s, volume, get_node_row(s, node_id), row)
    made = make_exports(ctx, plan)
    with ctx.db.write() as s:
        volume = s.get(VolumeRow, volume_id, with_for_update=True)
        row = s.get(AttachmentRow, (volume_id, node_id), with_for_update=True)
        if row is None or volume is None or row.psk_key != plan.psk_key or row.state != READY:
            return None  # detached meanwhile (or detaching): its exports are closed with it
        record_exports(s, volume_id, node_id, made)
        s.flush()
        attachment = attachment_model(s, row, volume)
        # under the lock: a detach marks the row first, so it cannot begin between this
        # check and the consumer recomposing the volume (which nothing would undo)
        ctx.agents.get(plan.consumer_url).attach(
            volume_id, readonly=attachment.readonly, connection=attachment.connection
        )
    log.info(
        "volume %s: node %s was sent legs %s", volume_id, node_id,
        ", ".join(f"{leg.index} ({leg.node_id}, {leg.state.value})"
                  for leg in attachment.connection.legs),
    )  # fmt: skip
    return attachment


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


# ---- detach ------------------------------------------------------------------------------


def detach(ctx: Context, volume_id: str, node_id: str) -> bool:
    """Release the attachment; True if there was one. Idempotent.

    A remote attachment's export is closed by the owner (its nbdkit ends,
    so every connection from the consumer drops, and its key is deleted)
    BEFORE the row goes: once the row is gone another node may become the
    writer, and the old one must no longer reach the data by then. An
    owner that is fenced is skipped (it serves nothing any more); one that
    is merely unreachable makes the detach 503 (retried) rather than risk
    two writers. A local (loop) attachment of a silent node is kept the
    same way (see _require_local_release).
    """
    ids.check_volume_id(volume_id)
    ids.check_node_id(node_id)
    _mark_detaching(ctx, volume_id, node_id)
    with ctx.db.read() as s:
        row = s.get(AttachmentRow, (volume_id, node_id))
        if row is None:
            return False
        key = row.psk_key
        if row.transport == Transport.LOOP:
            _require_local_release(ctx, s.get(NodeRow, node_id), volume_id)
        if row.transport != Transport.LOOP:
            volume = s.get(VolumeRow, volume_id)
            consumer = s.get(NodeRow, node_id)
            owners = []
            if volume is not None:
                owners = [
                    s.get(NodeRow, n)
                    for n in export_nodes(s, row, volume)
                    if not _never_exported(ctx, s, row, n)
                ]
            for owner in owners:
                if owner is not None:
                    _revoke(ctx, volume_id, owner, consumer)
    with ctx.db.write() as s:
        s.execute(
            delete(AttachmentRow).where(
                AttachmentRow.volume_id == volume_id,
                AttachmentRow.node_id == node_id,
                AttachmentRow.psk_key == key,
            )
        )
    log.info("volume %s detached from %s", volume_id, node_id)
    return True


def _mark_detaching(ctx: Context, volume_id: str, node_id: str) -> None:
    """A composed attachment is marked before its exports are revoked, so a repair's
    refresh_connection (which checks under the lock) no longer re-sends it legs."""
    with ctx.db.write() as s:
        row = s.get(AttachmentRow, (volume_id, node_id), with_for_update=True)
        if row is not None and row.transport == Transport.COMPOSED and row.state == READY:
            row.state = DETACHING  # (a pending one never reached its consumer)


def _never_exported(ctx: Context, s: Session, row: AttachmentRow, leg_node: str) -> bool:
    """A leg node a ready composed attachment was made without (down at publish, see
    _require_whole_copy) and that is still not online: it holds no export to close, and
    its heartbeat reply would have it reap one anyway."""
    if row.transport != Transport.COMPOSED or row.state not in (READY, DETACHING):
        return False
    if s.get(AttachmentLegRow, (row.volume_id, row.node_id, leg_node)) is not None:
        return False
    node = s.get(NodeRow, leg_node)
    return node is None or liveness.node_state(ctx, node) != NodeState.ONLINE


def _require_local_release(ctx: Context, consumer: NodeRow | None, volume_id: str) -> None:
    """Unavailable while the node using the volume locally is unreachable (not fenced).

    A loop attachment's consumer is the owner: it reaches the file directly,
    so no export can be closed from here to cut it off. Releasing the row
    would let another node attach while the silent node's pod may still
    have the device mounted: two writers. Only a fence (the admin's word
    that the node is down) releases it. An online node is asking for the
    detach itself (its CSI node plugin unstaged first).
    """
    if consumer is None or liveness.node_state(ctx, consumer) != NodeState.UNREACHABLE:
        return
    raise Unavailable(
        f"node {consumer.id} is unreachable ({liveness.last_seen(ctx, consumer)}) and uses "
        f"volume {volume_id} locally: nothing can cut its access from here, so the attachment "
        f"is kept until it detaches itself; once it is really down or cut off, fence it "
        f"(tessera node fence {consumer.id}), which releases it",
        field="node_id",
    )


def _revoke(ctx: Context, volume_id: str, owner: NodeRow, consumer: NodeRow | None) -> None:
    """The owner closes the consumer's export (unless fenced); the consumer forgets the key."""
    consumer_id = consumer.id if consumer is not None else ""
    owner_state = liveness.node_state(ctx, owner)
    if owner_state != NodeState.FENCED:
        liveness.require_online(
            ctx,
            owner,
            "owner node",
            f"it must close the export of volume {volume_id} to {consumer_id} before the "
            "attachment is released (or fence the owner too)",
        )
        ctx.agents.get(owner.agent_url).close_export(volume_id, consumer_id)
    if consumer is not None and liveness.node_state(ctx, consumer) == NodeState.ONLINE:
        _forget_key(ctx, volume_id, consumer.id, consumer.agent_url)


def _forget_key(ctx: Context, volume_id: str, node_id: str, agent_url: str) -> None:
    """Best effort: with the export closed, the key opens nothing any more."""
    try:
        ctx.agents.get(agent_url).delete_key(volume_id)
    except TesseraError as err:
        log.warning("volume %s: node %s could not delete its key: %s", volume_id, node_id, err)


def _close_export(
    ctx: Context, volume_id: str, consumer: str, owner_url: str, consumer_url: str
) -> None:
    """Undo a remote attachment's agent calls after its row went away meanwhile."""
    try:
        ctx.agents.get(owner_url).close_export(volume_id, consumer)
    except TesseraError as err:
        # the owner's heartbeat reply no longer lists it, so the owner reaps it
        log.warning("volume %s: could not close the export to %s: %s", volume_id, consumer, err)
    _forget_key(ctx, volume_id, consumer, consumer_url)


def list_attachments(ctx: Context, volume_id: str) -> list[Attachment]:
    ids.check_volume_id(volume_id)
    with ctx.db.read() as s:
        volume = s.get(VolumeRow, volume_id)
        if volume is None:
            raise NotFound(f"volume {volume_id} does not exist", field="volume_id")
        rows = s.scalars(
            select(AttachmentRow)
            .where(AttachmentRow.volume_id == volume_id)
            .order_by(AttachmentRow.node_id)
        )
        return [attachment_model(s, r, volume) for r in rows]
