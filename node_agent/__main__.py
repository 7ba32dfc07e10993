"""`tessera-node-agent`: serve the agent's API on a unix socket, and on TCP for peers.

Start-up order matters: recover first (re-adopt devices and exports that
outlived the previous agent), then serve, and register with management in
the background so a missing control plane never blocks the data plane.
SIGTERM stops serving but never detaches volumes nor closes exports: pods
keep their I/O, here and on the nodes this one serves.

The unix socket (plain HTTP, mode 0600) is for the local CSI plugin; with
--listen the same API is also served on TCP for management and peer
nodes, HTTPS with --tls-cert/--tls-key. Both are uvicorn servers on one
event loop; every /v1 route on either needs the bearer token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from node_agent import file_pools
from node_agent.agent import DEFAULT_STATE_DIR, Agent
from node_agent.api import create_app
from node_agent.attachments import DEFAULT_DEV_DIR
from node_agent.capabilities import host_transports
from node_agent.exports import DEFAULT_PORTS, parse_port_range
from node_agent.nvme_exports import DEFAULT_NVME_PORT
from node_agent.pools import DEFAULT_RESERVE, Pool, Reserve, parse_overcommit, parse_pool_spec
from node_agent.registration import HEARTBEAT_SECONDS, Follower, Registrar
from tessera.clients import ManagementClient
from tessera.errors import TesseraError
from tessera.http import read_token
from tessera.models import Registration
from tessera.observability.logs import add_flags, configure_logging, register_secret
from tessera.rest import server_options
from tessera.sockets import SocketPathTaken, claim_socket_path
from tessera.system.cgroups import DEFAULT_CGROUP_ROOT
from tessera.units import parse_size

log = logging.getLogger("node_agent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tessera-node-agent", description=__doc__.splitlines()[0])
    p.add_argument("--node-id", required=True)
    p.add_argument("--management", required=True, help="unix:///path.sock or http(s)://host:port")
    p.add_argument("--token-file", required=True)
    p.add_argument("--pool", action="append", default=[], metavar="NAME=DIR")
    p.add_argument(
        "--file-pool",
        action="append",
        default=[],
        metavar="NAME=IMAGE:SIZE",
        help="a pool in a sparse image (XFS, loop-mounted under --state-dir/file-pools/NAME); "
        "made when missing, formatted only when blank, never shrunk",
    )
    p.add_argument("--socket", required=True, help="unix socket path for the local API")
    p.add_argument("--dev-dir", default=str(DEFAULT_DEV_DIR))
    p.add_argument("--max-volumes", type=int, default=0, help="0 means no limit")
    p.add_argument(
        "--listen",
        default="",
        metavar="HOST:PORT",
        help="also serve the API on TCP, for management and peer nodes (bearer token)",
    )
    p.add_argument(
        "--advertise",
        default="",
        metavar="ADDR",
        help="the address management and peers use for this node (default: the --listen host)",
    )
    p.add_argument("--tls-cert", default="", metavar="FILE", help="serve HTTPS on --listen")
    p.add_argument("--tls-key", default="", metavar="FILE")
    p.add_argument(
        "--ca-bundle", default="", metavar="FILE", help="CA certificates to trust for https"
    )
    p.add_argument(
        "--advertise-url",
        default="",
        help="the agent_url to register, verbatim (default: from --listen/--advertise, "
        "else unix://<socket>)",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=DEFAULT_STATE_DIR,
        help="exports/, keys/ and connections/ live here (one directory per agent)",
    )
    p.add_argument(
        "--export-address",
        default="",
        metavar="ADDR",
        help="where NBD exports listen (default: the --advertise host)",
    )
    p.add_argument(
        "--export-ports",
        type=_port_range,
        default=DEFAULT_PORTS,
        metavar="LO-HI",
        help=f"ports for NBD exports (default {DEFAULT_PORTS[0]}-{DEFAULT_PORTS[1]})",
    )
    p.add_argument(
        "--nvme-port",
        type=_port,
        default=DEFAULT_NVME_PORT,
        metavar="PORT",
        help=f"the port nvme-tcp exports listen on (default {DEFAULT_NVME_PORT})",
    )
    p.add_argument(
        "--heartbeat-interval",
        type=float,
        default=HEARTBEAT_SECONDS,
        metavar="SECONDS",
        help="seconds between heartbeats to management",
    )
    p.add_argument("--no-register", action="store_true", help="serve locally only")
    p.add_argument(
        "--copy-fallback",
        action="store_true",
        help="pools that cannot reflink make snapshots and clones as full copies (slow, "
        "full space) instead of refusing them",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument("--access-log", action="store_true", help="log every request line")
    p.add_argument(
        "--cgroup-root",
        type=Path,
        default=DEFAULT_CGROUP_ROOT,
        metavar="DIR",
        help="where the kubelet's pod cgroups are found for QoS limits (v1: its blkio "
        "hierarchy under DIR; v2: DIR itself)",
    )
    p.add_argument(
        "--capacity-reserve",
        type=float,
        default=DEFAULT_RESERVE.percent,
        metavar="PERCENT",
        help="percent of each pool filesystem never promised to volumes (metadata, growth)",
    )
    p.add_argument(
        "--capacity-reserve-min",
        type=parse_size,
        default=DEFAULT_RESERVE.minimum_bytes,
        metavar="SIZE",
        help="the reserve is at least this much per pool (e.g. 64MiB)",
    )
    p.add_argument(
        "--overcommit",
        action="append",
        default=[],
        metavar="POOL=RATIO",
        help="thin provisioning: promise RATIO times the pool's usable space (default 1.0)",
    )
    add_flags(p)
    args = p.parse_args(argv)
    if not args.pool and not args.file_pool:
        p.error("give at least one --pool NAME=DIR or --file-pool NAME=IMAGE:SIZE")
    return args


def _port(text: str) -> int:
    """One TCP port, 1-65535."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port within 1-65535")
    return port


def _port_range(text: str) -> tuple[int, int]:
    try:
        return parse_port_range(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def open_pools(args: argparse.Namespace) -> dict[str, Pool]:
    reserve = Reserve(args.capacity_reserve, args.capacity_reserve_min)
    ratios = parse_overcommit(args.overcommit)
    pools: dict[str, Pool] = {}
    for spec in args.pool:
        name = spec.partition("=")[0]
        if name in pools:
            raise SystemExit(f"--pool {name} given twice")
        ratio = ratios.pop(name, 1.0)
        pools[name] = parse_pool_spec(
            spec, reserve=reserve, overcommit_ratio=ratio, copy_fallback=args.copy_fallback
        )
    made = file_pools.open_file_pools(args.file_pool, args.state_dir.resolve(), set(pools))
    for name, directory in made.items():
        ratio = ratios.pop(name, 1.0)
        pools[name] = Pool.open(
            name,
            directory,
            reserve=reserve,
            overcommit_ratio=ratio,
            copy_fallback=args.copy_fallback,
        )
    if ratios:
        raise SystemExit(f"--overcommit names pools that are not given: {', '.join(ratios)}")
    return pools


def bind_socket(path: Path) -> socket.socket:
    """Listen on `path` with mode 0600; replace only a stale socket nobody serves."""
    try:
        claim_socket_path(path)
    except SocketPathTaken as err:
        raise SystemExit(f"tessera-node-agent: {err}") from err
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # no window in which the socket is world-accessible
    try:
        sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(128)
    return sock


@dataclass(frozen=True)
class Network:
    """Where the agent serves on TCP and what it tells others (from --listen/--advertise)."""

    host: str
    port: int
    advertise: str
    tls: bool

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.advertise}:{self.port}"


def network_of(args: argparse.Namespace) -> Network | None:
    """The TCP side from the flags, checked before anything starts; None without --listen."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("tessera-node-agent: --tls-cert and --tls-key go together")
    if not args.listen:
        if args.tls_cert:
            raise SystemExit(
                "tessera-node-agent: --tls-cert needs --listen (the unix socket is plain)"
            )
        return None
    host, sep, port = args.listen.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SystemExit(f"tessera-node-agent: --listen {args.listen!r} is not HOST:PORT")
    advertise = args.advertise or host
    if advertise in ("0.0.0.0", "::"):
        raise SystemExit(
            f"tessera-node-agent: --listen {args.listen} listens on every address; "
            "say which one others reach this node at with --advertise"
        )
    if ":" in advertise:
        raise SystemExit("tessera-node-agent: --advertise an IPv6 address by a host name")
    if args.tls_cert:
        check_tls_files(args.tls_cert, args.tls_key)
    return Network(host, int(port), advertise, bool(args.tls_cert))


def check_tls_files(cert: str, key: str) -> None:
    """Load the certificate and key now: a bad file must stop the start, not a listener later."""
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise SystemExit(f"tessera-node-agent: --tls-cert/--tls-key: {err}") from err


def check_ca_bundle(path: str) -> None:
    if not path:
        return
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as err:
        raise SystemExit(f"tessera-node-agent: --ca-bundle {path}: {err}") from err


def bind_tcp(network: Network) -> socket.socket:
    try:
        return socket.create_server(
            (network.host, network.port),
            family=socket.AF_INET6 if ":" in network.host else socket.AF_INET,
            backlog=128,
        )
    except OSError as err:
        raise SystemExit(
            f"tessera-node-agent: cannot listen on {network.host}:{network.port}: {err}"
        ) from err


class _Listener(uvicorn.Server):
    """A uvicorn server that leaves signals to `serve` (it stops every listener at once)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(
    agent: Agent,
    token: str,
    listeners: list[tuple[socket.socket, dict[str, str]]],
    log_level: str,
    access_log: bool,
    registration: Callable[[], Registration],
) -> None:
    """Serve the API on every (socket, TLS options) until SIGTERM/SIGINT stops them all."""
    app = create_app(agent, token, registration)
    servers = [
        (
            _Listener(
                uvicorn.Config(
                    app,
                    log_level=log_level,
                    log_config=None,  # uvicorn's lines go through configure_logging's handler
                    timeout_graceful_shutdown=5,
                    **tls,  # type: ignore[arg-type]
                    **server_options(access_log),
                )
            ),
            sock,
        )
        for sock, tls in listeners
    ]
    asyncio.run(_serve_all(servers))


async def _serve_all(servers: list[tuple[uvicorn.Server, socket.socket]]) -> None:
    def stop(signum: int) -> None:
        log.info("stopping on signal %d; volumes stay attached, exports stay open", signum)
        for server, _ in servers:
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop, signum)
    tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers]
    # one listener ending (it failed to start, say) ends the others: never half served
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for server, _ in servers:
        server.should_exit = True
    await asyncio.gather(*tasks)


def registration_of(registrar: Registrar | None) -> Callable[[], Registration]:
    """What GET /v1/node reports: the CSI plugin is not ready before this says registered."""
    if registrar is None:
        return lambda: Registration.DISABLED
    return lambda: (
        Registration.REGISTERED if registrar.registered.is_set() else Registration.PENDING
    )


def start_agent(args: argparse.Namespace, network: Network | None) -> Agent:
    export_address = args.export_address or (network.advertise if network else args.advertise)
    agent = Agent(
        args.node_id,
        open_pools(args),
        Path(args.dev_dir),
        state_dir=args.state_dir.resolve(),
        export_address=export_address,
        export_ports=args.export_ports,
        cgroup_root=args.cgroup_root,
        nvme_port=args.nvme_port,
    )
    agent.qos.watch()  # containers' cgroups appear after a publish (cgroup v1)
    agent.recover()
    agent.recover_exports()
    return agent


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    network = network_of(args)
    check_ca_bundle(args.ca_bundle)
    try:
        token = read_token(args.token_file)
        register_secret(token)
        agent = start_agent(args, network)
    except (TesseraError, OSError, ValueError) as err:
        print(f"tessera-node-agent: {err}", file=sys.stderr)
        return 2
    listeners: list[tuple[socket.socket, dict[str, str]]] = []
    if network is not None:  # first: a taken port must not leave the unix socket claimed
        tls = {"ssl_certfile": args.tls_cert, "ssl_keyfile": args.tls_key} if network.tls else {}
        listeners.append((bind_tcp(network), tls))
        log.info("serving peers on %s", network.url)
    socket_path = Path(args.socket).resolve()
    listeners.append((bind_socket(socket_path), {}))
    registrar = None
    if not args.no_register:
        agent_url = args.advertise_url or (network.url if network else f"unix://{socket_path}")
        registrar = Registrar(
            ManagementClient(args.management, token, ca_file=args.ca_bundle or None),
            agent.node_id,
            agent_url,
            agent.pool_reports,
            args.max_volumes,
            heartbeat_seconds=args.heartbeat_interval,
            follower=Follower(agent),
            transports=[t.value for t in host_transports()],
        )
        registrar.start()
    try:
        serve(agent, token, listeners, args.log_level, args.access_log, registration_of(registrar))
    finally:
        agent.freezes.thaw_all()  # never leave a filesystem frozen behind us
        if registrar is not None:
            registrar.stop()
        for sock, _ in listeners:
            sock.close()
        socket_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
