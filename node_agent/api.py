"""The node-agent's HTTP API: on a unix socket for the local CSI plugin, on TCP for peers.

Exactly the table in docs/contracts.md. Errors leave as problem+json via
`tessera.rest`, the same as management's, so clients rebuild the same
error type. Routes are plain `def`: they block on the kernel and the
filesystem (fsync, loop ioctls), and FastAPI runs them in its thread pool;
only /healthz is `async def`, so it answers while every worker is busy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Annotated

from fastapi import FastAPI, Path, Query, Response

from node_agent import volumes
from node_agent.agent import Agent
from node_agent.metrics import DataPathCollector
from node_agent.qos import UNKNOWN_POD
from tessera import __version__
from tessera.errors import Unavailable
from tessera.http import Service
from tessera.models import (
    AgentAttach,
    AgentAttachment,
    AgentExport,
    AgentExportCreate,
    AgentFreeze,
    AgentFreezeState,
    AgentKey,
    AgentNode,
    AgentSnapshot,
    AgentSnapshotCreate,
    AgentThaw,
    AgentView,
    AgentVolume,
    AgentVolumeCreate,
    AgentVolumeResize,
    ExtentPage,
    NodeId,
    QosLimits,
    Registration,
    SnapshotId,
    ViewKey,
    VolumeId,
)
from tessera.observability.metrics import install_http_observability
from tessera.rest import (
    BearerAuth,
    announce_service,
    install_problem_handlers,
    json_response,
    problems,
)
from tessera.system.cgroups import POD_UID_PATTERN

log = logging.getLogger(__name__)

#: a pod UID, or `unknown-pod` when the CSI node plugin was not told it (no podInfoOnMount)
PodUid = Annotated[
    str,
    Path(
        pattern=f"^{UNKNOWN_POD}$|{POD_UID_PATTERN}",
        description="the pod's UID (csi.storage.k8s.io/pod.uid), or " + UNKNOWN_POD,
    ),
]


def create_app(
    agent: Agent,
    token: str,
    registration: Callable[[], Registration] = lambda: Registration.DISABLED,
) -> FastAPI:
    """The API; `registration` tells whether management knows this node and its pools."""
    app = FastAPI(title="Tessera node-agent", version=__version__)
    install_problem_handlers(app, log, "node-agent")
    app.add_middleware(BearerAuth, token=token)
    announce_service(app, Service.NODE_AGENT)
    install_http_observability(app, "node-agent", DataPathCollector(agent))

    # `async def`: answered on the event loop, never queued behind work
    # holding the worker threads (anyio lends sync routes 40 of them).
    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", responses=problems(503))
    async def readyz() -> dict[str, str]:
        """Ready once management knows this node and its pools (what GET /v1/node says)."""
        if registration() == Registration.PENDING:
            raise Unavailable("not registered with management yet (it retries in the background)")
        return {"status": "ok"}

    @app.get("/v1/node", response_model=AgentNode)
    async def node() -> AgentNode:
        return AgentNode(node_id=agent.node_id, registration=registration())

    @app.put(
        "/v1/volumes/{volume_id}", response_model=AgentVolume, responses=problems(404, 409, 507)
    )
    def create_volume(
        volume_id: VolumeId,
        body: AgentVolumeCreate,
        must_exist: bool = Query(
            False, description="only confirm (fsync) an existing file; never create one (404)"
        ),
    ) -> Response:
        volume = agent.create_volume(
            volume_id, body.pool, body.size_bytes, must_exist=must_exist, source=body.source
        )
        return json_response(volume)

    @app.get("/v1/volumes")
    def list_volumes() -> dict[str, list[AgentVolume]]:
        return {"items": volumes.list_all(agent.pools.values())}

    @app.get("/v1/volumes/{volume_id}", response_model=AgentVolume)
    def get_volume(volume_id: str) -> Response:
        return json_response(agent.get_volume(volume_id))

    @app.post(
        "/v1/volumes/{volume_id}/resize", response_model=AgentVolume, responses=problems(409, 507)
    )
    def resize_volume(volume_id: str, body: AgentVolumeResize) -> Response:
        return json_response(agent.resize_volume(volume_id, body.size_bytes))

    @app.delete("/v1/volumes/{volume_id}", status_code=204, responses=problems(409))
    def delete_volume(volume_id: str) -> Response:
        agent.delete_volume(volume_id)
        return Response(status_code=204)

    # ---- snapshots: files beside the volumes; extents from their extent maps ------

    @app.put(
        "/v1/snapshots/{snapshot_id}",
        response_model=AgentSnapshot,
        responses=problems(409, 507),
    )
    def create_snapshot(snapshot_id: SnapshotId, body: AgentSnapshotCreate) -> Response:
        return json_response(agent.create_snapshot(snapshot_id, body.pool, body.source_volume_id))

    @app.get("/v1/snapshots")
    def list_snapshots() -> dict[str, list[AgentSnapshot]]:
        return {"items": agent.list_snapshots()}

    @app.delete("/v1/snapshots/{snapshot_id}", status_code=204, responses=problems(409))
    def delete_snapshot(snapshot_id: SnapshotId) -> Response:
        agent.delete_snapshot(snapshot_id)
        return Response(status_code=204)

    @app.get(
        "/v1/snapshots/{snapshot_id}/extents",
        response_model=ExtentPage,
        responses=problems(409),
    )
    def snapshot_extents(
        snapshot_id: SnapshotId,
        base: str = Query("", description="another snapshot of the same volume: the delta"),
        offset: int = Query(0, ge=0),
        max_entries: int = Query(0, ge=0, le=1_000_000),
    ) -> Response:
        return json_response(agent.snapshot_extents(snapshot_id, base, offset, max_entries))

    @app.put(
        "/v1/attachments/{volume_id}", response_model=AgentAttachment, responses=problems(409, 507)
    )
    def attach(volume_id: str, body: AgentAttach) -> Response:
        return json_response(
            agent.attach(volume_id, body.readonly, body.connection, body.min_size_bytes)
        )

    @app.post(
        "/v1/attachments/{volume_id}/freeze",
        response_model=AgentFreezeState,
        responses=problems(409, 503),
    )
    def freeze(volume_id: VolumeId, body: AgentFreeze) -> Response:
        return json_response(
            agent.freeze(volume_id, body.lease_seconds, body.holder, renew=body.renew)
        )

    @app.post("/v1/attachments/{volume_id}/thaw", response_model=AgentFreezeState)
    def thaw(volume_id: VolumeId, body: AgentThaw | None = None) -> Response:
        # no body (an older caller): the anonymous holder, i.e. every holder
        return json_response(agent.thaw(volume_id, body.holder if body else ""))

    @app.get("/v1/attachments")
    def list_attachments() -> dict[str, list[AgentAttachment]]:
        return {"items": agent.list_attachments()}

    @app.get("/v1/attachments/{volume_id}", response_model=AgentAttachment, responses=problems(409))
    def get_attachment(volume_id: str) -> Response:
        return json_response(agent.get_attachment(volume_id))

    @app.delete("/v1/attachments/{volume_id}", status_code=204, responses=problems(409))
    def detach(volume_id: str) -> Response:
        agent.detach(volume_id)
        return Response(status_code=204)

    @app.put(
        "/v1/attachments/{volume_id}/views/{view_key}",
        response_model=AgentView,
        responses=problems(409),
    )
    def attach_view(volume_id: str, view_key: ViewKey) -> Response:
        return json_response(agent.attach_view(volume_id, view_key))

    @app.delete(
        "/v1/attachments/{volume_id}/views/{view_key}", status_code=204, responses=problems(409)
    )
    def release_view(volume_id: str, view_key: ViewKey) -> Response:
        agent.release_view(volume_id, view_key)
        return Response(status_code=204)

    # ---- QoS (node_agent/qos.py): limits, and the pods that use a volume here ----------

    @app.put("/v1/attachments/{volume_id}/qos", status_code=204, responses=problems(409))
    def set_qos(volume_id: VolumeId, body: QosLimits) -> Response:
        agent.set_qos(volume_id, body)
        return Response(status_code=204)

    @app.put(
        "/v1/attachments/{volume_id}/consumers/{pod_uid}",
        status_code=204,
        responses=problems(409),
    )
    def add_consumer(volume_id: VolumeId, pod_uid: PodUid) -> Response:
        agent.add_consumer(volume_id, pod_uid)
        return Response(status_code=204)

    @app.delete(
        "/v1/attachments/{volume_id}/consumers/{pod_uid}",
        status_code=204,
        responses=problems(409),
    )
    def remove_consumer(volume_id: VolumeId, pod_uid: PodUid) -> Response:
        agent.remove_consumer(volume_id, pod_uid)
        return Response(status_code=204)

    # ---- owner side: NBD exports; consumer side: keys -------------------------------
    # Bodies carry TLS-PSK keys: routes log the volume and node only, and
    # validation errors never echo input (tessera.rest).

    @app.put(
        "/v1/exports/{volume_id}/{client_node}",
        response_model=AgentExport,
        responses=problems(409, 507),
    )
    def export(volume_id: VolumeId, client_node: NodeId, body: AgentExportCreate) -> Response:
        return json_response(agent.export(volume_id, client_node, body))

    @app.delete("/v1/exports/{volume_id}/{client_node}", status_code=204, responses=problems(409))
    def close_export(volume_id: VolumeId, client_node: NodeId) -> Response:
        agent.close_export(volume_id, client_node)
        return Response(status_code=204)

    @app.get("/v1/exports")
    def list_exports() -> dict[str, list[AgentExport]]:
        return {"items": agent.exports.list()}

    @app.put("/v1/keys/{volume_id}", status_code=204)
    def put_key(volume_id: VolumeId, body: AgentKey) -> Response:
        agent.put_key(volume_id, body)
        return Response(status_code=204)

    @app.delete("/v1/keys/{volume_id}", status_code=204)
    def delete_key(volume_id: VolumeId) -> Response:
        agent.delete_key(volume_id)
        return Response(status_code=204)

    return app
