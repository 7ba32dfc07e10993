"""What the plugin needs to know to run, parsed once from the command line."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Mode(StrEnum):
    CONTROLLER = "controller"
    NODE = "node"
    ALL = "all"

    @property
    def serves_controller(self) -> bool:
        return self in (Mode.CONTROLLER, Mode.ALL)

    @property
    def serves_node(self) -> bool:
        return self in (Mode.NODE, Mode.ALL)


@dataclass(frozen=True)
class PluginConfig:
    mode: Mode
    endpoint: str  # unix:///path/to/csi.sock
    node_id: str = ""
    management_url: str = ""
    token: str = ""
    agent_url: str = ""  # unix:///path/to/agent.sock (node mode)
    max_volumes_per_node: int = 0  # 0: no limit reported
    zone: str = ""  # topology.kubernetes.io/zone of this node, when known
    #: node mode: zone and region from the Kubernetes Node's labels (csi_driver.kubernetes_topology)
    kubernetes_topology: bool = False
