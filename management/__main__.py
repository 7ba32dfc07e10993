"""`tessera-management`: serve the management API on TCP or a unix socket."""

from __future__ import annotations

import argparse
import os

import uvicorn
from sqlalchemy import make_url
from sqlalchemy.exc import ArgumentError

from management.app import create_app
from management.context import DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_MISSES
from management.db import SchemaTooOld
from management.inventory import ensure_vpgs, parse_vpg_flag
from management.reconcile import PeriodicReconciler
from management.repair import AutoRepair
from tessera.errors import TesseraError
from tessera.http import read_token
from tessera.observability.logs import add_flags, configure_logging, register_secret
from tessera.rest import server_options

#: seconds between two periodic reconcile checks (each lists every agent's files and devices)
DEFAULT_RECONCILE_INTERVAL = 600.0
#: seconds between two looks of --auto-repair at degraded or rebuilding volumes
DEFAULT_AUTO_REPAIR_INTERVAL = 30.0


def parse_listen(listen: str) -> dict[str, object]:
    """`unix:///path.sock` or `HOST:PORT` (`[::1]:PORT` for IPv6) → uvicorn bind kwargs."""
    if listen.startswith("unix://"):
        return {"uds": listen.removeprefix("unix://")}
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(
            f"--listen {listen!r}: expected HOST:PORT or unix:///path.sock"
        )
    return {"host": host.strip("[]") or "127.0.0.1", "port": int(port)}


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera-management", description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT or unix:///path.sock")
    p.add_argument(
        "--db",
        # the chart feeds a PostgreSQL URL (with its password) from a Secret through the env
        default=os.environ.get("TESSERA_DB_URL") or "sqlite:///./tessera.db",
        help="SQLAlchemy database URL (default: $TESSERA_DB_URL, else sqlite:///./tessera.db)",
    )
    p.add_argument(
        "--vpg",
        action="append",
        default=[],
        metavar="NAME=LAYOUT[,legs=N][,chunk=SIZE]",
        help="a volume provisioning group to ensure at start, like `default` (repeatable); "
        "LAYOUT: concat, raid0, raid1 or raid10 (e.g. safe=raid1,legs=3 or "
        "wide=raid0,legs=4,chunk=128K)",
    )
    p.add_argument("--token-file", required=True, help="file holding the API bearer token")
    p.add_argument(
        "--heartbeat-interval",
        type=_positive,
        default=DEFAULT_HEARTBEAT_INTERVAL,
        metavar="SECONDS",
        help="how often the node-agents heartbeat (theirs is 10 s)",
    )
    p.add_argument(
        "--heartbeat-misses",
        type=_positive_int,
        default=DEFAULT_HEARTBEAT_MISSES,
        metavar="N",
        help="a node missing this many beats in a row is unreachable (see docs/liveness.md)",
    )
    p.add_argument(
        "--ca-bundle",
        metavar="FILE",
        help="CA certificates that signed the node-agents' https certificates",
    )
    p.add_argument("--access-log", action="store_true", help="log every request line")
    p.add_argument(
        "--reconcile-interval",
        type=float,
        default=DEFAULT_RECONCILE_INTERVAL,
        metavar="SECONDS",
        help="compare the agents' files and attachments with the database this often and log "
        "the differences as warnings (never fixes); 0 disables",
    )
    p.add_argument(
        "--auto-repair",
        action="store_true",
        help="replace the failed legs of mirrored volumes by itself (as `tessera volume "
        "repair` does) and follow their resync; off by default: an operator decides",
    )
    p.add_argument(
        "--auto-repair-interval",
        type=float,
        default=DEFAULT_AUTO_REPAIR_INTERVAL,
        metavar="SECONDS",
        help="with --auto-repair: how often degraded or rebuilding volumes are looked at",
    )
    add_flags(p, log_level=True)
    return p


def register_db_password(url: str) -> None:
    """A PostgreSQL URL's password never reaches the log, even inside a driver's error."""
    try:
        password = make_url(url).password
    except ArgumentError:
        return  # create_app reports the bad URL
    if password:
        register_secret(str(password))


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        bind = parse_listen(args.listen)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    if args.ca_bundle and not os.access(args.ca_bundle, os.R_OK):
        parser.error(f"--ca-bundle {args.ca_bundle}: not a readable file")
    if not args.auto_repair_interval > 0:
        parser.error("--auto-repair-interval must be more than 0 seconds")
    try:
        vpgs = [parse_vpg_flag(v) for v in args.vpg]
    except TesseraError as exc:
        parser.error(exc.message)
    configure_logging(args.log_level, args.log_format)
    token = read_token(args.token_file)
    register_secret(token)
    register_db_password(args.db)
    try:
        app = create_app(
            args.db,
            token,
            heartbeat_interval=args.heartbeat_interval,
            heartbeat_misses=args.heartbeat_misses,
            ca_file=args.ca_bundle,
        )
    except SchemaTooOld as exc:
        parser.exit(1, f"tessera-management: {exc}\n")
    try:
        ensure_vpgs(app.state.ctx, vpgs)
    except TesseraError as exc:
        parser.exit(1, f"tessera-management: {exc.message}\n")
    reconciler = None
    if args.reconcile_interval > 0:
        reconciler = PeriodicReconciler(app.state.ctx, args.reconcile_interval)
        reconciler.start()
    auto_repair = None
    if args.auto_repair:
        auto_repair = AutoRepair(app.state.ctx, args.auto_repair_interval)
        auto_repair.start()
    try:
        uvicorn.run(
            app,
            log_level=args.log_level.lower(),
            log_config=None,  # uvicorn's lines go through configure_logging's handler too
            **server_options(args.access_log),
            **bind,  # type: ignore[arg-type]
        )
    finally:
        if reconciler is not None:
            reconciler.stop()
        if auto_repair is not None:
            auto_repair.stop()


if __name__ == "__main__":
    main()
