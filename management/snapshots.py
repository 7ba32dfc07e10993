"""Snapshots: create (idempotent by name), list, get, delete, and changed-block metadata.

A snapshot is a file the source volume's owner agent cuts beside the
volume in the same pool (a reflink where the pool can, docs/data-services.md).
As for volumes, the row is committed before the agent is called and the
agent call runs outside any transaction: the row is inserted `creating`,
the agent cuts the file (idempotent by snapshot ID), then the row becomes
`ready`. A crash at any point leaves a `creating` row that the next
create of the same name re-drives; delete marks `deleting` first, so a
retried delete converges the same way.

Consistency: every node that has the source attached freezes its mounted
filesystems for the instant of the cut (AgentClient.freeze, with a short
lease after which the agent thaws by itself) and is thawed in a `finally`
whatever happens. Every freeze, renewal and thaw names its holder (the
snapshot's, group's or clone's ID), so two cuts never thaw each other; a
renewal the agent refuses or that fails means the instant may be lost and
the cut is dropped (FreezeLapsed, 503). Cuts of one source take turns
(CUT_LOCKS). A node that cannot be asked to freeze fails the create with
Unavailable before anything is cut: it may have a filesystem mounted.

Space: the row is inserted already promising what the source has written
(asked of its owner agent first), so a full pool refuses before any cut
and nothing else can take the room while the cut runs; `finish` replaces
the promise with what the cut really pins, checking room again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from management.context import Context
from management.limits import check_text
from management.pagination import fetch_page
from management.placement import allocated_by_pool
from management.schema import AttachmentRow, NodeRow, PoolRow, SnapshotRow, VolumeRow
from tessera import ids
from tessera.clients import AgentClient
from tessera.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    TesseraError,
    Unavailable,
)
from tessera.models import (
    AgentSnapshot,
    ExtentPage,
    Page,
    Snapshot,
    SnapshotCreate,
    SnapshotMethod,
    SnapshotState,
    VolumeState,
)
from tessera.units import format_size

log = logging.getLogger(__name__)

#: seconds a frozen filesystem stays frozen if management dies mid-cut (the agent thaws then)
FREEZE_LEASE_SECONDS = 10.0


def snapshot_model(row: SnapshotRow) -> Snapshot:
    return Snapshot(
        id=row.id,
        name=row.name,
        source_volume_id=row.source_volume_id,
        size_bytes=row.size_bytes,
        node_id=row.node_id,
        pool=row.pool,
        created_at=row.created_at,
        state=SnapshotState(row.state),
        ready_to_use=row.state == SnapshotState.READY,
        method=SnapshotMethod(row.method),
        allocated_bytes=row.allocated_bytes,
        group_snapshot_id=row.group_snapshot_id or "",
    )


def load(
    s: Session, snapshot_id: str, field: str = "snapshot_id", *, lock: bool = False
) -> SnapshotRow:
    ids.check_snapshot_id(snapshot_id, field)
    row = s.get(SnapshotRow, snapshot_id, with_for_update=lock or None)
    if row is None:
        raise NotFound(f"snapshot {snapshot_id} does not exist", field=field)
    return row


def agent_url(s: Session, node_id: str) -> str:
    url = s.execute(select(NodeRow.agent_url).where(NodeRow.id == node_id)).scalar()
    if url is None:
        raise FailedPrecondition(f"node {node_id!r} is not registered", field="node_id")
    return url


# ---- create --------------------------------------------------------------------------


def check_source(
    s: Session, volume_id: str, field: str = "source_volume_id", *, lock: bool = True
) -> VolumeRow:
    """The source volume (locked: `lock`); NotFound / FailedPrecondition saying what is wrong."""
    ids.check_volume_id(volume_id, field)
    vol = s.get(VolumeRow, volume_id, with_for_update=lock or None)
    if vol is None:
        raise NotFound(f"source volume {volume_id} does not exist", field=field)
    if vol.state != VolumeState.AVAILABLE:
        raise FailedPrecondition(
            f"source volume {volume_id} is {vol.state}, not available", field=field
        )
    if vol.layout not in ("", "concat"):
        # a snapshot is one reflinked file; a striped or mirrored volume is several
        raise FailedPrecondition(
            f"source volume {volume_id} has layout {vol.layout}: snapshots are made of "
            "one-leg (concat) volumes only for now",
            field=field,
        )
    return vol


def check_method(s: Session, node_id: str, pool: str, what: str = "snapshots") -> str:
    """The pool's snapshot method; `none` is FailedPrecondition naming the pool and the fix."""
    row = s.get(PoolRow, (node_id, pool))
    method = row.snapshot_method if row is not None else SnapshotMethod.NONE.value
    if method == SnapshotMethod.NONE:
        raise FailedPrecondition(
            f"pool {pool!r} on node {node_id!r} cannot make {what}: its filesystem cannot "
            "reflink; put the pool on a reflink filesystem (XFS with reflink=1, btrfs) or "
            "start its node-agent with --copy-fallback to make full copies",
            field="source_volume_id",
        )
    return method


def new_row(
    ctx: Context, name: str, vol: VolumeRow, method: str, reserved: int, group_id: str = ""
) -> SnapshotRow:
    """A `creating` row that already promises `reserved` bytes (the source's written bytes)."""
    return SnapshotRow(
        id=ids.new_snapshot_id(),
        name=name,
        source_volume_id=vol.id,
        node_id=vol.node_id,
        pool=vol.pool,
        size_bytes=vol.size_bytes,
        allocated_bytes=reserved,
        method=method,
        state=SnapshotState.CREATING.value,
        created_at=ctx.clock(),
        group_snapshot_id=group_id,
    )


def written_bytes(ctx: Context, volume_ids: list[str], field: str) -> dict[str, int]:
    """What each source has written now, from its owner agent: the space its cut will pin.

    Asked before the row is inserted (outside any transaction), so the
    space is promised from the start and a full pool refuses before any cut.
    """
    with ctx.db.read() as s:
        owners = {}
        for volume_id in volume_ids:
            vol = s.get(VolumeRow, volume_id)
            if vol is None:
                raise NotFound(f"source volume {volume_id} does not exist", field=field)
            owners[volume_id] = agent_url(s, vol.node_id)
    return {
        volume_id: ctx.agents.get(url).get_volume(volume_id).allocated_bytes
        for volume_id, url in owners.items()
    }


def check_room(s: Session, rows: list[SnapshotRow], extra: dict[str, int]) -> str:
    """Why the rows' pools cannot hold `extra` more bytes per snapshot ID; "" when they can.

    The pools are locked (PostgreSQL) for the check, as placement does.
    """
    need: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row.node_id, row.pool)
        need[key] = need.get(key, 0) + extra.get(row.id, 0)
    for (node_id, pool), wanted in sorted(need.items()):
        free = _free(s, node_id, pool)
        if wanted > free:
            return (
                f"pool {pool!r} on node {node_id!r} has {format_size(free)} free; the "
                f"snapshot pins {format_size(wanted)} more (what its source has written, "
                "which later writes may need again): free space or add capacity"
            )
    return ""


def create_snapshot(ctx: Context, req: SnapshotCreate) -> tuple[Snapshot, bool]:
    """Create or return the snapshot named `req.name`. Returns (snapshot, created).

    Checks in the contract's order: the name (same name, other source:
    AlreadyExists), then the source (unknown: NotFound; not available:
    FailedPrecondition), then the pool's method (`none`: FailedPrecondition),
    then room for what the source has written (ResourceExhausted, nothing cut).
    """
    check_text(req.name, "name")
    for key, value in req.parameters.items():
        check_text(key, "parameters")
        check_text(value, "parameters")
    ids.check_volume_id(req.source_volume_id, "source_volume_id")
    written = _written_if_new(ctx, req)
    try:
        with ctx.db.write() as s:
            row = s.scalars(select(SnapshotRow).where(SnapshotRow.name == req.name)).first()
            created = row is None
            if row is None:
                row = _insert(ctx, s, req, written)
            else:
                _check_same(row, req)
            snap = snapshot_model(row) if row is not None else None
    except IntegrityError:  # a concurrent create of the name won (PostgreSQL)
        return create_snapshot(ctx, req)[0], False
    if snap is None:  # the name was taken, then freed, while the agent was asked: again
        return create_snapshot(ctx, req)
    if snap.state == SnapshotState.DELETING:
        # a failed create (its freeze lapsed) or a delete that crashed midway: finish, start over
        delete_snapshot(ctx, snap.id)
        return create_snapshot(ctx, req)
    if snap.state == SnapshotState.CREATING:
        snap = drive(ctx, [snap], snap.id)[0]
    return snap, created


def _insert(
    ctx: Context, s: Session, req: SnapshotCreate, written: dict[str, int]
) -> SnapshotRow | None:
    """The new row, promising what the source has written; None if that was not asked."""
    vol = check_source(s, req.source_volume_id)
    method = check_method(s, vol.node_id, vol.pool)
    if vol.id not in written:
        return None
    row = new_row(ctx, req.name, vol, method, written[vol.id])
    short = check_room(s, [row], {row.id: row.allocated_bytes})
    if short:
        raise ResourceExhausted(short, field="source_volume_id")
    s.add(row)
    return row


def _written_if_new(ctx: Context, req: SnapshotCreate) -> dict[str, int]:
    """The source's written bytes when the name is new and the source fits; else {}.

    The source and its pool are checked first, so the agent is asked only
    for a create that will be made (and errors keep the contract's order).
    """
    with ctx.db.read() as s:
        if s.scalars(select(SnapshotRow.id).where(SnapshotRow.name == req.name)).first():
            return {}
        vol = check_source(s, req.source_volume_id, lock=False)
        check_method(s, vol.node_id, vol.pool)
    return written_bytes(ctx, [req.source_volume_id], "source_volume_id")


def _check_same(row: SnapshotRow, req: SnapshotCreate) -> None:
    if row.source_volume_id != req.source_volume_id:
        raise AlreadyExists(
            f"snapshot {req.name!r} already exists for volume {row.source_volume_id}, "
            f"not {req.source_volume_id}",
            field="name",
        )


def drive(ctx: Context, snaps: list[Snapshot], holder: str) -> list[Snapshot]:
    """One cut of the sources at a time; freeze them wherever attached, cut, thaw, settle.

    `holder` (the snapshot's or group's ID) names the freezes. Every step
    is idempotent, so a retry after a crash anywhere converges. A cut
    that fails leaves its row `creating` (the caller's retry re-drives it;
    a group deletes its members instead).
    """
    sources = sorted({snap.source_volume_id for snap in snaps})
    try:
        with CUT_LOCKS.hold(sources), frozen(ctx, sources, holder):
            cuts = [cut(ctx, snap) for snap in snaps]
    except FreezeLapsed:
        _drop(ctx, [snap.id for snap in snaps])  # files cut while perhaps thawed
        raise
    return finish(ctx, snaps, cuts)


def _drop(ctx: Context, snapshot_ids: list[str]) -> None:
    """Mark `creating` snapshots `deleting` and delete them (a create of the name starts over)."""
    with ctx.db.write() as s:
        for snapshot_id in snapshot_ids:
            row = s.get(SnapshotRow, snapshot_id)
            if row is not None and row.state == SnapshotState.CREATING:
                row.state = SnapshotState.DELETING.value
    for snapshot_id in snapshot_ids:
        delete_snapshot(ctx, snapshot_id, missing_ok=True)


def cut(ctx: Context, snap: Snapshot) -> AgentSnapshot:
    """Have the owner agent cut the file (idempotent by snapshot ID)."""
    with ctx.db.read() as s:
        url = agent_url(s, snap.node_id)
    return ctx.agents.get(url).create_snapshot(snap.id, snap.pool, snap.source_volume_id)


def finish(ctx: Context, snaps: list[Snapshot], cuts: list[AgentSnapshot]) -> list[Snapshot]:
    """Replace each reservation with what the cut really pins and mark it ready: all or none.

    The rows promised the sources' written bytes since insert; a source
    that wrote more before its cut needs the difference now. A pool
    without room for it: the new snapshots are marked `deleting`, their
    files deleted and rows forgotten, ResourceExhausted.
    """
    with ctx.db.write() as s:
        rows = [s.get(SnapshotRow, snap.id) for snap in snaps]
        live = [
            (row, got)
            for row, got in zip(rows, cuts, strict=True)
            if row is not None and row.state == SnapshotState.CREATING
        ]
        more = {row.id: got.allocated_bytes - row.allocated_bytes for row, got in live}
        short = check_room(s, [row for row, _ in live], more)
        for row, got in live:
            if short:
                row.state = SnapshotState.DELETING.value
                continue
            row.state = SnapshotState.READY.value
            row.size_bytes = got.size_bytes
            row.method = got.method.value
            row.allocated_bytes = got.allocated_bytes
        undone = [row.id for row, _ in live] if short else []
        done = [
            snapshot_model(row) if row is not None else snap
            for row, snap in zip(rows, snaps, strict=True)
        ]
    if short:
        for snapshot_id in undone:
            delete_snapshot(ctx, snapshot_id, missing_ok=True)
        raise ResourceExhausted(short, field="source_volume_id")
    return done


def _free(s: Session, node_id: str, pool: str) -> int:
    """The pool's free logical space, its row locked FOR UPDATE (PostgreSQL) first."""
    row = s.get(PoolRow, (node_id, pool), with_for_update=True)
    if row is None:
        return 0
    allocated = allocated_by_pool(s, node_id).get((node_id, pool), 0)
    return max(row.capacity_bytes - allocated, 0)


# ---- read ----------------------------------------------------------------------------


def get_snapshot(ctx: Context, snapshot_id: str) -> Snapshot:
    with ctx.db.read() as s:
        return snapshot_model(load(s, snapshot_id))


def list_snapshots(
    ctx: Context,
    page_token: str,
    max_entries: int,
    name: str = "",
    source_volume_id: str = "",
) -> Page[Snapshot]:
    """One page in ID order (stable across pages), optionally only one name / one source."""
    where = []
    if name:
        check_text(name, "name")
        where.append(SnapshotRow.name == name)
    if source_volume_id:
        check_text(source_volume_id, "source_volume_id")
        where.append(SnapshotRow.source_volume_id == source_volume_id)
    with ctx.db.read() as s:
        rows, token = fetch_page(s, SnapshotRow, [SnapshotRow.id], page_token, max_entries, where)
    return Page[Snapshot](items=[snapshot_model(r) for r in rows], next_token=token)


# ---- delete --------------------------------------------------------------------------


def delete_snapshot(ctx: Context, snapshot_id: str, *, missing_ok: bool = False) -> None:
    """Mark `deleting`, have the agent remove the file, forget the row; a retry converges.

    The space the snapshot pinned stays promised until the file is gone.
    """
    try:
        with ctx.db.write() as s:
            row = load(s, snapshot_id, lock=True)
            row.state = SnapshotState.DELETING.value
            url = agent_url(s, row.node_id)
    except NotFound:
        if missing_ok:
            return
        raise
    ctx.agents.get(url).delete_snapshot(snapshot_id)
    with ctx.db.write() as s:
        row = s.get(SnapshotRow, snapshot_id)
        if row is not None and row.state == SnapshotState.DELETING:
            s.delete(row)


# ---- changed-block metadata ----------------------------------------------------------


def _ready(s: Session, snapshot_id: str, field: str) -> SnapshotRow:
    row = load(s, snapshot_id, field)
    if row.state != SnapshotState.READY:
        raise FailedPrecondition(f"snapshot {snapshot_id} is {row.state}, not ready", field=field)
    return row


def allocated(ctx: Context, snapshot_id: str, offset: int, max_entries: int) -> ExtentPage:
    """The snapshot's byte ranges that hold data, from its owner agent's extent map."""
    with ctx.db.read() as s:
        row = _ready(s, snapshot_id, "snapshot_id")
        url = agent_url(s, row.node_id)
    return ctx.agents.get(url).snapshot_extents(snapshot_id, offset=offset, max_entries=max_entries)


def delta(
    ctx: Context, snapshot_id: str, base_id: str, offset: int, max_entries: int
) -> ExtentPage:
    """The ranges that differ between two snapshots of one volume (shared extents are equal)."""
    with ctx.db.read() as s:
        row = _ready(s, snapshot_id, "snapshot_id")
        base = _ready(s, base_id, "base")
        if base.source_volume_id != row.source_volume_id or base.node_id != row.node_id:
            raise FailedPrecondition(
                f"snapshots {base_id} (of volume {base.source_volume_id}) and {snapshot_id} "
                f"(of volume {row.source_volume_id}) are not of the same volume: a delta "
                "compares two snapshots of one volume",
                field="base",
            )
        url = agent_url(s, row.node_id)
    return ctx.agents.get(url).snapshot_extents(
        snapshot_id, base_snapshot_id=base_id, offset=offset, max_entries=max_entries
    )


class FreezeLapsed(Unavailable):
    """A freeze may have ended before the cut did (lapsed, renewal refused or failed)."""


#: how long a cut waits for another cut of the same volume before answering Aborted: less
#: than a caller's read timeout (tessera.http.READ_TIMEOUT), so it never hears "no answer"
CUT_WAIT_SECONDS = 20.0


class _CutLocks:
    """One cut of a volume at a time in this (single-replica) management process.

    Unlike tessera.locks.VolumeLocks a second cut WAITS (briefly) instead of
    being refused: a reflink cut takes milliseconds, and a user's second
    `snapshot create` should simply follow the first. Keys are taken in
    sorted order, so a group and a single snapshot never deadlock.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    def _ref(self, key: str, step: int) -> threading.Lock:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            if users + step:
                self._locks[key] = (lock, users + step)
            else:
                self._locks.pop(key, None)
            return lock

    @contextmanager
    def hold(self, keys: list[str], field: str = "source_volume_id") -> Iterator[None]:
        taken: list[str] = []
        try:
            for key in sorted(set(keys)):
                lock = self._ref(key, +1)
                if not lock.acquire(timeout=CUT_WAIT_SECONDS):
                    self._ref(key, -1)
                    raise Aborted(
                        f"another snapshot or clone of volume {key} is being cut; retry later",
                        field=field,
                    )
                taken.append(key)
            yield
        finally:
            for key in reversed(taken):
                self._ref(key, -1).release()


CUT_LOCKS = _CutLocks()


@dataclass
class _Held:
    client: AgentClient
    volume_id: str
    node_id: str
    #: monotonic time the last freeze (or renewal) that worked was sent: its lease runs from
    #: a moment after this, so this plus the lease is a safe bound on when it lapses
    sent: float = 0.0
    #: why a renewal failed (the freeze may be gone: the instant is lost); "" while fine
    failed: str = ""


class _Renewer(threading.Thread):
    """Renews every held freeze each third of a lease while the freezes and the cut run.

    Started before the first freeze: a group's freezes alone may outlast a
    lease. A renewal names the holder with renew=True, so an agent that no
    longer holds the freeze (lapsed, thawed, restarted) answers Conflict
    instead of freezing afresh after the instant was lost.
    """

    def __init__(self, holder: str) -> None:
        super().__init__(daemon=True, name=f"freeze-renewer-{holder}")
        self.holder = holder
        self.held: list[_Held] = []  # appended by `frozen` once each freeze is made
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(FREEZE_LEASE_SECONDS / 3):
            for h in list(self.held):
                if not h.failed:
                    self._renew(h)

    def _renew(self, h: _Held) -> None:
        sent = time.monotonic()
        try:
            h.client.freeze(h.volume_id, FREEZE_LEASE_SECONDS, holder=self.holder, renew=True)
            h.sent = sent
        except TesseraError as err:
            h.failed = err.message
            log.warning(
                "renewing the freeze of %s on node %s for %s failed: %s",
                h.volume_id,
                h.node_id,
                self.holder,
                err.message,
            )

    def stop(self) -> None:
        self.done.set()
        if self.is_alive():
            self.join()

    def lost(self) -> list[_Held]:
        """Freezes that may have ended: a renewal failed, or the lease ran out meanwhile."""
        now = time.monotonic()
        return [h for h in self.held if h.failed or now >= h.sent + FREEZE_LEASE_SECONDS]


def _attached(ctx: Context, volume_ids: list[str]) -> list[tuple[str, str, str]]:
    """(volume, node, agent URL) of every attachment of the volumes, in a stable order."""
    with ctx.db.read() as s:
        return [
            (volume_id, node_id, url)
            for volume_id, node_id, url in s.execute(
                select(AttachmentRow.volume_id, NodeRow.id, NodeRow.agent_url)
                .join(NodeRow, NodeRow.id == AttachmentRow.node_id)
                .where(AttachmentRow.volume_id.in_(volume_ids))
                .order_by(AttachmentRow.volume_id, NodeRow.id)
            )
        ]


@contextmanager
def frozen(ctx: Context, volume_ids: list[str], holder: str) -> Iterator[None]:
    """Freeze every node's mounts of the volumes for `holder`; thaw its freezes in `finally`.

    `holder` (the snapshot, group snapshot or clone ID) names every freeze,
    renewal and thaw, so two cuts of one volume never thaw each other.
    Freezes go in a stable order; if one cannot be made (the node is
    unreachable: it may have a filesystem mounted, so a cut now could be
    inconsistent) nothing is cut: Unavailable, after thawing those made.
    While the block runs the freezes are renewed; if one may have ended
    before the block did, FreezeLapsed (the caller drops what it cut).
    """
    renewer = _Renewer(holder)
    tried: list[_Held] = []
    try:
        renewer.start()
        for volume_id, node_id, url in _attached(ctx, volume_ids):
            h = _Held(ctx.agents.get(url), volume_id, node_id, time.monotonic())
            tried.append(h)  # thawed whatever the answer: a timed-out freeze may have worked
            try:
                state = h.client.freeze(volume_id, FREEZE_LEASE_SECONDS, holder=holder)
            except TesseraError as err:
                raise Unavailable(
                    f"could not freeze volume {volume_id} on node {node_id!r}, which has it "
                    f"attached ({err.message}); nothing was cut: retry when the node is back",
                    field="source_volume_id",
                ) from None
            if state.frozen:  # not mounted there (a block publish): nothing to keep frozen
                renewer.held.append(h)
        yield
        renewer.stop()
        lost = renewer.lost()
        if lost:
            names = ", ".join(
                f"{h.volume_id} on node {h.node_id!r} ({h.failed or 'not renewed in time'})"
                for h in lost
            )
            raise FreezeLapsed(
                f"the freeze of {names} may have ended before the cut did: the cut was "
                "dropped; retry",
                field="source_volume_id",
            )
    finally:
        renewer.stop()
        for h in reversed(tried):
            try:
                h.client.thaw(h.volume_id, holder=holder)
            except TesseraError as err:  # the agent thaws by itself when the lease ends
                log.warning(
                    "thawing volume %s on node %s failed (%s); its agent thaws it when the "
                    "%.0f s lease ends",
                    h.volume_id,
                    h.node_id,
                    err.message,
                    FREEZE_LEASE_SECONDS,
                )
