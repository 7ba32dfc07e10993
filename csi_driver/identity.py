"""CSI Identity service: who we are, what we can do, whether we are ready."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import grpc
from google.protobuf import wrappers_pb2

import tessera
from csi_driver import DRIVER_NAME
from csi_driver._gen import csi_pb2, csi_pb2_grpc
from csi_driver.config import PluginConfig

log = logging.getLogger("tessera.csi.identity")

_Service = csi_pb2.PluginCapability.Service
_Expansion = csi_pb2.PluginCapability.VolumeExpansion


def plugin_capabilities() -> list[csi_pb2.PluginCapability]:
    """The plugin's capabilities "as a whole".

    The spec (GetPluginCapabilities) says every instance of one version SHALL
    return the same set "regardless of which RPCs an instance is serving", so
    a node-mode instance still reports CONTROLLER_SERVICE: Tessera is always
    deployed with a controller. Figure 4's node-only plugin is a different
    deployment, not a mode of ours.
    """
    return [
        csi_pb2.PluginCapability(service=_Service(type=_Service.CONTROLLER_SERVICE)),
        csi_pb2.PluginCapability(service=_Service(type=_Service.VOLUME_ACCESSIBILITY_CONSTRAINTS)),
        csi_pb2.PluginCapability(volume_expansion=_Expansion(type=_Expansion.ONLINE)),
    ]


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    """Probe reports ready=false (not an error) while a dependency is unreachable.

    `checks` are named health checks (e.g. management, node-agent); the
    plugin itself is healthy while it can answer, so a peer that is down
    means "not ready yet" - restarting the plugin would not fix it.
    """

    def __init__(
        self, config: PluginConfig, checks: Sequence[tuple[str, Callable[[], bool]]] = ()
    ) -> None:
        self.config = config
        self.checks = list(checks)
        self._last_unready: tuple[str, ...] = ()

    def GetPluginInfo(
        self, request: csi_pb2.GetPluginInfoRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginInfoResponse:
        return csi_pb2.GetPluginInfoResponse(
            name=DRIVER_NAME,
            vendor_version=tessera.__version__,
            manifest={"mode": self.config.mode.value},
        )

    def GetPluginCapabilities(
        self, request: csi_pb2.GetPluginCapabilitiesRequest, context: grpc.ServicerContext
    ) -> csi_pb2.GetPluginCapabilitiesResponse:
        return csi_pb2.GetPluginCapabilitiesResponse(capabilities=plugin_capabilities())

    def Probe(
        self, request: csi_pb2.ProbeRequest, context: grpc.ServicerContext
    ) -> csi_pb2.ProbeResponse:
        unready = tuple(name for name, healthy in self.checks if not healthy())
        if unready != self._last_unready:
            # log transitions only: the CO probes every few seconds
            if unready:
                log.warning("not ready: %s unreachable", ", ".join(unready))
            else:
                log.info("ready")
            self._last_unready = unready
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=not unready))
