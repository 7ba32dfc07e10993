"""`tessera snapshot ...`: list, show, create and delete snapshots.

Like volumes, a snapshot is given by its name or its ID; the volume a
snapshot is cut of is given the same way. A snapshot is a reflink copy of
the volume's file in the same pool (docs/data-services.md): instant, and
it holds space only as the volume diverges from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tessera.cli.connect import Management, StateDir, TokenFile, all_items, connect
from tessera.cli.output import (
    Column,
    Output,
    OutputOpt,
    examples,
    print_list,
    print_object,
    when,
)
from tessera.cli.volumes import VolumeRef, check_ref, delete_found, print_made
from tessera.units import format_size

app = typer.Typer(
    help="Snapshots: instant copies of a volume, to restore or clone from.",
    no_args_is_help=True,
    epilog=examples(
        "tessera snapshot create db-data db-data-monday",
        "tessera snapshot list",
        "tessera volume clone db-data-monday db-restored",
    ),
)

SnapshotRef = Annotated[str, typer.Argument(metavar="NAME|ID", help="the snapshot's name or ID")]

COLUMNS = [
    Column("ID", lambda s: s.id),
    Column("NAME", lambda s: s.name, fold=True),
    Column("VOLUME", lambda s: s.source_volume_id, drop=3),
    Column("SIZE", lambda s: format_size(s.size_bytes)),
    Column("READY", lambda s: "yes" if s.ready_to_use else s.state.value),
    Column("ALLOCATED", lambda s: format_size(s.allocated_bytes), drop=4),
    Column("CREATED", lambda s: when(s.created_at), drop=5),
    Column("NODE", lambda s: s.node_id, wide_only=True),
    Column("POOL", lambda s: s.pool, wide_only=True),
    Column("METHOD", lambda s: s.method.value, wide_only=True),
    Column("GROUP", lambda s: s.group_snapshot_id or "-", wide_only=True),
]


@app.command(
    "list",
    epilog=examples(
        "tessera snapshot list",
        "tessera snapshot list --volume db-data -o wide",
        "tessera snapshot list -o json | jq -r '.items[].id'",
    ),
)
def snapshot_list(
    volume: Annotated[
        str, typer.Option(metavar="NAME|ID", help="only the snapshots of this volume")
    ] = "",
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """List snapshots. Narrow terminals drop CREATED, ALLOCATED, ... before an ID is ever cut."""
    with connect(state_dir, management, token_file) as client:
        source = client.find_volume(check_ref(volume)).id if volume else ""
        snaps = all_items(
            lambda page_token="", max_entries=0: client.list_snapshots(
                page_token, max_entries, source_volume_id=source
            )
        )
    print_list(snaps, COLUMNS, output, noun="snapshots")


@app.command(
    "show",
    epilog=examples(
        "tessera snapshot show db-data-monday",
        "tessera snapshot show snap-0123456789abcdef0123456789abcdef -o yaml",
    ),
)
def snapshot_show(
    snapshot: SnapshotRef,
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Show one snapshot, by name or ID. -o json/yaml: the Snapshot model."""
    check_ref(snapshot)
    with connect(state_dir, management, token_file) as client:
        s = client.find_snapshot(snapshot)
    fields = [
        ("id", s.id),
        ("name", s.name),
        ("volume", s.source_volume_id),
        ("size", f"{format_size(s.size_bytes)} ({s.size_bytes} bytes)"),
        ("state", s.state.value),
        ("ready to use", "yes" if s.ready_to_use else "no"),
        ("node", s.node_id),
        ("pool", s.pool),
        ("method", s.method.value),
        ("allocated", f"{format_size(s.allocated_bytes)} (space it may pin in the pool)"),
        ("group", s.group_snapshot_id or "-"),
        ("created", when(s.created_at)),
    ]
    print_object(s, fields, output)


@app.command(
    "create",
    epilog=examples(
        "tessera snapshot create db-data db-data-monday",
        "tessera snapshot create vol-0123456789abcdef0123456789abcdef nightly -o json",
    ),
)
def snapshot_create(
    volume: VolumeRef,
    name: Annotated[str, typer.Argument(help="unique name; creating it again is a no-op")],
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Snapshot a volume (idempotent by name; a mounted filesystem is frozen for the instant)."""
    check_ref(volume)
    check_ref(name, what="NAME")
    from tessera.models import SnapshotCreate

    with connect(state_dir, management, token_file) as client:
        source = client.find_volume(volume)
        s = client.create_snapshot(SnapshotCreate(name=name, source_volume_id=source.id))
    print_made(
        s,
        output,
        f"{s.id}  {s.name}  of {source.name} ({s.source_volume_id})  {format_size(s.size_bytes)}",
    )


@app.command(
    "delete",
    epilog=examples(
        "tessera snapshot delete db-data-monday",
        "tessera snapshot delete snap-0123456789abcdef0123456789abcdef --ignore-not-found",
    ),
)
def snapshot_delete(
    snapshot: SnapshotRef,
    ignore_not_found: Annotated[
        bool, typer.Option(help="exit 0 when there is no such snapshot (for scripts)")
    ] = False,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Delete a snapshot by name or ID (its clones keep their data)."""
    check_ref(snapshot)
    with connect(state_dir, management, token_file) as client:
        delete_found(
            snapshot,
            "snapshot",
            client.find_snapshot,
            client.delete_snapshot,
            ignore_not_found,
        )
