"""StorageClass `locality` as docs/storageclass.md describes it, through management's REST API.

The `cluster` fixture has two online nodes: n1 with a 10 GiB pool and n2
with a 4 GiB pool, so "most free space" and "the preferred node" differ.
"""

from __future__ import annotations

from tests.unit.management_fixtures import GiB, create, is_problem

pytest_plugins = ["tests.unit.management_fixtures"]


def test_any_ignores_the_consumer_and_goes_where_most_space_is_free(cluster):
    assert create(cluster, "a", GiB, locality="any", preferred_nodes=["n2"])["node_id"] == "n1"


def test_any_spreads_volumes_as_pools_fill(cluster):
    placed = [create(cluster, f"v{i}", 3 * GiB, locality="any")["node_id"] for i in range(4)]
    # free 10/4 -> n1 (7/4) -> n1 (4/4, tie broken by node id) -> n1 (1/4) -> n2
    assert placed == ["n1", "n1", "n1", "n2"]


def test_preferred_puts_the_volume_on_the_consumer_node_first(cluster):
    vol = create(cluster, "a", GiB, locality="preferred", preferred_nodes=["n2", "n1"])
    assert vol["node_id"] == "n2"


def test_preferred_falls_back_to_other_nodes_when_the_consumer_is_full(cluster):
    create(cluster, "fill", 4 * GiB, requisite_nodes=["n2"])
    vol = create(cluster, "a", GiB, locality="preferred", preferred_nodes=["n2"])
    assert vol["node_id"] == "n1"


def test_preferred_never_leaves_requisite(cluster):
    vol = create(
        cluster, "a", GiB, locality="preferred", requisite_nodes=["n1"], preferred_nodes=["n2"]
    )
    assert vol["node_id"] == "n1"


def test_required_uses_exactly_the_consumer_node_even_with_less_free_space(cluster):
    vol = create(cluster, "a", GiB, locality="required", preferred_nodes=["n2", "n1"])
    assert vol["node_id"] == "n2"


def test_required_fails_rather_than_place_away_from_a_full_consumer(cluster):
    create(cluster, "fill", 4 * GiB, requisite_nodes=["n2"])
    body = {"name": "a", "size_bytes": GiB, "locality": "required", "preferred_nodes": ["n2"]}
    resp = cluster.post("/v1/volumes", json=body)
    assert resp.status_code == 507 and is_problem(resp)


def test_required_without_a_consumer_stays_within_requisite(cluster):
    vol = create(cluster, "a", GiB, locality="required", requisite_nodes=["n2"])
    assert vol["node_id"] == "n2"  # n1 has more free space but is not requisite
    body = {"name": "b", "size_bytes": 4 * GiB, "locality": "required", "requisite_nodes": ["n2"]}
    assert cluster.post("/v1/volumes", json=body).status_code == 507


def test_required_with_a_consumer_outside_requisite_is_refused_naming_the_field(cluster):
    body = {
        "name": "a",
        "size_bytes": GiB,
        "locality": "required",
        "requisite_nodes": ["n1"],
        "preferred_nodes": ["n2"],
    }
    resp = cluster.post("/v1/volumes", json=body)
    assert resp.status_code == 422 and is_problem(resp)
    assert resp.json()["field"] == "preferred_nodes"
    assert cluster.get("/v1/volumes").json()["items"] == []
