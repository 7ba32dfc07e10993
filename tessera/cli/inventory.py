"""`tessera node list` and `tessera pool list`: what management knows of the hardware."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from tessera.cli.connect import Management, StateDir, TokenFile, all_items, connect
from tessera.cli.output import Column, Output, OutputOpt, examples, print_list
from tessera.units import format_size

if TYPE_CHECKING:
    from tessera.models import Node

node_app = typer.Typer(
    help="Nodes: the machines whose agents serve pools.",
    no_args_is_help=True,
    epilog=examples("tessera node list"),
)
pool_app = typer.Typer(
    help="Pools: where volumes live, with their capacity.",
    no_args_is_help=True,
    epilog=examples("tessera pool list"),
)

NODE_COLUMNS = [
    Column("ID", lambda n: n.id, fold=True),
    Column("ONLINE", lambda n: "yes" if n.online else "NO"),
    Column(
        "LAST HEARTBEAT", lambda n: f"{max(time.time() - n.last_heartbeat, 0):.0f}s ago", drop=2
    ),
    Column("MAX VOLUMES", lambda n: str(n.max_volumes or "-"), drop=3),
    Column("AGENT", lambda n: n.agent_url, drop=4, fold=True),
    Column("TOPOLOGY", lambda n: _topology(n), wide_only=True),
]

POOL_COLUMNS = [
    Column("NODE", lambda p: p.node_id, fold=True),
    Column("POOL", lambda p: p.name, fold=True),
    Column("CAPACITY", lambda p: format_size(p.capacity_bytes)),
    Column("ALLOCATED", lambda p: format_size(p.allocated_bytes), drop=2),
    Column("FREE", lambda p: format_size(p.free_bytes)),
]


@node_app.command("list", epilog=examples("tessera node list", "tessera node list -o yaml"))
def node_list(
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """List nodes and whether they are heartbeating."""
    with connect(state_dir, management, token_file) as client:
        nodes = all_items(client.list_nodes)
    print_list(nodes, NODE_COLUMNS, output, noun="nodes")


@pool_app.command("list", epilog=examples("tessera pool list", "tessera pool list -o json"))
def pool_list(
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """List pools with their capacity."""
    with connect(state_dir, management, token_file) as client:
        pools = all_items(client.list_pools)
    print_list(pools, POOL_COLUMNS, output, noun="pools")


def _age(ts: float) -> str:
    return f"{max(time.time() - ts, 0):.0f}s ago"


def _topology(n: Node) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(n.topology.items())) or "-"
