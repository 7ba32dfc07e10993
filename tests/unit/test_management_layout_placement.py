"""Multi-leg volumes (raid0/raid1/raid10): placement on distinct nodes and zones, leg files
made, grown and deleted on every node, on SQLite and PostgreSQL, against real-file agents."""

from __future__ import annotations

import uuid

import pytest

from management.schema import DiscardedLegRow, VolumeRow
from tessera import layouts
from tests.unit.layout_fixtures import Nodes
from tests.unit.management_fixtures import GiB, MiB

pytest_plugins = ["tests.unit.management_fixtures", "tests.unit.layout_fixtures"]


def test_a_raid1_volume_has_a_full_copy_plus_md_metadata_on_each_of_two_nodes(nodes: Nodes):
    for n in ("n1", "n2", "n3"):
        nodes.add(n)
    nodes.vpg("safe", "raid1")
    resp = nodes.create("v", GiB, "safe")
    assert resp.status_code == 201, resp.text
    vol = resp.json()
    assert vol["state"] == "available" and vol["size_bytes"] == GiB
    legs = vol["legs"]
    assert [leg["index"] for leg in legs] == [0, 1]
    assert len({leg["node_id"] for leg in legs}) == 2
    for leg in legs:
        assert leg["size_bytes"] == GiB + layouts.MD_DATA_OFFSET and leg["state"] == "in_sync"
        assert nodes.file(leg["node_id"], vol["id"]).stat().st_size == leg["size_bytes"]
    with nodes.ctx.db.read() as s:
        row = s.get(VolumeRow, vol["id"])
        assert row.layout == "raid1" and uuid.UUID(row.array_uuid).version == 4
    # space is counted where each leg is
    assert nodes.pool(legs[1]["node_id"])["allocated_bytes"] == GiB + layouts.MD_DATA_OFFSET


def test_a_raid0_volume_is_rounded_to_whole_chunks_on_every_leg(nodes: Nodes):
    for n in ("n1", "n2", "n3"):
        nodes.add(n)
    nodes.vpg("wide", "raid0", legs=3, chunk=64 * 1024)
    vol = nodes.create("v", 100 * MiB, "wide").json()
    assert vol["size_bytes"] == 102 * MiB  # lcm(1 MiB, 3 x 64 KiB) = 3 MiB
    assert sorted(leg["node_id"] for leg in vol["legs"]) == ["n1", "n2", "n3"]
    assert {leg["size_bytes"] for leg in vol["legs"]} == {34 * MiB}
    with nodes.ctx.db.read() as s:
        row = s.get(VolumeRow, vol["id"])
        assert (row.chunk_bytes, row.array_uuid) == (64 * 1024, "")  # no md: no uuid


def test_legs_go_to_distinct_zones_while_there_are_enough(nodes: Nodes):
    nodes.add("n1", zone="a", capacity=20 * GiB)
    nodes.add("n2", zone="a", capacity=20 * GiB)  # most free space after n1, same zone
    nodes.add("n3", zone="b", capacity=5 * GiB)
    nodes.add("n4", zone="c", capacity=5 * GiB)
    nodes.vpg("safe", "raid1", legs=3)
    vol = nodes.create("v", GiB, "safe", requisite_nodes=["n1"]).json()
    assert [leg["node_id"] for leg in vol["legs"]] == ["n1", "n3", "n4"]


def test_nodes_without_a_zone_label_are_one_zone_not_each_their_own(nodes: Nodes):
    nodes.add("n1")  # unlabelled
    nodes.add("n2", capacity=40 * GiB)  # unlabelled, most room
    nodes.add("n3", zone="b")
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe", requisite_nodes=["n1"]).json()
    assert [leg["node_id"] for leg in vol["legs"]] == ["n1", "n3"]


def test_legs_share_a_zone_only_when_there_are_fewer_zones_than_legs(nodes: Nodes):
    nodes.add("n1", zone="a")
    nodes.add("n2", zone="a")
    nodes.add("n3", zone="b")
    nodes.vpg("safe", "raid1", legs=3)
    vol = nodes.create("v", GiB, "safe").json()
    assert sorted(leg["node_id"] for leg in vol["legs"]) == ["n1", "n2", "n3"]


def test_the_first_leg_honours_the_preferred_node_of_the_pod(nodes: Nodes):
    for n in ("n1", "n2", "n3", "n4"):
        nodes.add(n)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe", locality="preferred", preferred_nodes=["n4", "n1"]).json()
    assert vol["legs"][0]["node_id"] == "n4" and vol["node_id"] == "n4"


def test_too_few_nodes_for_the_legs_is_refused_naming_both_numbers(nodes: Nodes):
    for n in ("n1", "n2", "n3"):
        nodes.add(n)
    nodes.vpg("r10", "raid10", legs=4)
    resp = nodes.create("v", GiB, "r10")
    assert resp.status_code == 507, resp.text
    assert "needs 4 distinct nodes" in resp.json()["detail"]
    assert "3 are eligible" in resp.json()["detail"]
    assert nodes.api.get("/v1/volumes", params={"name": "v"}).json()["items"] == []
    # a node that is down does not count
    nodes.add("n4")
    nodes.pass_time(60, "n1", "n2", "n3")
    resp = nodes.create("v", GiB, "r10")
    assert resp.status_code == 507 and "3 are eligible" in resp.json()["detail"]


def test_a_leg_larger_than_every_pool_is_out_of_range(nodes: Nodes):
    for n in ("n1", "n2"):
        nodes.add(n, capacity=2 * GiB)
    nodes.vpg("safe", "raid1")
    resp = nodes.create("v", 2 * GiB, "safe")  # + 4 MiB of md metadata per leg
    assert resp.status_code == 422 and resp.json()["field"] == "size_bytes", resp.text
    assert "largest eligible pool" in resp.json()["detail"]


def test_a_rounded_size_above_limit_bytes_is_refused_naming_limit_bytes(nodes: Nodes):
    for n in ("n1", "n2", "n3"):
        nodes.add(n)
    nodes.vpg("wide", "raid0", legs=3)
    resp = nodes.create("v", 100 * MiB, "wide", limit_bytes=100 * MiB)
    assert resp.status_code == 422 and resp.json()["field"] == "limit_bytes", resp.text
    vol = nodes.create("v", 99 * MiB, "wide").json()  # 3 legs of whole chunks: 99 MiB
    grow = {"size_bytes": 100 * MiB, "limit_bytes": 100 * MiB}  # rounds to 102 MiB
    resp = nodes.api.post(f"/v1/volumes/{vol['id']}/expand", json=grow)
    assert resp.status_code == 422 and resp.json()["field"] == "limit_bytes", resp.text
    assert nodes.api.get(f"/v1/volumes/{vol['id']}").json()["size_bytes"] == vol["size_bytes"]


def test_forcing_nbd_on_a_multi_leg_vpg_is_accepted_and_kept_for_every_publish(nodes: Nodes):
    for n in ("n1", "n2"):
        nodes.add(n)
    nodes.vpg("safe", "raid1")
    resp = nodes.create("v", GiB, "safe", parameters={"transport": "nbd"})
    assert resp.status_code == 201, resp.text  # nbd legs need the kernel nbd client
    assert resp.json()["parameters"] == {"transport": "nbd"}
    assert len(resp.json()["legs"]) == 2


def test_a_create_whose_second_leg_failed_is_finished_by_the_retry(nodes: Nodes):
    nodes.add("n1", capacity=20 * GiB)
    nodes.add("n2")
    nodes.vpg("safe", "raid1")
    nodes.agents["n2"].fail.add("create")
    assert nodes.create("v", GiB, "safe").status_code == 503
    (vol,) = nodes.api.get("/v1/volumes", params={"name": "v"}).json()["items"]
    assert vol["state"] == "creating"
    nodes.agents["n2"].fail.clear()
    again = nodes.create("v", GiB, "safe")
    assert again.status_code == 200 and again.json()["state"] == "available"
    assert again.json()["legs"] == vol["legs"]  # same legs, not placed anew
    for n in ("n1", "n2"):
        assert nodes.file(n, vol["id"]).stat().st_size == GiB + layouts.MD_DATA_OFFSET


def test_expanding_grows_every_leg_by_its_share(nodes: Nodes):
    for n in ("n1", "n2", "n3", "n4"):
        nodes.add(n)
    nodes.vpg("r10", "raid10", legs=4)
    vol = nodes.create("v", GiB, "r10").json()
    resp = nodes.api.post(f"/v1/volumes/{vol['id']}/expand", json={"size_bytes": 2 * GiB})
    assert resp.status_code == 200, resp.text
    grown = resp.json()
    assert grown["size_bytes"] == 2 * GiB
    want = layouts.leg_size("raid10", 2 * GiB, 4)  # 2 copies over 4 legs, + md metadata
    assert want == GiB + layouts.MD_DATA_OFFSET
    for leg in grown["legs"]:
        assert leg["size_bytes"] == want
        assert nodes.file(leg["node_id"], vol["id"]).stat().st_size == want


def test_expanding_is_refused_when_one_legs_pool_has_no_room(nodes: Nodes):
    nodes.add("n1")
    nodes.add("n2", capacity=GiB + 8 * MiB)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe").json()
    resp = nodes.api.post(f"/v1/volumes/{vol['id']}/expand", json={"size_bytes": 2 * GiB})
    assert resp.status_code == 422 and "on node 'n2'" in resp.json()["detail"], resp.text
    after = nodes.api.get(f"/v1/volumes/{vol['id']}").json()
    assert after["size_bytes"] == GiB and after["legs"] == vol["legs"]  # nothing grew


def test_deleting_removes_every_leg_and_a_down_nodes_leg_when_it_returns(nodes: Nodes):
    for n in ("n1", "n2", "n3"):
        nodes.add(n)
    nodes.vpg("safe", "raid1", legs=3)
    vol = nodes.create("v", GiB, "safe").json()
    nodes.pass_time(60, "n1", "n2")  # n3 stops beating
    assert nodes.api.delete(f"/v1/volumes/{vol['id']}").status_code == 204
    assert nodes.file("n1", vol["id"]) is None and nodes.file("n2", vol["id"]) is None
    assert nodes.file("n3", vol["id"]) is not None  # its node was down
    assert nodes.api.get(f"/v1/volumes/{vol['id']}").status_code == 404
    assert nodes.pool("n3")["allocated_bytes"] == GiB + layouts.MD_DATA_OFFSET  # still there
    assert nodes.pool("n1")["allocated_bytes"] == 0
    nodes.beat("n3")  # it returns: the leg goes
    assert nodes.file("n3", vol["id"]) is None
    assert nodes.pool("n3")["allocated_bytes"] == 0
    with nodes.ctx.db.read() as s:
        assert s.query(DiscardedLegRow).count() == 0


def test_a_discarded_leg_the_agent_cannot_delete_yet_is_tried_again_next_beat(nodes: Nodes):
    for n in ("n1", "n2"):
        nodes.add(n)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe").json()
    nodes.pass_time(60, "n1")
    assert nodes.api.delete(f"/v1/volumes/{vol['id']}").status_code == 204
    nodes.agents["n2"].fail.add("delete")
    nodes.beat("n2")
    assert nodes.file("n2", vol["id"]) is not None
    nodes.agents["n2"].fail.clear()
    nodes.beat("n2")
    assert nodes.file("n2", vol["id"]) is None


def test_snapshots_and_clones_of_multi_leg_volumes_are_refused_saying_why(nodes: Nodes):
    for n in ("n1", "n2"):
        nodes.add(n)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe").json()
    snap = nodes.api.post("/v1/snapshots", json={"name": "s", "source_volume_id": vol["id"]})
    assert snap.status_code == 409 and "one-leg (concat) volumes only" in snap.json()["detail"]
    clone = nodes.create("c", GiB, "safe", content_source={"volume_id": vol["id"]})
    assert clone.status_code == 409 and clone.json()["field"] == "content_source"


def test_concat_volumes_are_placed_as_before(nodes: Nodes):
    nodes.add("n1")
    vol = nodes.create("v", GiB, "default").json()
    assert vol["legs"] == [
        {"node_id": "n1", "pool": "p", "size_bytes": GiB, "index": 0, "state": "in_sync"}
    ]


def test_reconcile_judges_each_leg_by_its_own_size_and_knows_discarded_legs(nodes: Nodes):
    for n in ("n1", "n2", "n3"):
        nodes.add(n)
    nodes.vpg("safe", "raid1")
    nodes.vpg("wide", "raid0", legs=3)
    mirror = nodes.create("m", GiB, "safe").json()
    nodes.create("s", 96 * MiB, "wide")
    gone = nodes.create("g", GiB, "safe").json()
    down = gone["legs"][1]["node_id"]
    nodes.pass_time(120, *[n for n in ("n1", "n2", "n3") if n != down])
    assert nodes.api.delete(f"/v1/volumes/{gone['id']}").status_code == 204
    nodes.now[0] += 1
    report = nodes.api.post("/v1/reconcile", json={}).json()
    assert [f for f in report["findings"] if f["kind"] != "node_unreachable"] == []
    # a leg file that is really wrong is still reported, with the leg's own size
    path = nodes.file(mirror["legs"][1]["node_id"], mirror["id"])
    with open(path, "r+b") as f:
        f.truncate(GiB)
    report = nodes.api.post("/v1/reconcile", json={"fix": True}).json()
    (finding,) = [f for f in report["findings"] if f["kind"] == "size_mismatch"]
    assert str(GiB + layouts.MD_DATA_OFFSET) in finding["detail"] and not finding["fixed"]


@pytest.mark.parametrize(
    ("layout", "legs", "expected"),
    [
        ("raid1", 2, 4 * GiB - layouts.MD_DATA_OFFSET),  # the second-most free node's room
        ("raid0", 3, 6 * GiB),  # three legs of the third-most free node's room
        ("raid10", 3, 3 * (2 * GiB - layouts.MD_DATA_OFFSET) // 2 // (3 * MiB) * (3 * MiB)),
    ],
)
def test_capacity_of_a_layout_is_exactly_the_largest_volume_a_create_accepts(
    nodes: Nodes, layout, legs, expected
):
    for n, gib in (("n1", 10), ("n2", 4), ("n3", 2)):
        nodes.add(n, capacity=gib * GiB)
    nodes.vpg("g", layout, legs=legs)
    got = nodes.api.get("/v1/capacity", params={"vpg": "g"}).json()
    assert got["available_bytes"] == expected
    unit = layouts.volume_size(layout, 1, legs, layouts.DEFAULT_CHUNK if layout != "raid1" else 0)
    assert nodes.create("too-big", expected + unit, "g").status_code == 507
    assert nodes.create("fits", expected, "g").status_code == 201


def test_capacity_for_a_required_node_counts_its_own_room_for_the_first_leg(nodes: Nodes):
    for n, gib in (("n1", 10), ("n2", 4), ("n3", 2)):
        nodes.add(n, capacity=gib * GiB)
    nodes.vpg("safe", "raid1")
    params = {"vpg": "safe", "node_id": "n3", "locality": "required"}
    got = nodes.api.get("/v1/capacity", params=params).json()
    assert got["available_bytes"] == 2 * GiB - layouts.MD_DATA_OFFSET
