"""Remote attachments, liveness and fencing: management driving real node-agents.

Three real node-agent apps (node_agent.api over node_agent.agent.Agent)
serve on unix sockets in this process: n1 holds the pool, n2 and n3 are
consumers. A remote attachment makes n1 start a real `nbdkit` export on
127.0.0.1 and n2 store the key file, over the agents' real routes. Time is
management's injected clock, so "unreachable" needs no sleeping; nodes
beat through the real heartbeat route. n3 holds a pool too, so a node can
consume volumes of two owners.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, select

from management.app import create_app
from management.schema import AttachmentRow
from tessera.models import AgentExportCreate, AgentKey
from tests.unit.management_fixtures import TOKEN, GiB, MiB
from tests.unit.test_csi_controller_fixtures import serving

pytest_plugins = ["tests.unit.management_fixtures"]  # db_url: SQLite and PostgreSQL

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None, reason="needs nbdkit")

NODES = ("n1", "n2", "n3")


@dataclass
class Node:
    agent: object  # node_agent.agent.Agent
    url: str
    state_dir: Path


@dataclass
class Cluster:
    api: TestClient
    nodes: dict[str, Node]
    now: list[float]

    @property
    def ctx(self):  # noqa: ANN201 - management.context.Context
        return self.api.app.state.ctx  # type: ignore[attr-defined]

    def beat(self, *nodes: str) -> list[dict]:
        replies = []
        for node in nodes:
            resp = self.api.post(f"/v1/nodes/{node}/heartbeat")
            assert resp.status_code == 200, resp.text
            replies.append(resp.json())
        return replies

    def pass_time(self, seconds: float, *still_beating: str) -> None:
        self.now[0] += seconds
        self.beat(*still_beating)

    def attach(self, volume_id: str, node: str, mode: str = "SINGLE_NODE_WRITER", ro: bool = False):  # noqa: ANN201
        body = {"access_mode": mode, "readonly": ro}
        return self.api.put(f"/v1/volumes/{volume_id}/attachments/{node}", json=body)

    def exports(self, node: str) -> set[tuple[str, str]]:
        return {(e.volume_id, e.client_node) for e in self.nodes[node].agent.exports.list()}  # type: ignore[attr-defined]

    def key_file(self, node: str, volume_id: str) -> Path:
        return self.nodes[node].state_dir / "keys" / f"{volume_id}.psk"

    def stored_key(self, volume_id: str, node: str) -> str:
        with self.ctx.db.read() as s:
            row = s.scalar(
                select(AttachmentRow).where(
                    AttachmentRow.volume_id == volume_id, AttachmentRow.node_id == node
                )
            )
            return row.psk_key if row is not None else ""

    def volume(self, name: str = "pvc", on: str = "n1") -> str:
        body = {"name": name, "size_bytes": 4 * MiB, "requisite_nodes": [on]}
        resp = self.api.post("/v1/volumes", json=body)
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]


@pytest.fixture
def cluster(tmp_path: Path, db_url: str) -> Iterator[Cluster]:
    from node_agent.agent import Agent
    from node_agent.api import create_app as agent_app
    from node_agent.pools import Pool

    sock_dir = Path(tempfile.mkdtemp(prefix="tsr-"))
    servers = contextlib.ExitStack()
    nodes: dict[str, Node] = {}
    first_port = random.randrange(20000, 60000, 100)
    try:
        for i, node_id in enumerate(NODES):
            pools = {}
            if node_id in ("n1", "n3"):  # n2 only consumes
                (tmp_path / f"pool-{node_id}").mkdir()
                pools["p"] = Pool.open("p", tmp_path / f"pool-{node_id}")
            state_dir = tmp_path / f"state-{node_id}"
            agent = Agent(
                node_id,
                pools,
                dev_dir=tmp_path / f"dev-{node_id}",
                transports={},
                state_dir=state_dir,
                export_address="127.0.0.1",
                export_ports=(first_port + 30 * i, first_port + 30 * i + 29),
            )
            socket = sock_dir / f"{node_id}.sock"
            servers.enter_context(serving(agent_app(agent, TOKEN), socket))
            nodes[node_id] = Node(agent, f"unix://{socket}", state_dir)
        app = create_app(db_url, TOKEN)  # SQLite and PostgreSQL (management_fixtures)
        now = [1_000_000.0]
        app.state.ctx.clock = lambda: now[0]
        with TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"}) as api:
            for node_id, node in nodes.items():
                body = {"agent_url": node.url, "topology": {}}
                assert api.put(f"/v1/nodes/{node_id}", json=body).status_code == 200
            for owner in ("n1", "n3"):
                resp = api.put(f"/v1/nodes/{owner}/pools/p", json={"capacity_bytes": GiB})
                assert resp.status_code == 200, resp.text
            yield Cluster(api, nodes, now)
    finally:
        for node in nodes.values():  # no nbdkit outlives the test
            for export in node.agent.exports.list():  # type: ignore[attr-defined]
                node.agent.close_export(export.volume_id, export.client_node)  # type: ignore[attr-defined]
        servers.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def kind(resp) -> str:  # noqa: ANN001
    return resp.json()["type"].rsplit("/", 1)[1]


# ---- attach ------------------------------------------------------------------------------


def test_remote_attach_has_the_owner_export_and_the_consumer_hold_the_key(cluster):
    vol = cluster.volume()
    resp = cluster.attach(vol, "n2")
    assert resp.status_code == 200, resp.text
    conn = resp.json()["connection"]
    assert conn["transport"] == "nbd" and conn["owner_node"] == "n1"
    assert conn["host"] == "127.0.0.1" and conn["port"] > 0 and conn["psk_identity"] == "n2"
    assert cluster.exports("n1") == {(vol, "n2")}
    key = cluster.stored_key(vol, "n2")
    assert len(key) == 64
    assert cluster.key_file("n2", vol).read_text().strip() == f"n2:{key}"
    # a retry answers the same connection and starts nothing new
    again = cluster.attach(vol, "n2")
    assert again.json() == resp.json()
    assert cluster.exports("n1") == {(vol, "n2")}


def test_attach_on_the_owner_node_is_a_local_loop_with_no_export(cluster):
    vol = cluster.volume()
    resp = cluster.attach(vol, "n1")
    assert resp.status_code == 200, resp.text
    got = resp.json()["connection"]
    assert {k: got[k] for k in ("transport", "owner_node", "host", "port", "psk_identity")} == {
        "transport": "loop",
        "owner_node": "n1",
        "host": "",
        "port": 0,
        "psk_identity": "",
    }
    assert got["legs"] == [] and got["layout"] == "concat"
    assert cluster.exports("n1") == set()


def test_single_node_volume_attached_to_one_node_is_refused_on_another_naming_it(cluster):
    vol = cluster.volume()
    assert cluster.attach(vol, "n2").status_code == 200
    resp = cluster.attach(vol, "n3")
    assert resp.status_code == 409 and kind(resp) == "failed-precondition"
    assert "n2" in resp.json()["detail"]
    assert cluster.exports("n1") == {(vol, "n2")}
    assert not cluster.key_file("n3", vol).exists()


def test_multi_node_single_writer_refuses_a_second_writer_but_takes_readers(cluster):
    vol = cluster.volume()
    mode = "MULTI_NODE_SINGLE_WRITER"
    assert cluster.attach(vol, "n2", mode).status_code == 200
    resp = cluster.attach(vol, "n3", mode)
    assert resp.status_code == 409 and kind(resp) == "failed-precondition"
    assert "n2" in resp.json()["detail"] and resp.json()["field"] == "readonly"
    assert cluster.attach(vol, "n3", mode, ro=True).status_code == 200
    exports = cluster.nodes["n1"].agent.exports.list()  # type: ignore[attr-defined]
    assert {(e.client_node, e.readonly) for e in exports} == {("n2", False), ("n3", True)}


def test_attach_to_an_unknown_node_is_not_found_naming_the_node_field(cluster):
    resp = cluster.attach(cluster.volume(), "ghost")
    assert resp.status_code == 404 and resp.json()["field"] == "node_id"


def test_attach_to_an_unreachable_node_is_unavailable_naming_its_last_heartbeat(cluster):
    vol = cluster.volume()
    cluster.pass_time(31, "n1", "n3")
    resp = cluster.attach(vol, "n2")
    assert resp.status_code == 503 and kind(resp) == "unavailable"
    detail = resp.json()["detail"]
    assert "node n2 is unreachable" in detail and "last heartbeat" in detail
    assert "31 s ago" in detail
    assert cluster.api.get(f"/v1/volumes/{vol}").json()["published_nodes"] == []


def test_attach_to_a_fenced_node_is_unavailable(cluster):
    vol = cluster.volume()
    cluster.pass_time(31, "n1", "n3")
    assert cluster.api.post("/v1/nodes/n2/fence", json={}).status_code == 200
    resp = cluster.attach(vol, "n2")
    assert resp.status_code == 503 and "node n2 is fenced" in resp.json()["detail"]


def test_remote_attach_with_the_owner_unreachable_is_unavailable_naming_the_owner(cluster):
    vol = cluster.volume()
    cluster.pass_time(31, "n2", "n3")
    resp = cluster.attach(vol, "n2")
    assert resp.status_code == 503
    assert "owner node n1 is unreachable" in resp.json()["detail"]
    assert cluster.api.get(f"/v1/volumes/{vol}").json()["published_nodes"] == []


def test_a_retried_attach_finishes_a_half_made_one_with_the_same_key(cluster, tmp_path):
    vol = cluster.volume()
    # n2 is registered at a socket nobody serves: the key cannot be handed over
    body = {"agent_url": f"unix://{tmp_path / 'gone.sock'}", "topology": {}}
    assert cluster.api.put("/v1/nodes/n2", json=body).status_code == 200
    resp = cluster.attach(vol, "n2")
    assert resp.status_code == 503 and kind(resp) == "unavailable"
    key = cluster.stored_key(vol, "n2")
    (export,) = cluster.nodes["n1"].agent.exports.list()  # type: ignore[attr-defined]
    assert cluster.api.get(f"/v1/volumes/{vol}").json()["published_nodes"] == ["n2"]
    # the agent is back at its real address: the retry converges on the same key and port
    body = {"agent_url": cluster.nodes["n2"].url, "topology": {}}
    assert cluster.api.put("/v1/nodes/n2", json=body).status_code == 200
    resp = cluster.attach(vol, "n2")
    assert resp.status_code == 200, resp.text
    assert cluster.stored_key(vol, "n2") == key
    assert resp.json()["connection"]["port"] == export.port
    assert cluster.key_file("n2", vol).read_text().strip() == f"n2:{key}"


# ---- detach ------------------------------------------------------------------------------


def test_detach_closes_the_export_and_revokes_the_key_and_is_idempotent(cluster):
    vol = cluster.volume()
    assert cluster.attach(vol, "n2").status_code == 200
    assert cluster.api.delete(f"/v1/volumes/{vol}/attachments/n2").status_code == 204
    assert cluster.exports("n1") == set()
    assert not cluster.key_file("n2", vol).exists()
    assert cluster.api.get(f"/v1/volumes/{vol}").json()["published_nodes"] == []
    assert cluster.api.delete(f"/v1/volumes/{vol}/attachments/n2").status_code == 204


def test_detach_keeps_the_attachment_while_the_owner_cannot_close_its_export(cluster):
    vol = cluster.volume()
    assert cluster.attach(vol, "n2").status_code == 200
    cluster.pass_time(31, "n2", "n3")
    resp = cluster.api.delete(f"/v1/volumes/{vol}/attachments/n2")
    assert resp.status_code == 503 and "owner node n1 is unreachable" in resp.json()["detail"]
    assert cluster.api.get(f"/v1/volumes/{vol}").json()["published_nodes"] == ["n2"]
    cluster.beat("n1")
    assert cluster.api.delete(f"/v1/volumes/{vol}/attachments/n2").status_code == 204
    assert cluster.exports("n1") == set()


def test_a_silent_node_keeps_its_local_attachment_until_it_is_fenced(cluster):
    vol = cluster.volume()
    assert cluster.attach(vol, "n1").status_code == 200
    cluster.pass_time(31, "n2", "n3")
    # n1 may still have the device mounted: releasing it would let n2 write beside it
    resp = cluster.api.delete(f"/v1/volumes/{vol}/attachments/n1")
    assert resp.status_code == 503 and kind(resp) == "unavailable"
    detail = resp.json()["detail"]
    assert detail.startswith("node n1 is unreachable (last heartbeat")
    assert "31 s ago" in detail and "tessera node fence n1" in detail
    assert cluster.api.get(f"/v1/volumes/{vol}").json()["published_nodes"] == ["n1"]
    assert fenced_while_silent(cluster, "n1", "n2", "n3")["released"] == [vol]
    assert cluster.api.get(f"/v1/volumes/{vol}").json()["published_nodes"] == []
    # n1 beats again: still fenced, so it cannot export the volume to n2 behind its own pod
    cluster.beat("n1")
    resp = cluster.attach(vol, "n2")
    assert resp.status_code == 503 and "owner node n1 is fenced" in resp.json()["detail"]
    assert cluster.exports("n1") == set()


def test_an_online_node_detaches_its_local_attachment(cluster):
    vol = cluster.volume()
    assert cluster.attach(vol, "n1").status_code == 200
    assert cluster.api.delete(f"/v1/volumes/{vol}/attachments/n1").status_code == 204
    assert cluster.api.get(f"/v1/volumes/{vol}").json()["published_nodes"] == []


def test_a_silent_consumer_of_a_remote_volume_is_detached_by_closing_its_export(cluster):
    vol = cluster.volume()
    assert cluster.attach(vol, "n2").status_code == 200
    cluster.pass_time(31, "n1", "n3")
    assert cluster.api.delete(f"/v1/volumes/{vol}/attachments/n2").status_code == 204
    assert cluster.exports("n1") == set()  # the owner cut n2 off
    assert cluster.attach(vol, "n3").status_code == 200


# ---- fencing -----------------------------------------------------------------------------


def test_fence_refuses_an_online_node_unless_forced(cluster):
    vol = cluster.volume()
    assert cluster.attach(vol, "n2").status_code == 200
    resp = cluster.api.post("/v1/nodes/n2/fence", json={"force": False})
    assert resp.status_code == 409 and kind(resp) == "failed-precondition"
    assert resp.json()["field"] == "force" and "online" in resp.json()["detail"]
    assert cluster.api.get("/v1/nodes/n2").json()["state"] == "online"
    assert cluster.exports("n1") == {(vol, "n2")}
    forced = cluster.api.post("/v1/nodes/n2/fence", json={"force": True})
    assert forced.status_code == 200 and forced.json()["released"] == [vol]


def test_fence_closes_exports_then_releases_so_another_node_can_take_a_single_writer(cluster):
    vol = cluster.volume()
    assert cluster.attach(vol, "n2").status_code == 200
    cluster.pass_time(31, "n1", "n3")
    blocked = cluster.attach(vol, "n3")
    assert blocked.status_code == 409 and "tessera node fence n2" in blocked.json()["detail"]
    report = cluster.api.post("/v1/nodes/n2/fence", json={})
    assert report.status_code == 200, report.text
    assert report.json() == {"node_id": "n2", "state": "fenced", "released": [vol]}
    assert cluster.exports("n1") == set()  # n2's old connection cannot read any more
    node = cluster.api.get("/v1/nodes/n2").json()
    assert node["state"] == "fenced" and node["fenced_at"] == cluster.now[0]
    assert cluster.attach(vol, "n3").status_code == 200
    assert cluster.exports("n1") == {(vol, "n3")}
    again = cluster.api.post("/v1/nodes/n2/fence", json={})
    assert again.json() == {"node_id": "n2", "state": "fenced", "released": []}


def test_fence_releases_nothing_while_the_owner_cannot_close_the_export(cluster):
    vol = cluster.volume()
    assert cluster.attach(vol, "n2").status_code == 200
    cluster.pass_time(31, "n3")  # n1 (the owner) and n2 both unreachable
    resp = cluster.api.post("/v1/nodes/n2/fence", json={})
    assert resp.status_code == 503 and "owner node n1" in resp.json()["detail"]
    assert cluster.api.get(f"/v1/volumes/{vol}").json()["published_nodes"] == ["n2"]
    assert cluster.api.get("/v1/nodes/n2").json()["state"] == "fenced"
    # the owner is back: the retried fence finishes the release
    cluster.beat("n1")
    assert cluster.api.post("/v1/nodes/n2/fence", json={}).json()["released"] == [vol]
    assert cluster.exports("n1") == set()


def test_fence_releases_what_it_can_and_names_the_volumes_whose_owner_did_not_answer(cluster):
    silent_owner = cluster.volume("on-n1")
    live_owner = cluster.volume("on-n3", on="n3")
    assert cluster.attach(silent_owner, "n2").status_code == 200
    assert cluster.attach(live_owner, "n2").status_code == 200
    cluster.pass_time(31, "n3")  # n1 (one owner) and n2 (the consumer) both silent
    resp = cluster.api.post("/v1/nodes/n2/fence", json={})
    assert resp.status_code == 503 and kind(resp) == "unavailable"
    detail = resp.json()["detail"]
    assert f"volume {silent_owner} (owner node n1 is unreachable" in detail
    assert live_owner not in detail
    assert cluster.exports("n3") == set()  # released although n1 did not answer
    assert cluster.api.get(f"/v1/volumes/{live_owner}").json()["published_nodes"] == []
    assert cluster.api.get(f"/v1/volumes/{silent_owner}").json()["published_nodes"] == ["n2"]
    assert cluster.api.get("/v1/nodes/n2").json()["state"] == "fenced"
    cluster.beat("n1")
    retry = cluster.api.post("/v1/nodes/n2/fence", json={})
    assert retry.status_code == 200 and retry.json()["released"] == [silent_owner]
    assert cluster.exports("n1") == set()


def test_fencing_the_owner_lets_its_remote_consumers_detach(cluster):
    vol = cluster.volume()
    assert cluster.attach(vol, "n2").status_code == 200
    cluster.pass_time(31, "n2", "n3")
    assert cluster.api.post("/v1/nodes/n1/fence", json={}).json()["released"] == []
    assert cluster.api.delete(f"/v1/volumes/{vol}/attachments/n2").status_code == 204
    assert not cluster.key_file("n2", vol).exists()


def test_fence_of_an_unknown_node_is_not_found(cluster):
    resp = cluster.api.post("/v1/nodes/ghost/fence", json={})
    assert resp.status_code == 404 and resp.json()["field"] == "node_id"


# ---- heartbeat ---------------------------------------------------------------------------


def test_heartbeat_reply_lists_what_each_node_still_holds(cluster):
    vol = cluster.volume()
    other = cluster.volume("other")
    assert cluster.attach(vol, "n2", "MULTI_NODE_READER_ONLY", ro=True).status_code == 200
    assert cluster.attach(vol, "n3", "MULTI_NODE_READER_ONLY", ro=True).status_code == 200
    assert cluster.attach(other, "n1").status_code == 200
    n1, n2, n3 = cluster.beat("n1", "n2", "n3")
    epoch = n1["epoch"]
    assert len(epoch) == 32 and n2["epoch"] == n3["epoch"] == epoch
    assert n1 == {
        "state": "online",
        "epoch": epoch,
        "attachments": [other],
        "exports": [
            {"volume_id": vol, "client_node": "n2"},
            {"volume_id": vol, "client_node": "n3"},
        ],
    }
    assert n2 == {"state": "online", "epoch": epoch, "attachments": [vol], "exports": []}
    assert n3["attachments"] == [vol]


def fenced_while_silent(cluster: Cluster, node: str, *others: str) -> dict:
    cluster.pass_time(31, *others)
    resp = cluster.api.post(f"/v1/nodes/{node}/fence", json={})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_a_fenced_node_stays_fenced_holds_nothing_and_keeps_serving_its_healthy_consumers(
    cluster,
):
    vol = cluster.volume()
    local = cluster.volume("local")
    idle = cluster.volume("idle")
    assert cluster.attach(vol, "n2").status_code == 200
    assert cluster.attach(local, "n1").status_code == 200
    assert fenced_while_silent(cluster, "n1", "n2", "n3")["released"] == [local]
    # n1 comes back: it may still have `local` mounted, and n2 (not fenced) still
    # reaches `vol` through n1's export: the reply keeps that export wanted
    (reply,) = cluster.beat("n1")
    wanted = [{"volume_id": vol, "client_node": "n2"}]
    assert reply["state"] == "fenced" and reply["attachments"] == []
    assert reply["exports"] == wanted
    body = {"agent_url": cluster.nodes["n1"].url, "topology": {}}
    registered = cluster.api.put("/v1/nodes/n1", json=body).json()
    assert registered["state"] == "fenced" and registered["fenced_at"] > 0
    # nothing is attached to it, placed on it or exported from it
    resp = cluster.attach(local, "n1")
    assert resp.status_code == 503 and "tessera node unfence n1" in resp.json()["detail"]
    resp = cluster.attach(idle, "n3")
    assert resp.status_code == 503 and kind(resp) == "unavailable"
    assert "owner node n1 is fenced" in resp.json()["detail"]
    assert cluster.exports("n1") == {(vol, "n2")}  # no new export to n3
    body = {"name": "new", "size_bytes": 4 * MiB, "requisite_nodes": ["n1"]}
    made = cluster.api.post("/v1/volumes", json=body)
    assert made.status_code == 507 and kind(made) == "resource-exhausted", made.text
    assert cluster.api.get("/v1/nodes/n1").json()["state"] == "fenced"


def test_unfence_lets_a_repaired_node_back_and_is_idempotent(cluster):
    vol = cluster.volume()
    assert cluster.attach(vol, "n2").status_code == 200
    assert fenced_while_silent(cluster, "n2", "n1", "n3")["released"] == [vol]
    cluster.beat("n2")
    assert cluster.api.get("/v1/nodes/n2").json()["state"] == "fenced"
    first = cluster.api.post("/v1/nodes/n2/unfence")
    assert first.status_code == 200, first.text
    assert first.json()["state"] == "online" and first.json()["fenced_at"] == 0
    again = cluster.api.post("/v1/nodes/n2/unfence")
    assert again.status_code == 200 and again.json()["state"] == "online"
    (reply,) = cluster.beat("n2")
    assert reply["state"] == "online" and reply["attachments"] == []
    assert cluster.attach(vol, "n2").status_code == 200  # it may attach again
    missing = cluster.api.post("/v1/nodes/ghost/unfence")
    assert missing.status_code == 404 and missing.json()["field"] == "node_id"


def test_the_heartbeat_epoch_is_the_databases_and_survives_a_management_restart(
    cluster, tmp_path, db_url
):
    (before,) = cluster.beat("n1")
    restarted = create_app(db_url, TOKEN)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(restarted, headers=headers) as api:
        assert api.post("/v1/nodes/n1/heartbeat").json()["epoch"] == before["epoch"]
    other = create_app(f"sqlite:///{tmp_path / 'other.db'}", TOKEN)  # a lost or replaced one
    with TestClient(other, headers=headers) as api:
        body = {"agent_url": cluster.nodes["n1"].url, "topology": {}}
        assert api.put("/v1/nodes/n1", json=body).status_code == 200
        epoch = api.post("/v1/nodes/n1/heartbeat").json()["epoch"]
    assert len(epoch) == 32 and epoch != before["epoch"]


# ---- what volumes show -------------------------------------------------------------------


def test_volume_condition_names_an_unreachable_attached_node_then_the_owner(cluster):
    vol = cluster.volume()
    assert cluster.api.get(f"/v1/volumes/{vol}").json()["condition"] == ""
    assert cluster.attach(vol, "n2").status_code == 200
    cluster.pass_time(31, "n1", "n3")
    condition = cluster.api.get(f"/v1/volumes/{vol}").json()["condition"]
    assert condition.startswith("attached node n2 is unreachable (last heartbeat")
    cluster.pass_time(31, "n2", "n3")
    listed = cluster.api.get("/v1/volumes").json()["items"][0]["condition"]
    assert listed.startswith("owner node n1 is unreachable")
    cluster.beat("n1")
    assert cluster.api.get(f"/v1/volumes/{vol}").json()["condition"] == ""


def test_the_volume_answer_lists_its_legs_and_an_expand_grows_the_leg(cluster):
    vol = cluster.volume()
    got = cluster.api.get(f"/v1/volumes/{vol}").json()
    leg = {"node_id": "n1", "pool": "p", "index": 0, "state": "in_sync"}
    assert got["legs"] == [{**leg, "size_bytes": 4 * MiB}]
    grown = cluster.api.post(f"/v1/volumes/{vol}/expand", json={"size_bytes": 8 * MiB})
    assert grown.json()["legs"] == [{**leg, "size_bytes": 8 * MiB}]
    pools = cluster.api.get("/v1/pools").json()["items"]
    assert pools[0]["allocated_bytes"] == 8 * MiB


# ---- the key stays secret ----------------------------------------------------------------


def test_the_psk_key_never_appears_in_an_answer_or_a_log_line(cluster, caplog):
    caplog.set_level(logging.DEBUG)
    vol = cluster.volume()
    api = cluster.api
    answers = [cluster.attach(vol, "n2")]
    key = cluster.stored_key(vol, "n2")
    assert key
    answers += [
        cluster.attach(vol, "n2"),
        cluster.attach(vol, "n2", "MULTI_NODE_MULTI_WRITER"),  # 409 naming the existing one
        api.get(f"/v1/volumes/{vol}/attachments"),
        api.get(f"/v1/volumes/{vol}"),
        api.get("/v1/volumes"),
        api.get("/v1/nodes"),
        api.get("/v1/nodes/n2"),
        api.post("/v1/nodes/n1/heartbeat"),
        api.post("/v1/nodes/n2/heartbeat"),
        api.post("/v1/reconcile", json={"fix": False}),
        api.post("/v1/volumes", json={"name": "pvc", "size_bytes": 4 * MiB}),
        api.post(f"/v1/volumes/{vol}/expand", json={"size_bytes": 8 * MiB}),
        api.get("/v1/capacity", params={"node_id": "n2"}),
        api.get("/v1/pools"),
        api.get("/v1/vpgs"),
        api.post("/v1/vpgs", json={"name": "default"}),
        api.put("/v1/nodes/n3", json={"agent_url": cluster.nodes["n3"].url}),
        api.put("/v1/nodes/n1/pools/p", json={"capacity_bytes": GiB}),
        api.get("/openapi.json"),
        api.get("/healthz"),
        api.delete(f"/v1/volumes/{vol}"),  # 409: still attached
        api.post("/v1/nodes/n2/fence", json={}),  # 409: online
        api.post("/v1/nodes/n2/fence", json={"force": True}),
        api.delete(f"/v1/volumes/{vol}/attachments/n2"),
        api.delete(f"/v1/volumes/{vol}"),
    ]
    for resp in answers:
        assert resp.status_code < 500, resp.text
        assert key not in resp.text
    assert key not in caplog.text
    assert key not in json.dumps([r.getMessage() for r in caplog.records])
    # nor where a model is shown whole (a debug line, a traceback's locals)
    assert key not in repr(AgentKey(psk_identity="n2", psk_key=key))
    assert key not in repr(AgentExportCreate(psk_identity="n2", psk_key=key))


def test_a_failing_database_statement_never_shows_the_key_in_a_log_or_the_answer(cluster, caplog):
    caplog.set_level(logging.DEBUG)
    vol = cluster.volume()
    seen: list[str] = []
    engine = cluster.ctx.db.engine

    sqlite = engine.dialect.name == "sqlite"
    blocker = contextlib.ExitStack()
    if not sqlite:  # PostgreSQL: another transaction holds a lock the insert must wait for
        conn = blocker.enter_context(engine.connect())
        conn.exec_driver_sql("LOCK TABLE attachments IN SHARE MODE")

    def read_only(_conn, cursor, statement, parameters, _context, _many) -> None:  # noqa: ANN001
        if statement.startswith("INSERT INTO attachments"):
            values = parameters.values() if isinstance(parameters, dict) else parameters
            seen.extend(p for p in values if isinstance(p, str) and len(p) == 64)
            # the insert of the row with the key fails
            cursor.execute("PRAGMA query_only=ON" if sqlite else "SET LOCAL lock_timeout = '50ms'")

    event.listen(engine, "before_cursor_execute", read_only)
    try:
        with blocker:
            resp = cluster.attach(vol, "n2")
    finally:
        event.remove(engine, "before_cursor_execute", read_only)
        engine.dispose()  # no read-only connection stays in the pool
    (key,) = seen
    assert resp.status_code == 503 and kind(resp) == "unavailable"
    assert "database error" in caplog.text  # the failure was logged
    assert ("readonly" if sqlite else "lock timeout") in caplog.text
    assert key not in caplog.text and key not in resp.text
    assert cluster.attach(vol, "n2").status_code == 200
