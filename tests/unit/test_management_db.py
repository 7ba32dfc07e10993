"""The SQLite store's write path against a real database file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

import management.db
from management.db import Database


def test_writes_resume_after_another_process_held_the_database_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(management.db, "BUSY_TIMEOUT_MS", 200)
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    with db.write_connection() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    intruder = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    intruder.execute("BEGIN IMMEDIATE")  # e.g. an admin's sqlite3 shell mid-transaction
    with pytest.raises(OperationalError), db.write_connection() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    intruder.execute("ROLLBACK")
    with db.write_connection() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (2)")
    with db.write_connection() as conn:
        assert conn.exec_driver_sql("SELECT x FROM t").fetchall() == [(2,)]
    db.dispose()


def test_a_failed_transaction_leaves_nothing_behind(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    with db.write_connection() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    with pytest.raises(RuntimeError), db.write_connection() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        raise RuntimeError("placement refused")
    with db.write_connection() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
    db.dispose()


def test_placement_on_postgresql_locks_pools_before_summing_their_volumes() -> None:
    from sqlalchemy.dialects import postgresql

    from management import placement

    for by_node in (False, True):
        lock = str(placement._LOCK_POOLS[by_node].compile(dialect=postgresql.dialect()))
        space = str(placement._POOL_SPACE[by_node].compile(dialect=postgresql.dialect()))
        # FOR UPDATE cannot share a statement with the aggregate: the sum must be
        # read by a later statement, whose snapshot sees what the lock waited for.
        assert "FOR UPDATE OF pools" in lock and "sum(" not in lock
        assert "sum(" in space and "FOR UPDATE" not in space


def test_every_connection_fsyncs_each_commit_so_an_answered_create_survives_power_loss(
    tmp_path: Path,
) -> None:
    # synchronous=FULL (2) on WAL fsyncs the log at every commit; NORMAL (1)
    # only at checkpoints, which loses answered commits on power failure.
    db = Database(f"sqlite:///{tmp_path / 'm.db'}")
    with db.write_connection() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    with db.read() as s:
        assert s.connection().exec_driver_sql("PRAGMA synchronous").scalar() == 2
    db.dispose()
