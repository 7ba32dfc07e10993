"""The gRPC server: the services for this mode, on a private unix socket."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from csi_driver._gen import csi_pb2_grpc
from csi_driver.config import PluginConfig
from csi_driver.controller import ControllerServicer
from csi_driver.group_controller import GroupControllerServicer
from csi_driver.identity import IdentityServicer
from csi_driver.interceptor import ErrorMappingInterceptor
from csi_driver.snapshot_metadata import SnapshotMetadataServicer
from tessera.clients import AgentClient, ManagementClient
from tessera.locks import VolumeLocks
from tessera.sockets import claim_socket_path

log = logging.getLogger("tessera.csi")

WORKERS = 16
GRACE_SECONDS = 10.0


def socket_path(endpoint: str) -> Path:
    """`unix:///abs/path` or `unix:/abs/path` -> /abs/path; anything else is refused."""
    if endpoint.startswith("unix://"):
        path = endpoint.removeprefix("unix://")
    elif endpoint.startswith("unix:"):
        path = endpoint.removeprefix("unix:")
    else:
        raise ValueError(f"endpoint {endpoint!r} must be unix:///absolute/path")
    if not path.startswith("/"):
        raise ValueError(f"endpoint {endpoint!r} must name an absolute path (unix:///path)")
    return Path(path)


def build_server(config: PluginConfig) -> grpc.Server:
    """A server with Identity, plus Controller and/or Node for the mode, bound (not started)."""
    server = grpc.server(
        ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="csi"),
        interceptors=[ErrorMappingInterceptor()],
    )
    checks = []
    if config.mode.serves_controller:
        management = ManagementClient(config.management_url, config.token)
        locks = VolumeLocks()  # one in-flight table for the controller-side services
        csi_pb2_grpc.add_ControllerServicer_to_server(ControllerServicer(management, locks), server)
        csi_pb2_grpc.add_GroupControllerServicer_to_server(
            GroupControllerServicer(management, locks), server
        )
        csi_pb2_grpc.add_SnapshotMetadataServicer_to_server(
            SnapshotMetadataServicer(management), server
        )
        checks.append(("management answers", management.healthy))
    if config.mode.serves_node:
        # imported here so that controller mode does not need the node's dependencies
        try:
            from csi_driver.node import NodeServicer
        except ImportError as exc:
            raise RuntimeError(f"{config.mode.value} mode needs the node service: {exc}") from exc

        agent = AgentClient(config.agent_url, config.token)
        csi_pb2_grpc.add_NodeServicer_to_server(NodeServicer(config, agent), server)
        # the agent answers, and management knows this node and its pools
        checks.append(("node-agent registered with management", agent.registered))
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(config, checks), server)

    path = socket_path(config.endpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a live peer on this socket stays untouched: SocketPathTaken, exit 1
    claim_socket_path(path)
    old_umask = os.umask(0o177)  # no window in which the socket is open to others
    try:
        server.add_insecure_port(f"unix:{path}")
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


def serve(config: PluginConfig) -> None:
    """Serve until SIGTERM or SIGINT, then finish in-flight calls and remove the socket."""
    server = build_server(config)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop.set())
    server.start()
    log.info("serving %s mode on %s", config.mode.value, config.endpoint)
    stop.wait()
    log.info("stopping: letting in-flight calls finish (up to %.0fs)", GRACE_SECONDS)
    server.stop(GRACE_SECONDS).wait()
    path = socket_path(config.endpoint)
    if path.is_socket():
        path.unlink()
    log.info("stopped")
