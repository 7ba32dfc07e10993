"""Typed clients for the management REST API and the node-agent local API."""

from __future__ import annotations

from tessera.errors import NotFound, TesseraError
from tessera.http import JsonClient
from tessera.ids import is_volume_id
from tessera.models import (
    AccessMode,
    AgentAttachment,
    AgentNode,
    AgentView,
    AgentVolume,
    Attachment,
    Capacity,
    Node,
    Page,
    Pool,
    ReconcileReport,
    Registration,
    Volume,
    VolumeCreate,
    Vpg,
)


class ManagementClient:
    def __init__(self, url: str, token: str) -> None:
        self._c = JsonClient(url, token, peer="management")

    def close(self) -> None:
        self._c.close()

    def healthy(self) -> bool:
        return self._c.healthy()

    # nodes and pools
    def register_node(
        self, node_id: str, agent_url: str, topology: dict[str, str], max_volumes: int = 0
    ) -> Node:
        body = {"agent_url": agent_url, "topology": topology, "max_volumes": max_volumes}
        return Node.model_validate(self._c.request("PUT", f"/v1/nodes/{node_id}", json=body))

    def heartbeat(self, node_id: str) -> None:
        self._c.request("POST", f"/v1/nodes/{node_id}/heartbeat")

    def register_pool(self, node_id: str, pool: str, capacity_bytes: int) -> Pool:
        body = {"capacity_bytes": capacity_bytes}
        data = self._c.request("PUT", f"/v1/nodes/{node_id}/pools/{pool}", json=body)
        return Pool.model_validate(data)

    def get_node(self, node_id: str) -> Node:
        return Node.model_validate(self._c.request("GET", f"/v1/nodes/{node_id}"))

    def list_nodes(self, page_token: str = "", max_entries: int = 0) -> Page[Node]:
        params = _page_params(page_token, max_entries)
        return Page[Node].model_validate(self._c.request("GET", "/v1/nodes", params=params))

    def list_pools(self, page_token: str = "", max_entries: int = 0) -> Page[Pool]:
        params = _page_params(page_token, max_entries)
        return Page[Pool].model_validate(self._c.request("GET", "/v1/pools", params=params))

    def list_vpgs(self) -> Page[Vpg]:
        return Page[Vpg].model_validate(self._c.request("GET", "/v1/vpgs"))

    # volumes
    def create_volume(self, req: VolumeCreate) -> Volume:
        data = self._c.request("POST", "/v1/volumes", json=req.model_dump(mode="json"))
        return Volume.model_validate(data)

    def get_volume(self, volume_id: str) -> Volume:
        return Volume.model_validate(self._c.request("GET", f"/v1/volumes/{volume_id}"))

    def list_volumes(self, page_token: str = "", max_entries: int = 0) -> Page[Volume]:
        params = _page_params(page_token, max_entries)
        return Page[Volume].model_validate(self._c.request("GET", "/v1/volumes", params=params))

    def find_volume(self, name_or_id: str) -> Volume:
        """The volume a person means: by ID when it looks like one, else (or then) by name.

        A name may itself look like an ID (names are free text), so an ID
        that names no volume is tried as a name before giving up.
        """
        if is_volume_id(name_or_id):
            try:
                return self.get_volume(name_or_id)
            except NotFound:
                pass
        params = {"name": name_or_id}
        page = Page[Volume].model_validate(self._c.request("GET", "/v1/volumes", params=params))
        if not page.items:
            raise NotFound(f"no volume has the name or ID {name_or_id!r}", field="volume")
        return page.items[0]

    def delete_volume(self, volume_id: str) -> None:
        self._c.request("DELETE", f"/v1/volumes/{volume_id}")

    def expand_volume(self, volume_id: str, size_bytes: int, limit_bytes: int = 0) -> Volume:
        body = {"size_bytes": size_bytes, "limit_bytes": limit_bytes}
        data = self._c.request("POST", f"/v1/volumes/{volume_id}/expand", json=body)
        return Volume.model_validate(data)

    def capacity(self, vpg: str = "default", node_id: str = "") -> Capacity:
        params = {"vpg": vpg}
        if node_id:
            params["node_id"] = node_id
        return Capacity.model_validate(self._c.request("GET", "/v1/capacity", params=params))

    # attachments
    def attach(
        self, volume_id: str, node_id: str, access_mode: AccessMode, readonly: bool
    ) -> Attachment:
        body = {"access_mode": access_mode.value, "readonly": readonly}
        path = f"/v1/volumes/{volume_id}/attachments/{node_id}"
        return Attachment.model_validate(self._c.request("PUT", path, json=body))

    def detach(self, volume_id: str, node_id: str) -> None:
        self._c.request("DELETE", f"/v1/volumes/{volume_id}/attachments/{node_id}")

    def list_attachments(self, volume_id: str) -> list[Attachment]:
        data = self._c.request("GET", f"/v1/volumes/{volume_id}/attachments")
        return [Attachment.model_validate(a) for a in data["items"]]

    # consistency
    def reconcile(self, fix: bool = False) -> ReconcileReport:
        data = self._c.request("POST", "/v1/reconcile", json={"fix": fix})
        return ReconcileReport.model_validate(data)


class AgentClient:
    """The node-agent's local API (also what management uses to drive it)."""

    def __init__(self, url: str, token: str) -> None:
        self._c = JsonClient(url, token, peer="node-agent")

    def close(self) -> None:
        self._c.close()

    def healthy(self) -> bool:
        return self._c.healthy()

    def node(self) -> AgentNode:
        """This agent's node and whether management has registered it and its pools."""
        return AgentNode.model_validate(self._c.request("GET", "/v1/node"))

    def registered(self) -> bool:
        """Whether management knows this node and its pools (or the agent never registers).

        For readiness checks: any failure to ask is "not yet", never an error.
        """
        try:
            return self.node().registration != Registration.PENDING
        except (TesseraError, ValueError):
            return False

    def create_volume(self, volume_id: str, pool: str, size_bytes: int) -> AgentVolume:
        body = {"pool": pool, "size_bytes": size_bytes}
        data = self._c.request("PUT", f"/v1/volumes/{volume_id}", json=body)
        return AgentVolume.model_validate(data)

    def get_volume(self, volume_id: str) -> AgentVolume:
        return AgentVolume.model_validate(self._c.request("GET", f"/v1/volumes/{volume_id}"))

    def list_volumes(self) -> list[AgentVolume]:
        """Every volume file in every pool of the node."""
        data = self._c.request("GET", "/v1/volumes")
        return [AgentVolume.model_validate(v) for v in data["items"]]

    def resize_volume(self, volume_id: str, size_bytes: int) -> AgentVolume:
        body = {"size_bytes": size_bytes}
        data = self._c.request("POST", f"/v1/volumes/{volume_id}/resize", json=body)
        return AgentVolume.model_validate(data)

    def delete_volume(self, volume_id: str) -> None:
        self._c.request("DELETE", f"/v1/volumes/{volume_id}")

    def attach(self, volume_id: str, readonly: bool = False) -> AgentAttachment:
        body = {"readonly": readonly}
        data = self._c.request("PUT", f"/v1/attachments/{volume_id}", json=body)
        return AgentAttachment.model_validate(data)

    def detach(self, volume_id: str) -> None:
        self._c.request("DELETE", f"/v1/attachments/{volume_id}")

    def get_attachment(self, volume_id: str) -> AgentAttachment:
        data = self._c.request("GET", f"/v1/attachments/{volume_id}")
        return AgentAttachment.model_validate(data)

    def attach_view(self, volume_id: str, view_key: str) -> AgentView:
        data = self._c.request("PUT", f"/v1/attachments/{volume_id}/views/{view_key}")
        return AgentView.model_validate(data)

    def release_view(self, volume_id: str, view_key: str) -> None:
        self._c.request("DELETE", f"/v1/attachments/{volume_id}/views/{view_key}")

    def list_attachments(self) -> list[AgentAttachment]:
        data = self._c.request("GET", "/v1/attachments")
        return [AgentAttachment.model_validate(a) for a in data["items"]]


def _page_params(page_token: str, max_entries: int) -> dict[str, str | int]:
    params: dict[str, str | int] = {}
    if page_token:
        params["page_token"] = page_token
    if max_entries:
        params["max_entries"] = max_entries
    return params
