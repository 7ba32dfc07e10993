"""Concurrent requests on two management replicas sharing one database (SQLite and PostgreSQL).

Each test starts many requests at once through a barrier, split between two
apps on the same database (two replicas: on PostgreSQL nothing in-process
serialises them, only the database's locks), and checks that no two of them
passed a check only one may pass, and that none failed with a 500.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from management.app import create_app
from tests.unit.management_fixtures import TOKEN, GiB, MiB, add_node, create

pytest_plugins = ["tests.unit.management_fixtures"]

WORKERS = 8


@pytest.fixture
def replicas(db_url: str, api: TestClient) -> Iterator[list[TestClient]]:
    """`api` and a second app on the same database."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(db_url, TOKEN), headers=headers) as second:
        yield [api, second]


def at_once(
    replicas: list[TestClient], call: Callable[[TestClient, int], httpx.Response]
) -> list[httpx.Response]:
    """Run call(client, k) for k in range(WORKERS) at the same moment, alternating replicas."""
    barrier = threading.Barrier(WORKERS)
    answers: list[httpx.Response] = []

    def worker(k: int) -> None:
        client = replicas[k % len(replicas)]
        barrier.wait()
        answers.append(call(client, k))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == WORKERS
    return answers


def codes(answers: list[httpx.Response]) -> list[int]:
    return sorted(r.status_code for r in answers)


def show(answers: list[httpx.Response]) -> list[str]:
    """What the failing answers said (for the assertion message)."""
    return [f"{r.status_code} {r.text[:300]}" for r in answers if r.status_code >= 300]


def test_attaches_racing_for_a_nodes_last_slots_never_exceed_its_max_volumes(replicas, agent):
    api = replicas[0]
    add_node(api, "owner", agent.url, {"p": 10 * GiB})
    add_node(api, "small", agent.url, {}, max_volumes=3)
    vols = [create(api, f"v{k}", MiB)["id"] for k in range(WORKERS)]

    def attach(client: TestClient, k: int) -> httpx.Response:
        body = {"access_mode": "SINGLE_NODE_WRITER", "readonly": False}
        return client.put(f"/v1/volumes/{vols[k]}/attachments/small", json=body)

    answers = at_once(replicas, attach)
    assert codes(answers) == [200] * 3 + [507] * (WORKERS - 3), show(answers)
    attached = [v for v in vols if api.get(f"/v1/volumes/{v}").json()["published_nodes"]]
    assert len(attached) == 3


def test_single_writer_attaches_on_two_replicas_let_exactly_one_node_win(replicas, agent):
    api = replicas[0]
    add_node(api, "owner", agent.url, {"p": 10 * GiB})
    for k in range(WORKERS):
        add_node(api, f"c{k}", agent.url, {})
    vol = create(api, "pvc", MiB)["id"]

    def attach(client: TestClient, k: int) -> httpx.Response:
        body = {"access_mode": "SINGLE_NODE_WRITER", "readonly": False}
        return client.put(f"/v1/volumes/{vol}/attachments/c{k}", json=body)

    answers = at_once(replicas, attach)
    assert codes(answers) == [200] + [409] * (WORKERS - 1), show(answers)
    assert len(api.get(f"/v1/volumes/{vol}").json()["published_nodes"]) == 1


def test_creates_on_two_replicas_never_overcommit_a_pool(replicas, agent):
    api = replicas[0]
    add_node(api, "n1", agent.url, {"p": 20 * MiB})

    def make(client: TestClient, k: int) -> httpx.Response:
        return client.post("/v1/volumes", json={"name": f"w{k}", "size_bytes": 6 * MiB})

    answers = at_once(replicas, make)
    assert codes(answers) == [201] * 3 + [507] * (WORKERS - 3), show(answers)
    pool = api.get("/v1/pools").json()["items"][0]
    assert pool["allocated_bytes"] == 18 * MiB


def test_creates_of_one_name_on_two_replicas_make_one_volume(replicas, agent):
    api = replicas[0]
    add_node(api, "n1", agent.url, {"p": 10 * GiB})

    def make(client: TestClient, _k: int) -> httpx.Response:
        return client.post("/v1/volumes", json={"name": "same", "size_bytes": GiB})

    answers = at_once(replicas, make)
    assert codes(answers) == [200] * (WORKERS - 1) + [201], show(answers)
    assert len({r.json()["id"] for r in answers}) == 1
    assert len(api.get("/v1/volumes").json()["items"]) == 1


def test_expands_racing_for_a_pools_free_space_grant_it_once(replicas, agent):
    api = replicas[0]
    add_node(api, "n1", agent.url, {"p": 64 * MiB})
    vols = [create(api, f"v{k}", 4 * MiB)["id"] for k in range(WORKERS)]
    # 32 MiB in use, 32 MiB free: one growth of 4 -> 28 MiB fits, a second would not

    def grow(client: TestClient, k: int) -> httpx.Response:
        return client.post(f"/v1/volumes/{vols[k]}/expand", json={"size_bytes": 28 * MiB})

    answers = at_once(replicas, grow)
    assert codes(answers) == [200] + [507] * (WORKERS - 1), show(answers)
    pool = api.get("/v1/pools").json()["items"][0]
    assert pool["allocated_bytes"] == 28 * MiB + (WORKERS - 1) * 4 * MiB


def test_one_vpg_created_on_two_replicas_at_once_is_created_once(replicas):
    def make(client: TestClient, _k: int) -> httpx.Response:
        return client.post("/v1/vpgs", json={"name": "fast", "layout": "concat"})

    answers = at_once(replicas, make)
    assert codes(answers) == [200] * (WORKERS - 1) + [201], show(answers)


def test_a_new_node_registering_on_two_replicas_at_once_is_registered_once(replicas, agent):
    def register(client: TestClient, _k: int) -> httpx.Response:
        body = {"agent_url": agent.url, "topology": {"zone": "a"}, "max_volumes": 0}
        return client.put("/v1/nodes/fresh", json=body)

    answers = at_once(replicas, register)
    assert codes(answers) == [200] * WORKERS, show(answers)

    def pool(client: TestClient, _k: int) -> httpx.Response:
        return client.put("/v1/nodes/fresh/pools/p", json={"capacity_bytes": GiB})

    answers = at_once(replicas, pool)
    assert codes(answers) == [200] * WORKERS, show(answers)
    assert replicas[1].get("/v1/pools").json()["items"][0]["capacity_bytes"] == GiB


def test_expands_of_one_volume_to_different_sizes_at_once_end_at_the_largest(replicas, agent):
    api = replicas[0]
    add_node(api, "n1", agent.url, {"p": 10 * GiB})
    vol = create(api, "v", 4 * MiB)["id"]
    sizes = [(8 + 4 * k) * MiB for k in range(WORKERS)]

    def grow(client: TestClient, k: int) -> httpx.Response:
        return client.post(f"/v1/volumes/{vol}/expand", json={"size_bytes": sizes[k]})

    answers = at_once(replicas, grow)
    assert codes(answers) == [200] * WORKERS, show(answers)
    final = api.get(f"/v1/volumes/{vol}").json()
    assert final["size_bytes"] == max(sizes)  # a smaller expand that came late never shrinks it
    assert final["legs"][0]["size_bytes"] == max(sizes)
    assert api.get("/v1/pools").json()["items"][0]["allocated_bytes"] == max(sizes)
    assert agent.path("p", vol).stat().st_size == max(sizes)


def test_a_volume_deleted_while_it_is_attached_elsewhere_is_never_both(replicas, agent):
    api = replicas[0]
    add_node(api, "n1", agent.url, {"p": 10 * GiB})
    for k in range(WORKERS):
        add_node(api, f"c{k}", agent.url, {})
    vol = create(api, "v", MiB)["id"]

    def attach_or_delete(client: TestClient, k: int) -> httpx.Response:
        if k % 2:
            return client.delete(f"/v1/volumes/{vol}")
        body = {"access_mode": "MULTI_NODE_MULTI_WRITER", "readonly": False}
        return client.put(f"/v1/volumes/{vol}/attachments/c{k}", json=body)

    answers = at_once(replicas, attach_or_delete)
    attached = [r for k, r in enumerate(answers) if r.request.method == "PUT" and r.is_success]
    deleted = [r for r in answers if r.request.method == "DELETE" and r.is_success]
    assert not (attached and deleted), show(answers)
    assert all(r.status_code < 500 for r in answers), show(answers)


def test_a_node_fenced_while_volumes_attach_to_it_is_left_holding_none(replicas, agent):
    api = replicas[0]
    add_node(api, "owner", agent.url, {"p": 10 * GiB})
    add_node(api, "c", agent.url, {})
    vols = [create(api, f"v{k}", MiB)["id"] for k in range(WORKERS)]

    def attach_or_fence(client: TestClient, k: int) -> httpx.Response:
        if k % 2:
            return client.post("/v1/nodes/c/fence", json={"force": True})
        body = {"access_mode": "SINGLE_NODE_WRITER", "readonly": False}
        return client.put(f"/v1/volumes/{vols[k]}/attachments/c", json=body)

    answers = at_once(replicas, attach_or_fence)
    fences = [r.status_code for r in answers if r.request.method == "POST"]
    attaches = [r.status_code for r in answers if r.request.method == "PUT"]
    assert set(fences) == {200}, show(answers)
    # 503: the node is fenced; 409: a fence released the attachment while it was being made
    assert set(attaches) <= {200, 409, 503}, show(answers)
    assert api.get("/v1/nodes/c").json()["state"] == "fenced"
    # an attach that won against a fence was released by it; one that lost was refused
    held = [v for v in vols if api.get(f"/v1/volumes/{v}").json()["published_nodes"]]
    assert held == [], show(answers)
