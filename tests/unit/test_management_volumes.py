"""Volume lifecycle through the REST API against a real (fake-but-real-files) agent."""

from __future__ import annotations

import statistics
import threading
import time

from management.app import create_app
from tests.unit.management_fixtures import TOKEN, GiB, MiB, add_node, create, is_problem

pytest_plugins = ["tests.unit.management_fixtures"]


# ---- create --------------------------------------------------------------------------


def test_new_volume_is_available_and_backed_by_a_sparse_file(cluster, agent):
    resp = cluster.post("/v1/volumes", json={"name": "pvc-1", "size_bytes": 5 * MiB + 1})
    assert resp.status_code == 201
    vol = resp.json()
    assert vol["id"].startswith("vol-")
    assert vol["state"] == "available"
    assert vol["size_bytes"] == 6 * MiB  # rounded up to whole MiB
    path = agent.path(vol["pool"], vol["id"])
    assert path.stat().st_size == 6 * MiB
    assert path.stat().st_blocks == 0  # sparse


def test_creating_same_name_twice_returns_same_volume(cluster, agent):
    first = cluster.post("/v1/volumes", json={"name": "pvc", "size_bytes": GiB})
    again = cluster.post("/v1/volumes", json={"name": "pvc", "size_bytes": GiB})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert [c for c in agent.calls if c[0] == "create"] == [("create", first.json()["id"])]


def test_same_name_with_incompatible_size_is_409_naming_the_field(cluster):
    create(cluster, "pvc", GiB)
    resp = cluster.post("/v1/volumes", json={"name": "pvc", "size_bytes": 2 * GiB})
    assert resp.status_code == 409 and is_problem(resp)
    assert resp.json()["type"].endswith("/already-exists")
    assert resp.json()["field"] == "size_bytes"
    resp = cluster.post(
        "/v1/volumes", json={"name": "pvc", "size_bytes": MiB, "limit_bytes": 512 * MiB}
    )
    assert resp.status_code == 409 and resp.json()["field"] == "size_bytes"


def test_same_name_in_another_vpg_is_409(cluster):
    cluster.post("/v1/vpgs", json={"name": "gold"})
    create(cluster, "pvc", GiB)
    resp = cluster.post("/v1/volumes", json={"name": "pvc", "size_bytes": GiB, "vpg": "gold"})
    assert resp.status_code == 409 and resp.json()["field"] == "vpg"


def test_same_name_within_range_is_accepted(cluster):
    vol = create(cluster, "pvc", GiB)
    again = create(cluster, "pvc", GiB // 2, limit_bytes=2 * GiB)
    assert again["id"] == vol["id"]


def test_rounding_past_limit_is_out_of_range(cluster):
    resp = cluster.post(
        "/v1/volumes", json={"name": "x", "size_bytes": MiB + 1, "limit_bytes": MiB + 10}
    )
    assert resp.status_code == 422
    assert resp.json()["type"].endswith("/out-of-range")


def test_unknown_vpg_is_404_naming_vpg(cluster):
    resp = cluster.post("/v1/volumes", json={"name": "x", "size_bytes": 1, "vpg": "nope"})
    assert resp.status_code == 404 and resp.json()["field"] == "vpg"


def test_volume_larger_than_any_pool_is_out_of_range_and_says_the_max(cluster):
    resp = cluster.post("/v1/volumes", json={"name": "x", "size_bytes": 11 * GiB})
    assert resp.status_code == 422
    body = resp.json()
    assert body["type"].endswith("/out-of-range") and body["field"] == "size_bytes"
    assert "10 GiB" in body["detail"]


def test_full_pools_are_resource_exhausted(cluster):
    create(cluster, "a", 9 * GiB)
    create(cluster, "b", 3 * GiB)
    resp = cluster.post("/v1/volumes", json={"name": "c", "size_bytes": 2 * GiB})
    assert resp.status_code == 507 and is_problem(resp)
    assert resp.json()["type"].endswith("/resource-exhausted")


def test_placement_prefers_most_free_then_honours_preferred_and_requisite(cluster):
    assert create(cluster, "a", GiB)["node_id"] == "n1"  # most free
    vol = create(cluster, "b", GiB, locality="preferred", preferred_nodes=["n2", "n1"])
    assert vol["node_id"] == "n2"
    assert create(cluster, "c", GiB, requisite_nodes=["n2"])["node_id"] == "n2"
    resp = cluster.post(
        "/v1/volumes", json={"name": "d", "size_bytes": 3 * GiB, "requisite_nodes": ["n2"]}
    )
    assert resp.status_code == 507  # n2 has 2 GiB left; n1 is not allowed


def test_locality_required_places_on_the_consumer_node(cluster):
    vol = create(cluster, "a", GiB, locality="required", preferred_nodes=["n2"])
    assert vol["node_id"] == "n2"


def test_concurrent_creates_never_overcommit_a_pool(api, agent):
    add_node(api, "n1", agent.url, {"p": 64 * MiB})
    errors: list[int] = []

    def worker(k: int) -> None:
        for i in range(12):
            resp = api.post("/v1/volumes", json={"name": f"w{k}-{i}", "size_bytes": 3 * MiB})
            if resp.status_code not in (200, 201):
                errors.append(resp.status_code)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    vols = api.get("/v1/volumes", params={"max_entries": 1000}).json()["items"]
    assert sum(v["size_bytes"] for v in vols) <= 64 * MiB
    assert len(vols) == 64 // 3
    assert set(errors) == {507}
    pool = api.get("/v1/pools").json()["items"][0]
    assert pool["free_bytes"] == 64 * MiB - len(vols) * 3 * MiB


def test_concurrent_creates_of_one_name_make_one_volume(cluster):
    ids: list[str] = []

    def worker() -> None:
        ids.append(create(cluster, "same", GiB)["id"])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
    assert len(cluster.get("/v1/volumes").json()["items"]) == 1


def test_agent_failure_leaves_creating_and_retry_converges(cluster, agent):
    agent.fail.add("create")
    resp = cluster.post("/v1/volumes", json={"name": "pvc", "size_bytes": GiB})
    assert resp.status_code == 503 and is_problem(resp)
    [vol] = cluster.get("/v1/volumes").json()["items"]
    assert vol["state"] == "creating"
    agent.fail.clear()
    again = cluster.post("/v1/volumes", json={"name": "pvc", "size_bytes": GiB})
    assert again.status_code == 200
    assert again.json()["id"] == vol["id"] and again.json()["state"] == "available"
    assert agent.path(vol["pool"], vol["id"]).exists()


def test_unreachable_agent_is_unavailable(api, tmp_path):
    add_node(api, "n1", f"unix://{tmp_path}/missing.sock", {"p": GiB})
    resp = api.post("/v1/volumes", json={"name": "pvc", "size_bytes": MiB})
    assert resp.status_code == 503
    assert resp.json()["type"].endswith("/unavailable")


def test_volume_create_is_fast(cluster):
    for i in range(5):
        create(cluster, f"warm{i}", MiB)
    times = []
    for i in range(40):
        start = time.perf_counter()
        create(cluster, f"v{i}", MiB)
        times.append(time.perf_counter() - start)
    # in-process test client + in-process agent; the real server is faster
    assert statistics.median(times) < 0.05


def test_state_survives_a_restart(db_url, agent):
    from fastapi.testclient import TestClient

    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(db_url, TOKEN), headers=headers) as one:
        add_node(one, "n1", agent.url, {"p": GiB})
        vol = create(one, "pvc", MiB)
    with TestClient(create_app(db_url, TOKEN), headers=headers) as two:
        assert two.get(f"/v1/volumes/{vol['id']}").json()["name"] == "pvc"


# ---- get / delete --------------------------------------------------------------------


def test_malformed_or_unknown_volume_id_is_404(cluster):
    for vid in ("vol-doesnotexist", "vol-..", "nope", "vol-ABC"):
        resp = cluster.get(f"/v1/volumes/{vid}")
        assert resp.status_code == 404 and is_problem(resp), vid
    assert cluster.delete("/v1/volumes/vol-0123").status_code == 404


def test_delete_removes_file_and_is_404_after(cluster, agent):
    vol = create(cluster, "pvc", MiB)
    assert cluster.delete(f"/v1/volumes/{vol['id']}").status_code == 204
    assert not agent.path(vol["pool"], vol["id"]).exists()
    assert cluster.get(f"/v1/volumes/{vol['id']}").status_code == 404
    assert cluster.delete(f"/v1/volumes/{vol['id']}").status_code == 404


def test_delete_refused_while_attached(cluster, agent):
    vol = create(cluster, "pvc", MiB)
    body = {"access_mode": "SINGLE_NODE_WRITER"}
    assert cluster.put(f"/v1/volumes/{vol['id']}/attachments/n2", json=body).status_code == 200
    resp = cluster.delete(f"/v1/volumes/{vol['id']}")
    assert resp.status_code == 409
    assert resp.json()["type"].endswith("/failed-precondition")
    assert "n2" in resp.json()["detail"]
    assert agent.path(vol["pool"], vol["id"]).exists()
    cluster.delete(f"/v1/volumes/{vol['id']}/attachments/n2")
    assert cluster.delete(f"/v1/volumes/{vol['id']}").status_code == 204


def test_failed_agent_delete_converges_on_retry(cluster, agent):
    vol = create(cluster, "pvc", MiB)
    agent.fail.add("delete")
    assert cluster.delete(f"/v1/volumes/{vol['id']}").status_code == 503
    assert cluster.get(f"/v1/volumes/{vol['id']}").json()["state"] == "deleting"
    # the name cannot be reused while deletion is pending
    assert cluster.post("/v1/volumes", json={"name": "pvc", "size_bytes": MiB}).status_code == 409
    agent.fail.clear()
    assert cluster.delete(f"/v1/volumes/{vol['id']}").status_code == 204
    assert cluster.get(f"/v1/volumes/{vol['id']}").status_code == 404


def test_deleted_space_is_reusable(cluster):
    vol = create(cluster, "a", 9 * GiB)
    cluster.delete(f"/v1/volumes/{vol['id']}")
    assert create(cluster, "b", 9 * GiB)["node_id"] == "n1"


# ---- expand --------------------------------------------------------------------------


def test_expand_grows_the_file(cluster, agent):
    vol = create(cluster, "pvc", MiB)
    resp = cluster.post(f"/v1/volumes/{vol['id']}/expand", json={"size_bytes": 10 * MiB + 5})
    assert resp.status_code == 200
    assert resp.json()["size_bytes"] == 11 * MiB
    assert agent.path(vol["pool"], vol["id"]).stat().st_size == 11 * MiB


def test_expand_never_shrinks(cluster, agent):
    vol = create(cluster, "pvc", 8 * MiB)
    resp = cluster.post(f"/v1/volumes/{vol['id']}/expand", json={"size_bytes": MiB})
    assert resp.status_code == 200 and resp.json()["size_bytes"] == 8 * MiB
    assert not [c for c in agent.calls if c[0] == "resize"]


def test_expand_beyond_pool_free_space_is_resource_exhausted(cluster):
    vol = create(cluster, "pvc", GiB, requisite_nodes=["n2"])
    create(cluster, "neighbour", 2 * GiB, requisite_nodes=["n2"])
    resp = cluster.post(f"/v1/volumes/{vol['id']}/expand", json={"size_bytes": 3 * GiB})
    assert resp.status_code == 507
    assert cluster.get(f"/v1/volumes/{vol['id']}").json()["size_bytes"] == GiB


def test_expand_beyond_what_the_pool_could_ever_hold_is_out_of_range(cluster):
    vol = create(cluster, "pvc", GiB, requisite_nodes=["n2"])
    resp = cluster.post(f"/v1/volumes/{vol['id']}/expand", json={"size_bytes": 5 * GiB})
    assert resp.status_code == 422 and resp.json()["type"].endswith("/out-of-range")
    assert cluster.get(f"/v1/volumes/{vol['id']}").json()["size_bytes"] == GiB


def test_expand_respects_limit(cluster):
    vol = create(cluster, "pvc", MiB)
    body = {"size_bytes": 2 * MiB + 1, "limit_bytes": 2 * MiB + 2}
    resp = cluster.post(f"/v1/volumes/{vol['id']}/expand", json=body)
    assert resp.status_code == 422 and resp.json()["type"].endswith("/out-of-range")


def test_failed_expand_is_redriven_by_retry(cluster, agent):
    vol = create(cluster, "pvc", MiB)
    agent.fail.add("resize")
    url = f"/v1/volumes/{vol['id']}/expand"
    assert cluster.post(url, json={"size_bytes": 4 * MiB}).status_code == 503
    agent.fail.clear()
    assert cluster.post(url, json={"size_bytes": 4 * MiB}).json()["size_bytes"] == 4 * MiB
    assert agent.path(vol["pool"], vol["id"]).stat().st_size == 4 * MiB


# ---- capacity ------------------------------------------------------------------------


def test_capacity_is_the_largest_single_pool_free_space(cluster):
    cap = cluster.get("/v1/capacity").json()
    assert cap["available_bytes"] == 10 * GiB and cap["maximum_volume_bytes"] == 10 * GiB
    create(cluster, "a", 8 * GiB)
    assert cluster.get("/v1/capacity").json()["available_bytes"] == 4 * GiB
    on_n1 = {"node_id": "n1", "locality": "required"}
    assert cluster.get("/v1/capacity", params=on_n1).json()["available_bytes"] == 2 * GiB
    assert cluster.get("/v1/capacity", params={"vpg": "nope"}).status_code == 404
