"""StorageClass `locality` as docs/storageclass.md describes it, through management's REST API.

The `cluster` fixture has two online nodes: n1 with a 10 GiB pool and n2
with a 4 GiB pool, so "most free space" and "the preferred node" differ.
"""

from __future__ import annotations

from tests.unit.management_fixtures import GiB, add_node, create, is_problem

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


# ---- capacity as seen from a consumer node (CSI GetCapacity per topology segment) ----------


def capacity(api, **params) -> int:  # noqa: ANN001
    resp = api.get("/v1/capacity", params=params)
    assert resp.status_code == 200, resp.text
    return resp.json()["available_bytes"]


def test_capacity_required_counts_only_the_consumer_nodes_pools(cluster):
    create(cluster, "a", GiB, requisite_nodes=["n2"])
    assert capacity(cluster, node_id="n2", locality="required") == 3 * GiB
    assert capacity(cluster, node_id="n1", locality="required") == 10 * GiB


def test_capacity_any_or_preferred_counts_every_online_pool_a_consumer_can_reach(cluster, agent):
    add_node(cluster, "client", agent.url, {})  # no pool of its own
    for locality in ("any", "preferred"):
        assert capacity(cluster, node_id="client", locality=locality) == 10 * GiB
        assert capacity(cluster, node_id="n2", locality=locality) == 10 * GiB
    assert capacity(cluster, node_id="client", locality="required") == 0


def test_capacity_for_an_unknown_node_is_zero_whatever_the_locality(cluster):
    for locality in ("any", "preferred", "required"):
        assert capacity(cluster, node_id="ghost", locality=locality) == 0


def test_capacity_leaves_out_pools_of_unreachable_and_fenced_nodes(cluster):
    ctx = cluster.app.state.ctx
    now = [ctx.clock() + 60]  # both nodes missed their beats
    ctx.clock = lambda: now[0]
    assert cluster.post("/v1/nodes/n2/heartbeat").status_code == 200
    assert capacity(cluster, node_id="n2") == 4 * GiB  # n1 unreachable
    assert cluster.post("/v1/nodes/n1/heartbeat").status_code == 200
    assert capacity(cluster, node_id="n2") == 10 * GiB
    now[0] += 60
    assert cluster.post("/v1/nodes/n2/heartbeat").status_code == 200
    assert cluster.post("/v1/nodes/n1/fence", json={}).status_code == 200
    assert capacity(cluster, node_id="n2") == 4 * GiB
