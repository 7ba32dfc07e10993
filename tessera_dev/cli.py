"""`tessera dev up`: a whole Tessera stack on this machine, for trying it out.

Registered as the `dev` sub-command through the `tessera.cli` entry-point
group (pyproject.toml): the base CLI never imports this package.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Protocol

import typer
from rich.table import Table

from tessera.cli.connect import StateDir
from tessera.cli.failures import CliError, usage
from tessera.cli.output import console, examples
from tessera.errors import TesseraError
from tessera.units import parse_size

DEFAULT_NODE_ID = "node-1"

app = typer.Typer(
    help="A whole Tessera stack on this machine.",
    no_args_is_help=True,
    epilog=examples("tessera dev up --state-dir .state"),
)


class Stack(Protocol):
    def stop(self) -> None: ...
    def failed_process(self) -> str | None: ...


@app.command(
    "up",
    epilog=examples(
        "tessera dev up --state-dir .state",
        "tessera dev up --state-dir .state --demo --exit-after-demo",
        "tessera dev up --state-dir .state-3 --nodes 3 --pool-size 4G",
    ),
)
def dev_up(
    state_dir: StateDir = Path(".state"),
    pool_size: Annotated[
        str, typer.Option(help="size of the file-backed pool (of each node)")
    ] = "20G",
    nodes: Annotated[
        int,
        typer.Option(
            min=1,
            help="nodes: 1 runs everything in this network namespace; N >= 2 runs nodes "
            "n1..nN, each in its own network namespace with its own address, pool, agent "
            "and CSI node plugin",
        ),
    ] = 1,
    node_id: Annotated[
        str | None, typer.Option(help=f"this node's id (--nodes 1; default {DEFAULT_NODE_ID})")
    ] = None,
    max_volumes_per_node: Annotated[int, typer.Option(min=0, help="0 = no limit")] = 0,
    demo: Annotated[bool, typer.Option(help="run the demo once the stack is up")] = False,
    exit_after_demo: Annotated[bool, typer.Option(help="stop after the demo")] = False,
) -> None:
    """Start management, a node-agent with a file-backed pool, and the CSI plugin.

    With --nodes N (N >= 2): management and the CSI controller here, and N
    nodes each in a network namespace linked to a bridge; see
    DIR/stack.json for every address and socket.

    Runs until Ctrl-C or SIGTERM, then stops everything and leaves no loop
    devices, mounts, namespaces or processes behind; volumes stay in the
    state directory.
    """
    size = _pool_size(pool_size)
    if nodes > 1 and node_id is not None:
        raise usage(f"--node-id is for --nodes 1; with --nodes {nodes} the ids are n1..n{nodes}")
    if nodes > 1 and (demo or exit_after_demo):
        raise usage("--demo runs on --nodes 1 (the demo publishes on one node)")
    if os.geteuid() != 0:
        raise usage("tessera dev up needs root: it creates loop devices and mounts")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    if nodes == 1:
        _run_single(state_dir, size, node_id or DEFAULT_NODE_ID, max_volumes_per_node, stop,
                    demo=demo, exit_after_demo=exit_after_demo)  # fmt: skip
    else:
        _run_multi(state_dir, size, nodes, max_volumes_per_node, stop)


def _run_single(
    state_dir: Path,
    size: int,
    node_id: str,
    max_volumes: int,
    stop: threading.Event,
    *,
    demo: bool,
    exit_after_demo: bool,
) -> None:
    from tessera_dev.stack import DevStack

    stack = DevStack(state_dir, pool_size=size, node_id=node_id, max_volumes_per_node=max_volumes)

    def after_start(info: Any) -> bool:
        _print_table("Tessera dev stack", vars(info))
        if demo or exit_after_demo:
            from tessera_dev.demo import run_demo

            run_demo(info, console)
        return not exit_after_demo

    _supervise(stack, stack.start, after_start, stop)


def _run_multi(
    state_dir: Path, size: int, nodes: int, max_volumes: int, stop: threading.Event
) -> None:
    from tessera_dev.multinode import MultiNodeStack, StackError

    try:
        stack = MultiNodeStack(
            state_dir, nodes=nodes, pool_size=size, max_volumes_per_node=max_volumes, cancel=stop
        )
    except StackError as exc:
        raise usage(str(exc)) from None

    def after_start(info: Any) -> bool:
        _print_table(f"Tessera dev stack, {nodes} nodes", {
            k: v for k, v in vars(info).items() if k != "nodes"
        })  # fmt: skip
        _print_nodes(info.nodes)
        return True

    _supervise(stack, stack.start, after_start, stop)


def _supervise(
    stack: Stack,
    start: Callable[[], Any],
    after_start: Callable[[Any], bool],
    stop: threading.Event,
) -> None:
    """Start, run `after_start`, then watch the processes until a signal; always stop."""
    try:
        info = start()
        if not after_start(info):
            return
        console.print("[green]running[/] — Ctrl-C stops everything")
        while not stop.wait(1.0):
            failed = stack.failed_process()
            if failed:
                raise CliError(f"{failed} exited; see {info.state_dir}/logs/{failed}.log")
    except (RuntimeError, TesseraError) as exc:
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


def _print_table(title: str, values: dict[str, object]) -> None:
    table = Table(title=title, show_header=False)
    for key, value in values.items():
        table.add_row(key, str(value))
    console.print(table)


def _print_nodes(nodes: list[Any]) -> None:
    table = Table(title="nodes")
    for column in ("node", "namespace", "agent", "CSI endpoint"):
        table.add_column(column, overflow="fold")  # never cut an address or a path
    for node in nodes:
        table.add_row(node.node_id, node.netns, node.agent_url, node.csi_endpoint)
    console.print(table)
