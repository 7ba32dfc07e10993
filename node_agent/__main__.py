"""`tessera-node-agent`: serve the local API on a unix socket.

Start-up order matters: recover first (re-adopt devices that outlived the
previous agent), then serve, and register with management in the
background so a missing control plane never blocks the data plane.
SIGTERM stops serving but never detaches volumes: pods keep their I/O.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import uvicorn

from node_agent.agent import Agent
from node_agent.api import create_app
from node_agent.attachments import DEFAULT_DEV_DIR
from node_agent.pools import DEFAULT_RESERVE, Pool, Reserve, parse_overcommit, parse_pool_spec
from node_agent.registration import Registrar
from tessera.clients import ManagementClient
from tessera.errors import TesseraError
from tessera.http import read_token
from tessera.models import Registration
from tessera.rest import server_options
from tessera.sockets import SocketPathTaken, claim_socket_path
from tessera.units import parse_size

log = logging.getLogger("node_agent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tessera-node-agent", description=__doc__.splitlines()[0])
    p.add_argument("--node-id", required=True)
    p.add_argument("--management", required=True, help="unix:///path.sock or http(s)://host:port")
    p.add_argument("--token-file", required=True)
    p.add_argument("--pool", action="append", required=True, metavar="NAME=DIR")
    p.add_argument("--socket", required=True, help="unix socket path for the local API")
    p.add_argument("--dev-dir", default=str(DEFAULT_DEV_DIR))
    p.add_argument("--max-volumes", type=int, default=0, help="0 means no limit")
    p.add_argument("--advertise-url", default="", help="default: unix://<socket>")
    p.add_argument("--no-register", action="store_true", help="serve locally only")
    p.add_argument("--log-level", default="info")
    p.add_argument("--access-log", action="store_true", help="log every request line")
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
    return p.parse_args(argv)


def open_pools(args: argparse.Namespace) -> dict[str, Pool]:
    reserve = Reserve(args.capacity_reserve, args.capacity_reserve_min)
    ratios = parse_overcommit(args.overcommit)
    pools: dict[str, Pool] = {}
    for spec in args.pool:
        name = spec.partition("=")[0]
        if name in pools:
            raise SystemExit(f"--pool {name} given twice")
        ratio = ratios.pop(name, 1.0)
        pools[name] = parse_pool_spec(spec, reserve=reserve, overcommit_ratio=ratio)
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


def serve(
    agent: Agent,
    token: str,
    sock: socket.socket,
    log_level: str,
    access_log: bool,
    registration: Callable[[], Registration],
) -> None:
    config = uvicorn.Config(
        create_app(agent, token, registration),
        log_level=log_level,
        timeout_graceful_shutdown=5,
        **server_options(access_log),
    )
    uvicorn.Server(config).run(sockets=[sock])


def registration_of(registrar: Registrar | None) -> Callable[[], Registration]:
    """What GET /v1/node reports: the CSI plugin is not ready before this says registered."""
    if registrar is None:
        return lambda: Registration.DISABLED
    return lambda: (
        Registration.REGISTERED if registrar.registered.is_set() else Registration.PENDING
    )


def _ignore_replayed_signal(signum: int, _frame: object) -> None:
    """uvicorn re-raises SIGTERM after its graceful stop; we have already stopped."""
    log.info("stopping on signal %d; volumes stay attached", signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        agent = Agent(args.node_id, open_pools(args), Path(args.dev_dir))
        token = read_token(args.token_file)
        agent.recover()
    except (TesseraError, OSError, ValueError) as err:
        print(f"tessera-node-agent: {err}", file=sys.stderr)
        return 2
    socket_path = Path(args.socket).resolve()
    sock = bind_socket(socket_path)
    registrar = None
    if not args.no_register:
        registrar = Registrar(
            ManagementClient(args.management, token),
            agent.node_id,
            args.advertise_url or f"unix://{socket_path}",
            agent.pool_capacities,
            args.max_volumes,
        )
        registrar.start()
    signal.signal(signal.SIGTERM, _ignore_replayed_signal)
    signal.signal(signal.SIGINT, _ignore_replayed_signal)
    try:
        serve(agent, token, sock, args.log_level, args.access_log, registration_of(registrar))
    finally:
        if registrar is not None:
            registrar.stop()
        sock.close()
        socket_path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
