"""Vpgs with layouts (raid0/raid1/raid10): legs and chunk checked, resolved and stored."""

from __future__ import annotations

import pytest

from tests.unit.management_fixtures import is_problem

pytest_plugins = ["tests.unit.management_fixtures"]

KiB = 1024


@pytest.mark.parametrize(
    ("body", "resolved"),
    [
        ({"layout": "raid1"}, (2, 0)),
        ({"layout": "raid1", "legs": 3}, (3, 0)),
        ({"layout": "raid0"}, (2, 64 * KiB)),
        ({"layout": "raid0", "legs": 4, "chunk_bytes": 4 * KiB}, (4, 4 * KiB)),
        ({"layout": "raid10"}, (4, 64 * KiB)),
        ({"layout": "raid10", "legs": 3, "chunk_bytes": 1024 * KiB}, (3, 1024 * KiB)),
        ({"layout": "concat"}, (1, 0)),
    ],
)
def test_a_vpg_gets_its_layouts_default_legs_and_chunk_and_keeps_them(api, body, resolved):
    resp = api.post("/v1/vpgs", json={"name": "g", **body})
    assert resp.status_code == 201, resp.text
    assert (resp.json()["legs"], resp.json()["chunk_bytes"]) == resolved
    listed = {v["name"]: v for v in api.get("/v1/vpgs").json()["items"]}
    assert (listed["g"]["legs"], listed["g"]["chunk_bytes"]) == resolved
    again = api.post("/v1/vpgs", json={"name": "g", **body})
    assert again.status_code == 200 and again.json() == resp.json()


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"layout": "raid1", "legs": 4}, "legs", "outside 2-3"),
        ({"layout": "raid1", "legs": 1}, "legs", "outside 2-3"),
        ({"layout": "raid0", "legs": 1}, "legs", "outside 2-16"),
        ({"layout": "raid10", "legs": 2}, "legs", "outside 3-16"),
        ({"layout": "concat", "legs": 2}, "legs", "outside 1-1"),
        ({"layout": "raid0", "chunk_bytes": 2048}, "chunk_bytes", "power of two"),
        ({"layout": "raid0", "chunk_bytes": 12288}, "chunk_bytes", "power of two"),
        ({"layout": "raid1", "chunk_bytes": 65536}, "chunk_bytes", "striped layouts"),
        ({"layout": "raid5"}, "layout", "not one of"),
    ],
)
def test_a_vpg_the_layout_cannot_have_is_refused_naming_the_field(api, body, field, says):
    resp = api.post("/v1/vpgs", json={"name": "g", **body})
    assert resp.status_code == 422 and is_problem(resp), resp.text
    assert resp.json()["field"] == field
    assert says in resp.json()["detail"]
    assert [v["name"] for v in api.get("/v1/vpgs").json()["items"]] == ["default"]


def test_a_vpg_asked_again_with_other_legs_is_a_conflict_naming_legs(api):
    assert api.post("/v1/vpgs", json={"name": "g", "layout": "raid1"}).status_code == 201
    resp = api.post("/v1/vpgs", json={"name": "g", "layout": "raid1", "legs": 3})
    assert resp.status_code == 409 and resp.json()["field"] == "legs"
    assert "legs 2, not 3" in resp.json()["detail"]
