"""HTTP routes: thin, synchronous handlers over the domain modules.

Handlers are plain `def` so FastAPI runs them in its threadpool, where
blocking SQLAlchemy and agent calls belong. Paths and shapes follow
docs/contracts.md; bodies and answers are the shared tessera.models.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from starlette.background import BackgroundTask

from management import (
    attachments,
    fencing,
    group_snapshots,
    inventory,
    legs,
    qos,
    reconcile,
    repair,
    snapshots,
    volumes,
)
from management.context import Context
from tessera.models import (
    MAX_VOLUME_NAME,
    OPTIONAL_NODE_ID_PATTERN,
    TEXT_PATTERN,
    Attachment,
    AttachmentCreate,
    Capacity,
    ExtentPage,
    FenceReport,
    FenceRequest,
    GroupSnapshot,
    GroupSnapshotCreate,
    HeartbeatReply,
    Locality,
    Name,
    Node,
    NodeId,
    NodeRegistration,
    NodeState,
    Page,
    Pool,
    PoolRegistration,
    ReconcileReport,
    ReconcileRequest,
    Snapshot,
    SnapshotCreate,
    SnapshotId,
    Volume,
    VolumeCreate,
    VolumeExpand,
    VolumeModify,
    Vpg,
    VpgCreate,
)
from tessera.rest import json_response, problems

PageToken = Annotated[str, Query(description="next_token of the previous page")]
OptionalNodeId = Annotated[
    str, Query(max_length=128, pattern=OPTIONAL_NODE_ID_PATTERN, description="empty: every node")
]
MaxEntries = Annotated[
    int, Query(ge=0, description="page size; 0 = default (100), clamped to 1000")
]
VolumeName = Annotated[
    str,
    Query(
        max_length=MAX_VOLUME_NAME,
        pattern=TEXT_PATTERN,
        description="only the volume with exactly this name (names are unique: 0 or 1 item)",
    ),
]

SnapshotName = Annotated[
    str,
    Query(
        max_length=MAX_VOLUME_NAME,
        pattern=TEXT_PATTERN,
        description="only the snapshot with exactly this name (0 or 1 item)",
    ),
]
SourceVolumeId = Annotated[
    str,
    Query(max_length=63, pattern=TEXT_PATTERN, description="only snapshots of this volume"),
]
ExtentOffset = Annotated[int, Query(ge=0, le=2**63 - 1, description="byte offset to start at")]
MaxExtents = Annotated[
    int, Query(ge=0, le=2**31 - 1, description="extents per page; 0 = the agent's default")
]
GroupSnapshotId = Annotated[str, Path(max_length=63)]

health = APIRouter()


# `async def`: answered on the event loop, never queued behind requests
# holding the worker threads (see "Locks and timeouts" in docs/contracts.md).
@health.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def v1_router(ctx: Context) -> APIRouter:
    """Every /v1 route (the app's BearerAuth middleware guards the prefix).

    Handlers return `json_response(model)`: the declared response_model is
    for the OpenAPI document, the model is ours and needs no re-validation.
    """
    r = APIRouter(prefix="/v1")

    # ---- nodes and pools ----
    @r.put("/nodes/{node_id}", response_model=Node, tags=["nodes"])
    def register_node(node_id: NodeId, body: NodeRegistration) -> Response:
        return json_response(inventory.register_node(ctx, node_id, body))

    @r.post(
        "/nodes/{node_id}/heartbeat",
        response_model=HeartbeatReply,
        tags=["nodes"],
        responses=problems(404),
    )
    def heartbeat(node_id: NodeId) -> Response:
        reply = inventory.heartbeat(ctx, node_id)
        response = json_response(reply)
        if reply.state == NodeState.ONLINE:
            # after the reply is sent: the node is back, so the leg files it still holds
            # for nothing (stale, or of volumes deleted while it was down) can go now
            response.background = BackgroundTask(legs.sweep_discarded, ctx, node_id)
        return response

    @r.post(
        "/nodes/{node_id}/fence",
        response_model=FenceReport,
        tags=["nodes"],
        responses=problems(404, 409, 502, 503, 504),
    )
    def fence_node(node_id: NodeId, body: FenceRequest | None = None) -> Response:
        return json_response(fencing.fence(ctx, node_id, body or FenceRequest()))

    @r.post(
        "/nodes/{node_id}/unfence",
        response_model=Node,
        tags=["nodes"],
        responses=problems(404),
    )
    def unfence_node(node_id: NodeId) -> Response:
        return json_response(inventory.unfence_node(ctx, node_id))

    @r.get("/nodes", response_model=Page[Node], tags=["nodes"])
    def list_nodes(page_token: PageToken = "", max_entries: MaxEntries = 0) -> Response:
        return json_response(inventory.list_nodes(ctx, page_token, max_entries))

    @r.get("/nodes/{node_id}", response_model=Node, tags=["nodes"])
    def get_node(node_id: NodeId) -> Response:
        return json_response(inventory.get_node(ctx, node_id))

    @r.put("/nodes/{node_id}/pools/{pool}", response_model=Pool, tags=["pools"])
    def register_pool(node_id: NodeId, pool: Name, body: PoolRegistration) -> Response:
        return json_response(inventory.register_pool(ctx, node_id, pool, body))

    @r.get("/pools", response_model=Page[Pool], tags=["pools"])
    def list_pools(page_token: PageToken = "", max_entries: MaxEntries = 0) -> Response:
        return json_response(inventory.list_pools(ctx, page_token, max_entries))

    # ---- vpgs and capacity ----
    @r.get("/vpgs", response_model=Page[Vpg], tags=["vpgs"])
    def list_vpgs(page_token: PageToken = "", max_entries: MaxEntries = 0) -> Response:
        return json_response(inventory.list_vpgs(ctx, page_token, max_entries))

    @r.post(
        "/vpgs",
        response_model=Vpg,
        status_code=201,
        tags=["vpgs"],
        responses={
            200: {"model": Vpg, "description": "already exists with the same layout"},
            **problems(409),
        },
    )
    def create_vpg(body: VpgCreate) -> Response:
        vpg, created = inventory.create_vpg(ctx, body)
        return json_response(vpg, 201 if created else 200)

    @r.get("/capacity", response_model=Capacity, tags=["capacity"], responses=problems(404))
    def capacity(
        vpg: str = "default", node_id: OptionalNodeId = "", locality: Locality = Locality.ANY
    ) -> Response:
        return json_response(inventory.capacity(ctx, vpg, node_id, locality))

    # ---- volumes ----
    @r.post(
        "/volumes",
        response_model=Volume,
        status_code=201,
        tags=["volumes"],
        responses={
            200: {"model": Volume, "description": "same name, compatible request"},
            **problems(404, 409, 502, 504, 507),
        },
    )
    def create_volume(body: VolumeCreate) -> Response:
        volume, created = volumes.create_volume(ctx, body)
        return json_response(volume, 201 if created else 200)

    @r.get("/volumes", response_model=Page[Volume], tags=["volumes"])
    def list_volumes(
        page_token: PageToken = "", max_entries: MaxEntries = 0, name: VolumeName = ""
    ) -> Response:
        return json_response(volumes.list_volumes(ctx, page_token, max_entries, name))

    @r.get("/volumes/{volume_id}", response_model=Volume, tags=["volumes"])
    def get_volume(volume_id: str) -> Response:
        repair.refresh_reports(ctx, volume_id)  # a multi-leg volume's consumers say how it is
        return json_response(volumes.get_volume(ctx, volume_id))

    @r.delete(
        "/volumes/{volume_id}",
        status_code=204,
        tags=["volumes"],
        responses=problems(409, 502, 504),
    )
    def delete_volume(volume_id: str) -> Response:
        volumes.delete_volume(ctx, volume_id)
        return Response(status_code=204)

    @r.post(
        "/volumes/{volume_id}/expand",
        response_model=Volume,
        tags=["volumes"],
        responses=problems(409, 502, 504, 507),
    )
    def expand_volume(volume_id: str, body: VolumeExpand) -> Response:
        return json_response(volumes.expand_volume(ctx, volume_id, body))

    @r.patch(
        "/volumes/{volume_id}",
        response_model=Volume,
        tags=["volumes"],
        responses=problems(404, 409, 502, 503, 504),
    )
    def modify_volume(volume_id: str, body: VolumeModify) -> Response:
        """QoS limits: stored, then in force on every node of the data path (503: retry)."""
        return json_response(qos.modify_volume(ctx, volume_id, body))

    # ---- attachments ----
    @r.put(
        "/volumes/{volume_id}/attachments/{node_id}",
        response_model=Attachment,
        tags=["attach"],
        responses=problems(404, 409, 502, 503, 504, 507),
    )
    def attach(volume_id: str, node_id: NodeId, body: AttachmentCreate) -> Response:
        return json_response(attachments.attach(ctx, volume_id, node_id, body))

    @r.delete(
        "/volumes/{volume_id}/attachments/{node_id}",
        status_code=204,
        tags=["attach"],
        responses=problems(502, 503, 504),
    )
    def detach(volume_id: str, node_id: NodeId) -> Response:
        attachments.detach(ctx, volume_id, node_id)
        return Response(status_code=204)

    @r.post(
        "/volumes/{volume_id}/repair",
        response_model=Volume,
        tags=["volumes"],
        responses=problems(404, 409, 502, 503, 504, 507),
    )
    def repair_volume(volume_id: str) -> Response:
        """One step of a mirrored volume's repair: failed legs replaced, new legs resynced
        (docs/layouts.md, "Repair"); call again until no leg is rebuilding."""
        return json_response(repair.repair(ctx, volume_id))

    @r.get("/volumes/{volume_id}/attachments", tags=["attach"])
    def list_attachments(volume_id: str) -> dict[str, list[Attachment]]:
        return {"items": attachments.list_attachments(ctx, volume_id)}

    _snapshot_routes(r, ctx)

    # ---- consistency ----
    @r.post("/reconcile", response_model=ReconcileReport, tags=["reconcile"])
    def reconcile_nodes(body: ReconcileRequest | None = None) -> Response:
        fix = body.fix if body is not None else False
        return json_response(reconcile.reconcile(ctx, fix=fix))

    return r


def _snapshot_routes(r: APIRouter, ctx: Context) -> None:
    """Snapshots, their changed-block metadata and group snapshots (docs/data-services.md)."""

    @r.post(
        "/snapshots",
        response_model=Snapshot,
        status_code=201,
        tags=["snapshots"],
        responses={
            200: {"model": Snapshot, "description": "same name and source volume"},
            **problems(404, 409, 502, 503, 504, 507),
        },
    )
    def create_snapshot(body: SnapshotCreate) -> Response:
        snap, created = snapshots.create_snapshot(ctx, body)
        return json_response(snap, 201 if created else 200)

    @r.get("/snapshots", response_model=Page[Snapshot], tags=["snapshots"])
    def list_snapshots(
        page_token: PageToken = "",
        max_entries: MaxEntries = 0,
        name: SnapshotName = "",
        source_volume_id: SourceVolumeId = "",
    ) -> Response:
        page = snapshots.list_snapshots(ctx, page_token, max_entries, name, source_volume_id)
        return json_response(page)

    @r.get(
        "/snapshots/{snapshot_id}",
        response_model=Snapshot,
        tags=["snapshots"],
        responses=problems(404),
    )
    def get_snapshot(snapshot_id: SnapshotId) -> Response:
        return json_response(snapshots.get_snapshot(ctx, snapshot_id))

    @r.delete(
        "/snapshots/{snapshot_id}",
        status_code=204,
        tags=["snapshots"],
        responses=problems(404, 502, 503, 504),
    )
    def delete_snapshot(snapshot_id: SnapshotId) -> Response:
        snapshots.delete_snapshot(ctx, snapshot_id)
        return Response(status_code=204)

    @r.get(
        "/snapshots/{snapshot_id}/allocated",
        response_model=ExtentPage,
        tags=["snapshots"],
        responses=problems(404, 409, 502, 503, 504),
    )
    def snapshot_allocated(
        snapshot_id: SnapshotId, offset: ExtentOffset = 0, max_entries: MaxExtents = 0
    ) -> Response:
        return json_response(snapshots.allocated(ctx, snapshot_id, offset, max_entries))

    @r.get(
        "/snapshots/{snapshot_id}/delta",
        response_model=ExtentPage,
        tags=["snapshots"],
        responses=problems(404, 409, 502, 503, 504),
    )
    def snapshot_delta(
        snapshot_id: SnapshotId,
        base: Annotated[
            str, Query(max_length=63, pattern=TEXT_PATTERN, description="the older snapshot's ID")
        ],
        offset: ExtentOffset = 0,
        max_entries: MaxExtents = 0,
    ) -> Response:
        page = snapshots.delta(ctx, snapshot_id, base, offset, max_entries)
        return json_response(page)

    @r.post(
        "/group-snapshots",
        response_model=GroupSnapshot,
        status_code=201,
        tags=["snapshots"],
        responses={
            200: {"model": GroupSnapshot, "description": "same name and volumes"},
            **problems(404, 409, 502, 503, 504, 507),
        },
    )
    def create_group_snapshot(body: GroupSnapshotCreate) -> Response:
        group, created = group_snapshots.create_group_snapshot(ctx, body)
        return json_response(group, 201 if created else 200)

    @r.get(
        "/group-snapshots/{group_snapshot_id}",
        response_model=GroupSnapshot,
        tags=["snapshots"],
        responses=problems(404),
    )
    def get_group_snapshot(group_snapshot_id: GroupSnapshotId) -> Response:
        return json_response(group_snapshots.get_group_snapshot(ctx, group_snapshot_id))

    @r.delete(
        "/group-snapshots/{group_snapshot_id}",
        status_code=204,
        tags=["snapshots"],
        responses=problems(404, 502, 503, 504),
    )
    def delete_group_snapshot(group_snapshot_id: GroupSnapshotId) -> Response:
        group_snapshots.delete_group_snapshot(ctx, group_snapshot_id)
        return Response(status_code=204)
