"""CSI Identity service: who we are, what we can do, whether we are ready."""

from __future__ import annotations

import logging
import threading
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
        # served by the controller-mode instance (csi_driver/group_controller.py)
        csi_pb2.PluginCapability(service=_Service(type=_Service.GROUP_CONTROLLER_SERVICE)),
        # served by the controller-mode instance (csi_driver/snapshot_metadata.py)
        csi_pb2.PluginCapability(service=_Service(type=_Service.SNAPSHOT_METADATA_SERVICE)),
    ]


class IdentityServicer(csi_pb2_grpc.IdentityServicer):
    """Probe: not ready until this mode's peers have answered once; then about this process only.

    `startup_checks` are named checks of what a first request needs: in
    controller mode that management answers, in node mode that the agent
    answers and management has registered this node and its pools (so a
    CreateVolume sent right after the first ready Probe finds a pool).
    Until they all pass, each Probe runs them and answers ready=false, not
    an error.

    After the first success Probe never asks a peer again. The kubernetes-csi
    livenessprobe sidecar turns a failed or not-ready Probe into a container
    restart, and restarting every node plugin during a management outage
    (maybe in the middle of an mkfs) fixes nothing. An outage shows up where
    it matters: UNAVAILABLE on the RPCs that need the missing peer, and the
    log lines of those calls.
    """

    def __init__(
        self, config: PluginConfig, startup_checks: Sequence[tuple[str, Callable[[], bool]]] = ()
    ) -> None:
        self.config = config
        self.startup_checks = list(startup_checks)
        self._ready = threading.Event()
        self._last_waiting: tuple[str, ...] = ()

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
        return csi_pb2.ProbeResponse(ready=wrappers_pb2.BoolValue(value=self._started()))

    def _started(self) -> bool:
        """True from the first time every start-up check passed, for good."""
        if self._ready.is_set():
            return True
        waiting = tuple(name for name, passed in self.startup_checks if not passed())
        if not waiting:
            self._ready.set()
            log.info("ready: %s", ", ".join(n for n, _ in self.startup_checks) or "no peers")
            return True
        if waiting != self._last_waiting:  # the CO probes every few seconds: log changes only
            log.warning("not ready yet, waiting for: %s", ", ".join(waiting))
            self._last_waiting = waiting
        return False
