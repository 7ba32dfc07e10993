"""`GET /v1/volumes?name=`: how the CLI (and any client) turns a volume's name into the volume."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.unit.management_fixtures import GiB, create, is_problem

pytest_plugins = ["tests.unit.management_fixtures"]


def test_name_filter_answers_exactly_the_volume_of_that_name(cluster: TestClient) -> None:
    wanted = create(cluster, "alpha", GiB)
    create(cluster, "alphabet", GiB)
    resp = cluster.get("/v1/volumes", params={"name": "alpha"})
    assert resp.status_code == 200
    assert resp.json() == {"items": [wanted], "next_token": ""}


def test_name_filter_with_no_such_name_is_an_empty_list_not_an_error(cluster: TestClient) -> None:
    create(cluster, "present", GiB)
    resp = cluster.get("/v1/volumes", params={"name": "absent"})
    assert resp.status_code == 200
    assert resp.json() == {"items": [], "next_token": ""}


def test_name_no_volume_could_have_is_a_problem_naming_the_field(cluster: TestClient) -> None:
    for name in ("bad\x01name", "n" * 129):
        resp = cluster.get("/v1/volumes", params={"name": name})
        assert resp.status_code == 422 and is_problem(resp), resp.text
        assert resp.json()["field"] == "name"
