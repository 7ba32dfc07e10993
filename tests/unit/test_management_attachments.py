"""Attachments: idempotency, the CSI access-mode rules across nodes, node limits."""

from __future__ import annotations

import threading

import pytest

from management.attachments import check_mode_rules
from tessera.errors import FailedPrecondition
from tessera.models import AccessMode
from tests.unit.management_fixtures import GiB, MiB, add_node, create, is_problem

pytest_plugins = ["tests.unit.management_fixtures"]


@pytest.fixture
def vol(cluster, agent):
    """A volume on a cluster of four nodes (n1, n2 with pools; n3, n4 clients only)."""
    add_node(cluster, "n3", agent.url, {})
    add_node(cluster, "n4", agent.url, {})
    return create(cluster, "pvc", MiB)["id"]


def attach(api, volume_id, node, mode, readonly=False):
    body = {"access_mode": mode, "readonly": readonly}
    return api.put(f"/v1/volumes/{volume_id}/attachments/{node}", json=body)


def kind(resp):
    return resp.json()["type"].rsplit("/", 1)[1]


def test_attach_is_idempotent_and_shows_in_published_nodes(cluster, vol):
    first = attach(cluster, vol, "n3", "SINGLE_NODE_WRITER")
    again = attach(cluster, vol, "n3", "SINGLE_NODE_WRITER")
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json()
    assert cluster.get(f"/v1/volumes/{vol}").json()["published_nodes"] == ["n3"]
    items = cluster.get(f"/v1/volumes/{vol}/attachments").json()["items"]
    assert [(a["node_id"], a["access_mode"]) for a in items] == [("n3", "SINGLE_NODE_WRITER")]


def test_same_node_with_other_mode_or_readonly_is_already_exists(cluster, vol):
    attach(cluster, vol, "n3", "MULTI_NODE_MULTI_WRITER")
    resp = attach(cluster, vol, "n3", "MULTI_NODE_MULTI_WRITER", readonly=True)
    assert resp.status_code == 409 and kind(resp) == "already-exists"
    resp = attach(cluster, vol, "n3", "SINGLE_NODE_WRITER")
    assert resp.status_code == 409 and kind(resp) == "already-exists"


@pytest.mark.parametrize(
    "mode",
    [
        "SINGLE_NODE_WRITER",
        "SINGLE_NODE_SINGLE_WRITER",
        "SINGLE_NODE_MULTI_WRITER",
        "SINGLE_NODE_READER_ONLY",
    ],
)
def test_single_node_modes_refuse_a_second_node_and_name_the_holder(cluster, vol, mode):
    readonly = mode == "SINGLE_NODE_READER_ONLY"
    assert attach(cluster, vol, "n3", mode, readonly).status_code == 200
    resp = attach(cluster, vol, "n4", mode, readonly)
    assert resp.status_code == 409 and is_problem(resp)
    assert kind(resp) == "failed-precondition"
    assert "n3" in resp.json()["detail"]
    # after unpublishing, the other node may take it
    assert cluster.delete(f"/v1/volumes/{vol}/attachments/n3").status_code == 204
    assert attach(cluster, vol, "n4", mode, readonly).status_code == 200


@pytest.mark.parametrize("mode", ["SINGLE_NODE_READER_ONLY", "MULTI_NODE_READER_ONLY"])
def test_reader_only_modes_require_readonly(cluster, vol, mode):
    resp = attach(cluster, vol, "n3", mode, readonly=False)
    assert resp.status_code == 422
    assert resp.json()["field"] == "readonly"
    assert cluster.get(f"/v1/volumes/{vol}").json()["published_nodes"] == []


def test_multi_node_reader_only_allows_many_readers(cluster, vol):
    for node in ("n1", "n2", "n3", "n4"):
        assert attach(cluster, vol, node, "MULTI_NODE_READER_ONLY", True).status_code == 200
    assert len(cluster.get(f"/v1/volumes/{vol}").json()["published_nodes"]) == 4


def test_multi_node_single_writer_allows_one_writer_and_many_readers(cluster, vol):
    mode = "MULTI_NODE_SINGLE_WRITER"
    assert attach(cluster, vol, "n3", mode).status_code == 200
    assert attach(cluster, vol, "n1", mode, readonly=True).status_code == 200
    assert attach(cluster, vol, "n2", mode, readonly=True).status_code == 200
    resp = attach(cluster, vol, "n4", mode)
    assert resp.status_code == 409 and kind(resp) == "failed-precondition"
    assert "n3" in resp.json()["detail"]
    cluster.delete(f"/v1/volumes/{vol}/attachments/n3")
    assert attach(cluster, vol, "n4", mode).status_code == 200


def test_multi_node_multi_writer_allows_any(cluster, vol):
    for node in ("n1", "n2", "n3", "n4"):
        assert attach(cluster, vol, node, "MULTI_NODE_MULTI_WRITER").status_code == 200


def test_mixed_modes_on_one_volume_are_refused(cluster, vol):
    attach(cluster, vol, "n3", "MULTI_NODE_MULTI_WRITER")
    resp = attach(cluster, vol, "n4", "MULTI_NODE_READER_ONLY", readonly=True)
    assert resp.status_code == 409 and kind(resp) == "failed-precondition"
    assert "MULTI_NODE_MULTI_WRITER" in resp.json()["detail"]


def test_node_at_max_volumes_is_resource_exhausted(cluster, agent):
    add_node(cluster, "small", agent.url, {}, max_volumes=2)
    vols = [create(cluster, f"v{i}", MiB)["id"] for i in range(3)]
    assert attach(cluster, vols[0], "small", "SINGLE_NODE_WRITER").status_code == 200
    assert attach(cluster, vols[1], "small", "SINGLE_NODE_WRITER").status_code == 200
    resp = attach(cluster, vols[2], "small", "SINGLE_NODE_WRITER")
    assert resp.status_code == 507 and kind(resp) == "resource-exhausted"
    # re-attaching an existing one is still fine at the limit
    assert attach(cluster, vols[0], "small", "SINGLE_NODE_WRITER").status_code == 200


def test_attach_to_unknown_node_or_volume_is_404(cluster, vol):
    resp = attach(cluster, vol, "ghost", "SINGLE_NODE_WRITER")
    assert resp.status_code == 404 and resp.json()["field"] == "node_id"
    resp = attach(cluster, "vol-" + "0" * 32, "n1", "SINGLE_NODE_WRITER")
    assert resp.status_code == 404 and resp.json()["field"] == "volume_id"


def test_unknown_access_mode_is_422_naming_the_field(cluster, vol):
    resp = attach(cluster, vol, "n3", "EVERYONE_WRITES")
    assert resp.status_code == 422 and resp.json()["field"] == "access_mode"


def test_detach_is_idempotent(cluster, vol):
    attach(cluster, vol, "n3", "SINGLE_NODE_WRITER")
    assert cluster.delete(f"/v1/volumes/{vol}/attachments/n3").status_code == 204
    assert cluster.delete(f"/v1/volumes/{vol}/attachments/n3").status_code == 204
    assert cluster.delete(f"/v1/volumes/vol-{'0' * 32}/attachments/n3").status_code == 204


def test_concurrent_single_writer_attaches_let_exactly_one_node_win(cluster, vol, agent):
    nodes = [f"c{i}" for i in range(8)]
    for node in nodes:
        add_node(cluster, node, agent.url, {})
    codes: list[int] = []
    barrier = threading.Barrier(len(nodes))

    def worker(node: str) -> None:
        barrier.wait()
        codes.append(attach(cluster, vol, node, "SINGLE_NODE_WRITER").status_code)

    threads = [threading.Thread(target=worker, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200] + [409] * (len(nodes) - 1)
    assert len(cluster.get(f"/v1/volumes/{vol}").json()["published_nodes"]) == 1


def test_mode_rules_table():
    """The pure rule function, for the combinations the REST tests don't reach."""
    MNSW = AccessMode.MULTI_NODE_SINGLE_WRITER

    class Row:
        def __init__(self, node_id, mode, readonly):
            self.node_id, self.access_mode, self.readonly = node_id, mode, readonly

    check_mode_rules(MNSW, True, "b", [Row("a", "MULTI_NODE_SINGLE_WRITER", False)])
    with pytest.raises(FailedPrecondition, match="one writer"):
        check_mode_rules(MNSW, False, "b", [Row("a", "MULTI_NODE_SINGLE_WRITER", False)])
    check_mode_rules(MNSW, False, "b", [Row("a", "MULTI_NODE_SINGLE_WRITER", True)])


def test_capacity_unaffected_by_attachments(cluster, vol):
    before = cluster.get("/v1/capacity").json()
    attach(cluster, vol, "n3", "SINGLE_NODE_WRITER")
    assert cluster.get("/v1/capacity").json() == before
    assert before["available_bytes"] == 10 * GiB - MiB


def test_an_attachment_detached_while_its_export_was_made_is_undone_and_answers_aborted(
    cluster, vol, agent
):
    """A detach that runs between the row's insert and its `ready` leaves no export or key."""
    detached: list[int] = []
    agent.hooks["put_key"] = lambda: detached.append(
        cluster.delete(f"/v1/volumes/{vol}/attachments/n3").status_code
    )
    resp = attach(cluster, vol, "n3", "SINGLE_NODE_WRITER")
    assert detached == [204]
    assert resp.status_code == 409 and kind(resp) == "aborted"
    assert agent.exports == {} and agent.keys == {}
    assert cluster.get(f"/v1/volumes/{vol}").json()["published_nodes"] == []
    # the CO's retry attaches afresh
    assert attach(cluster, vol, "n3", "SINGLE_NODE_WRITER").status_code == 200
    assert set(agent.exports) == {(vol, "n3")} and set(agent.keys) == {vol}
