"""`tessera node list|fence|unfence` and `tessera pool list`: what management knows of the hardware.

`node list` shows each node's liveness (online, UNREACHABLE, FENCED: see
docs/liveness.md) and how long ago it last beat. `node fence` cuts a node
off so its single-writer volumes can move: management has the owners close
its exports before it releases its attachments, and refuses a node that
still heartbeats unless `--force`. A fence is sticky: `node unfence` lifts
it once the node was repaired (docs/liveness.md).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tessera.cli.connect import Management, StateDir, TokenFile, all_items, connect
from tessera.cli.output import Column, Output, OutputOpt, console, dump, examples, print_list
from tessera.cli.volumes import check_ref
from tessera.units import format_size

if TYPE_CHECKING:
    from tessera.models import Node

node_app = typer.Typer(
    help="Nodes: the machines whose agents serve pools.",
    no_args_is_help=True,
    epilog=examples("tessera node list", "tessera node fence n2", "tessera node unfence n2"),
)
pool_app = typer.Typer(
    help="Pools: where volumes live, with their capacity.",
    no_args_is_help=True,
    epilog=examples("tessera pool list"),
)

NODE_COLUMNS = [
    Column("ID", lambda n: n.id, fold=True),
    # upper case where a person must act: an unreachable node blocks its volumes
    Column("STATE", lambda n: n.state.value if n.online else n.state.value.upper()),
    Column("LAST HEARTBEAT", lambda n: _age(n.last_heartbeat), drop=2),
    # what its remote legs and attachments can come over (nvme-tcp needs kernel modules)
    Column("TRANSPORTS", lambda n: _transports(n), drop=2),
    Column("MAX VOLUMES", lambda n: str(n.max_volumes or "-"), drop=3),
    Column("AGENT", lambda n: n.agent_url, drop=4, fold=True),
    Column("TOPOLOGY", lambda n: _topology(n), wide_only=True),
]

POOL_COLUMNS = [
    Column("NODE", lambda p: p.node_id, fold=True),
    Column("POOL", lambda p: p.name, fold=True),
    Column("CAPACITY", lambda p: format_size(p.capacity_bytes)),
    # logical: what volumes and snapshots were promised; physical: what the filesystem holds
    # (reflinked extents once), so a pool full of snapshots shows ALLOCATED >> USED
    Column("ALLOCATED", lambda p: format_size(p.allocated_bytes), drop=2),
    Column("FREE", lambda p: format_size(p.free_bytes)),
    Column("USED", lambda p: format_size(p.used_bytes), drop=3),
    Column("SNAPSHOTS", lambda p: p.snapshot_method.value, drop=4),
]


@node_app.command("list", epilog=examples("tessera node list", "tessera node list -o yaml"))
def node_list(
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """List nodes, their state (online, unreachable, fenced), last heartbeat and transports."""
    with connect(state_dir, management, token_file) as client:
        nodes = all_items(client.list_nodes)
    print_list(nodes, NODE_COLUMNS, output, noun="nodes")


@node_app.command(
    "fence",
    epilog=examples("tessera node fence n2", "tessera node fence n2 --force -o json"),
)
def node_fence(
    node: Annotated[str, typer.Argument(help="the node to cut off")],
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="fence a node that still heartbeats (it may still be writing: be sure it is "
            "cut off from its volumes)",
        ),
    ] = False,
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Fence a node: its exports are closed and its attachments released (idempotent)."""
    check_ref(node, what="NODE")
    with connect(state_dir, management, token_file) as client:
        report = client.fence_node(node, force=force)
    if output in (Output.JSON, Output.YAML):
        dump(report.model_dump(mode="json"), output)
        return
    released = ", ".join(report.released) or "none"
    console.print(
        f"node {report.node_id} is {report.state.value}; attachments released: {released}",
        markup=False,
        soft_wrap=True,
    )


@node_app.command(
    "unfence",
    epilog=examples("tessera node unfence n2", "tessera node unfence n2 -o json"),
)
def node_unfence(
    node: Annotated[str, typer.Argument(help="the repaired node to let back in")],
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Lift a node's fence once it was repaired or rebooted (idempotent).

    Only then may it attach, host new volumes and export again. Do not
    unfence a node whose pods may still use local volumes: they could write
    beside the node that took them over.
    """
    check_ref(node, what="NODE")
    with connect(state_dir, management, token_file) as client:
        got = client.unfence_node(node)
    if output in (Output.JSON, Output.YAML):
        dump(got.model_dump(mode="json"), output)
        return
    console.print(f"node {got.id} is {got.state.value}", markup=False, soft_wrap=True)


@pool_app.command("list", epilog=examples("tessera pool list", "tessera pool list -o json"))
def pool_list(
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """List pools: capacity, logical allocation, physical use and how they snapshot.

    ALLOCATED is what management promised (volume sizes plus what snapshots
    may pin); USED is what the filesystem really holds (shared extents once).
    SNAPSHOTS: reflink (instant), copy (--copy-fallback: full copies) or none.
    """
    with connect(state_dir, management, token_file) as client:
        pools = all_items(client.list_pools)
    print_list(pools, POOL_COLUMNS, output, noun="pools")


def _transports(node: Node) -> str:
    """`loop,nbd (kernel),nvme-tcp`: `(kernel)` when its nbd has the kernel client, which
    nbd legs of composed volumes need on the node using them (docs/layouts.md)."""
    named = ["nbd (kernel)" if t == "nbd" and node.kernel_nbd else t for t in node.transports]
    return ",".join(named) or "-"


def _age(ts: float) -> str:
    return f"{max(time.time() - ts, 0):.0f}s ago" if ts else "never"


def _topology(n: Node) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(n.topology.items())) or "-"
