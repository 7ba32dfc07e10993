"""What PostgreSQL adds: upgrades of an old database, replicas starting together, types, case.

(Every management API test also runs on PostgreSQL, through the db_url
fixture of tests/unit/management_fixtures.py; the last tests here run on
both databases too.)
"""

from __future__ import annotations

import base64
import json
import threading
import traceback
from collections.abc import Iterator

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, make_url
from sqlalchemy.exc import IntegrityError

from management.__main__ import build_parser
from management.app import create_app
from management.db import Database, read_epoch
from management.schema import AttachmentRow
from tessera.models import MAX_BYTES
from tests.postgresql import PostgresServer
from tests.unit.management_fixtures import TOKEN, MiB, add_node, create
from tests.unit.test_management_db import OLD_SCHEMA

pytest_plugins = ["tests.unit.management_fixtures"]


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    with postgres_server.database() as url:
        yield url


def run_sql(url: str, script: str) -> None:
    """Run statements straight through psycopg, as an older release (or an admin) would have."""
    u = make_url(url)
    with psycopg.connect(dbname=u.database, user=u.username, host=u.query["host"]) as conn:
        for statement in script.split(";"):
            if statement.strip():
                conn.execute(statement)


def test_a_postgresql_database_made_by_the_previous_version_is_upgraded_at_start(pg_url):
    # the same old schema and rows as the SQLite upgrade test; PostgreSQL spells booleans
    run_sql(
        pg_url,
        OLD_SCHEMA.replace("'SINGLE_NODE_WRITER', 0, 2.0", "'SINGLE_NODE_WRITER', false, 2.0"),
    )
    epochs = set()
    for _ in range(2):  # a second start finds nothing left to do
        with TestClient(
            create_app(pg_url, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}
        ) as api:
            epochs.add(api.post("/v1/nodes/n1/heartbeat").json()["epoch"])
            vol = api.get("/v1/volumes/vol-00000000000000000000000000000001").json()
            assert vol["legs"] == [
                {"node_id": "n1", "pool": "p", "size_bytes": 256 * 1024**2, "index": 0,
                 "state": "in_sync"}
            ]  # fmt: skip
            assert api.get("/v1/pools").json()["items"][0]["allocated_bytes"] == 256 * 1024**2
            node = api.get("/v1/nodes/n1").json()
            assert node["state"] == "online" and node["fenced_at"] == 0
            (att,) = api.get(f"/v1/volumes/{vol['id']}/attachments").json()["items"]
            assert att["connection"]["transport"] == "loop"
    (epoch,) = epochs
    assert len(epoch) == 32


def test_replicas_starting_together_on_an_empty_database_make_one_schema_and_one_epoch(pg_url):
    epochs: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def start() -> None:
        db = Database(pg_url)
        try:
            barrier.wait()
            db.create_tables()
            with db.read() as s:
                epochs.append(read_epoch(s))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(epochs) == 4 and len(set(epochs)) == 1


def test_sizes_are_64_bit_columns_on_postgresql_and_the_largest_size_round_trips(pg_url):
    db = Database(pg_url)
    try:
        db.create_tables()
        columns = inspect(db.engine).get_columns
        for table, column in [
            ("pools", "capacity_bytes"),
            ("volumes", "size_bytes"),
            ("volumes", "agent_size_bytes"),
            ("volume_legs", "size_bytes"),
        ]:
            kind = next(c["type"] for c in columns(table) if c["name"] == column)
            assert str(kind) == "BIGINT", (table, column, kind)
    finally:
        db.dispose()
    with TestClient(create_app(pg_url, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        body = {"agent_url": "unix:///nowhere.sock", "topology": {}, "max_volumes": 0}
        assert api.put("/v1/nodes/big", json=body).status_code == 200
        resp = api.put("/v1/nodes/big/pools/p", json={"capacity_bytes": MAX_BYTES})
        assert resp.status_code == 200, resp.text
        assert api.get("/v1/pools").json()["items"][0]["capacity_bytes"] == MAX_BYTES
        cap = api.get("/v1/capacity", params={"vpg": "default", "node_id": "big"}).json()
        assert cap["available_bytes"] == MAX_BYTES


def test_db_defaults_to_tessera_db_url_from_the_environment(monkeypatch):
    url = "postgresql+psycopg://tessera@db.example/tessera"
    monkeypatch.setenv("TESSERA_DB_URL", url)
    assert build_parser().parse_args(["--token-file", "t"]).db == url
    # an explicit --db still wins
    args = build_parser().parse_args(["--token-file", "t", "--db", "sqlite:///x.db"])
    assert args.db == "sqlite:///x.db"
    monkeypatch.delenv("TESSERA_DB_URL")
    assert build_parser().parse_args(["--token-file", "t"]).db == "sqlite:///./tessera.db"


# ---- on both databases: what a collation or a case rule could change -------------------


def test_names_differing_only_in_case_are_distinct_and_page_once_each(cluster, agent):
    assert create(cluster, "Data", MiB)["id"] != create(cluster, "data", MiB)["id"]
    assert len(cluster.get("/v1/volumes").json()["items"]) == 2
    node_ids = ["Node-B", "node-a", "NODE-c", "node.A", "n1", "n2"]
    for node_id in node_ids[:4]:
        add_node(cluster, node_id, agent.url, {})
    seen, token = [], None
    while token != "":
        params = {"max_entries": 1, **({"page_token": token} if token else {})}
        page = cluster.get("/v1/nodes", params=params).json()
        seen += [n["id"] for n in page["items"]]
        token = page["next_token"]
    assert sorted(seen) == sorted(node_ids)  # every node once, whatever the collation's order


def test_a_postgresql_error_never_repeats_the_rows_values_such_as_a_key(pg_url):
    key = "f0" * 32  # a TLS-PSK key in a row PostgreSQL refuses (NOT NULL created_at)
    db = Database(pg_url)
    try:
        db.create_tables()
        with pytest.raises(IntegrityError) as err, db.write_connection() as conn:
            conn.execute(
                AttachmentRow.__table__.insert().values(
                    volume_id="vol-1", node_id="n1", access_mode="SINGLE_NODE_WRITER",
                    readonly=False, created_at=None, psk_key=key,
                )
            )  # fmt: skip
    finally:
        db.dispose()
    assert "not-null constraint" in str(err.value) and "23502" in str(err.value)
    assert key not in str(err.value) and key not in repr(err.value)
    # nor in a logged traceback, which also shows the driver's own exception
    assert key not in "".join(traceback.format_exception(err.value))


def test_a_nul_in_a_vpg_or_a_page_token_is_a_clear_4xx_on_both_databases(cluster):
    # PostgreSQL refuses NUL in any query parameter; these reach a query unvalidated
    resp = cluster.get("/v1/capacity", params={"vpg": "fast\x00"})
    assert resp.status_code == 404 and resp.json()["field"] == "vpg"
    resp = cluster.post("/v1/volumes", json={"name": "v", "size_bytes": MiB, "vpg": "a\x00"})
    assert resp.status_code == 404 and resp.json()["field"] == "vpg"
    token = base64.urlsafe_b64encode(json.dumps(["n1\x00"]).encode()).decode().rstrip("=")
    resp = cluster.get("/v1/nodes", params={"page_token": token})
    assert resp.status_code == 422 and resp.json()["field"] == "page_token"
