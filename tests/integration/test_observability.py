"""Scrape a running dev stack's /metrics and read its logs after real CSI calls (issue 9).

The dev stack is the three real processes (management, node-agent, CSI
plugin in `all` mode) on a loop-mounted pool; the calls are the ones
kubelet and the sidecars make. What an operator must find afterwards: the
RPCs just made, by method and code (an error included), on the plugin's
/metrics; management's requests by route template and the pool, volume,
attachment and node gauges with the right values; the agent's local
attachment; one JSON access line per RPC and request, without the token.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from csi_driver._gen import csi_pb2
from tessera.system.loopdev import bound_under
from tessera.system.mounts import mounts_under
from tessera_dev.csi_client import CsiClient, mount_capability
from tessera_dev.stack import DevStack, StackInfo
from tests.conftest import needs_root

pytestmark = needs_root
MiB = 1024**2
NODE = "obs-node"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[DevStack, StackInfo]]:
    dev = DevStack(tmp_path / "state", pool_size=1024**3, node_id=NODE)
    info = dev.start()
    try:
        yield dev, info
    finally:
        dev.stop()
    assert bound_under(tmp_path) == [] and mounts_under(tmp_path) == []


def metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def over_unix(socket_path: str, path: str) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path)) as client:
        return client.get(f"http://localhost{path}")


def json_lines(log: Path) -> list[dict]:
    """Every JSON line of a process's log (its stdout may add others: a crash, a print)."""
    lines = log.read_text().splitlines()
    parsed = [json.loads(line) for line in lines if line.startswith("{")]
    assert parsed, f"no JSON line in {log}"
    return parsed


def test_metrics_and_logs_of_a_running_stack_show_the_calls_just_made(
    stack: tuple[DevStack, StackInfo], tmp_path: Path
) -> None:
    dev, info = stack
    staging = tmp_path / "staging"
    staging.mkdir()
    token = Path(info.token_file).read_text().strip()
    with CsiClient(info.csi_endpoint) as csi:
        volume = csi.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name="observed",
                capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
                volume_capabilities=[mount_capability("ext4")],
            ),
            metadata=[("x-request-id", "obs-create-1")],
            timeout=60,
        ).volume
        vid = volume.volume_id
        csi.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=vid, node_id=NODE, volume_capability=mount_capability("ext4")
            ),
            timeout=60,
        )
        stage = csi_pb2.NodeStageVolumeRequest(
            volume_id=vid,
            staging_target_path=str(staging),
            volume_capability=mount_capability("ext4"),
            secrets={"password": "never-in-a-log-0001"},
        )
        csi.node.NodeStageVolume(stage, timeout=60)
        with pytest.raises(grpc.RpcError) as bad:
            csi.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(volume_id=vid), timeout=60)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        # ---- the plugin's /metrics: the RPCs by method and code
        with urllib.request.urlopen(f"{info.csi_metrics_url}/healthz", timeout=10) as resp:
            assert resp.status == 200
        with urllib.request.urlopen(f"{info.csi_metrics_url}/metrics", timeout=10) as resp:
            found = metrics(resp.read().decode())
        rpcs = "tessera_csi_rpcs_total"
        assert get(found, rpcs, method="CreateVolume", code="OK") == 1
        assert get(found, rpcs, method="ControllerPublishVolume", code="OK") == 1
        assert get(found, rpcs, method="NodeStageVolume", code="OK") == 1
        assert get(found, rpcs, method="NodeStageVolume", code="INVALID_ARGUMENT") == 1
        duration = "tessera_csi_rpc_duration_seconds_count"
        assert get(found, duration, method="NodeStageVolume") == 2
        assert (get(found, "tessera_csi_rpc_duration_seconds_sum", method="CreateVolume") or 0) > 0
        assert get(found, "process_resident_memory_bytes") is not None

        # ---- management: route templates with status, and the inventory gauges
        assert over_unix(info.management_url.removeprefix("unix://"), "/readyz").status_code == 200
        text = over_unix(info.management_url.removeprefix("unix://"), "/metrics").text
        found = metrics(text)
        assert vid not in text, "a raw path became a label"
        requests = "tessera_http_requests_total"
        assert (
            get(found, requests, process="management", route="/v1/volumes", method="POST",
                status="201") == 1
        )  # fmt: skip
        attach_route = "/v1/volumes/{volume_id}/attachments/{node_id}"
        assert (get(found, requests, process="management", route=attach_route, method="PUT",
                    status="200") or 0) >= 1  # fmt: skip
        pool = {"node": NODE, "pool": "default"}
        capacity = get(found, "tessera_pool_capacity_bytes", **pool)
        assert capacity is not None and capacity > 64 * MiB
        assert get(found, "tessera_pool_allocated_bytes", **pool) == 64 * MiB
        assert get(found, "tessera_volumes", condition="available") == 1
        assert get(found, "tessera_attachments", state="ready") == 1
        assert get(found, "tessera_nodes", state="online") == 1

        # ---- the node-agent: the attachment it holds, on its unix socket
        assert over_unix(info.agent_socket, "/readyz").status_code == 200
        found = metrics(over_unix(info.agent_socket, "/metrics").text)
        assert get(found, "tessera_attachments_local", transport="loop") == 1
        assert get(found, "tessera_datapath_processes", kind="nbdkit_export", healthy="false") == 0
        assert (
            get(found, "tessera_http_requests_total", process="node-agent",
                route="/v1/attachments/{volume_id}", method="PUT", status="200") == 1
        )  # fmt: skip

        csi.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
            timeout=60,
        )

    # ---- logs: one JSON access line per RPC, never the token nor a request's secrets
    logs = Path(info.state_dir) / "logs"
    access = [line for line in json_lines(logs / "csi.log") if line["logger"] == "tessera.access"]
    stages = [line for line in access if line["rpc"] == "NodeStageVolume"]
    assert [line["code"] for line in stages] == ["OK", "INVALID_ARGUMENT"]
    for line in stages:
        assert line["volume_id"] == vid and line["duration_ms"] >= 0 and line["request_id"]
        assert line["level"] == "INFO" and line["ts"].endswith("Z")
    create = next(line for line in access if line["rpc"] == "CreateVolume")
    assert create["request_id"] == "obs-create-1" and create["code"] == "OK"
    management = json_lines(logs / "management.log")
    posted = [
        line for line in management
        if line["logger"] == "tessera.access" and line.get("route") == "/v1/volumes"
    ]  # fmt: skip
    assert posted and posted[0]["status"] == 201 and posted[0]["method"] == "POST"
    # the plugin passes its RPC's request id on: one id from the CSI call to the agent's file
    assert posted[0]["request_id"] == "obs-create-1"
    agent = json_lines(logs / "node-agent.log")
    assert any(
        line.get("request_id") == "obs-create-1" and line.get("route") == "/v1/volumes/{volume_id}"
        for line in agent
    )
    for name in ("csi.log", "management.log", "node-agent.log"):
        text = (logs / name).read_text()
        assert token not in text, f"the token is in {name}"
        assert "never-in-a-log-0001" not in text
    assert dev.failed_process() is None
