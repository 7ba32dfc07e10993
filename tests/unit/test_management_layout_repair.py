"""Degraded mirrored volumes and their repair: what the volume says, which leg is replaced
where, what each agent is asked (file, export with the attachment's key, the consumer's new
connection), rebuilding -> in_sync from the consumer's own report, and stale legs deleted
when their node returns. SQLite and PostgreSQL; agents serve real files on unix sockets
(the consumer side reports what the composed transport would: the md data path itself
runs in the VM suite)."""

from __future__ import annotations

from management.repair import needing_repair, refresh_reports
from tessera import layouts
from tests.unit.layout_fixtures import Nodes
from tests.unit.management_fixtures import GiB

pytest_plugins = ["tests.unit.management_fixtures", "tests.unit.layout_fixtures"]

NVME = ["loop", "nbd", "nvme-tcp"]
ALL = ("n1", "n2", "n3", "n4")
LEG = GiB + layouts.MD_DATA_OFFSET


def _mirror_used_on_n1(
    nodes: Nodes,
    names: tuple[str, ...] = ALL,
    mode: str = "SINGLE_NODE_WRITER",
    readonly: bool = False,
) -> tuple[dict, str]:
    """A raid1 volume with leg 0 on n1, attached there; and the node of its leg 1."""
    for n in names:
        nodes.add(n, transports=NVME)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe", requisite_nodes=["n1"]).json()
    body = {"access_mode": mode, "readonly": readonly}
    resp = nodes.api.put(f"/v1/volumes/{vol['id']}/attachments/n1", json=body)
    assert resp.status_code == 200, resp.text
    nodes.agents["n1"].attached[vol["id"]] = _attach_body(resp.json())
    return vol, vol["legs"][1]["node_id"]


def _attach_body(attachment: dict):  # noqa: ANN202 - what the CSI node would have sent
    from tessera.models import AgentAttach, Connection

    return AgentAttach(connection=Connection.model_validate(attachment["connection"]))


def comes_back(nodes: Nodes, node: str) -> dict:
    """The node heartbeats, closes the exports the reply no longer lists (as the real agent
    does: its file cannot be deleted while exported) and beats again; the second reply."""
    reply = nodes.api.post(f"/v1/nodes/{node}/heartbeat").json()
    keep = {(e["volume_id"], e["client_node"]) for e in reply["exports"]}
    agent = nodes.agents[node]
    for key in [k for k in agent.exports if k not in keep]:
        del agent.exports[key]
    return nodes.api.post(f"/v1/nodes/{node}/heartbeat").json()


def repair(nodes: Nodes, vol: dict) -> dict:
    resp = nodes.api.post(f"/v1/volumes/{vol['id']}/repair")
    assert resp.status_code == 200, resp.text
    return resp.json()


def consumer_legs(nodes: Nodes, vol: dict) -> list[tuple[int, str, str]]:
    conn = nodes.agents["n1"].attached[vol["id"]].connection
    return [(leg.index, leg.node_id, leg.state.value) for leg in conn.legs]


def test_a_leg_whose_node_died_is_replaced_resynced_and_its_old_file_deleted_on_return(
    nodes: Nodes,
):
    vol, lost = _mirror_used_on_n1(nodes)
    others = [n for n in ALL if n != lost]
    nodes.pass_time(60, *others)  # `lost` stops beating
    got = nodes.api.get(f"/v1/volumes/{vol['id']}").json()
    assert f"degraded: leg 1 on {lost}: node {lost} is unreachable" in got["condition"]
    assert needing_repair(nodes.ctx) == [vol["id"]]
    # md on n1 failed the leg it could no longer reach: that word discards it
    nodes.agents["n1"].conditions[vol["id"]] = f"degraded: leg 1 ({lost}) failed"

    fixed = repair(nodes, vol)
    live = [leg for leg in fixed["legs"] if leg["state"] != "stale"]
    (stale,) = [leg for leg in fixed["legs"] if leg["state"] == "stale"]
    assert (stale["index"], stale["node_id"]) == (1, lost)
    new = live[1]["node_id"]
    assert live[0]["node_id"] == "n1" and new not in ("n1", lost)
    assert (live[1]["index"], live[1]["state"], live[1]["size_bytes"]) == (1, "rebuilding", LEG)
    assert nodes.file(new, vol["id"]).stat().st_size == LEG  # its file made
    export = nodes.agents[new].exports[(vol["id"], "n1")]  # exported with the attachment's key
    assert export.transport == "nvme-tcp"
    assert export.psk_key == nodes.agents["n1"].keys[vol["id"]].psk_key
    # the consumer was handed the new leg list: the dead leg is never listed again
    assert consumer_legs(nodes, vol) == [(0, "n1", "in_sync"), (1, new, "rebuilding")]
    assert f"rebuilding: leg 1 on {new}" in fixed["condition"]

    nodes.agents["n1"].conditions[vol["id"]] = f"resyncing leg 1 ({new}): 43%"
    again = repair(nodes, vol)  # progress, nothing placed anew
    assert f"rebuilding: leg 1 on {new} (resyncing leg 1 ({new}): 43%)" in again["condition"]
    assert [leg["node_id"] for leg in again["legs"]] == [leg["node_id"] for leg in fixed["legs"]]

    nodes.agents["n1"].conditions[vol["id"]] = ""  # md finished
    done = repair(nodes, vol)
    assert [leg["state"] for leg in done["legs"]] == ["in_sync", "in_sync", "stale"]
    assert needing_repair(nodes.ctx) == []

    assert nodes.file(lost, vol["id"]) is not None
    beat = comes_back(nodes, lost)  # it returns: its stale leg is deleted, never re-added
    assert nodes.file(lost, vol["id"]) is None
    assert beat["exports"] == []  # its old export to n1 is closed too
    final = nodes.api.get(f"/v1/volumes/{vol['id']}").json()
    assert [(leg["node_id"], leg["state"]) for leg in final["legs"]] == [
        ("n1", "in_sync"),
        (new, "in_sync"),
    ]
    assert final["condition"] == ""


def test_a_leg_the_consumer_reports_failed_is_replaced_though_its_node_is_online(nodes: Nodes):
    vol, bad = _mirror_used_on_n1(nodes)
    nodes.agents["n1"].conditions[vol["id"]] = f"degraded: leg 1 ({bad}) failed"
    fixed = repair(nodes, vol)
    assert [(leg["node_id"], leg["state"]) for leg in fixed["legs"]][2] == (bad, "stale")
    assert fixed["legs"][1]["node_id"] not in ("n1", bad)
    comes_back(nodes, bad)  # online all along: its stale file goes once its export is closed
    assert nodes.file(bad, vol["id"]) is None


def test_a_repair_whose_new_leg_could_not_be_made_is_finished_by_the_next_call(nodes: Nodes):
    vol, bad = _mirror_used_on_n1(nodes)
    spare = [n for n in ALL if n not in ("n1", bad)]
    nodes.agents["n1"].conditions[vol["id"]] = f"degraded: leg 1 ({bad}) failed"
    for n in spare:
        nodes.agents[n].fail.add("create")
    assert nodes.api.post(f"/v1/volumes/{vol['id']}/repair").status_code == 503
    got = nodes.api.get(f"/v1/volumes/{vol['id']}").json()
    new = got["legs"][1]["node_id"]
    assert new in spare and got["legs"][1]["state"] == "rebuilding"
    assert f"rebuilding: leg 1 on {new}" in got["condition"]
    assert consumer_legs(nodes, vol) == [(0, "n1", "in_sync"), (1, bad, "in_sync")]  # not yet
    for n in spare:
        nodes.agents[n].fail.clear()
    fixed = repair(nodes, vol)
    assert fixed["legs"][1]["node_id"] == new  # the same leg, driven on
    assert nodes.file(new, vol["id"]).stat().st_size == LEG
    assert consumer_legs(nodes, vol) == [(0, "n1", "in_sync"), (1, new, "rebuilding")]


def test_a_repair_with_no_free_node_is_refused_and_changes_nothing(nodes: Nodes):
    vol, lost = _mirror_used_on_n1(nodes, ("n1", "n2"))
    nodes.pass_time(60, "n1")
    nodes.agents["n1"].conditions[vol["id"]] = f"degraded: leg 1 ({lost}) failed"
    resp = nodes.api.post(f"/v1/volumes/{vol['id']}/repair")
    assert resp.status_code == 507, resp.text
    assert "0 are eligible" in resp.json()["detail"]
    assert "holding no leg of the volume" in resp.json()["detail"]
    after = nodes.api.get(f"/v1/volumes/{vol['id']}").json()
    assert after["legs"] == vol["legs"]  # the dead leg is not made stale without a successor
    assert "degraded: leg 1" in after["condition"]


def test_a_new_leg_goes_to_a_zone_the_surviving_leg_does_not_use(nodes: Nodes):
    nodes.add("n1", zone="a", transports=NVME)
    nodes.add("n2", zone="b", transports=NVME)
    nodes.add("n3", zone="a", capacity=40 * GiB, transports=NVME)  # most room, same zone
    nodes.add("n4", zone="c", transports=NVME)
    nodes.vpg("safe", "raid1")
    vol = nodes.create("v", GiB, "safe", requisite_nodes=["n1"]).json()
    assert vol["legs"][1]["node_id"] in ("n2", "n4")
    lost = vol["legs"][1]["node_id"]
    nodes.pass_time(60, *[n for n in ALL if n != lost])
    assert nodes.api.post(f"/v1/nodes/{lost}/fence", json={}).status_code == 200
    fixed = repair(nodes, vol)
    assert fixed["legs"][1]["node_id"] == ({"n2", "n4"} - {lost}).pop()


def test_raid0_and_concat_volumes_cannot_be_repaired_and_say_why(nodes: Nodes):
    for n in ("n1", "n2"):
        nodes.add(n, transports=NVME)
    nodes.vpg("wide", "raid0")
    for name, vpg in (("s", "wide"), ("c", "default")):
        vol = nodes.create(name, GiB, vpg).json()
        resp = nodes.api.post(f"/v1/volumes/{vol['id']}/repair")
        assert resp.status_code == 409 and "only mirrored volumes" in resp.json()["detail"]


def test_a_healthy_mirror_is_left_as_it_is_by_a_repair(nodes: Nodes):
    vol, _other = _mirror_used_on_n1(nodes)
    calls_before = {n: list(a.calls) for n, a in nodes.agents.items()}
    fixed = repair(nodes, vol)
    assert fixed["legs"] == vol["legs"] and fixed["condition"] == ""
    for n, agent in nodes.agents.items():  # only the consumer was asked how it is
        new = agent.calls[len(calls_before[n]) :]
        assert new == ([("get_attachment", vol["id"])] if n == "n1" else [])


def test_a_partitioned_consumer_keeps_its_local_leg_the_only_current_copy(nodes: Nodes):
    """n1 (consumer, leg 0 local) is cut off from management and n2: md on n1 goes on
    writing leg 0 alone. Management only sees n1 silent: it must not discard leg 0 and
    keep n2's leg (which missed every write), nor delete n1's file when it returns."""
    vol, other = _mirror_used_on_n1(nodes)
    nodes.pass_time(60, *[n for n in ALL if n != "n1"])
    # a report n1 made before the cut (leg 1 fine then) must not count either
    fixed = repair(nodes, vol)
    assert fixed["legs"] == vol["legs"]
    comes_back(nodes, "n1")
    assert nodes.file("n1", vol["id"]) is not None
    assert nodes.file(other, vol["id"]) is not None


def test_an_unreachable_leg_node_nobody_reported_is_not_discarded_until_fenced(nodes: Nodes):
    vol, lost = _mirror_used_on_n1(nodes)
    nodes.pass_time(60, *[n for n in ALL if n != lost])
    assert repair(nodes, vol)["legs"] == vol["legs"]  # it may come back with its data
    assert nodes.api.post(f"/v1/nodes/{lost}/fence", json={}).status_code == 200
    fixed = repair(nodes, vol)
    assert (fixed["legs"][2]["node_id"], fixed["legs"][2]["state"]) == (lost, "stale")


def test_an_old_failure_report_does_not_discard_a_leg_once_the_consumer_is_silent(
    nodes: Nodes,
):
    vol, bad = _mirror_used_on_n1(nodes)
    nodes.agents["n1"].conditions[vol["id"]] = f"degraded: leg 1 ({bad}) failed"
    refresh_reports(nodes.ctx, vol["id"])  # recorded: leg 1 failed
    nodes.pass_time(60, *[n for n in ALL if n != "n1"])  # then n1 falls silent
    assert repair(nodes, vol)["legs"] == vol["legs"]


def test_a_repair_never_discards_the_last_in_sync_leg(nodes: Nodes):
    vol, other = _mirror_used_on_n1(nodes)
    nodes.agents["n1"].conditions[vol["id"]] = (
        f"degraded: leg 0 (n1) failed; degraded: leg 1 ({other}) failed"
    )
    resp = nodes.api.post(f"/v1/volumes/{vol['id']}/repair")
    assert resp.status_code == 409 and "no in-sync leg is left" in resp.json()["detail"]
    assert nodes.api.get(f"/v1/volumes/{vol['id']}").json()["legs"] == vol["legs"]


def test_a_raid10_repair_refuses_to_discard_both_legs_holding_the_same_chunks(nodes: Nodes):
    for n in ("n1", "n2", "n3", "n4", "n5"):
        nodes.add(n, transports=NVME)
    nodes.vpg("wide", "raid10", legs=4)
    vol = nodes.create("v", GiB, "wide", requisite_nodes=["n1"]).json()
    body = {"access_mode": "SINGLE_NODE_WRITER", "readonly": False}
    resp = nodes.api.put(f"/v1/volumes/{vol['id']}/attachments/n1", json=body)
    assert resp.status_code == 200, resp.text
    nodes.agents["n1"].attached[vol["id"]] = _attach_body(resp.json())
    leg = {x["index"]: x["node_id"] for x in vol["legs"]}
    nodes.agents["n1"].conditions[vol["id"]] = (
        f"degraded: leg 2 ({leg[2]}) failed; degraded: leg 3 ({leg[3]}) failed"
    )
    resp = nodes.api.post(f"/v1/volumes/{vol['id']}/repair")
    assert resp.status_code == 409, resp.text
    assert "bring leg 2 or 3 back" in resp.json()["detail"]
    assert nodes.api.get(f"/v1/volumes/{vol['id']}").json()["legs"] == vol["legs"]


def test_a_mirror_only_read_by_readers_is_not_repaired_into_ever_more_legs(nodes: Nodes):
    vol, bad = _mirror_used_on_n1(nodes, mode="MULTI_NODE_READER_ONLY", readonly=True)
    nodes.agents["n1"].conditions[vol["id"]] = f"degraded: leg 1 ({bad}) failed"
    resp = nodes.api.post(f"/v1/volumes/{vol['id']}/repair")
    assert resp.status_code == 409, resp.text
    assert "no read-write consumer" in resp.json()["detail"]
    assert nodes.api.get(f"/v1/volumes/{vol['id']}").json()["legs"] == vol["legs"]


def test_a_new_leg_not_added_yet_is_not_replaced_again(nodes: Nodes):
    vol, bad = _mirror_used_on_n1(nodes)
    nodes.agents["n1"].conditions[vol["id"]] = f"degraded: leg 1 ({bad}) failed"
    new = repair(nodes, vol)["legs"][1]["node_id"]
    nodes.agents["n1"].conditions[vol["id"]] = f"degraded: leg 1 ({new}) missing"
    again = repair(nodes, vol)
    assert [(x["node_id"], x["state"]) for x in again["legs"]] == [
        ("n1", "in_sync"), (new, "rebuilding"), (bad, "stale"),
    ]  # fmt: skip


def test_every_connection_after_a_repair_carries_a_newer_legs_generation(nodes: Nodes):
    """Kubernetes keeps the publish_context of the first publish: the node must be able to
    tell those legs from the ones a repair sent it since."""
    vol, bad = _mirror_used_on_n1(nodes)
    before = nodes.agents["n1"].attached[vol["id"]].connection.generation
    nodes.agents["n1"].conditions[vol["id"]] = f"degraded: leg 1 ({bad}) failed"
    repair(nodes, vol)
    sent = nodes.agents["n1"].attached[vol["id"]].connection.generation
    assert sent > before
    listed = nodes.api.get(f"/v1/volumes/{vol['id']}/attachments").json()["items"]
    assert listed[0]["connection"]["generation"] == sent


def test_a_volume_deleted_while_its_repair_makes_the_new_leg_leaves_no_file_behind(
    nodes: Nodes,
):
    vol, bad = _mirror_used_on_n1(nodes)
    nodes.agents["n1"].conditions[vol["id"]] = f"degraded: leg 1 ({bad}) failed"
    deleted = []

    def delete_meanwhile() -> None:  # the user detaches and deletes the volume right then
        nodes.agents["n1"].attached.clear()
        assert nodes.api.delete(f"/v1/volumes/{vol['id']}/attachments/n1").status_code < 300
        deleted.append(nodes.api.delete(f"/v1/volumes/{vol['id']}").status_code)

    spares = [n for n in ALL if n not in ("n1", bad)]
    for n in spares:
        nodes.agents[n].hooks["create"] = delete_meanwhile
    resp = nodes.api.post(f"/v1/volumes/{vol['id']}/repair")
    assert deleted and deleted[0] < 300
    assert resp.status_code in (404, 409), resp.text
    assert nodes.api.get(f"/v1/volumes/{vol['id']}").status_code == 404
    comes_back(nodes, bad)  # the discarded leg goes at its node's beat, as ever
    assert [n for n in ALL if nodes.file(n, vol["id"]) is not None] == []


def test_a_consumer_whose_detach_began_is_not_sent_legs_again_until_republished(
    nodes: Nodes,
):
    from management.attachments import refresh_connection

    vol, other = _mirror_used_on_n1(nodes)
    nodes.agents[other].fail.add("close_export")
    resp = nodes.api.delete(f"/v1/volumes/{vol['id']}/attachments/n1")
    assert resp.status_code == 503, resp.text  # the detach began; its retry finishes it
    sent_before = nodes.agents["n1"].calls.count(("attach", vol["id"]))
    assert refresh_connection(nodes.ctx, vol["id"], "n1") is None  # a repair's re-send
    assert nodes.agents["n1"].calls.count(("attach", vol["id"])) == sent_before
    nodes.agents[other].fail.clear()
    body = {"access_mode": "SINGLE_NODE_WRITER", "readonly": False}
    again = nodes.api.put(f"/v1/volumes/{vol['id']}/attachments/n1", json=body)
    assert again.status_code == 200, again.text  # published again: made ready again
    assert refresh_connection(nodes.ctx, vol["id"], "n1") is not None
