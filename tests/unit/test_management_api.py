"""Management REST surface: auth, problem+json errors, inventory, pagination."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from management.__main__ import parse_listen
from management.app import create_app
from tests.unit.management_fixtures import TOKEN, GiB, add_node, create, is_problem

pytest_plugins = ["tests.unit.management_fixtures"]

# ---- auth and health -----------------------------------------------------------------


def test_healthz_needs_no_token(db_url):
    client = TestClient(create_app(db_url, TOKEN))
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": "Basic x"}],
)
def test_v1_without_the_right_token_is_401_problem(db_url, headers):
    client = TestClient(create_app(db_url, TOKEN))
    resp = client.get("/v1/volumes", headers=headers)
    assert resp.status_code == 401
    assert is_problem(resp)
    assert resp.json()["type"].endswith("/unauthenticated")
    assert resp.headers["www-authenticate"] == "Bearer"


def test_openapi_document_lists_the_contract_routes(api):
    paths = api.get("/openapi.json").json()["paths"]
    for path in (
        "/v1/volumes",
        "/v1/volumes/{volume_id}",
        "/v1/volumes/{volume_id}/attachments/{node_id}",
        "/v1/capacity",
        "/v1/nodes/{node_id}/pools/{pool}",
    ):
        assert path in paths


def test_listen_accepts_tcp_and_unix_socket():
    assert parse_listen("unix:///run/t.sock") == {"uds": "/run/t.sock"}
    assert parse_listen("0.0.0.0:8080") == {"host": "0.0.0.0", "port": 8080}
    assert parse_listen("[::1]:9") == {"host": "::1", "port": 9}


# ---- errors are always problem+json ----------------------------------------------------


def test_validation_errors_name_each_field(api):
    resp = api.post("/v1/volumes", json={"name": "", "size_bytes": 0, "colour": "red"})
    assert resp.status_code == 422
    assert is_problem(resp)
    detail = resp.json()["detail"]
    assert "size_bytes: must be greater than 0" in detail
    assert "name:" in detail
    assert "colour: is not a known field" in detail
    assert {e["field"] for e in resp.json()["errors"]} == {"name", "size_bytes", "colour"}


def test_malformed_json_is_400_problem(api):
    resp = api.post("/v1/volumes", content=b"{nope", headers={"content-type": "application/json"})
    assert resp.status_code == 400
    assert is_problem(resp)
    assert "not valid JSON" in resp.json()["detail"]


def test_unknown_route_is_problem_json_not_html(api):
    resp = api.get("/v1/nothing-here")
    assert resp.status_code == 404
    assert is_problem(resp)


def test_unexpected_failure_is_500_problem_without_traceback(db_url, monkeypatch):
    from management import volumes

    def boom(*_a, **_k):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(volumes, "list_volumes", boom)
    client = TestClient(
        create_app(db_url, TOKEN),
        headers={"Authorization": f"Bearer {TOKEN}"},
        raise_server_exceptions=False,
    )
    resp = client.get("/v1/volumes")
    assert resp.status_code == 500
    assert is_problem(resp)
    assert "secret" not in resp.text and "Traceback" not in resp.text


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=10,
)
_fields = st.sampled_from(
    ["name", "size_bytes", "limit_bytes", "vpg", "locality", "requisite_nodes", "parameters"]
)
_junk_volume = (
    st.dictionaries(_fields, _json, max_size=7).filter(
        lambda d: not (isinstance(d.get("name"), str) and type(d.get("size_bytes")) is int)
    )
    | st.fixed_dictionaries(
        {"name": st.text(min_size=1, max_size=10), "size_bytes": st.integers(max_value=0)}
    )
    | st.fixed_dictionaries({"name": st.just("big"), "size_bytes": st.integers(min_value=2**63)})
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=_json | _junk_volume)
def test_bad_input_is_problem_json_never_500(api, body):
    resp = api.post(
        "/v1/volumes", content=json.dumps(body), headers={"content-type": "application/json"}
    )
    assert 400 <= resp.status_code < 500, resp.text
    assert is_problem(resp)
    assert resp.json()["detail"]


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=st.binary(max_size=40))
def test_garbage_bytes_are_rejected_as_problem_json(api, raw):
    resp = api.post("/v1/volumes", content=raw, headers={"content-type": "application/json"})
    assert 400 <= resp.status_code < 500
    assert is_problem(resp)


# ---- inventory -----------------------------------------------------------------------


def test_default_vpg_exists_and_is_concat(api):
    assert api.get("/v1/vpgs").json()["items"] == [
        {"name": "default", "layout": "concat", "legs": 1, "chunk_bytes": 0}
    ]


def test_other_layouts_are_refused_with_clear_message(api):
    resp = api.post("/v1/vpgs", json={"name": "fast", "layout": "stripe"})
    assert resp.status_code == 422
    assert is_problem(resp)
    body = resp.json()
    assert body["field"] == "layout"
    assert "'stripe' is not one of concat, raid0, raid1, raid10" in body["detail"]


def test_creating_a_vpg_is_idempotent(api):
    assert api.post("/v1/vpgs", json={"name": "gold"}).status_code == 201
    assert api.post("/v1/vpgs", json={"name": "gold", "layout": "concat"}).status_code == 200
    names = [v["name"] for v in api.get("/v1/vpgs").json()["items"]]
    assert names == ["default", "gold"]


def test_registered_node_is_online_until_heartbeats_stop(db_url, agent):
    app = create_app(db_url, TOKEN, heartbeat_interval=10, heartbeat_misses=3)
    ctx = app.state.ctx
    now = [1000.0]
    ctx.clock = lambda: now[0]
    client = TestClient(app, headers={"Authorization": f"Bearer {TOKEN}"})
    add_node(client, "n1", agent.url, {"p": GiB})
    assert client.get("/v1/nodes/n1").json()["online"] is True
    now[0] += 31
    node = client.get("/v1/nodes/n1").json()
    assert node["online"] is False and node["state"] == "unreachable"
    assert client.post("/v1/volumes", json={"name": "v", "size_bytes": 1}).status_code == 507
    assert client.post("/v1/nodes/n1/heartbeat").status_code == 200
    node = client.get("/v1/nodes/n1").json()
    assert node["online"] is True and node["last_heartbeat"] == now[0]
    assert node["state"] == "online"


def test_heartbeat_of_unknown_node_is_404(api):
    resp = api.post("/v1/nodes/ghost/heartbeat")
    assert resp.status_code == 404 and is_problem(resp)


def test_pool_on_unregistered_node_is_404(api):
    resp = api.put("/v1/nodes/ghost/pools/p", json={"capacity_bytes": GiB})
    assert resp.status_code == 404
    assert resp.json()["field"] == "node_id"


def test_pools_report_allocation(cluster):
    create(cluster, "a", GiB, requisite_nodes=["n2"])
    pools = {p["name"]: p for p in cluster.get("/v1/pools").json()["items"]}
    assert pools["p2"]["allocated_bytes"] == GiB
    assert pools["p2"]["free_bytes"] == 3 * GiB
    assert pools["p1"]["allocated_bytes"] == 0


def test_bad_agent_url_is_refused(api):
    resp = api.put("/v1/nodes/n1", json={"agent_url": "ftp://x"})
    assert resp.status_code == 422 and resp.json()["field"] == "agent_url"


# ---- pagination ----------------------------------------------------------------------


def _all_pages(api, path, max_entries):
    seen, token = [], ""
    while True:
        page = api.get(path, params={"max_entries": max_entries, "page_token": token}).json()
        seen += page["items"]
        token = page["next_token"]
        if not token:
            return seen


def test_pages_cover_every_volume_once(cluster):
    made = {create(cluster, f"v{i}", 1)["id"] for i in range(7)}
    seen = [v["id"] for v in _all_pages(cluster, "/v1/volumes", 3)]
    assert sorted(seen) == sorted(made)


def test_pagination_token_survives_deleted_items(cluster):
    for i in range(6):
        create(cluster, f"v{i}", 1)
    first = cluster.get("/v1/volumes", params={"max_entries": 2}).json()
    # delete the item the token points at, and one before it
    for v in first["items"]:
        assert cluster.delete(f"/v1/volumes/{v['id']}").status_code == 204
    rest = cluster.get("/v1/volumes", params={"page_token": first["next_token"]}).json()
    assert len(rest["items"]) == 4
    assert rest["next_token"] == ""


def test_malformed_page_token_is_invalid_argument(api):
    for token in ("not-base64!", "eyJ4Ijox", "W10"):
        resp = api.get("/v1/volumes", params={"page_token": token})
        assert resp.status_code == 422
        assert resp.json()["field"] == "page_token"


def test_huge_max_entries_is_clamped_not_refused(cluster):
    create(cluster, "a", 1)
    resp = cluster.get("/v1/volumes", params={"max_entries": 10**6})
    assert resp.status_code == 200 and len(resp.json()["items"]) == 1


def test_node_and_pool_lists_paginate(api, agent):
    for i in range(5):
        add_node(api, f"n{i}", agent.url, {"a": GiB, "b": GiB})
    assert len(_all_pages(api, "/v1/nodes", 2)) == 5
    assert len(_all_pages(api, "/v1/pools", 3)) == 10


def test_console_entry_point_serves_on_a_unix_socket(tmp_path):
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from tessera.clients import ManagementClient

    sock = Path(tempfile.mkdtemp(prefix="tsm-")) / "m.sock"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    log = tmp_path / "log"
    args = ["--listen", f"unix://{sock}", "--db", f"sqlite:///{tmp_path / 'm.db'}"]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "management", *args, "--token-file", str(token_file)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    client = ManagementClient(f"unix://{sock}", TOKEN)
    try:
        deadline = time.monotonic() + 20
        while not client.healthy():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert [v.name for v in client.list_vpgs().items] == ["default"]
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
    assert TOKEN not in log.read_text()
