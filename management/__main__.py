"""`tessera-management`: serve the management API on TCP or a unix socket."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from management.app import create_app
from management.context import DEFAULT_HEARTBEAT_TIMEOUT
from management.reconcile import PeriodicReconciler
from tessera.http import read_token
from tessera.rest import server_options

#: seconds between two periodic reconcile checks (each lists every agent's files and devices)
DEFAULT_RECONCILE_INTERVAL = 600.0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tessera-management", description=__doc__)
    p.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT or unix:///path.sock")
    p.add_argument("--db", default="sqlite:///./tessera.db", help="SQLAlchemy database URL")
    p.add_argument("--token-file", required=True, help="file holding the API bearer token")
    p.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=DEFAULT_HEARTBEAT_TIMEOUT,
        help="seconds without a heartbeat before a node is offline",
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
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        bind = parse_listen(args.listen)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = read_token(args.token_file)
    app = create_app(args.db, token, heartbeat_timeout=args.heartbeat_timeout)
    reconciler = None
    if args.reconcile_interval > 0:
        reconciler = PeriodicReconciler(app.state.ctx, args.reconcile_interval)
        reconciler.start()
    try:
        uvicorn.run(app, log_level="info", **server_options(args.access_log), **bind)  # type: ignore[arg-type]
    finally:
        if reconciler is not None:
            reconciler.stop()


if __name__ == "__main__":
    main()
