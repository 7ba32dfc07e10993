"""The SQLite store's write path against a real database file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

import management.db
from management.db import Database, SchemaTooOld


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


#: what the release before volume legs and node liveness created (its create_all)
OLD_SCHEMA = """
CREATE TABLE nodes (id VARCHAR(128) NOT NULL, agent_url VARCHAR(1024) NOT NULL,
    topology JSON NOT NULL, max_volumes INTEGER NOT NULL, last_heartbeat FLOAT NOT NULL,
    PRIMARY KEY (id));
CREATE TABLE vpgs (name VARCHAR(63) NOT NULL, layout VARCHAR(32) NOT NULL, PRIMARY KEY (name));
CREATE TABLE pools (node_id VARCHAR(128) NOT NULL, name VARCHAR(128) NOT NULL,
    capacity_bytes BIGINT NOT NULL, PRIMARY KEY (node_id, name),
    FOREIGN KEY(node_id) REFERENCES nodes (id) ON DELETE CASCADE);
CREATE TABLE volumes (id VARCHAR(64) NOT NULL, name VARCHAR(128) NOT NULL,
    size_bytes BIGINT NOT NULL, agent_size_bytes BIGINT NOT NULL, vpg VARCHAR(63) NOT NULL,
    node_id VARCHAR(128) NOT NULL, pool VARCHAR(128) NOT NULL, state VARCHAR(16) NOT NULL,
    parameters JSON NOT NULL, created_at FLOAT NOT NULL, PRIMARY KEY (id),
    FOREIGN KEY(node_id, pool) REFERENCES pools (node_id, name), UNIQUE (name),
    FOREIGN KEY(vpg) REFERENCES vpgs (name));
CREATE TABLE attachments (volume_id VARCHAR(64) NOT NULL, node_id VARCHAR(128) NOT NULL,
    access_mode VARCHAR(32) NOT NULL, readonly BOOLEAN NOT NULL, created_at FLOAT NOT NULL,
    PRIMARY KEY (volume_id, node_id),
    FOREIGN KEY(volume_id) REFERENCES volumes (id) ON DELETE CASCADE,
    FOREIGN KEY(node_id) REFERENCES nodes (id));
INSERT INTO vpgs VALUES ('default', 'concat');
INSERT INTO nodes VALUES ('n1', 'unix:///nowhere.sock', '{}', 0, 9e12);
INSERT INTO pools VALUES ('n1', 'p', 1073741824);
INSERT INTO volumes VALUES ('vol-00000000000000000000000000000001', 'old', 268435456,
    268435456, 'default', 'n1', 'p', 'available', '{}', 1.0);
INSERT INTO attachments VALUES ('vol-00000000000000000000000000000001', 'n1',
    'SINGLE_NODE_WRITER', 0, 2.0);
"""


def test_a_database_made_by_the_previous_version_is_upgraded_at_start(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from management.app import create_app

    path = tmp_path / "m.db"
    old = sqlite3.connect(path)
    old.executescript(OLD_SCHEMA)
    old.close()
    epochs = set()
    for _ in range(2):  # a second start finds nothing left to do
        app = create_app(f"sqlite:///{path}", "t0ken")
        with TestClient(app, headers={"Authorization": "Bearer t0ken"}) as api:
            epochs.add(api.post("/v1/nodes/n1/heartbeat").json()["epoch"])
            vol = api.get("/v1/volumes/vol-00000000000000000000000000000001").json()
            assert vol["legs"] == [
                {"node_id": "n1", "pool": "p", "size_bytes": 256 * 1024**2, "index": 0,
                 "state": "in_sync"}
            ]  # fmt: skip
            pool = api.get("/v1/pools").json()["items"][0]
            assert pool["allocated_bytes"] == 256 * 1024**2  # the old volume still takes space
            node = api.get("/v1/nodes/n1").json()
            assert node["state"] == "online" and node["fenced_at"] == 0
            assert node["transports"] == ["loop", "nbd"]  # what agents of that time could do
            (att,) = api.get(f"/v1/volumes/{vol['id']}/attachments").json()["items"]
            assert att["connection"]["transport"] == "loop"
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM volume_legs").fetchone() == (1,)
    # the upgraded database got its identity once, and kept it across the restart
    (epoch,) = epochs
    assert len(epoch) == 32


def test_a_column_this_version_cannot_add_stops_the_start_with_a_clear_message(
    tmp_path: Path,
) -> None:
    path = tmp_path / "m.db"
    ancient = sqlite3.connect(path)
    ancient.executescript(OLD_SCHEMA.replace("max_volumes INTEGER NOT NULL, ", "", 1).split(";")[0])
    ancient.close()
    db = Database(f"sqlite:///{path}")
    with pytest.raises(SchemaTooOld, match="'nodes' has no column 'max_volumes'"):
        db.create_tables()
    db.dispose()


def test_the_database_holding_the_attachment_keys_is_readable_by_its_owner_only(
    tmp_path: Path,
) -> None:
    path = tmp_path / "m.db"
    path.write_bytes(b"")
    path.chmod(0o644)  # e.g. made by an earlier version under a lax umask
    db = Database(f"sqlite:///{path}")
    db.create_tables()
    with db.write_connection() as conn:
        conn.exec_driver_sql("SELECT 1")
    for name in ("m.db", "m.db-wal", "m.db-shm"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    db.dispose()
