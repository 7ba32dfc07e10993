"""Publishing multi-leg and nvme-tcp volumes: the connection each consumer gets, which
transport each leg comes over, the exports each owner is asked for (one key per
attachment), and the multi-writer rules of mirrored layouts. SQLite and PostgreSQL,
real-file agents on unix sockets."""

from __future__ import annotations

from management.schema import VolumeRow
from tessera.nvme_names import subsystem_nqn
from tests.unit.layout_fixtures import Nodes
from tests.unit.management_fixtures import GiB

pytest_plugins = ["tests.unit.management_fixtures", "tests.unit.layout_fixtures"]

NVME = ["loop", "nbd", "nvme-tcp"]


def attach(nodes: Nodes, vol: str, node: str, mode: str = "SINGLE_NODE_WRITER", ro: bool = False):  # noqa: ANN201
    body = {"access_mode": mode, "readonly": ro}
    return nodes.api.put(f"/v1/volumes/{vol}/attachments/{node}", json=body)


def exports(nodes: Nodes, node: str) -> dict[tuple[str, str], object]:
    return dict(nodes.agents[node].exports)


def test_a_raid1_volume_used_on_a_leg_node_gets_a_loop_leg_and_an_nvme_leg(nodes: Nodes):
    for n in ("n1", "n2", "n3"):
        nodes.add(n, transports=NVME)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe", requisite_nodes=["n1"]).json()
    other = vol["legs"][1]["node_id"]
    resp = attach(nodes, vol["id"], "n1")
    assert resp.status_code == 200, resp.text
    conn = resp.json()["connection"]
    with nodes.ctx.db.read() as s:
        array_uuid = s.get(VolumeRow, vol["id"]).array_uuid
    assert (conn["transport"], conn["layout"], conn["array_uuid"]) == (
        "composed",
        "raid1",
        array_uuid,
    )
    assert conn["data_bytes"] == GiB and conn["chunk_bytes"] == 0
    assert conn["legs"] == [
        {"index": 0, "node_id": "n1", "transport": "loop", "host": "", "port": 0,
         "subsystem_nqn": "", "state": "in_sync"},
        {"index": 1, "node_id": other, "transport": "nvme-tcp", "host": "192.0.2.1",
         "port": 4420, "subsystem_nqn": subsystem_nqn(vol["id"], other), "state": "in_sync"},
    ]  # fmt: skip
    assert "psk_key" not in resp.text
    (export,) = exports(nodes, other).values()
    assert export.transport == "nvme-tcp" and export.psk_identity == "n1"
    assert not export.readonly
    assert nodes.agents["n1"].keys[vol["id"]].psk_key == export.psk_key  # the one key
    assert exports(nodes, "n1") == {}  # its own leg is a loop device
    # the leg's owner is told to keep that export; the consumer owns nothing to export
    beat = nodes.api.post(f"/v1/nodes/{other}/heartbeat").json()
    assert beat["exports"] == [{"volume_id": vol["id"], "client_node": "n1"}]
    assert nodes.api.post("/v1/nodes/n1/heartbeat").json()["exports"] == []
    again = attach(nodes, vol["id"], "n1")  # a retry answers the same
    assert again.status_code == 200 and again.json()["connection"] == conn


def test_a_raid0_volume_used_elsewhere_gets_every_leg_over_nvme_with_one_key(nodes: Nodes):
    for n in ("n1", "n2", "n3", "n4"):
        nodes.add(n, transports=NVME)
    nodes.vpg("wide", "raid0", legs=3, chunk=128 * 1024)
    vol = nodes.create("v", GiB, "wide", requisite_nodes=["n1", "n2", "n3"]).json()
    holders = [leg["node_id"] for leg in vol["legs"]]
    consumer = ({"n1", "n2", "n3", "n4"} - set(holders)).pop()
    conn = attach(nodes, vol["id"], consumer).json()["connection"]
    assert conn["layout"] == "raid0" and conn["chunk_bytes"] == 128 * 1024
    assert conn["array_uuid"] == ""
    assert [(leg["index"], leg["node_id"], leg["transport"]) for leg in conn["legs"]] == [
        (i, n, "nvme-tcp") for i, n in enumerate(holders)
    ]
    keys = {exports(nodes, n)[(vol["id"], consumer)].psk_key for n in holders}
    assert len(keys) == 1 and nodes.agents[consumer].keys[vol["id"]].psk_key in keys
    # detach closes every export and the consumer forgets the key
    assert nodes.api.delete(f"/v1/volumes/{vol['id']}/attachments/{consumer}").status_code == 204
    assert all(exports(nodes, n) == {} for n in holders)
    assert vol["id"] not in nodes.agents[consumer].keys


def test_a_composed_volume_is_refused_where_a_node_has_neither_nvme_nor_kernel_nbd_naming_it(
    nodes: Nodes,
):
    nodes.add("n1", transports=NVME)
    nodes.add("n2", transports=NVME)
    nodes.add("n3", transports=["loop", "nbd"])  # nbdfuse only: no kernel nbd client
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe", requisite_nodes=["n1"]).json()
    resp = attach(nodes, vol["id"], "n3")
    assert resp.status_code == 409, resp.text
    detail = resp.json()["detail"]
    assert "nvme-tcp" in detail and "node n3 offers loop, nbd" in detail
    assert "node n3 has no kernel nbd client" in detail
    assert nodes.api.get(f"/v1/volumes/{vol['id']}/attachments").json()["items"] == []
    assert all(exports(nodes, n) == {} for n in ("n1", "n2"))


def _single(nodes: Nodes, owner_transports, consumer_transports, **extra):  # noqa: ANN001, ANN202
    nodes.add("n1", transports=owner_transports)
    nodes.add("n2", transports=consumer_transports)
    return nodes.create("v", GiB, "default", requisite_nodes=["n1"], **extra).json()


def test_a_one_leg_volume_goes_over_nvme_when_both_nodes_can(nodes: Nodes):
    vol = _single(nodes, NVME, NVME)
    conn = attach(nodes, vol["id"], "n2").json()["connection"]
    assert conn["transport"] == "nvme-tcp" and conn["psk_identity"] == "n2"
    assert (conn["host"], conn["port"]) == ("192.0.2.1", 4420)
    assert conn["subsystem_nqn"] == subsystem_nqn(vol["id"], "n1") and conn["legs"] == []
    assert exports(nodes, "n1")[(vol["id"], "n2")].transport == "nvme-tcp"


def test_a_one_leg_volume_goes_over_nbd_when_a_node_lacks_nvme(nodes: Nodes):
    vol = _single(nodes, NVME, ["loop", "nbd"])
    conn = attach(nodes, vol["id"], "n2").json()["connection"]
    assert conn["transport"] == "nbd" and conn["subsystem_nqn"] == ""


def test_read_only_one_leg_attachments_use_nbd_nvmet_has_no_read_only_host(nodes: Nodes):
    vol = _single(nodes, NVME, NVME)
    resp = attach(nodes, vol["id"], "n2", mode="MULTI_NODE_READER_ONLY", ro=True)
    assert resp.json()["connection"]["transport"] == "nbd", resp.text
    assert exports(nodes, "n1")[(vol["id"], "n2")].readonly


def test_the_storageclass_transport_parameter_forces_nbd(nodes: Nodes):
    vol = _single(nodes, NVME, NVME, parameters={"transport": "nbd"})
    assert attach(nodes, vol["id"], "n2").json()["connection"]["transport"] == "nbd"


def test_a_forced_transport_the_owner_cannot_do_fails_the_publish_naming_it(nodes: Nodes):
    vol = _single(nodes, ["loop", "nbd"], NVME, parameters={"transport": "nvme-tcp"})
    resp = attach(nodes, vol["id"], "n2")
    assert resp.status_code == 409 and "node n1 offers loop, nbd" in resp.json()["detail"]


def test_an_unknown_transport_parameter_is_refused_at_create_naming_it(nodes: Nodes):
    nodes.add("n1")
    resp = nodes.create("v", GiB, "default", parameters={"transport": "iscsi"})
    assert resp.status_code == 422 and "parameters.transport 'iscsi'" in resp.json()["detail"]


def test_a_mirrored_volume_refuses_a_second_node_while_one_writes(nodes: Nodes):
    for n in ("n1", "n2", "n3"):
        nodes.add(n, transports=NVME)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe").json()
    mode = "MULTI_NODE_MULTI_WRITER"
    assert attach(nodes, vol["id"], "n1", mode=mode).status_code == 200
    resp = attach(nodes, vol["id"], "n2", mode=mode)
    assert resp.status_code == 409, resp.text
    assert "layout raid1" in resp.json()["detail"] and "diverge" in resp.json()["detail"]


def test_a_striped_volume_takes_several_writers(nodes: Nodes):
    for n in ("n1", "n2", "n3"):
        nodes.add(n, transports=NVME)
    nodes.vpg("wide", "raid0")
    vol = nodes.create("v", GiB, "wide").json()
    mode = "MULTI_NODE_MULTI_WRITER"
    assert attach(nodes, vol["id"], "n1", mode=mode).status_code == 200
    assert attach(nodes, vol["id"], "n3", mode=mode).status_code == 200


def _legs(resp) -> list[tuple[int, str]]:  # noqa: ANN001
    return [(x["index"], x["node_id"]) for x in resp.json()["connection"]["legs"]]


def test_a_raid1_whose_leg_node_is_down_is_still_published_with_its_live_leg(nodes: Nodes):
    for n in ("n1", "n2", "n3"):
        nodes.add(n, transports=NVME)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe", requisite_nodes=["n1"]).json()
    down = vol["legs"][1]["node_id"]
    up = next(n for n in ("n1", "n2", "n3") if n not in ("n1", down))
    nodes.pass_time(60, "n1", up)
    local = attach(nodes, vol["id"], "n1")
    assert local.status_code == 200, local.text
    assert _legs(local) == [(0, "n1")]  # only what it can reach: md runs degraded
    got = nodes.api.get(f"/v1/volumes/{vol['id']}").json()
    assert f"degraded: leg 1 on {down}" in got["condition"]
    assert nodes.api.delete(f"/v1/volumes/{vol['id']}/attachments/n1").status_code in (200, 204)
    remote = attach(nodes, vol["id"], up)  # from a node holding no leg
    assert remote.status_code == 200, remote.text
    assert _legs(remote) == [(0, "n1")]
    assert exports(nodes, down) == {}


def test_a_raid0_whose_leg_node_is_down_cannot_be_published(nodes: Nodes):
    for n in ("n1", "n2"):
        nodes.add(n, transports=NVME)
    nodes.vpg("wide", "raid0")
    vol = nodes.create("v", GiB, "wide", requisite_nodes=["n1"]).json()
    nodes.pass_time(60, "n1")
    resp = attach(nodes, vol["id"], "n1")
    assert resp.status_code == 503, resp.text
    assert "n2" in resp.json()["detail"]


def test_a_raid10_is_published_while_each_chunk_has_a_reachable_copy(nodes: Nodes):
    for n in ("n1", "n2", "n3", "n4", "n5"):
        nodes.add(n, transports=NVME)
    nodes.vpg("wide", "raid10", legs=4)
    vol = nodes.create("v", GiB, "wide", requisite_nodes=["n1"]).json()
    leg = {x["index"]: x["node_id"] for x in vol["legs"]}
    spare = ({"n1", "n2", "n3", "n4", "n5"} - set(leg.values())).pop()
    nodes.pass_time(60, leg[0], leg[1], spare)  # legs 2 and 3: the same chunks, both gone
    resp = attach(nodes, vol["id"], spare)
    assert resp.status_code == 503, resp.text
    assert "legs 2 and 3 hold the same chunks" in resp.json()["detail"]
    nodes.pass_time(60, leg[0], leg[3], spare)  # legs 1 and 2 gone: (0,1), (2,3) each keep one
    resp = attach(nodes, vol["id"], spare)
    assert resp.status_code == 200, resp.text
    assert _legs(resp) == [(0, leg[0]), (3, leg[3])]


def test_a_mirror_published_while_an_expand_is_half_done_is_composed_at_its_old_size(
    nodes: Nodes,
):
    for n in ("n1", "n2"):
        nodes.add(n, transports=NVME)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe", requisite_nodes=["n1"]).json()
    nodes.agents["n2"].fail.add("resize")
    grown = nodes.api.post(f"/v1/volumes/{vol['id']}/expand", json={"size_bytes": 2 * GiB})
    assert grown.status_code == 503, grown.text  # n1's leg grew, n2's did not
    resp = attach(nodes, vol["id"], "n1")
    assert resp.status_code == 200, resp.text
    assert resp.json()["connection"]["data_bytes"] == GiB  # not beyond n2's leg
    nodes.agents["n2"].fail.clear()
    done = nodes.api.post(f"/v1/volumes/{vol['id']}/expand", json={"size_bytes": 2 * GiB})
    assert done.status_code == 200, done.text
    assert attach(nodes, vol["id"], "n1").json()["connection"]["data_bytes"] == 2 * GiB
