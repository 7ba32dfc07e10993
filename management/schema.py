"""SQLAlchemy 2 table definitions.

Portable column types only (SQLite by default, PostgreSQL for HA): sizes
are BigInteger, timestamps are epoch seconds as Float, free-form maps are
JSON. Space accounting is derived (capacity minus the sum of volume sizes)
rather than stored, so it can never drift from the volumes that use it.
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
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class NodeRow(Base):
    __tablename__ = "nodes"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    agent_url: Mapped[str] = mapped_column(String(1024))
    topology: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    max_volumes: Mapped[int] = mapped_column(Integer, default=0)
    last_heartbeat: Mapped[float] = mapped_column(Float, default=0.0)


class PoolRow(Base):
    __tablename__ = "pools"

    node_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    capacity_bytes: Mapped[int] = mapped_column(BigInteger)


class VpgRow(Base):
    __tablename__ = "vpgs"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    layout: Mapped[str] = mapped_column(String(32))


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
