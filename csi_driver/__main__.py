"""`tessera-csi`: run the CSI plugin in controller, node or all mode."""

from __future__ import annotations

import argparse
import logging
import sys

from csi_driver.config import Mode, PluginConfig
from tessera.http import read_token
from tessera.observability.logs import add_flags, configure_logging, register_secret
from tessera.observability.metrics import MetricsServer, parse_host_port


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tessera-csi", description="Tessera CSI plugin")
    p.add_argument("--mode", type=Mode, choices=list(Mode), required=True)
    p.add_argument("--endpoint", required=True, help="unix:///path/to/csi.sock")
    p.add_argument("--node-id", default="", help="this node's id (node and all modes)")
    p.add_argument("--management", default="", help="management URL (controller and all modes)")
    p.add_argument("--token-file", default="", help="file holding the bearer token")
    p.add_argument("--agent-socket", default="", help="node-agent socket (node and all modes)")
    p.add_argument("--max-volumes-per-node", type=int, default=0, help="0: no limit")
    p.add_argument("--zone", default="", help="topology.kubernetes.io/zone of this node")
    p.add_argument(
        "--kubernetes-topology",
        action="store_true",
        help="node mode: report the zone and region labels of the Kubernetes Node named by "
        "--node-id (in-cluster config or $KUBECONFIG; RBAC get nodes)",
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument(
        "--metrics-listen",
        default="",
        metavar="HOST:PORT",
        help="serve /metrics and /healthz over HTTP here (default: not at all)",
    )
    add_flags(p)
    args = p.parse_args(argv)
    mode: Mode = args.mode
    if mode.serves_controller and not args.management:
        p.error(f"--management is required in {mode.value} mode")
    if mode.serves_node and not args.node_id:
        p.error(f"--node-id is required in {mode.value} mode")
    if mode.serves_node and not args.agent_socket:
        p.error(f"--agent-socket is required in {mode.value} mode")
    if not args.token_file:
        p.error("--token-file is required")
    if args.kubernetes_topology and not mode.serves_node:
        p.error("--kubernetes-topology is for node (or all) mode: only NodeGetInfo reports it")
    if args.kubernetes_topology and args.zone:
        p.error("--zone and --kubernetes-topology both set the zone: pass one of them")
    if args.max_volumes_per_node < 0:
        p.error("--max-volumes-per-node must be 0 (no limit) or more")
    if args.metrics_listen:
        try:
            args.metrics_address = parse_host_port(args.metrics_listen)
        except ValueError as exc:
            p.error(f"--metrics-listen: {exc}")
    return args


def config_from_args(args: argparse.Namespace) -> PluginConfig:
    agent = args.agent_socket
    agent_url = agent if not agent or agent.startswith("unix://") else f"unix://{agent}"
    return PluginConfig(
        mode=args.mode,
        endpoint=args.endpoint,
        node_id=args.node_id,
        management_url=args.management,
        token=read_token(args.token_file),
        agent_url=agent_url,
        max_volumes_per_node=args.max_volumes_per_node,
        zone=args.zone,
        kubernetes_topology=args.kubernetes_topology,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    log = logging.getLogger("tessera.csi")
    try:
        config = config_from_args(args)
    except (OSError, ValueError) as exc:
        # the message names the file, never its content
        log.error("cannot read --token-file: %s", exc)
        sys.exit(2)
    register_secret(config.token)
    log.info(
        "tessera-csi mode=%s endpoint=%s node=%s management=%s agent=%s",
        config.mode.value,
        config.endpoint,
        config.node_id or "-",
        config.management_url or "-",
        config.agent_url or "-",
    )
    from csi_driver.server import serve

    metrics = start_metrics(args, log)
    try:
        serve(config)
    except (ValueError, RuntimeError) as exc:
        log.error("%s", exc)
        sys.exit(1)
    finally:
        if metrics is not None:
            metrics.stop()


def start_metrics(args: argparse.Namespace, log: logging.Logger) -> MetricsServer | None:
    """The /metrics server of --metrics-listen; a port that is taken stops the start (exit 1)."""
    if not args.metrics_listen:
        return None
    host, port = args.metrics_address
    try:
        server = MetricsServer(host, port).start()
    except OSError as exc:
        log.error("--metrics-listen %s: cannot listen: %s", args.metrics_listen, exc)
        sys.exit(1)
    log.info("serving /metrics and /healthz on %s:%d", *server.address)
    return server


if __name__ == "__main__":
    main()
