"""SQLAlchemy 2 table definitions.

Portable column types only (SQLite by default, PostgreSQL for HA): sizes
are BigInteger, timestamps are epoch seconds as Float, free-form maps are
JSON. Space accounting is derived (capacity minus the sum of the legs
placed in a pool) rather than stored, so it can never drift from the volumes that use it.

Columns added after the first release carry a `server_default`:
`management.db.upgrade_schema` adds them to a database an older version
made (see docs/operations.md, "Upgrading").
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    String,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class MetaRow(Base):
    """Facts about the database itself: `epoch`, its identity (see management.db.ensure_epoch)."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class NodeRow(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    agent_url: Mapped[str] = mapped_column(String(1024))
    topology: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    max_volumes: Mapped[int] = mapped_column(Integer, default=0)
    last_heartbeat: Mapped[float] = mapped_column(Float, default=0.0)
    #: when an admin (or ControllerUnpublish via `tessera node fence`) fenced it; 0: not fenced
    fenced_at: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    #: tessera.models.Transport values the agent can serve and attach over, comma-separated
    #: (an agent older than nvme-tcp registers none: loop and nbd)
    transports: Mapped[str] = mapped_column(
        String(128), default="loop,nbd", server_default=text("'loop,nbd'")
    )
    #: the kernel nbd client (nbd module, nbd-client, nbdkit): it can attach nbd legs of
    #: composed volumes (an agent older than those registers none: false)
    kernel_nbd: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))


class PoolRow(Base):
    __tablename__ = "pools"

    node_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    capacity_bytes: Mapped[int] = mapped_column(BigInteger)
    #: physical bytes in use on the pool's filesystem, as its agent last reported (shared
    #: extents once); shown beside the logical allocation, never used for placement
    used_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    #: tessera.models.SnapshotMethod the agent probed: reflink, copy (--copy-fallback) or none
    snapshot_method: Mapped[str] = mapped_column(
        String(16), default="none", server_default=text("'none'")
    )


class VpgRow(Base):
    __tablename__ = "vpgs"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    layout: Mapped[str] = mapped_column(String(32))
    #: legs per volume, resolved at create (tessera.layouts.DEFAULT_LEGS when not given)
    legs: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    #: stripe chunk of raid0/raid10 (0 for layouts that do not stripe)
    chunk_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))


class VolumeRow(Base):
    __tablename__ = "volumes"
    __table_args__ = (
        ForeignKeyConstraint(["node_id", "pool"], ["pools.node_id", "pools.name"]),
        Index("ix_volumes_pool", "node_id", "pool"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    #: size the node-agent has confirmed; below size_bytes = an agent call to (re)drive
    agent_size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    vpg: Mapped[str] = mapped_column(String(63), ForeignKey("vpgs.name"))
    node_id: Mapped[str] = mapped_column(String(128))
    pool: Mapped[str] = mapped_column(String(128))
    state: Mapped[str] = mapped_column(String(16))
    parameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float)
    #: a clone's source: `snapshot` or `volume` and its ID ("" for an empty volume). No
    #: foreign key: the source may be deleted before its clones (files are independent)
    content_source_kind: Mapped[str] = mapped_column(
        String(16), default="", server_default=text("''")
    )
    content_source_id: Mapped[str] = mapped_column(
        String(64), default="", server_default=text("''")
    )
    #: tessera.models.QosLimits, 0 = unlimited
    qos_read_bps: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    qos_write_bps: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    qos_read_iops: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    qos_write_iops: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    #: tessera.models.Layout, copied from the vpg at create (a vpg's layout never changes,
    #: but the volume's geometry must not depend on another row)
    layout: Mapped[str] = mapped_column(
        String(16), default="concat", server_default=text("'concat'")
    )
    chunk_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    #: raid1/raid10: the md array's UUID (uuid4), "" for layouts without md metadata
    array_uuid: Mapped[str] = mapped_column(String(36), default="", server_default=text("''"))
    #: composed: bumped on every change of the leg list (repair); sent in every composed
    #: Connection so a node never applies legs older than some it already applied
    legs_generation: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))


class VolumeLegRow(Base):
    """One piece of a volume: a file in one node's pool.

    A concat volume has one leg (position 0); striped and mirrored layouts
    add more without another schema change. The first leg's node is the
    volume's owner (`VolumeRow.node_id`/`pool` repeat it, so the many
    queries that only need the owner need no join). Space accounting and
    placement count legs.
    """

    __tablename__ = "volume_legs"
    __table_args__ = (
        ForeignKeyConstraint(["node_id", "pool"], ["pools.node_id", "pools.name"]),
        Index("ix_volume_legs_pool", "node_id", "pool"),
    )

    volume_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("volumes.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(String(128))
    pool: Mapped[str] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    #: tessera.models.LegState: in_sync, or rebuilding after a repair placed it
    state: Mapped[str] = mapped_column(
        String(16), default="in_sync", server_default=text("'in_sync'")
    )
    #: what a consumer last said of this leg ("failed", "resyncing leg 1 (n4): 43%"),
    #: read by a repair (management.repair); "" when it said nothing
    report: Mapped[str] = mapped_column(String(255), default="", server_default=text("''"))


class DiscardedLegRow(Base):
    """A leg file that must go but whose node could not delete it yet.

    A stale leg replaced by a repair (never read again: it missed writes),
    or a leg of a deleted volume whose node was down at the delete. Its file
    still takes space, so placement counts it like a leg; the node is never
    given a new leg of the same volume while it is here (the file path is
    the volume's). Deleted on its node as soon as the node answers again
    (management.legs.sweep_discarded). No foreign key to the volume: it may
    be gone already.
    """

    __tablename__ = "discarded_legs"
    __table_args__ = (
        ForeignKeyConstraint(["node_id", "pool"], ["pools.node_id", "pools.name"]),
        Index("ix_discarded_legs_pool", "node_id", "pool"),
    )

    volume_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    pool: Mapped[str] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    #: the leg's slot in its volume (shown as a stale leg while the volume exists)
    position: Mapped[int] = mapped_column(Integer, default=0)


class AttachmentRow(Base):
    __tablename__ = "attachments"

    volume_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("volumes.id", ondelete="CASCADE"), primary_key=True
    )
    node_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("nodes.id"), primary_key=True, index=True
    )
    access_mode: Mapped[str] = mapped_column(String(32))
    readonly: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    #: tessera.models.Transport: `loop` (the consumer owns the file), `nbd` or `nvme-tcp`
    #: (the owner exports it to the consumer), `composed` (several legs, see AttachmentLegRow)
    transport: Mapped[str] = mapped_column(
        String(16), default="loop", server_default=text("'loop'")
    )
    #: `pending` until the owner's export and the consumer's key are in place, then `ready`
    state: Mapped[str] = mapped_column(String(16), default="ready", server_default=text("'ready'"))
    psk_identity: Mapped[str] = mapped_column(String(128), default="", server_default=text("''"))
    #: the TLS-PSK key of a remote attachment: never in an answer, a log line or an error
    psk_key: Mapped[str] = mapped_column(String(64), default="", server_default=text("''"))
    host: Mapped[str] = mapped_column(String(255), default="", server_default=text("''"))
    port: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


class AttachmentLegRow(Base):
    """One export a remote attachment uses: a leg's owner exports its file to the consumer.

    nvme-tcp and composed attachments: the transport, address (and nvme-tcp
    subsystem) each owner answered, so the consumer's connection names
    exactly what was made. Goes with its attachment.
    """

    __tablename__ = "attachment_legs"
    __table_args__ = (
        ForeignKeyConstraint(
            ["volume_id", "node_id"],
            ["attachments.volume_id", "attachments.node_id"],
            ondelete="CASCADE",
        ),
    )

    volume_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: the consumer
    node_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    #: the node that holds the leg and exports it
    leg_node: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    port: Mapped[int] = mapped_column(Integer, default=0)
    subsystem_nqn: Mapped[str] = mapped_column(String(223), default="")
    #: tessera.models.Transport the export was made for (nvme-tcp or nbd); rows made
    #: before nbd legs existed were all nvme-tcp
    transport: Mapped[str] = mapped_column(
        String(16), default="nvme-tcp", server_default=text("'nvme-tcp'")
    )


class SnapshotRow(Base):
    """A point-in-time copy of a volume: a file beside the volumes in the source's pool.

    `source_volume_id` has no foreign key on purpose: a volume may be
    deleted before its snapshots (reflinked files are independent). The
    snapshot's `allocated_bytes` counts against its pool's logical
    allocation (management.placement), so the copy-on-write space later
    writes to the source may need is never promised twice.
    """

    __tablename__ = "snapshots"
    __table_args__ = (
        ForeignKeyConstraint(["node_id", "pool"], ["pools.node_id", "pools.name"]),
        Index("ix_snapshots_pool", "node_id", "pool"),
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    source_volume_id: Mapped[str] = mapped_column(String(64), index=True)
    node_id: Mapped[str] = mapped_column(String(128))
    pool: Mapped[str] = mapped_column(String(128))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    allocated_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    method: Mapped[str] = mapped_column(String(16))
    #: tessera.models.SnapshotState: `creating` until the agent confirmed the file
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
    #: the group snapshot this one belongs to ("" for none)
    group_snapshot_id: Mapped[str] = mapped_column(String(64), default="", index=True)


class GroupSnapshotRow(Base):
    """Snapshots of several volumes cut at one instant; its members are the snapshots
    whose `group_snapshot_id` names it."""

    __tablename__ = "group_snapshots"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    #: tessera.models.SnapshotState of the group as a whole
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[float] = mapped_column(Float)
