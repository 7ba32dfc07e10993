"""PATCH /v1/volumes/{id}: limits stored, then in force on every node of the data path.

Management drives three real node-agents (tests/unit/test_management_remote.py's
cluster: n1 owns the pool, n2 and n3 consume; real nbdkit exports). The
consumer's agent must hold the limits (its cgroup rules come from them) and the
owner's export its rate file, after a modify and after an attach; a node that
cannot be told gets them at the retry, and the answer says so meanwhile.
"""

# ruff: noqa: F811

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tessera.models import QosLimits
from tests.unit.management_fixtures import MiB
from tests.unit.test_management_remote import Cluster, cluster  # noqa: F401 - fixture

pytest_plugins = ["tests.unit.management_fixtures"]  # db_url: SQLite and PostgreSQL

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None, reason="needs nbdkit")

LIMITS = {
    "max_read_bytes_per_second": 8 * MiB,
    "max_write_bytes_per_second": 4 * MiB,
    "max_read_iops": 100,
    "max_write_iops": 0,
}


def held_by(cluster: Cluster, node: str, volume_id: str) -> QosLimits:
    return cluster.nodes[node].agent.qos.limits(volume_id)  # type: ignore[attr-defined]


def export_rate(cluster: Cluster, volume_id: str, consumer: str) -> int:
    path: Path = cluster.nodes["n1"].state_dir / "exports" / volume_id / f"{consumer}.rate"
    return int(path.read_text())


def patch(cluster: Cluster, volume_id: str, qos: dict[str, int]):  # noqa: ANN201
    return cluster.api.patch(f"/v1/volumes/{volume_id}", json={"qos": qos})


def test_modify_stores_the_limits_and_tells_the_consumer_and_the_owners_export(
    cluster: Cluster,
) -> None:
    vol = cluster.volume()
    assert cluster.attach(vol, "n2").status_code == 200
    resp = patch(cluster, vol, LIMITS)
    assert resp.status_code == 200, resp.text
    assert resp.json()["qos"] == LIMITS
    assert cluster.api.get(f"/v1/volumes/{vol}").json()["qos"] == LIMITS
    assert held_by(cluster, "n2", vol) == QosLimits(**LIMITS)
    assert export_rate(cluster, vol, "n2") == 8 * MiB * 8  # bits/s, the larger byte limit
    # the same request again is fine
    assert patch(cluster, vol, LIMITS).status_code == 200


def test_a_new_attachment_starts_with_the_volumes_limits(cluster: Cluster) -> None:
    body = {"name": "limited", "size_bytes": 4 * MiB, "requisite_nodes": ["n1"], "qos": LIMITS}
    resp = cluster.api.post("/v1/volumes", json=body)
    assert resp.status_code == 201, resp.text
    vol = resp.json()["id"]
    assert cluster.attach(vol, "n2").status_code == 200
    assert held_by(cluster, "n2", vol) == QosLimits(**LIMITS)
    assert export_rate(cluster, vol, "n2") == 8 * MiB * 8


def test_a_consumer_that_cannot_be_told_gets_the_limits_at_the_retry(cluster: Cluster) -> None:
    vol = cluster.volume()
    assert cluster.attach(vol, "n2").status_code == 200
    cluster.pass_time(3600, "n1", "n3")  # n2 stops beating
    resp = patch(cluster, vol, LIMITS)
    assert resp.status_code == 503, resp.text
    assert "n2 is unreachable" in resp.json()["detail"] and "stored" in resp.json()["detail"]
    assert cluster.api.get(f"/v1/volumes/{vol}").json()["qos"] == LIMITS  # kept
    assert export_rate(cluster, vol, "n2") == 8 * MiB * 8  # the owner has it already
    assert held_by(cluster, "n2", vol) == QosLimits()
    cluster.beat("n2")
    assert patch(cluster, vol, LIMITS).status_code == 200  # the caller's retry
    assert held_by(cluster, "n2", vol) == QosLimits(**LIMITS)


def test_modify_of_an_unknown_volume_is_404_and_a_bad_limit_422(cluster: Cluster) -> None:
    resp = patch(cluster, "vol-" + "0" * 32, LIMITS)
    assert resp.status_code == 404
    vol = cluster.volume()
    resp = patch(cluster, vol, {"max_read_iops": -1})
    assert resp.status_code == 422 and "max_read_iops" in resp.text
