"""The `tessera` command: run a development stack and look at what it holds."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tessera.clients import ManagementClient
from tessera.errors import TesseraError
from tessera.http import read_token
from tessera.models import VolumeCreate
from tessera.units import format_size, parse_size

app = typer.Typer(help="Tessera: NVMe-backed block volumes for Kubernetes.", no_args_is_help=True)
dev_app = typer.Typer(help="A whole Tessera stack on this machine.", no_args_is_help=True)
volume_app = typer.Typer(help="Volumes.", no_args_is_help=True)
node_app = typer.Typer(help="Nodes.", no_args_is_help=True)
pool_app = typer.Typer(help="Pools.", no_args_is_help=True)
app.add_typer(dev_app, name="dev")
app.add_typer(volume_app, name="volume")
app.add_typer(node_app, name="node")
app.add_typer(pool_app, name="pool")

console = Console()
err_console = Console(stderr=True)

StateDir = Annotated[
    Path, typer.Option("--state-dir", envvar="TESSERA_STATE_DIR", help="dev stack state directory")
]


# ---- dev ---------------------------------------------------------------------


@dev_app.command("up")
def dev_up(
    state_dir: StateDir = Path(".state"),
    pool_size: Annotated[str, typer.Option(help="size of the file-backed pool")] = "20G",
    node_id: Annotated[str, typer.Option(help="this node's id")] = "node-1",
    max_volumes_per_node: Annotated[int, typer.Option(help="0 = no limit")] = 0,
    demo: Annotated[bool, typer.Option(help="run the demo once the stack is up")] = False,
    exit_after_demo: Annotated[bool, typer.Option(help="stop after the demo")] = False,
) -> None:
    """Start management, a node-agent with a file-backed pool, and the CSI plugin."""
    from tessera.dev.stack import DevStack

    if os.geteuid() != 0:
        err_console.print("[red]tessera dev up needs root[/]: it creates loop devices and mounts.")
        raise typer.Exit(2)
    stack = DevStack(
        state_dir,
        pool_size=parse_size(pool_size),
        node_id=node_id,
        max_volumes_per_node=max_volumes_per_node,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        info = stack.start()
        _print_stack(info)
        if demo or exit_after_demo:
            from tessera.dev.demo import run_demo

            run_demo(info, console)
        if exit_after_demo:
            return
        console.print("[green]running[/] — Ctrl-C stops everything")
        while not stop.wait(1.0):
            failed = stack.failed_process()
            if failed:
                err_console.print(
                    f"[red]{failed} exited[/]; see {info.state_dir}/logs/{failed}.log"
                )
                raise typer.Exit(1)
    except RuntimeError as exc:
        err_console.print(f"[red]{exc}[/]")
        raise typer.Exit(1) from exc
    finally:
        stack.stop()
        console.print("stopped; no loop devices, mounts or processes left behind")


def _print_stack(info: object) -> None:
    table = Table(title="Tessera dev stack", show_header=False)
    for key, value in vars(info).items():
        table.add_row(key, str(value))
    console.print(table)


# ---- management queries ----------------------------------------------------------


def _client(state_dir: Path, management: str | None, token_file: Path | None) -> ManagementClient:
    if management and token_file:
        return ManagementClient(management, read_token(token_file))
    from tessera.dev.stack import load_stack_info

    try:
        info = load_stack_info(state_dir)
    except FileNotFoundError:
        err_console.print(
            f"no running stack in {state_dir}: start one with `tessera dev up`, "
            "or pass --management and --token-file"
        )
        raise typer.Exit(2) from None
    return ManagementClient(info.management_url, read_token(info.token_file))


Management = Annotated[str | None, typer.Option(envvar="TESSERA_MANAGEMENT", help="management URL")]
TokenFile = Annotated[
    Path | None, typer.Option(envvar="TESSERA_TOKEN_FILE", help="bearer token file")
]


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _all_pages(fetch):  # type: ignore[no-untyped-def]
    token = ""
    while True:
        page = fetch(token)
        yield from page.items
        token = page.next_token
        if not token:
            return


@volume_app.command("list")
def volume_list(
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """List volumes."""
    with _errors():
        client = _client(state_dir, management, token_file)
        table = Table("ID", "NAME", "SIZE", "STATE", "NODE", "POOL", "PUBLISHED ON", "CREATED")
        for v in _all_pages(lambda t: client.list_volumes(page_token=t)):
            table.add_row(
                v.id,
                v.name,
                format_size(v.size_bytes),
                v.state.value,
                v.node_id,
                v.pool,
                ", ".join(v.published_nodes) or "-",
                _when(v.created_at),
            )
        console.print(table)


@volume_app.command("show")
def volume_show(
    volume_id: str,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Show one volume and its attachments."""
    with _errors():
        client = _client(state_dir, management, token_file)
        v = client.get_volume(volume_id)
        table = Table(show_header=False, title=v.id)
        for key, value in v.model_dump(mode="json").items():
            table.add_row(key, str(value))
        for a in client.list_attachments(volume_id):
            ro = " (read-only)" if a.readonly else ""
            table.add_row("attachment", f"{a.node_id}: {a.access_mode.value}{ro}")
        console.print(table)


@volume_app.command("create")
def volume_create(
    name: str,
    size: Annotated[str, typer.Option(help="e.g. 10G")] = "1G",
    vpg: str = "default",
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Create a volume (idempotent by name)."""
    with _errors():
        client = _client(state_dir, management, token_file)
        v = client.create_volume(VolumeCreate(name=name, size_bytes=parse_size(size), vpg=vpg))
        console.print(f"{v.id}  {v.name}  {format_size(v.size_bytes)}  on {v.node_id}/{v.pool}")


@volume_app.command("delete")
def volume_delete(
    volume_id: str,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Delete a volume (refused while it is attached)."""
    with _errors():
        _client(state_dir, management, token_file).delete_volume(volume_id)
        console.print(f"deleted {volume_id}")


@node_app.command("list")
def node_list(
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """List nodes."""
    with _errors():
        client = _client(state_dir, management, token_file)
        table = Table("ID", "ONLINE", "AGENT", "MAX VOLUMES", "LAST HEARTBEAT")
        for n in _all_pages(lambda t: client.list_nodes(page_token=t)):
            age = f"{time.time() - n.last_heartbeat:.0f}s ago"
            table.add_row(
                n.id, "yes" if n.online else "NO", n.agent_url, str(n.max_volumes or "-"), age
            )
        console.print(table)


@pool_app.command("list")
def pool_list(
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """List pools with their capacity."""
    with _errors():
        client = _client(state_dir, management, token_file)
        table = Table("NODE", "POOL", "CAPACITY", "ALLOCATED", "FREE")
        for p in _all_pages(lambda t: client.list_pools(page_token=t)):
            table.add_row(
                p.node_id,
                p.name,
                format_size(p.capacity_bytes),
                format_size(p.allocated_bytes),
                format_size(p.free_bytes),
            )
        console.print(table)


class _errors:
    """Print Tessera errors as one readable line instead of a traceback."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, TesseraError):
            err_console.print(f"[red]error:[/] {exc.message}")
            raise typer.Exit(1)
        return False


def main() -> None:
    app()


if __name__ == "__main__":
    main()
