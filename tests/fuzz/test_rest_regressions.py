"""Every failure the REST fuzzer (test_rest_schemathesis.py) found, as the exact request.

Each test sends what schemathesis sent, to real management and node-agent
processes, and asserts the fixed answer; where the finding was that the
OpenAPI document did not state a rule the server enforces, it also checks
that the document now states it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tessera.errors import PROBLEM_JSON, PROBLEM_TYPE_PREFIX
from tessera.ids import new_volume_id
from tests.conftest import needs_root
from tests.fuzz.rest_fixtures import POOL, TOKEN, RestStack, running_stack

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestStack]:
    with running_stack(tmp_path_factory.mktemp("rest-regressions"), 512 * MiB) as rest:
        yield rest


@pytest.fixture(scope="module")
def management(stack: RestStack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, headers=AUTH, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def agent(stack: RestStack) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(uds=str(stack.agent_socket))
    with httpx.Client(
        transport=transport, base_url="http://agent", headers=AUTH, timeout=30
    ) as client:
        yield client


def problem(reply: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == PROBLEM_JSON
    body = reply.json()
    assert body["type"] == PROBLEM_TYPE_PREFIX + kind, body
    return body


def schema_of(client: httpx.Client, name: str) -> dict[str, Any]:
    return client.get("/openapi.json").json()["components"]["schemas"][name]


def test_an_unknown_query_parameter_is_refused_not_ignored(management: httpx.Client) -> None:
    # was 200: a misspelt parameter silently answered another question
    reply = management.get("/v1/capacity?=null&node_id=&%C3%9D%C2%96%5C=null")
    body = problem(reply, 422, "invalid-argument")
    assert "unknown query parameter" in body["detail"]


def test_a_misspelt_page_size_names_the_parameter(management: httpx.Client) -> None:
    body = problem(management.get("/v1/volumes?max_entrie=5"), 422, "invalid-argument")
    assert body["field"] == "max_entrie"


def test_an_empty_agent_url_is_refused_and_the_document_says_why(
    management: httpx.Client,
) -> None:
    # was a 422 the OpenAPI document did not predict (any string was "valid")
    body = problem(management.put("/v1/nodes/0", json={"agent_url": ""}), 422, "invalid-argument")
    assert body["field"] == "agent_url"
    assert "unix:///" in body["detail"]
    assert "pattern" in schema_of(management, "NodeRegistration")["properties"]["agent_url"]


@pytest.mark.parametrize(
    "agent_url",
    [
        "https://[f0D]",  # urlsplit: not an IPv6 address
        "http://3S..dT1w2ujF:65292/x",  # getaddrinfo: UnicodeError, label empty
        "http://" + "a" * 64 + ":1",  # getaddrinfo: UnicodeError, label too long
    ],
)
def test_an_agent_url_no_resolver_can_use_is_refused_at_registration(
    management: httpx.Client, agent_url: str
) -> None:
    # was accepted; POST /v1/reconcile then answered 500 when it tried the agent
    body = problem(
        management.put("/v1/nodes/1.N.L.tT", json={"agent_url": agent_url}),
        422,
        "invalid-argument",
    )
    assert body["field"] == "agent_url"
    assert management.post("/v1/reconcile").status_code == 200


def test_topology_with_a_control_character_key_or_a_non_text_value_is_refused(
    management: httpx.Client,
) -> None:
    # was a 422 the document did not predict: its schema let any key through
    reply = management.put(
        "/v1/nodes/qy.Sc.y.so",
        json={"topology": {"\t": [944, True, "/u"]}, "agent_url": "unix:///x", "max_volumes": 1},
    )
    problem(reply, 422, "invalid-argument")
    topology = schema_of(management, "NodeRegistration")["properties"]["topology"]
    assert topology["additionalProperties"] is False


def test_a_volume_name_filter_with_a_control_character_is_refused_as_documented(
    management: httpx.Client,
) -> None:
    problem(management.get("/v1/volumes?name=%0C"), 422, "invalid-argument")
    params = management.get("/openapi.json").json()["paths"]["/v1/volumes"]["get"]["parameters"]
    name = next(p for p in params if p["name"] == "name")
    assert "pattern" in name["schema"]


def test_a_trailing_slash_is_no_such_route_not_a_redirect_to_the_list(
    management: httpx.Client,
) -> None:
    # was a 307 to GET /v1/volumes, whose Page answer did not match the Volume schema
    reply = management.get("/v1/volumes/", follow_redirects=False)
    problem(reply, 404, "no-such-route")


def test_a_volume_id_that_names_another_route_gets_a_documented_405(
    management: httpx.Client,
) -> None:
    # POST /v1/volumes/{volume_id}/expand with volume_id "expand": 405 was undocumented
    reply = management.post("/v1/volumes/expand", content=b"K\xff\xfe")
    problem(reply, 405, "no-such-route")
    responses = management.get("/openapi.json").json()["paths"]["/v1/volumes/{volume_id}"]
    assert "405" in responses["get"]["responses"]


def test_a_view_key_outside_the_rule_is_refused_as_the_document_says(
    agent: httpx.Client,
) -> None:
    # was a 422 for a key the document called valid (no pattern on view_key)
    volume_id = new_volume_id()
    key = "%F1%B3%AF%93%C2%80%C2%B1%C3%9C%F1%A1%BF%BDNw%F2%9A%BC%ABs%C2%8B"
    body = problem(agent.put(f"/v1/attachments/{volume_id}/views/{key}"), 422, "invalid-argument")
    assert body["field"] == "view_key"
    path = agent.get("/openapi.json").json()["paths"][
        "/v1/attachments/{volume_id}/views/{view_key}"
    ]
    view_key = next(p for p in path["put"]["parameters"] if p["name"] == "view_key")
    assert re.fullmatch(view_key["schema"]["pattern"].strip("^$"), "abc-1")


def test_the_agent_refuses_a_volume_larger_than_its_pool(
    agent: httpx.Client, stack: RestStack
) -> None:
    # was a sparse file of any size (up to 2**63 - 1 bytes) on a 512 MiB pool
    volume_id = new_volume_id()
    reply = agent.put(f"/v1/volumes/{volume_id}", json={"pool": POOL, "size_bytes": 2**62})
    assert problem(reply, 422, "out-of-range")["field"] == "size_bytes"
    assert not (stack.pool_dir / "volumes" / f"{volume_id}.img").exists()
    created = agent.put(f"/v1/volumes/{volume_id}", json={"pool": POOL, "size_bytes": MiB})
    assert created.status_code == 200
    try:
        grown = agent.post(f"/v1/volumes/{volume_id}/resize", json={"size_bytes": 2**62})
        problem(grown, 422, "out-of-range")
        assert agent.get(f"/v1/volumes/{volume_id}").json()["size_bytes"] == MiB
    finally:
        assert agent.delete(f"/v1/volumes/{volume_id}").status_code == 204
