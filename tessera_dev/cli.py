"""`tessera dev up`: a whole Tessera stack on this machine, for trying it out."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tessera.cli.connect import StateDir
from tessera.cli.failures import CliError, usage
from tessera.cli.output import console, examples
from tessera.units import parse_size

app = typer.Typer(
    help="A whole Tessera stack on this machine.",
    no_args_is_help=True,
    epilog=examples("tessera dev up --state-dir .state"),
)


@app.command(
    "up",
    epilog=examples(
        "tessera dev up --state-dir .state",
        "tessera dev up --state-dir .state --demo --exit-after-demo",
    ),
)
def dev_up(
    state_dir: StateDir = Path(".state"),
    pool_size: Annotated[str, typer.Option(help="size of the file-backed pool")] = "20G",
    node_id: Annotated[str, typer.Option(help="this node's id")] = "node-1",
    max_volumes_per_node: Annotated[int, typer.Option(min=0, help="0 = no limit")] = 0,
    demo: Annotated[bool, typer.Option(help="run the demo once the stack is up")] = False,
    exit_after_demo: Annotated[bool, typer.Option(help="stop after the demo")] = False,
) -> None:
    """Start management, a node-agent with a file-backed pool, and the CSI plugin.

    Runs until Ctrl-C or SIGTERM, then stops everything and leaves no loop
    devices, mounts or processes behind; volumes stay in the state directory.
    """
    from tessera_dev.stack import DevStack

    size = _pool_size(pool_size)
    if os.geteuid() != 0:
        raise usage("tessera dev up needs root: it creates loop devices and mounts")
    stack = DevStack(
        state_dir, pool_size=size, node_id=node_id, max_volumes_per_node=max_volumes_per_node
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        info = stack.start()
        _print_stack(info)
        if demo or exit_after_demo:
            from tessera_dev.demo import run_demo

            run_demo(info, console)
        if exit_after_demo:
            return
        console.print("[green]running[/] — Ctrl-C stops everything")
        while not stop.wait(1.0):
            failed = stack.failed_process()
            if failed:
                raise CliError(f"{failed} exited; see {info.state_dir}/logs/{failed}.log")
    except RuntimeError as exc:
        raise CliError(str(exc)) from exc
    finally:
        stack.stop()
        console.print("stopped; no loop devices, mounts or processes left behind")


def _pool_size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise usage(f"--pool-size: {exc}") from None
    if size <= 0:
        raise usage(f"--pool-size must be more than 0 (got {text!r})")
    return size


def _print_stack(info: object) -> None:
    table = Table(title="Tessera dev stack", show_header=False)
    for key, value in vars(info).items():
        table.add_row(key, str(value))
    console.print(table)
