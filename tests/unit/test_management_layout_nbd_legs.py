"""nbd legs of composed volumes, management's side: which transport each remote leg comes
over (the StorageClass's `transport`, else nvme-tcp where both nodes offer it, else nbd where
the leg's node serves nbd and the consumer has the kernel nbd client), what each owner is
asked, what the consumer's connection says, degraded publishes and repairs with nbd legs, and
a database made before nbd legs. SQLite and PostgreSQL, real-file agents on unix sockets
(the kernel nbd data path itself runs in the VM suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from management.attachments import leg_transport, refresh_connection
from management.db import Database
from management.schema import NodeRow, VolumeRow
from tessera.errors import FailedPrecondition
from tessera.models import AgentAttach, Connection
from tessera.nvme_names import subsystem_nqn
from tests.unit.layout_fixtures import Nodes, running_nodes
from tests.unit.management_fixtures import GiB

pytest_plugins = ["tests.unit.management_fixtures", "tests.unit.layout_fixtures"]

NVME = ["loop", "nbd", "nvme-tcp"]
NBD = ["loop", "nbd"]

BOTH, NBD_ONLY, NVME_ONLY = "loop,nbd,nvme-tcp", "loop,nbd", "loop,nvme-tcp"
NO_KERNEL = "node n1 has no kernel nbd client"

#: (parameters.transport, consumer n1 offers, n1 has the kernel nbd client, leg node n2
#: offers) -> the leg's transport, or what the refusal must name
CHOICES = [
    ("", BOTH, True, BOTH, "nvme-tcp"),
    ("", BOTH, False, BOTH, "nvme-tcp"),
    ("", BOTH, True, NBD_ONLY, "nbd"),
    ("", BOTH, False, NBD_ONLY, ["node n2 offers loop, nbd", NO_KERNEL]),
    ("", BOTH, True, NVME_ONLY, "nvme-tcp"),
    ("", BOTH, False, NVME_ONLY, "nvme-tcp"),
    ("", NBD_ONLY, True, BOTH, "nbd"),
    ("", NBD_ONLY, False, BOTH, ["node n1 offers loop, nbd", NO_KERNEL]),
    ("", NBD_ONLY, True, NVME_ONLY, ["node n1 offers loop, nbd", "node n2 offers loop, nvme-tcp"]),
    ("nvme-tcp", BOTH, True, BOTH, "nvme-tcp"),
    ("nvme-tcp", BOTH, False, BOTH, "nvme-tcp"),
    ("nvme-tcp", BOTH, True, NBD_ONLY, ["node n2 offers loop, nbd"]),
    ("nvme-tcp", BOTH, False, NBD_ONLY, ["node n2 offers loop, nbd"]),
    ("nvme-tcp", BOTH, True, NVME_ONLY, "nvme-tcp"),
    ("nvme-tcp", BOTH, False, NVME_ONLY, "nvme-tcp"),
    ("nvme-tcp", NBD_ONLY, True, BOTH, ["node n1 offers loop, nbd"]),
    ("nbd", BOTH, True, BOTH, "nbd"),
    ("nbd", BOTH, False, BOTH, [NO_KERNEL]),
    ("nbd", BOTH, True, NBD_ONLY, "nbd"),
    ("nbd", BOTH, False, NBD_ONLY, [NO_KERNEL]),
    ("nbd", BOTH, True, NVME_ONLY, ["node n2 offers loop, nvme-tcp"]),
    ("nbd", BOTH, False, NVME_ONLY, ["node n2 offers loop, nvme-tcp", NO_KERNEL]),
    ("nbd", NBD_ONLY, True, NBD_ONLY, "nbd"),
]


@pytest.mark.parametrize(("forced", "user", "kernel", "leg", "expected"), CHOICES)
def test_each_remote_leg_comes_over_the_transport_both_nodes_can_do(
    forced: str, user: str, kernel: bool, leg: str, expected: str | list[str]
) -> None:
    volume = VolumeRow(
        id="vol-1", layout="raid1", parameters={"transport": forced} if forced else {}
    )
    consumer = NodeRow(id="n1", transports=user, kernel_nbd=kernel)
    holder = NodeRow(id="n2", transports=leg, kernel_nbd=False)
    if isinstance(expected, str):
        assert leg_transport(volume, consumer, holder).value == expected
        return
    with pytest.raises(FailedPrecondition) as refused:
        leg_transport(volume, consumer, holder)
    message = refused.value.message
    assert all(why in message for why in expected), message
    assert "leg on node n2 that node n1 cannot reach" in message
    assert ("parameters.transport" in message) == bool(forced)
    assert refused.value.field == "node_id"


def attach(nodes: Nodes, vol: str, node: str, mode: str = "SINGLE_NODE_WRITER", ro: bool = False):  # noqa: ANN201
    body = {"access_mode": mode, "readonly": ro}
    return nodes.api.put(f"/v1/volumes/{vol}/attachments/{node}", json=body)


def _legs(conn: dict) -> list[tuple[int, str, str]]:
    return [(leg["index"], leg["node_id"], leg["transport"]) for leg in conn["legs"]]


def _mirror(nodes: Nodes, leg_node_transports: list[str], **extra: object) -> tuple[dict, str]:
    """A raid1 volume on n1 (kernel nbd client, nvme-tcp) and n2 (offering what is given)."""
    nodes.add("n1", transports=NVME, kernel_nbd=True)
    nodes.add("n2", transports=leg_node_transports)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe", requisite_nodes=["n1"], **extra)
    assert vol.status_code in (200, 201), vol.text
    return vol.json(), "n2"


def test_a_mirror_leg_on_a_node_without_nvme_comes_over_nbd_with_the_attachments_key(
    nodes: Nodes,
):
    vol, other = _mirror(nodes, NBD)
    resp = attach(nodes, vol["id"], "n1")
    assert resp.status_code == 200, resp.text
    conn = resp.json()["connection"]
    export = nodes.agents[other].exports[(vol["id"], "n1")]
    assert conn["legs"] == [
        {"index": 0, "node_id": "n1", "transport": "loop", "host": "", "port": 0,
         "subsystem_nqn": "", "state": "in_sync"},
        {"index": 1, "node_id": other, "transport": "nbd", "host": "192.0.2.1",
         "port": nodes.agents[other].ports[(vol["id"], "n1")], "subsystem_nqn": "",
         "state": "in_sync"},
    ]  # fmt: skip
    assert conn["psk_identity"] == "n1"  # the TLS-PSK identity the bridge presents
    assert "psk_key" not in resp.text
    assert export.transport == "nbd" and export.psk_identity == "n1"
    assert nodes.agents["n1"].keys[vol["id"]].psk_key == export.psk_key  # the one key
    again = attach(nodes, vol["id"], "n1")  # a retry answers the same
    assert again.status_code == 200 and again.json()["connection"] == conn


def test_a_read_only_mirror_still_gets_read_write_nbd_legs_md_needs_one_view(nodes: Nodes):
    vol, other = _mirror(nodes, NBD)
    resp = attach(nodes, vol["id"], "n1", mode="SINGLE_NODE_READER_ONLY", ro=True)
    assert resp.status_code == 200, resp.text
    assert resp.json()["readonly"] and _legs(resp.json()["connection"])[1][2] == "nbd"
    assert not nodes.agents[other].exports[(vol["id"], "n1")].readonly


def test_a_striped_volume_mixes_nvme_and_nbd_legs_each_as_its_node_can(nodes: Nodes):
    nodes.add("n1", transports=NVME)
    nodes.add("n2", transports=NBD)
    nodes.add("n3", transports=["loop", "nvme-tcp"])
    nodes.add("n4", transports=NVME, kernel_nbd=True)
    nodes.vpg("wide", "raid0", legs=3)
    vol = nodes.create("v", GiB, "wide", requisite_nodes=["n1", "n2", "n3"]).json()
    holders = [leg["node_id"] for leg in vol["legs"]]
    resp = attach(nodes, vol["id"], "n4")
    assert resp.status_code == 200, resp.text
    want = {"n1": "nvme-tcp", "n2": "nbd", "n3": "nvme-tcp"}
    conn = resp.json()["connection"]
    assert _legs(conn) == [(i, n, want[n]) for i, n in enumerate(holders)]
    nqns = {leg["node_id"]: leg["subsystem_nqn"] for leg in conn["legs"]}
    assert nqns == {n: subsystem_nqn(vol["id"], n) if n != "n2" else "" for n in holders}
    assert {n: nodes.agents[n].exports[(vol["id"], "n4")].transport for n in holders} == want
    # detach closes every export, nbd and nvme-tcp alike
    assert nodes.api.delete(f"/v1/volumes/{vol['id']}/attachments/n4").status_code == 204
    assert all(nodes.agents[n].exports == {} for n in holders)


def test_the_storageclass_transport_nbd_gives_a_mirror_nbd_legs_though_nvme_is_there(
    nodes: Nodes,
):
    vol, other = _mirror(nodes, NVME, parameters={"transport": "nbd"})
    assert vol["parameters"]["transport"] == "nbd"  # no longer refused at create
    conn = attach(nodes, vol["id"], "n1").json()["connection"]
    assert _legs(conn) == [(0, "n1", "loop"), (1, other, "nbd")]


def test_forced_nbd_legs_are_refused_where_the_consumer_has_no_kernel_nbd_client(nodes: Nodes):
    nodes.add("n1", transports=NVME)
    nodes.add("n2", transports=NVME)
    nodes.vpg("safe", "raid1")
    params = {"transport": "nbd"}
    vol = nodes.create("v", GiB, "safe", requisite_nodes=["n1"], parameters=params).json()
    resp = attach(nodes, vol["id"], "n1")
    assert resp.status_code == 409, resp.text
    detail = resp.json()["detail"]
    assert NO_KERNEL in detail and "parameters.transport" in detail
    assert nodes.api.get(f"/v1/volumes/{vol['id']}/attachments").json()["items"] == []
    assert nodes.agents["n2"].exports == {}


def test_a_degraded_mirror_is_published_with_its_live_nbd_leg(nodes: Nodes):
    nodes.add("n1", transports=NBD)
    nodes.add("n2", transports=NVME)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe").json()  # legs on n1 and n2
    nodes.add("n3", transports=NVME, kernel_nbd=True)
    nodes.pass_time(60, "n1", "n3")  # n2 stops beating
    resp = attach(nodes, vol["id"], "n3")
    assert resp.status_code == 200, resp.text
    leg = {x["node_id"]: x["index"] for x in vol["legs"]}
    assert _legs(resp.json()["connection"]) == [(leg["n1"], "n1", "nbd")]  # md runs degraded
    assert nodes.agents["n2"].exports == {}


def _used_by_n1(nodes: Nodes, vol: dict) -> None:
    resp = attach(nodes, vol["id"], "n1")
    assert resp.status_code == 200, resp.text
    conn = Connection.model_validate(resp.json()["connection"])
    nodes.agents["n1"].attached[vol["id"]] = AgentAttach(connection=conn)


def _consumer_legs(nodes: Nodes, vol: dict) -> list[tuple[int, str, str, str]]:
    conn = nodes.agents["n1"].attached[vol["id"]].connection
    return [(leg.index, leg.node_id, leg.transport.value, leg.state.value) for leg in conn.legs]


def test_a_repair_gives_the_consumer_its_new_leg_over_nbd_and_keeps_the_others(nodes: Nodes):
    nodes.add("n1", transports=NVME, kernel_nbd=True)
    nodes.add("n2", transports=NVME)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe", requisite_nodes=["n1"]).json()
    _used_by_n1(nodes, vol)
    nodes.add("n3", transports=NBD)  # the only node left for a new leg serves nbd only
    nodes.agents["n1"].conditions[vol["id"]] = "degraded: leg 1 (n2) failed"
    fixed = nodes.api.post(f"/v1/volumes/{vol['id']}/repair")
    assert fixed.status_code == 200, fixed.text
    assert _consumer_legs(nodes, vol) == [
        (0, "n1", "loop", "in_sync"),
        (1, "n3", "nbd", "rebuilding"),
    ]
    export = nodes.agents["n3"].exports[(vol["id"], "n1")]
    assert export.transport == "nbd" and not export.readonly
    assert export.psk_key == nodes.agents["n1"].keys[vol["id"]].psk_key


def test_a_leg_the_consumer_holds_keeps_its_transport_when_its_node_gains_nvme(nodes: Nodes):
    # switching a live md member's device from nbd to nvme-tcp would make md drop the leg
    # and resync it: the transport a leg was exported over stays until it is replaced
    nodes.add("n1", transports=NVME, kernel_nbd=True)
    nodes.add("n2", transports=NBD)
    nodes.add("n3", transports=NVME)
    nodes.vpg("safe", "raid1", legs=3)
    vol = nodes.create("v", GiB, "safe", requisite_nodes=["n1"]).json()
    index = {x["node_id"]: x["index"] for x in vol["legs"]}
    _used_by_n1(nodes, vol)
    over = {node: transport for _, node, transport, _ in _consumer_legs(nodes, vol)}
    assert over == {"n1": "loop", "n2": "nbd", "n3": "nvme-tcp"}
    nodes.add("n2", transports=NVME)  # its agent restarted on a host that now has nvme-tcp
    nodes.add("n4", transports=NVME)
    nodes.agents["n1"].conditions[vol["id"]] = f"degraded: leg {index['n3']} (n3) failed"
    fixed = nodes.api.post(f"/v1/volumes/{vol['id']}/repair")
    assert fixed.status_code == 200, fixed.text
    assert sorted(_consumer_legs(nodes, vol)) == sorted([
        (index["n1"], "n1", "loop", "in_sync"),
        (index["n2"], "n2", "nbd", "in_sync"),
        (index["n3"], "n4", "nvme-tcp", "rebuilding"),
    ])  # fmt: skip


def test_a_node_says_whether_it_has_the_kernel_nbd_client_and_an_older_agent_has_not(
    nodes: Nodes,
):
    nodes.add("n1", transports=NVME, kernel_nbd=True)
    assert nodes.api.get("/v1/nodes/n1").json()["kernel_nbd"] is True
    nodes.add("n1", transports=NVME)  # re-registered by an agent that does not say
    assert nodes.api.get("/v1/nodes/n1").json()["kernel_nbd"] is False


def test_a_database_made_before_nbd_legs_opens_with_its_legs_still_over_nvme(
    db_url: str, tmp_path: Path
):
    names = ("n1", "n2", "n3")
    run = running_nodes(db_url, tmp_path, names)
    nodes = next(run)
    for n in names:
        nodes.add(n, transports=NVME)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe", requisite_nodes=["n1"]).json()
    before = attach(nodes, vol["id"], "n1").json()["connection"]
    run.close()
    old = Database(db_url)  # what the previous release made: neither column
    with old.write_connection() as conn:
        conn.exec_driver_sql("ALTER TABLE nodes DROP COLUMN kernel_nbd")
        conn.exec_driver_sql("ALTER TABLE attachment_legs DROP COLUMN transport")
    old.dispose()

    run = running_nodes(db_url, tmp_path, names)
    nodes = next(run)
    try:
        listed = nodes.api.get(f"/v1/volumes/{vol['id']}/attachments").json()["items"]
        assert [a["connection"] for a in listed] == [before]  # nvme-tcp legs, as they were
        assert _legs(before)[1][2] == "nvme-tcp"
        assert nodes.api.get("/v1/nodes/n2").json()["kernel_nbd"] is False
        for n in names:  # the upgraded agents register again (n1 has the kernel client)
            nodes.add(n, transports=NVME, kernel_nbd=n == "n1")
        assert nodes.api.get("/v1/nodes/n1").json()["kernel_nbd"] is True
        # a repair's refresh re-exports every leg over the transport it was made for
        refreshed = refresh_connection(nodes.ctx, vol["id"], "n1")
        assert refreshed is not None
        assert refreshed.connection.model_dump(mode="json") == before
        other = _legs(before)[1][1]
        assert nodes.agents[other].exports[(vol["id"], "n1")].transport == "nvme-tcp"
    finally:
        run.close()
