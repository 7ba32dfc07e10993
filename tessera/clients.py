"""Typed clients for the management REST API and the node-agent local API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from tessera.errors import Misconfigured, NotFound, TesseraError
from tessera.http import JsonClient, Service
from tessera.ids import is_snapshot_id, is_volume_id
from tessera.models import (
    AccessMode,
    AgentAttachment,
    AgentExport,
    AgentExportCreate,
    AgentFreezeState,
    AgentKey,
    AgentNode,
    AgentSnapshot,
    AgentSource,
    AgentView,
    AgentVolume,
    Attachment,
    Capacity,
    Connection,
    ExtentPage,
    FenceReport,
    GroupSnapshot,
    GroupSnapshotCreate,
    HeartbeatReply,
    Locality,
    Node,
    Page,
    Pool,
    QosLimits,
    ReconcileReport,
    Registration,
    Snapshot,
    SnapshotCreate,
    SnapshotMethod,
    Volume,
    VolumeCreate,
    VolumeModify,
    Vpg,
    VpgCreate,
)

_M = TypeVar("_M", bound=BaseModel)


class _TypedClient:
    """Answers turned into wire models; an answer of another shape is a version mismatch.

    A peer that answers 2xx with JSON our models cannot read runs another
    Tessera version (or is not Tessera at all): a configuration error the
    caller can act on, never an internal error with a pydantic traceback.
    """

    _c: JsonClient

    def _parse(self, model: type[_M], data: Any) -> _M:
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise self._skew(model.__name__, exc) from exc

    def _items(self, model: type[_M], data: Any) -> list[_M]:
        if not isinstance(data, dict) or not isinstance(data.get("items"), list):
            raise self._skew(f"a list of {model.__name__}", None)
        return [self._parse(model, item) for item in data["items"]]

    def _skew(self, what: str, exc: ValidationError | None) -> Misconfigured:
        first = f": {exc.errors()[0]['msg']}" if exc is not None and exc.errors() else ""
        return Misconfigured(
            f"{self._c.peer} at {self._c.url} answered something that is not {what}{first}; "
            "do both ends run the same Tessera version?"
        )


class ManagementClient(_TypedClient):
    def __init__(self, url: str, token: str, ca_file: str | None = None) -> None:
        self._c = JsonClient(url, token, service=Service.MANAGEMENT, ca_file=ca_file)

    def close(self) -> None:
        self._c.close()

    def healthy(self) -> bool:
        return self._c.healthy()

    # nodes and pools
    def register_node(
        self,
        node_id: str,
        agent_url: str,
        topology: dict[str, str],
        max_volumes: int = 0,
        transports: list[str] | None = None,
        kernel_nbd: bool | None = None,
    ) -> Node:
        body: dict[str, object] = {
            "agent_url": agent_url,
            "topology": topology,
            "max_volumes": max_volumes,
        }
        if transports is not None:  # none: management assumes loop and nbd (older agents)
            body["transports"] = transports
        if kernel_nbd is not None:  # none: management assumes no kernel nbd client
            body["kernel_nbd"] = kernel_nbd
        return self._parse(Node, self._c.request("PUT", f"/v1/nodes/{node_id}", json=body))

    def heartbeat(self, node_id: str) -> HeartbeatReply:
        """Alive; the answer says what management wants of this node (what to clean up)."""
        data = self._c.request("POST", f"/v1/nodes/{node_id}/heartbeat")
        return self._parse(HeartbeatReply, data)

    def fence_node(self, node_id: str, force: bool = False) -> FenceReport:
        """Cut the node off: owners close its exports, its attachments are released."""
        data = self._c.request("POST", f"/v1/nodes/{node_id}/fence", json={"force": force})
        return self._parse(FenceReport, data)

    def unfence_node(self, node_id: str) -> Node:
        """Lift a fence once the node was repaired (idempotent); only an admin does this."""
        return self._parse(Node, self._c.request("POST", f"/v1/nodes/{node_id}/unfence"))

    def register_pool(
        self,
        node_id: str,
        pool: str,
        capacity_bytes: int,
        used_bytes: int = 0,
        snapshot_method: SnapshotMethod = SnapshotMethod.NONE,
    ) -> Pool:
        body = {
            "capacity_bytes": capacity_bytes,
            "used_bytes": used_bytes,
            "snapshot_method": str(snapshot_method),
        }
        data = self._c.request("PUT", f"/v1/nodes/{node_id}/pools/{pool}", json=body)
        return self._parse(Pool, data)

    def get_node(self, node_id: str) -> Node:
        return self._parse(Node, self._c.request("GET", f"/v1/nodes/{node_id}"))

    def list_nodes(self, page_token: str = "", max_entries: int = 0) -> Page[Node]:
        params = _page_params(page_token, max_entries)
        return self._parse(Page[Node], self._c.request("GET", "/v1/nodes", params=params))

    def list_pools(self, page_token: str = "", max_entries: int = 0) -> Page[Pool]:
        params = _page_params(page_token, max_entries)
        return self._parse(Page[Pool], self._c.request("GET", "/v1/pools", params=params))

    def list_vpgs(self) -> Page[Vpg]:
        return self._parse(Page[Vpg], self._c.request("GET", "/v1/vpgs"))

    def create_vpg(self, req: VpgCreate) -> Vpg:
        """Idempotent: the same name and values answer the existing vpg."""
        data = self._c.request("POST", "/v1/vpgs", json=req.model_dump(mode="json"))
        return self._parse(Vpg, data)

    # volumes
    def create_volume(self, req: VolumeCreate) -> Volume:
        data = self._c.request("POST", "/v1/volumes", json=req.model_dump(mode="json"))
        return self._parse(Volume, data)

    def get_volume(self, volume_id: str) -> Volume:
        return self._parse(Volume, self._c.request("GET", f"/v1/volumes/{volume_id}"))

    def list_volumes(self, page_token: str = "", max_entries: int = 0) -> Page[Volume]:
        params = _page_params(page_token, max_entries)
        return self._parse(Page[Volume], self._c.request("GET", "/v1/volumes", params=params))

    def find_volume(self, name_or_id: str) -> Volume:
        """The volume a person means: by ID when it looks like one, else (or then) by name.

        A name may itself look like an ID (names are free text), so an ID
        that names no volume is tried as a name before giving up.
        """
        params = {"name": name_or_id}
        return _find(
            name_or_id,
            "volume",
            self.get_volume if is_volume_id(name_or_id) else None,
            lambda: (
                self._parse(
                    Page[Volume], self._c.request("GET", "/v1/volumes", params=params)
                ).items
            ),
        )

    def find_snapshot(self, name_or_id: str) -> Snapshot:
        """The snapshot a person means: by ID when it looks like one, else (or then) by name."""
        return _find(
            name_or_id,
            "snapshot",
            self.get_snapshot if is_snapshot_id(name_or_id) else None,
            lambda: self.list_snapshots(name=name_or_id).items,
        )

    def delete_volume(self, volume_id: str) -> None:
        self._c.request("DELETE", f"/v1/volumes/{volume_id}")

    def repair_volume(self, volume_id: str) -> Volume:
        """One step of a mirrored volume's repair; call again until no leg is rebuilding."""
        return self._parse(Volume, self._c.request("POST", f"/v1/volumes/{volume_id}/repair"))

    def expand_volume(self, volume_id: str, size_bytes: int, limit_bytes: int = 0) -> Volume:
        body = {"size_bytes": size_bytes, "limit_bytes": limit_bytes}
        data = self._c.request("POST", f"/v1/volumes/{volume_id}/expand", json=body)
        return self._parse(Volume, data)

    def modify_volume(self, volume_id: str, req: VolumeModify) -> Volume:
        """Change mutable parameters (QoS) of a volume, live on every node that uses it."""
        data = self._c.request(
            "PATCH", f"/v1/volumes/{volume_id}", json=req.model_dump(mode="json")
        )
        return self._parse(Volume, data)

    # snapshots (docs/data-services.md)
    def create_snapshot(self, req: SnapshotCreate) -> Snapshot:
        """Cut a snapshot; idempotent by name (the same name for another source: AlreadyExists)."""
        data = self._c.request("POST", "/v1/snapshots", json=req.model_dump(mode="json"))
        return self._parse(Snapshot, data)

    def get_snapshot(self, snapshot_id: str) -> Snapshot:
        return self._parse(Snapshot, self._c.request("GET", f"/v1/snapshots/{snapshot_id}"))

    def list_snapshots(
        self,
        page_token: str = "",
        max_entries: int = 0,
        *,
        name: str = "",
        source_volume_id: str = "",
    ) -> Page[Snapshot]:
        params = _page_params(page_token, max_entries)
        if name:
            params["name"] = name
        if source_volume_id:
            params["source_volume_id"] = source_volume_id
        return self._parse(Page[Snapshot], self._c.request("GET", "/v1/snapshots", params=params))

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot; NotFound when there is none (CSI callers treat that as done)."""
        self._c.request("DELETE", f"/v1/snapshots/{snapshot_id}")

    def snapshot_allocated(
        self, snapshot_id: str, offset: int = 0, max_entries: int = 0
    ) -> ExtentPage:
        """The byte ranges of the snapshot that hold data, from `offset` on."""
        params = _extent_params(offset, max_entries)
        path = f"/v1/snapshots/{snapshot_id}/allocated"
        return self._parse(ExtentPage, self._c.request("GET", path, params=params))

    def snapshot_delta(
        self, base_snapshot_id: str, snapshot_id: str, offset: int = 0, max_entries: int = 0
    ) -> ExtentPage:
        """The byte ranges that differ between two snapshots of one volume, from `offset` on."""
        params: dict[str, str | int] = {
            "base": base_snapshot_id,
            **_extent_params(offset, max_entries),
        }
        path = f"/v1/snapshots/{snapshot_id}/delta"
        return self._parse(ExtentPage, self._c.request("GET", path, params=params))

    def create_group_snapshot(self, req: GroupSnapshotCreate) -> GroupSnapshot:
        """Snapshot every volume at one instant; idempotent by name and member set."""
        data = self._c.request("POST", "/v1/group-snapshots", json=req.model_dump(mode="json"))
        return self._parse(GroupSnapshot, data)

    def get_group_snapshot(self, group_snapshot_id: str) -> GroupSnapshot:
        path = f"/v1/group-snapshots/{group_snapshot_id}"
        return self._parse(GroupSnapshot, self._c.request("GET", path))

    def delete_group_snapshot(self, group_snapshot_id: str) -> None:
        """Delete the group and its member snapshots; NotFound when there is none."""
        self._c.request("DELETE", f"/v1/group-snapshots/{group_snapshot_id}")

    def capacity(
        self, vpg: str = "default", node_id: str = "", locality: Locality = Locality.ANY
    ) -> Capacity:
        """Room for one new volume reachable from `node_id` (any node when empty)."""
        params = {"vpg": vpg, "locality": locality.value}
        if node_id:
            params["node_id"] = node_id
        return self._parse(Capacity, self._c.request("GET", "/v1/capacity", params=params))

    # attachments
    def attach(
        self, volume_id: str, node_id: str, access_mode: AccessMode, readonly: bool
    ) -> Attachment:
        body = {"access_mode": access_mode.value, "readonly": readonly}
        path = f"/v1/volumes/{volume_id}/attachments/{node_id}"
        return self._parse(Attachment, self._c.request("PUT", path, json=body))

    def detach(self, volume_id: str, node_id: str) -> None:
        self._c.request("DELETE", f"/v1/volumes/{volume_id}/attachments/{node_id}")

    def list_attachments(self, volume_id: str) -> list[Attachment]:
        data = self._c.request("GET", f"/v1/volumes/{volume_id}/attachments")
        return self._items(Attachment, data)

    # consistency
    def reconcile(self, fix: bool = False) -> ReconcileReport:
        data = self._c.request("POST", "/v1/reconcile", json={"fix": fix})
        return self._parse(ReconcileReport, data)


class AgentClient(_TypedClient):
    """The node-agent's local API (also what management uses to drive it)."""

    def __init__(self, url: str, token: str, ca_file: str | None = None) -> None:
        self._c = JsonClient(url, token, service=Service.NODE_AGENT, ca_file=ca_file)

    def close(self) -> None:
        self._c.close()

    def healthy(self) -> bool:
        return self._c.healthy()

    def node(self) -> AgentNode:
        """This agent's node and whether management has registered it and its pools."""
        return self._parse(AgentNode, self._c.request("GET", "/v1/node"))

    def registered(self) -> bool:
        """Whether management knows this node and its pools (or the agent never registers).

        For readiness checks: any failure to ask is "not yet", never an error.
        """
        try:
            return self.node().registration != Registration.PENDING
        except (TesseraError, ValueError):
            return False

    def create_volume(
        self,
        volume_id: str,
        pool: str,
        size_bytes: int,
        *,
        must_exist: bool = False,
        source: AgentSource | None = None,
    ) -> AgentVolume:
        """Create the volume file (idempotent); `must_exist`: only confirm one already there.

        With `must_exist` a missing file is NotFound and nothing is created;
        an agent too old to know the flag refuses it (422), it never creates.
        With `source` the file starts as a clone of that snapshot or volume.
        """
        body: dict[str, Any] = {"pool": pool, "size_bytes": size_bytes}
        if source is not None:
            body["source"] = source.model_dump(mode="json")
        params = {"must_exist": "true"} if must_exist else None
        data = self._c.request("PUT", f"/v1/volumes/{volume_id}", json=body, params=params)
        return self._parse(AgentVolume, data)

    def get_volume(self, volume_id: str) -> AgentVolume:
        return self._parse(AgentVolume, self._c.request("GET", f"/v1/volumes/{volume_id}"))

    def list_volumes(self) -> list[AgentVolume]:
        """Every volume file in every pool of the node."""
        data = self._c.request("GET", "/v1/volumes")
        return self._items(AgentVolume, data)

    def resize_volume(self, volume_id: str, size_bytes: int) -> AgentVolume:
        body = {"size_bytes": size_bytes}
        data = self._c.request("POST", f"/v1/volumes/{volume_id}/resize", json=body)
        return self._parse(AgentVolume, data)

    def delete_volume(self, volume_id: str) -> None:
        self._c.request("DELETE", f"/v1/volumes/{volume_id}")

    def attach(
        self,
        volume_id: str,
        readonly: bool = False,
        connection: Connection | None = None,
        min_size_bytes: int = 0,
    ) -> AgentAttachment:
        """Connect the volume on this node: local loop, or the export `connection` names."""
        body: dict[str, Any] = {"readonly": readonly}
        if connection is not None:
            body["connection"] = connection.model_dump(mode="json")
        if min_size_bytes:
            body["min_size_bytes"] = min_size_bytes
        data = self._c.request("PUT", f"/v1/attachments/{volume_id}", json=body)
        return self._parse(AgentAttachment, data)

    def detach(self, volume_id: str) -> None:
        self._c.request("DELETE", f"/v1/attachments/{volume_id}")

    def get_attachment(self, volume_id: str) -> AgentAttachment:
        data = self._c.request("GET", f"/v1/attachments/{volume_id}")
        return self._parse(AgentAttachment, data)

    def attach_view(self, volume_id: str, view_key: str) -> AgentView:
        data = self._c.request("PUT", f"/v1/attachments/{volume_id}/views/{view_key}")
        return self._parse(AgentView, data)

    def release_view(self, volume_id: str, view_key: str) -> None:
        self._c.request("DELETE", f"/v1/attachments/{volume_id}/views/{view_key}")

    def list_attachments(self) -> list[AgentAttachment]:
        data = self._c.request("GET", "/v1/attachments")
        return self._items(AgentAttachment, data)

    # owner side: NBD exports (the body carries a secret: never log it)
    def export(self, volume_id: str, client_node: str, req: AgentExportCreate) -> AgentExport:
        path = f"/v1/exports/{volume_id}/{client_node}"
        data = self._c.request("PUT", path, json=req.model_dump(mode="json"))
        return self._parse(AgentExport, data)

    def close_export(self, volume_id: str, client_node: str) -> None:
        """Close the export and revoke its key; already closed is fine."""
        self._c.request("DELETE", f"/v1/exports/{volume_id}/{client_node}")

    def list_exports(self) -> list[AgentExport]:
        return self._items(AgentExport, self._c.request("GET", "/v1/exports"))

    # snapshots: files beside the volumes in the same pool
    def create_snapshot(self, snapshot_id: str, pool: str, source_volume_id: str) -> AgentSnapshot:
        """Cut the snapshot file (reflink, or a copy where the pool falls back); idempotent."""
        body = {"pool": pool, "source_volume_id": source_volume_id}
        data = self._c.request("PUT", f"/v1/snapshots/{snapshot_id}", json=body)
        return self._parse(AgentSnapshot, data)

    def list_snapshots(self) -> list[AgentSnapshot]:
        return self._items(AgentSnapshot, self._c.request("GET", "/v1/snapshots"))

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Remove the snapshot file; already gone is fine."""
        self._c.request("DELETE", f"/v1/snapshots/{snapshot_id}")

    def snapshot_extents(
        self, snapshot_id: str, base_snapshot_id: str = "", offset: int = 0, max_entries: int = 0
    ) -> ExtentPage:
        """Allocated ranges of a snapshot, or (with a base) the ranges that differ from it."""
        params = _extent_params(offset, max_entries)
        if base_snapshot_id:
            params["base"] = base_snapshot_id
        path = f"/v1/snapshots/{snapshot_id}/extents"
        return self._parse(ExtentPage, self._c.request("GET", path, params=params))

    # consistency points: a mounted filesystem frozen for the instant of a snapshot
    def freeze(
        self, volume_id: str, lease_seconds: float = 10.0, *, holder: str = "", renew: bool = False
    ) -> AgentFreezeState:
        """Freeze the volume's filesystems mounted here for `holder`; thawed after the lease.

        `renew`: only extend the holder's lease; Conflict when it no longer holds
        the freeze (lapsed, thawed or the agent restarted: the instant was lost).
        """
        body = {"lease_seconds": lease_seconds, "holder": holder, "renew": renew}
        data = self._c.request("POST", f"/v1/attachments/{volume_id}/freeze", json=body)
        return self._parse(AgentFreezeState, data)

    def thaw(self, volume_id: str, *, holder: str = "") -> AgentFreezeState:
        """Release `holder`'s freeze (every holder's when empty); not frozen is fine."""
        body = {"holder": holder}
        data = self._c.request("POST", f"/v1/attachments/{volume_id}/thaw", json=body)
        return self._parse(AgentFreezeState, data)

    # QoS on this node's data path (cgroup limits, and the export's rate filter)
    def set_qos(self, volume_id: str, limits: QosLimits) -> None:
        path = f"/v1/attachments/{volume_id}/qos"
        self._c.request("PUT", path, json=limits.model_dump(mode="json"))

    def add_consumer(self, volume_id: str, pod_uid: str) -> None:
        """The pod (its UID, or `unknown-pod`) uses the volume here: its cgroup gets the limits."""
        self._c.request("PUT", f"/v1/attachments/{volume_id}/consumers/{pod_uid}")

    def remove_consumer(self, volume_id: str, pod_uid: str) -> None:
        self._c.request("DELETE", f"/v1/attachments/{volume_id}/consumers/{pod_uid}")

    # consumer side: the key to connect to a remote volume
    def put_key(self, volume_id: str, key: AgentKey) -> None:
        self._c.request("PUT", f"/v1/keys/{volume_id}", json=key.model_dump(mode="json"))

    def delete_key(self, volume_id: str) -> None:
        self._c.request("DELETE", f"/v1/keys/{volume_id}")


def _find(
    name_or_id: str,
    noun: str,
    by_id: Callable[[str], _M] | None,
    by_name: Callable[[], list[_M]],
) -> _M:
    """By ID first when `by_id` is given (the text looks like an ID), then by name."""
    if by_id is not None:
        try:
            return by_id(name_or_id)
        except NotFound:
            pass
    items = by_name()
    if not items:
        raise NotFound(f"no {noun} has the name or ID {name_or_id!r}", field=noun)
    return items[0]


def _extent_params(offset: int, max_entries: int) -> dict[str, str | int]:
    params: dict[str, str | int] = {}
    if offset:
        params["offset"] = offset
    if max_entries:
        params["max_entries"] = max_entries
    return params


def _page_params(page_token: str, max_entries: int) -> dict[str, str | int]:
    params: dict[str, str | int] = {}
    if page_token:
        params["page_token"] = page_token
    if max_entries:
        params["max_entries"] = max_entries
    return params
