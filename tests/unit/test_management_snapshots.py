"""Snapshots, group snapshots and clones through management's REST API, on SQLite and PostgreSQL.

The agent is `SnapshotAgent`: the fixtures' real-files agent plus the
snapshot and freeze routes of the contract (docs/data-services.md), with
snapshot files copied for real and every freeze and thaw recorded, so the
tests see what management asked of each node and in which order.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.testclient import TestClient

from management import group_snapshots, snapshots
from management.agents import AgentClients
from management.app import create_app
from management.context import Context
from management.db import Database
from tessera.errors import Conflict, NotFound, Unauthenticated, Unavailable
from tessera.models import (
    AgentFreeze,
    AgentFreezeState,
    AgentSnapshot,
    AgentSnapshotCreate,
    AgentThaw,
    AgentVolume,
    Extent,
    ExtentPage,
    SnapshotMethod,
)
from tests.unit.management_fixtures import TOKEN, FakeAgent, GiB, MiB, is_problem, serve_agent

pytest_plugins = ["tests.unit.management_fixtures"]


@dataclass
class SnapshotAgent(FakeAgent):
    #: volume -> the holders whose freeze of it is live (the agent's holder rules)
    holders: dict[str, set[str]] = field(default_factory=dict)
    #: every freeze and thaw in order: (op, volume, holder, renew)
    freeze_log: list[tuple[str, str, str, bool]] = field(default_factory=list)
    #: op -> the call number (1-based) that fails with 503
    fail_nth: dict[str, int] = field(default_factory=dict)

    def snap_path(self, pool: str, snapshot_id: str) -> Path:
        return self.root / pool / "snapshots" / f"{snapshot_id}.img"

    def find_snap(self, snapshot_id: str) -> Path | None:
        hits = list(self.root.glob(f"*/snapshots/{snapshot_id}.img"))
        return hits[0] if hits else None

    def app(self) -> FastAPI:
        app = super().app()

        def guard(request: Request, op: str, ident: str) -> None:
            if request.headers.get("authorization") != f"Bearer {self.token}":
                raise Unauthenticated("bad token")
            self.calls.append((op, ident))
            if op in self.hooks:
                self.hooks.pop(op)()
            if self.fail_nth.get(op) == sum(1 for c in self.calls if c[0] == op):
                raise Unavailable(f"injected failure of {op} call {self.fail_nth[op]}")
            if op in self.fail:
                raise Unavailable(f"injected failure of {op}")

        @app.put("/v1/snapshots/{snapshot_id}")
        def cut(request: Request, snapshot_id: str, body: AgentSnapshotCreate) -> AgentSnapshot:
            guard(request, "snapshot", snapshot_id)
            source = self.path(body.pool, body.source_volume_id)
            if not source.exists():
                raise NotFound("no such volume")
            target = self.snap_path(body.pool, snapshot_id)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
            return AgentSnapshot(
                id=snapshot_id,
                pool=body.pool,
                source_volume_id=body.source_volume_id,
                size_bytes=target.stat().st_size,
                path=str(target),
                method=SnapshotMethod.REFLINK,
                allocated_bytes=target.stat().st_blocks * 512,
            )

        @app.delete("/v1/snapshots/{snapshot_id}")
        def delete(request: Request, snapshot_id: str) -> Response:
            guard(request, "delete_snapshot", snapshot_id)
            found = self.find_snap(snapshot_id)
            if found is not None:
                found.unlink()
            return Response(status_code=204)

        @app.get("/v1/snapshots/{snapshot_id}/extents")
        def extents(request: Request, snapshot_id: str, base: str = "") -> ExtentPage:
            guard(request, "extents", f"{snapshot_id}:{base}")
            found = self.find_snap(snapshot_id)
            if found is None:
                raise NotFound("no such snapshot")
            size = found.stat().st_size
            return ExtentPage(size_bytes=size, extents=[Extent(offset=0, length=size)])

        @app.get("/v1/volumes/{volume_id}")
        def describe(request: Request, volume_id: str) -> AgentVolume:
            guard(request, "get_volume", volume_id)
            path = self.find(volume_id)
            if path is None:
                raise NotFound("no such volume")
            st = path.stat()
            return AgentVolume(
                id=volume_id,
                pool=path.parent.parent.name,
                size_bytes=st.st_size,
                path=str(path),
                allocated_bytes=st.st_blocks * 512,
            )

        @app.post("/v1/attachments/{volume_id}/freeze")
        def freeze(request: Request, volume_id: str, body: AgentFreeze) -> AgentFreezeState:
            guard(request, "freeze", volume_id)
            self.freeze_log.append(("freeze", volume_id, body.holder, body.renew))
            held = self.holders.setdefault(volume_id, set())
            if body.renew and body.holder not in held:
                raise Conflict(f"{body.holder} no longer holds the freeze of {volume_id}")
            held.add(body.holder)
            return AgentFreezeState(volume_id=volume_id, frozen=True, mountpoints=["/mnt/x"])

        @app.post("/v1/attachments/{volume_id}/thaw")
        def thaw(request: Request, volume_id: str, body: AgentThaw) -> AgentFreezeState:
            guard(request, "thaw", volume_id)
            self.freeze_log.append(("thaw", volume_id, body.holder, False))
            held = self.holders.get(volume_id, set())
            held.discard(body.holder)
            if not held:
                self.holders.pop(volume_id, None)
            return AgentFreezeState(volume_id=volume_id, frozen=bool(held))

        return app


@pytest.fixture
def sagent(tmp_path: Path) -> Iterator[SnapshotAgent]:
    sock_dir = Path(tempfile.mkdtemp(prefix="tss-"))
    try:
        agent = SnapshotAgent(root=tmp_path / "pools", socket=sock_dir / "agent.sock")
        yield from serve_agent(agent)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def add_pool_node(
    api: TestClient, node_id: str, url: str, pool: str, capacity: int, method: str = "reflink"
) -> None:
    body = {"agent_url": url, "topology": {"zone": "a"}, "max_volumes": 0}
    assert api.put(f"/v1/nodes/{node_id}", json=body).status_code == 200
    reg = {"capacity_bytes": capacity, "used_bytes": 12345, "snapshot_method": method}
    resp = api.put(f"/v1/nodes/{node_id}/pools/{pool}", json=reg)
    assert resp.status_code == 200, resp.text


@pytest.fixture
def scluster(api: TestClient, sagent: SnapshotAgent) -> TestClient:
    """n1: a 1 GiB reflink pool; n2: a 1 GiB pool that cannot snapshot."""
    add_pool_node(api, "n1", sagent.url, "p1", GiB)
    add_pool_node(api, "n2", sagent.url, "p2", GiB, method="none")
    return api


def volume_with_data(api: TestClient, agent: SnapshotAgent, name: str, data: bytes) -> dict:
    resp = api.post(
        "/v1/volumes", json={"name": name, "size_bytes": 8 * MiB, "requisite_nodes": ["n1"]}
    )
    assert resp.status_code == 201, resp.text
    vol = resp.json()
    with open(agent.path(vol["pool"], vol["id"]), "r+b") as f:
        f.write(data)
        os.fsync(f.fileno())
    return vol


def snap(api: TestClient, name: str, vol: dict) -> Response:
    return api.post("/v1/snapshots", json={"name": name, "source_volume_id": vol["id"]})


def pool(api: TestClient, name: str) -> dict:
    return next(p for p in api.get("/v1/pools").json()["items"] if p["name"] == name)


# ---- create, idempotency, errors -------------------------------------------------------


def test_snapshot_is_ready_holds_the_volumes_data_and_a_retry_returns_it(scluster, sagent):
    vol = volume_with_data(scluster, sagent, "v", b"hello" * 1000)
    first = snap(scluster, "s1", vol)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["id"].startswith("snap-") and body["ready_to_use"] and body["state"] == "ready"
    assert (body["node_id"], body["pool"], body["size_bytes"]) == ("n1", "p1", 8 * MiB)
    assert sagent.find_snap(body["id"]).read_bytes()[:5000] == b"hello" * 1000
    again = snap(scluster, "s1", vol)
    assert again.status_code == 200 and again.json()["id"] == body["id"]
    assert [c for c in sagent.calls if c[0] == "snapshot"] == [("snapshot", body["id"])]
    assert scluster.get(f"/v1/snapshots/{body['id']}").json() == body


def test_same_snapshot_name_for_another_volume_is_already_exists_naming_name(scluster, sagent):
    a = volume_with_data(scluster, sagent, "a", b"a")
    b = volume_with_data(scluster, sagent, "b", b"b")
    assert snap(scluster, "s", a).status_code == 201
    resp = snap(scluster, "s", b)
    assert resp.status_code == 409 and is_problem(resp)
    assert resp.json()["type"].endswith("/already-exists") and resp.json()["field"] == "name"
    assert snap(scluster, "s2", a).json()["id"] != snap(scluster, "s", a).json()["id"]


def test_snapshot_of_unknown_volume_is_404_naming_source_volume_id(scluster):
    resp = snap(scluster, "s", {"id": "vol-0123456789abcdef"})
    assert resp.status_code == 404 and resp.json()["field"] == "source_volume_id"


def test_pool_that_cannot_reflink_refuses_snapshots_and_says_how_to_fix_it(scluster, sagent):
    resp = scluster.post(
        "/v1/volumes", json={"name": "v", "size_bytes": 8 * MiB, "requisite_nodes": ["n2"]}
    )
    resp = snap(scluster, "s", resp.json())
    assert resp.status_code == 409 and resp.json()["type"].endswith("/failed-precondition")
    assert "'p2'" in resp.json()["detail"] and "--copy-fallback" in resp.json()["detail"]
    assert not [c for c in sagent.calls if c[0] == "snapshot"]


def test_unknown_or_foreign_snapshot_id_is_404_or_422_never_500(scluster):
    assert scluster.get("/v1/snapshots/snap-0123456789abcdef").status_code == 404
    assert scluster.delete("/v1/snapshots/snap-0123456789abcdef").status_code == 404
    assert scluster.get("/v1/snapshots/vol-1").status_code in (404, 422)
    assert scluster.get("/v1/group-snapshots/group-0123456789abcdef").status_code == 404


# ---- list and pagination -------------------------------------------------------------


def test_list_pages_through_every_snapshot_once_and_filters_by_name_and_source(scluster, sagent):
    a = volume_with_data(scluster, sagent, "a", b"a")
    b = volume_with_data(scluster, sagent, "b", b"b")
    made = {snap(scluster, f"s{i}", a if i % 2 == 0 else b).json()["id"] for i in range(5)}
    seen, token = [], ""
    while True:
        params = {"max_entries": 2, **({"page_token": token} if token else {})}
        page = scluster.get("/v1/snapshots", params=params).json()
        assert len(page["items"]) <= 2
        seen += [s["id"] for s in page["items"]]
        token = page["next_token"]
        if not token:
            break
    assert sorted(seen) == sorted(made)
    by_source = scluster.get("/v1/snapshots", params={"source_volume_id": a["id"]}).json()
    assert {s["source_volume_id"] for s in by_source["items"]} == {a["id"]}
    assert len(by_source["items"]) == 3
    named = scluster.get("/v1/snapshots", params={"name": "s3"}).json()["items"]
    assert [s["name"] for s in named] == ["s3"]
    bad = scluster.get("/v1/snapshots", params={"page_token": "garbage!"})
    assert bad.status_code == 422 and bad.json()["field"] == "page_token"


# ---- freeze and thaw -------------------------------------------------------------------


def attach(api: TestClient, vol: dict, node: str) -> None:
    resp = api.put(
        f"/v1/volumes/{vol['id']}/attachments/{node}",
        json={"access_mode": "SINGLE_NODE_WRITER"},
    )
    assert resp.status_code == 200, resp.text


def test_attached_volume_is_frozen_for_the_cut_and_thawed_after(scluster, sagent):
    vol = volume_with_data(scluster, sagent, "v", b"x")
    attach(scluster, vol, "n1")
    sid = snap(scluster, "s", vol).json()["id"]
    ops = [c for c in sagent.calls if c[0] in ("freeze", "snapshot", "thaw")]
    assert ops == [("freeze", vol["id"]), ("snapshot", sid), ("thaw", vol["id"])]
    assert not sagent.holders


def test_a_failed_cut_still_thaws_and_a_retry_converges(scluster, sagent):
    vol = volume_with_data(scluster, sagent, "v", b"x")
    attach(scluster, vol, "n1")
    sagent.fail.add("snapshot")
    resp = snap(scluster, "s", vol)
    assert resp.status_code == 503 and is_problem(resp)
    assert not sagent.holders and ("thaw", vol["id"]) in sagent.calls
    listed = scluster.get("/v1/snapshots", params={"name": "s"}).json()["items"]
    assert [s["state"] for s in listed] == ["creating"]  # the row a retry re-drives
    sagent.fail.clear()
    again = snap(scluster, "s", vol)
    assert again.status_code == 200 and again.json()["ready_to_use"]
    assert again.json()["id"] == listed[0]["id"]


def test_a_node_that_cannot_freeze_fails_the_snapshot_with_nothing_cut(scluster, sagent):
    vol = volume_with_data(scluster, sagent, "v", b"x")
    attach(scluster, vol, "n1")
    sagent.fail.add("freeze")
    resp = snap(scluster, "s", vol)
    assert resp.status_code == 503 and "freeze" in resp.json()["detail"]
    assert not [c for c in sagent.calls if c[0] == "snapshot"]
    assert ("thaw", vol["id"]) in sagent.calls


# ---- space -------------------------------------------------------------------------


def test_snapshot_space_counts_in_its_pool_until_deleted_in_any_order(scluster, sagent):
    empty = pool(scluster, "p1")["allocated_bytes"]
    vol = volume_with_data(scluster, sagent, "v", os.urandom(2 * MiB))
    with_volume = pool(scluster, "p1")["allocated_bytes"]
    assert with_volume == empty + 8 * MiB
    s1 = snap(scluster, "s1", vol).json()
    assert s1["allocated_bytes"] >= 2 * MiB
    assert pool(scluster, "p1")["allocated_bytes"] == with_volume + s1["allocated_bytes"]
    clone = scluster.post(
        "/v1/volumes",
        json={"name": "c", "size_bytes": 8 * MiB, "content_source": {"snapshot_id": s1["id"]}},
    ).json()
    # the volume first, then the snapshot, then the clone: each returns exactly its share
    assert scluster.delete(f"/v1/volumes/{vol['id']}").status_code == 204
    assert pool(scluster, "p1")["allocated_bytes"] == empty + 8 * MiB + s1["allocated_bytes"]
    assert scluster.delete(f"/v1/snapshots/{s1['id']}").status_code == 204
    assert sagent.find_snap(s1["id"]) is None
    assert pool(scluster, "p1")["allocated_bytes"] == empty + 8 * MiB
    assert scluster.delete(f"/v1/volumes/{clone['id']}").status_code == 204
    assert pool(scluster, "p1")["allocated_bytes"] == empty
    assert scluster.delete(f"/v1/snapshots/{s1['id']}").status_code == 404


def test_pool_without_room_for_what_the_snapshot_pins_is_507_and_keeps_nothing(api, sagent):
    add_pool_node(api, "n1", sagent.url, "p1", 10 * MiB)
    vol = volume_with_data(api, sagent, "v", os.urandom(3 * MiB))
    resp = snap(api, "s", vol)
    assert resp.status_code == 507 and resp.json()["type"].endswith("/resource-exhausted")
    assert not [c for c in sagent.calls if c[0] in ("freeze", "snapshot")]  # refused before
    assert api.get("/v1/snapshots").json()["items"] == []
    assert not list(sagent.root.glob("*/snapshots/*.img"))
    assert pool(api, "p1")["allocated_bytes"] == 8 * MiB


def test_pool_list_shows_physical_use_and_snapshot_method(scluster):
    p1, p2 = pool(scluster, "p1"), pool(scluster, "p2")
    assert (p1["used_bytes"], p1["snapshot_method"]) == (12345, "reflink")
    assert p2["snapshot_method"] == "none"


# ---- clones --------------------------------------------------------------------------


def test_clones_of_snapshot_and_volume_carry_the_data_on_the_sources_node(scluster, sagent):
    data = os.urandom(MiB)
    vol = volume_with_data(scluster, sagent, "v", data)
    s1 = snap(scluster, "s1", vol).json()
    with open(sagent.path(vol["pool"], vol["id"]), "r+b") as f:
        f.write(b"\0" * MiB)  # the source changes after the cut
    body = {"name": "r", "size_bytes": 16 * MiB, "content_source": {"snapshot_id": s1["id"]}}
    resp = scluster.post("/v1/volumes", json=body)
    assert resp.status_code == 201, resp.text
    restored = resp.json()
    assert (restored["node_id"], restored["pool"]) == ("n1", "p1")
    assert restored["content_source"] == {"snapshot_id": s1["id"], "volume_id": ""}
    path = sagent.path("p1", restored["id"])
    assert path.read_bytes()[:MiB] == data and path.stat().st_size == 16 * MiB
    again = scluster.post("/v1/volumes", json=body)
    assert again.status_code == 200 and again.json()["id"] == restored["id"]
    other = {**body, "content_source": {"volume_id": vol["id"]}}
    assert scluster.post("/v1/volumes", json=other).json()["field"] == "content_source"
    chain = scluster.post(
        "/v1/volumes",
        json={
            "name": "c2",
            "size_bytes": 16 * MiB,
            "content_source": {"volume_id": restored["id"]},
        },
    ).json()
    assert sagent.path("p1", chain["id"]).read_bytes()[:MiB] == data


def test_clone_smaller_than_its_source_is_out_of_range_naming_size_bytes(scluster, sagent):
    vol = volume_with_data(scluster, sagent, "v", b"x")
    body = {"name": "c", "size_bytes": MiB, "content_source": {"volume_id": vol["id"]}}
    resp = scluster.post("/v1/volumes", json=body)
    assert resp.status_code == 422 and resp.json()["field"] == "size_bytes"


def test_clone_whose_topology_excludes_the_sources_node_says_why(scluster, sagent):
    vol = volume_with_data(scluster, sagent, "v", b"x")
    body = {
        "name": "c",
        "size_bytes": 8 * MiB,
        "requisite_nodes": ["n2"],
        "content_source": {"volume_id": vol["id"]},
    }
    resp = scluster.post("/v1/volumes", json=body)
    assert resp.status_code == 507 and "'n1'" in resp.json()["detail"]
    missing = {**body, "requisite_nodes": [], "content_source": {"snapshot_id": "snap-00aa"}}
    assert scluster.post("/v1/volumes", json=missing).status_code == 404


# ---- group snapshots -------------------------------------------------------------------


def test_group_snapshot_freezes_all_cuts_all_thaws_all(scluster, sagent):
    vols = [volume_with_data(scluster, sagent, f"v{i}", bytes([i]) * 100) for i in range(3)]
    for v in vols:
        attach(scluster, v, "n1")
    body = {"name": "g", "source_volume_ids": [v["id"] for v in vols]}
    resp = scluster.post("/v1/group-snapshots", json=body)
    assert resp.status_code == 201, resp.text
    group = resp.json()
    assert group["ready_to_use"] and len(group["snapshots"]) == 3
    ops = [c[0] for c in sagent.calls if c[0] in ("freeze", "snapshot", "thaw")]
    assert ops == ["freeze"] * 3 + ["snapshot"] * 3 + ["thaw"] * 3
    assert {e[2] for e in sagent.freeze_log} == {group["id"]}  # held in the group's name
    assert not sagent.holders
    again = scluster.post("/v1/group-snapshots", json=body)
    assert again.status_code == 200 and again.json()["id"] == group["id"]
    other = {**body, "source_volume_ids": [vols[0]["id"]]}
    assert scluster.post("/v1/group-snapshots", json=other).status_code == 409
    assert scluster.get(f"/v1/group-snapshots/{group['id']}").json() == group
    assert scluster.delete(f"/v1/group-snapshots/{group['id']}").status_code == 204
    assert scluster.get("/v1/snapshots").json()["items"] == []
    assert scluster.get(f"/v1/group-snapshots/{group['id']}").status_code == 404


def test_a_failed_member_leaves_no_group_and_no_snapshot_and_everything_thawed(scluster, sagent):
    vols = [volume_with_data(scluster, sagent, f"v{i}", b"x") for i in range(3)]
    for v in vols:
        attach(scluster, v, "n1")
    sagent.fail_nth["snapshot"] = 2  # the first member is cut, the second fails
    body = {"name": "g", "source_volume_ids": [v["id"] for v in vols]}
    resp = scluster.post("/v1/group-snapshots", json=body)
    assert resp.status_code == 503
    assert not sagent.holders
    assert scluster.get("/v1/snapshots").json()["items"] == []
    assert not list(sagent.root.glob("*/snapshots/*.img"))
    assert ("delete_snapshot", resp_first_cut(sagent)) in sagent.calls
    sagent.fail_nth.clear()
    assert scluster.post("/v1/group-snapshots", json=body).status_code == 201


def resp_first_cut(agent: SnapshotAgent) -> str:
    return next(c[1] for c in agent.calls if c[0] == "snapshot")


# ---- crash convergence ---------------------------------------------------------------


def test_a_creating_row_left_by_a_crash_is_redriven_by_the_retry(db_url, sagent):
    app = create_app(db_url, TOKEN)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        add_pool_node(api, "n1", sagent.url, "p1", GiB)
        vol = volume_with_data(api, sagent, "v", b"x")
        sagent.fail.add("snapshot")  # as if management died before the agent was asked
        assert snap(api, "s", vol).status_code == 503
    sagent.fail.clear()
    app = create_app(db_url, TOKEN)  # a restarted management on the same database
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        resp = snap(api, "s", vol)
        assert resp.status_code == 200 and resp.json()["state"] == "ready"
        assert sagent.find_snap(resp.json()["id"]) is not None


def test_group_snapshot_with_members_on_two_nodes_cuts_each_on_its_owner(scluster, sagent):
    add_pool_node(scluster, "n3", sagent.url, "p3", GiB)
    a = volume_with_data(scluster, sagent, "a", b"a")
    resp = scluster.post(
        "/v1/volumes", json={"name": "b", "size_bytes": 8 * MiB, "requisite_nodes": ["n3"]}
    )
    b = resp.json()
    group = scluster.post(
        "/v1/group-snapshots", json={"name": "g", "source_volume_ids": [a["id"], b["id"]]}
    ).json()
    where = {s["source_volume_id"]: (s["node_id"], s["pool"]) for s in group["snapshots"]}
    assert where == {a["id"]: ("n1", "p1"), b["id"]: ("n3", "p3")}
    assert all(sagent.find_snap(s["id"]) for s in group["snapshots"])


def test_a_delete_the_agent_failed_is_finished_by_the_retry(scluster, sagent):
    vol = volume_with_data(scluster, sagent, "v", b"x")
    sid = snap(scluster, "s", vol).json()["id"]
    sagent.fail.add("delete_snapshot")
    assert scluster.delete(f"/v1/snapshots/{sid}").status_code == 503
    assert scluster.get(f"/v1/snapshots/{sid}").json()["state"] == "deleting"
    sagent.fail.clear()
    assert scluster.delete(f"/v1/snapshots/{sid}").status_code == 204
    assert sagent.find_snap(sid) is None
    assert scluster.get(f"/v1/snapshots/{sid}").status_code == 404
    # a create of the same name after a half-done delete starts a new snapshot
    assert snap(scluster, "s", vol).json()["id"] != sid


# ---- a cut longer than a freeze's lease ------------------------------------------------


def test_freezes_are_renewed_while_a_long_cut_runs(scluster, sagent, monkeypatch):
    monkeypatch.setattr(snapshots, "FREEZE_LEASE_SECONDS", 0.6)
    vol = volume_with_data(scluster, sagent, "v", b"x")
    attach(scluster, vol, "n1")
    sagent.hooks["snapshot"] = lambda: time.sleep(1.5)  # a long copy
    resp = snap(scluster, "s", vol)
    assert resp.status_code == 201 and resp.json()["ready_to_use"]
    freezes = [c for c in sagent.calls if c == ("freeze", vol["id"])]
    assert len(freezes) >= 3  # the first and its renewals
    assert not sagent.holders


def test_a_freeze_that_could_not_be_renewed_drops_the_cut(scluster, sagent, monkeypatch):
    monkeypatch.setattr(snapshots, "FREEZE_LEASE_SECONDS", 0.6)
    vol = volume_with_data(scluster, sagent, "v", b"x")
    attach(scluster, vol, "n1")

    def long_cut_with_the_node_gone() -> None:
        sagent.fail.add("freeze")
        time.sleep(1.5)

    sagent.hooks["snapshot"] = long_cut_with_the_node_gone
    resp = snap(scluster, "s", vol)
    assert resp.status_code == 503 and "may have ended" in resp.json()["detail"]
    assert scluster.get("/v1/snapshots").json()["items"] == []
    assert not list(sagent.root.glob("*/snapshots/*.img"))
    assert ("thaw", vol["id"]) in sagent.calls
    sagent.fail.clear()
    assert snap(scluster, "s", vol).json()["ready_to_use"]


@pytest.mark.parametrize("order", list(itertools.permutations(("volume", "snapshot", "clone"))))
def test_volume_snapshot_and_clone_delete_in_any_order_each_returning_its_share(
    scluster, sagent, order
):
    empty = pool(scluster, "p1")["allocated_bytes"]
    vol = volume_with_data(scluster, sagent, "v", os.urandom(MiB))
    s1 = snap(scluster, "s1", vol).json()
    body = {"name": "c", "size_bytes": 16 * MiB, "content_source": {"snapshot_id": s1["id"]}}
    clone = scluster.post("/v1/volumes", json=body).json()
    share = {"volume": 8 * MiB, "snapshot": s1["allocated_bytes"], "clone": 16 * MiB}
    url = {
        "volume": f"/v1/volumes/{vol['id']}",
        "snapshot": f"/v1/snapshots/{s1['id']}",
        "clone": f"/v1/volumes/{clone['id']}",
    }
    left = empty + sum(share.values())
    for what in order:
        assert scluster.delete(url[what]).status_code == 204
        left -= share[what]
        assert pool(scluster, "p1")["allocated_bytes"] == left
    assert left == empty
    assert not list(sagent.root.glob("*/snapshots/*.img"))
    assert not list(sagent.root.glob("*/volumes/*.img"))


def test_a_group_left_creating_by_a_crash_is_redriven_by_the_retry(db_url, sagent):
    """Management died right after committing the group and its members, before any agent
    call: the retried create finds the rows and finishes them."""
    app = create_app(db_url, TOKEN)
    with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        add_pool_node(api, "n1", sagent.url, "p1", GiB)
        vols = sorted(volume_with_data(api, sagent, f"v{i}", b"x")["id"] for i in range(2))
        db = Database(db_url)
        try:
            ctx = Context(db=db, agents=AgentClients(TOKEN))
            written = snapshots.written_bytes(ctx, vols, "source_volume_ids")
            with db.write() as s:
                left = group_snapshots._insert(ctx, s, "g", vols, written).id
        finally:
            db.dispose()
        resp = api.post("/v1/group-snapshots", json={"name": "g", "source_volume_ids": vols})
        assert resp.status_code == 200, resp.text
        group = resp.json()
        assert group["id"] == left and group["ready_to_use"]
        assert all(sagent.find_snap(s["id"]) for s in group["snapshots"])


# ---- freeze holders, one cut of a volume at a time, clones, space promised first -------


def test_each_cut_freezes_renews_and_thaws_in_its_own_name(scluster, sagent, monkeypatch):
    monkeypatch.setattr(snapshots, "FREEZE_LEASE_SECONDS", 0.6)
    vol = volume_with_data(scluster, sagent, "v", b"x")
    attach(scluster, vol, "n1")
    sagent.hooks["snapshot"] = lambda: time.sleep(1.0)  # long enough for renewals
    sid = snap(scluster, "s", vol).json()["id"]
    log = [e for e in sagent.freeze_log if e[1] == vol["id"]]
    assert log[0] == ("freeze", vol["id"], sid, False)
    assert log[-1] == ("thaw", vol["id"], sid, False)
    renewals = log[1:-1]
    assert renewals and all(e == ("freeze", vol["id"], sid, True) for e in renewals)


def test_a_renewal_the_agent_refuses_drops_the_cut(scluster, sagent, monkeypatch):
    """The agent restarted mid-cut (it thawed and forgot the holder): the renewal's 409 means
    the instant is lost, so no snapshot is kept and a retry cuts a new one."""
    monkeypatch.setattr(snapshots, "FREEZE_LEASE_SECONDS", 0.6)
    vol = volume_with_data(scluster, sagent, "v", b"x")
    attach(scluster, vol, "n1")

    def agent_restarts_during_the_cut() -> None:
        sagent.holders.clear()
        time.sleep(1.0)

    sagent.hooks["snapshot"] = agent_restarts_during_the_cut
    resp = snap(scluster, "s", vol)
    assert resp.status_code == 503 and is_problem(resp)
    assert "no longer holds" in resp.json()["detail"]
    assert any(e[0] == "freeze" and e[3] for e in sagent.freeze_log)  # it was a renewal
    assert scluster.get("/v1/snapshots").json()["items"] == []
    assert not list(sagent.root.glob("*/snapshots/*.img"))
    again = snap(scluster, "s", vol)
    assert again.status_code == 201 and again.json()["ready_to_use"]


def test_two_snapshots_of_one_volume_take_turns(scluster, sagent):
    """The second create arrives while the first is cutting: its freeze and cut wait for the
    first's thaw (else one cut's thaw would unfreeze the other's instant)."""
    vol = volume_with_data(scluster, sagent, "v", b"x")
    attach(scluster, vol, "n1")
    second: dict[str, Response] = {}

    def second_create_arrives_mid_cut() -> None:
        thread = threading.Thread(target=lambda: second.update(r=snap(scluster, "s2", vol)))
        thread.start()
        while sum(1 for c in sagent.calls if c == ("get_volume", vol["id"])) < 2:
            time.sleep(0.01)  # the second has asked what to reserve: it is at the lock
        time.sleep(0.3)  # room for it to overlap, if nothing stopped it
        second["thread"] = thread  # type: ignore[assignment]

    sagent.hooks["snapshot"] = second_create_arrives_mid_cut
    first = snap(scluster, "s1", vol)
    second["thread"].join(timeout=30)  # type: ignore[attr-defined]
    assert first.status_code == 201 and second["r"].status_code == 201
    s1, s2 = first.json()["id"], second["r"].json()["id"]
    ops = [(c[0], c[1]) for c in sagent.calls if c[0] in ("freeze", "snapshot", "thaw")]
    assert ops == [
        ("freeze", vol["id"]),
        ("snapshot", s1),
        ("thaw", vol["id"]),
        ("freeze", vol["id"]),
        ("snapshot", s2),
        ("thaw", vol["id"]),
    ]
    assert [e[2] for e in sagent.freeze_log] == [s1, s1, s2, s2]
    assert not sagent.holders


def test_cloning_a_mounted_volume_freezes_it_for_the_copy(scluster, sagent):
    vol = volume_with_data(scluster, sagent, "v", b"live data")
    attach(scluster, vol, "n1")
    body = {"name": "c", "size_bytes": 8 * MiB, "content_source": {"volume_id": vol["id"]}}
    resp = scluster.post("/v1/volumes", json=body)
    assert resp.status_code == 201, resp.text
    clone = resp.json()
    ops = [c for c in sagent.calls if c[0] in ("freeze", "create", "thaw")][-3:]
    assert ops == [("freeze", vol["id"]), ("create", clone["id"]), ("thaw", vol["id"])]
    assert [e[2] for e in sagent.freeze_log] == [clone["id"], clone["id"]]
    assert not sagent.holders
    assert sagent.path("p1", clone["id"]).read_bytes()[:9] == b"live data"


def test_a_clone_whose_freeze_was_lost_is_deleted_and_a_retry_makes_it(
    scluster, sagent, monkeypatch
):
    monkeypatch.setattr(snapshots, "FREEZE_LEASE_SECONDS", 0.6)
    vol = volume_with_data(scluster, sagent, "v", b"x")
    attach(scluster, vol, "n1")

    def agent_restarts_during_the_copy() -> None:
        sagent.holders.clear()
        time.sleep(1.0)

    sagent.hooks["create"] = agent_restarts_during_the_copy
    body = {"name": "c", "size_bytes": 8 * MiB, "content_source": {"volume_id": vol["id"]}}
    resp = scluster.post("/v1/volumes", json=body)
    assert resp.status_code == 503 and "no longer holds" in resp.json()["detail"]
    assert scluster.get("/v1/volumes", params={"name": "c"}).json()["items"] == []
    assert len(list(sagent.root.glob("*/volumes/*.img"))) == 1  # only the source
    again = scluster.post("/v1/volumes", json=body)
    assert again.status_code == 201 and again.json()["state"] == "available"


def test_a_snapshots_space_is_promised_while_its_cut_runs(scluster, sagent):
    vol = volume_with_data(scluster, sagent, "v", os.urandom(2 * MiB))
    before = pool(scluster, "p1")["allocated_bytes"]
    during: list[int] = []
    sagent.hooks["snapshot"] = lambda: during.append(pool(scluster, "p1")["allocated_bytes"])
    done = snap(scluster, "s", vol).json()
    assert during and during[0] >= before + 2 * MiB  # what the source had written
    assert pool(scluster, "p1")["allocated_bytes"] == before + done["allocated_bytes"]


def test_a_group_snapshot_that_does_not_fit_is_refused_before_anything_is_frozen(api, sagent):
    add_pool_node(api, "n1", sagent.url, "p1", 20 * MiB)
    vols = [volume_with_data(api, sagent, f"v{i}", os.urandom(3 * MiB)) for i in range(2)]
    for v in vols:
        attach(api, v, "n1")
    body = {"name": "g", "source_volume_ids": [v["id"] for v in vols]}
    resp = api.post("/v1/group-snapshots", json=body)
    assert resp.status_code == 507 and resp.json()["field"] == "source_volume_ids"
    assert not [c for c in sagent.calls if c[0] in ("freeze", "snapshot")]
    assert api.get("/v1/snapshots").json()["items"] == []
    assert pool(api, "p1")["allocated_bytes"] == 16 * MiB
