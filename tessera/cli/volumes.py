"""`tessera volume ...`: list, show, create and delete volumes.

Every command that takes a volume takes its name or its ID, like kubectl
takes a name: the ID when the argument looks like one (and names a
volume), otherwise the name, resolved by management's exact-name filter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Protocol

import typer

from tessera.cli.connect import Management, StateDir, TokenFile, all_items, connect
from tessera.cli.failures import CliError, usage
from tessera.cli.output import (
    Column,
    Output,
    OutputOpt,
    console,
    examples,
    print_list,
    print_object,
    when,
)
from tessera.errors import NotFound
from tessera.ids import is_snapshot_id
from tessera.models import LegState
from tessera.units import format_size, parse_size

if TYPE_CHECKING:
    from pydantic import BaseModel

    from tessera.clients import ManagementClient
    from tessera.models import Attachment, Leg, Volume

app = typer.Typer(
    help="Volumes: list, show, create, clone, delete, repair.",
    no_args_is_help=True,
    epilog=examples("tessera volume list", "tessera volume show db-data -o yaml"),
)

VolumeRef = Annotated[str, typer.Argument(metavar="NAME|ID", help="the volume's name or ID")]

COLUMNS = [
    Column("ID", lambda v: v.id),
    Column("NAME", lambda v: v.name, fold=True),
    Column("SIZE", lambda v: format_size(v.size_bytes)),
    Column("STATE", lambda v: v.state.value),
    Column("NODE", lambda v: v.node_id, drop=2, fold=True),
    Column("POOL", lambda v: v.pool, drop=4),
    Column("PUBLISHED ON", lambda v: ", ".join(v.published_nodes) or "-", drop=3),
    Column("CREATED", lambda v: when(v.created_at), drop=5),
    Column("VPG", lambda v: v.vpg, wide_only=True),
    Column("PARAMETERS", lambda v: _parameters(v), wide_only=True),
    Column("CONDITION", lambda v: v.condition or "ok", wide_only=True),
]


@app.command(
    "list",
    epilog=examples(
        "tessera volume list",
        "tessera volume list -o wide",
        "tessera volume list -o json | jq -r '.items[].id'",
    ),
)
def volume_list(
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """List volumes. Narrow terminals drop CREATED, POOL, ... before an ID is ever cut."""
    with connect(state_dir, management, token_file) as client:
        volumes = all_items(client.list_volumes)
    print_list(volumes, COLUMNS, output, noun="volumes")


@app.command(
    "show",
    epilog=examples(
        "tessera volume show db-data",
        "tessera volume show vol-0123456789abcdef0123456789abcdef -o yaml",
    ),
)
def volume_show(
    volume: VolumeRef,
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Show one volume, by name or ID, and its attachments. -o json/yaml: the Volume model."""
    check_ref(volume)
    with connect(state_dir, management, token_file) as client:
        v = client.find_volume(volume)
        if len(v.legs) > 1:  # by ID: management asks the consumers how the legs are
            v = client.get_volume(v.id)
        attachments = client.list_attachments(v.id) if output in (Output.TABLE, Output.WIDE) else []
    fields = [(key, str(value)) for key, value in _display(v).items()]
    if len(v.legs) > 1:  # one line per leg: where it is, whether current, how it is reached
        fields += [(f"leg {leg.index}", _leg_line(leg, attachments)) for leg in v.legs]
    for a in attachments:
        ro = ", read-only" if a.readonly else ""
        over = "" if len(v.legs) > 1 else f" over {a.connection.transport.value}"
        fields.append(("attachment", f"{a.node_id} ({a.access_mode.value}{ro}){over}"))
    print_object(v, fields, output)


@app.command(
    "create",
    epilog=examples(
        "tessera volume create db-data --size 10G",
        "tessera volume create scratch --size 512MiB --vpg default -o json",
    ),
)
def volume_create(
    name: Annotated[str, typer.Argument(help="unique name; creating it again is a no-op")],
    size: Annotated[str, typer.Option(help="e.g. 10G, 512MiB or bytes")] = "1G",
    vpg: Annotated[str, typer.Option(help="volume provisioning group")] = "default",
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Create a volume (idempotent by name: the same name and size answer the same volume)."""
    check_ref(name, what="NAME")
    from tessera.models import VolumeCreate

    request = VolumeCreate(name=name, size_bytes=_size(size), vpg=vpg)
    with connect(state_dir, management, token_file) as client:
        v = client.create_volume(request)
    print_made(v, output, f"{v.id}  {v.name}  {format_size(v.size_bytes)}  on {v.node_id}/{v.pool}")


@app.command(
    "clone",
    epilog=examples(
        "tessera volume clone db-data-monday db-restored",
        "tessera volume clone db-data db-copy --size 20G -o json",
    ),
)
def volume_clone(
    source: Annotated[
        str,
        typer.Argument(metavar="SOURCE", help="the snapshot or volume to copy (name or ID)"),
    ],
    name: Annotated[str, typer.Argument(help="the new volume's unique name")],
    size: Annotated[
        str | None, typer.Option(help="at least the source's size (default: the same)")
    ] = None,
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Create a volume from a snapshot or a volume: a reflink copy on the source's node and pool.

    Idempotent by name with the same source. SOURCE is looked up as a
    snapshot and as a volume; a name that is both must be given by ID.
    """
    check_ref(source, what="SOURCE")
    check_ref(name, what="NAME")
    from tessera.models import ContentSource, VolumeCreate

    with connect(state_dir, management, token_file) as client:
        content, source_size = _clone_source(client, source)
        wanted = _size(size) if size is not None else source_size
        v = client.create_volume(
            VolumeCreate(name=name, size_bytes=wanted, content_source=ContentSource(**content))
        )
    print_made(
        v,
        output,
        f"{v.id}  {v.name}  {format_size(v.size_bytes)}  on {v.node_id}/{v.pool}  from {source}",
    )


def _clone_source(client: ManagementClient, ref: str) -> tuple[dict[str, str], int]:
    """({snapshot_id|volume_id: ID}, size) of what SOURCE names; ambiguous names are refused."""
    found: list[tuple[dict[str, str], int]] = []
    try:
        snap = client.find_snapshot(ref)
        found.append(({"snapshot_id": snap.id}, snap.size_bytes))
    except NotFound:
        pass
    if not found or not is_snapshot_id(ref):
        try:
            vol = client.find_volume(ref)
            found.append(({"volume_id": vol.id}, vol.size_bytes))
        except NotFound:
            pass
    if not found:
        raise NotFound(f"no snapshot or volume has the name or ID {ref!r}", field="source")
    if len(found) > 1:
        ids = " and ".join(next(iter(c.values())) for c, _ in found)
        raise usage(f"SOURCE {ref!r} names both a snapshot and a volume ({ids}): give the ID")
    return found[0]


@app.command(
    "delete",
    epilog=examples(
        "tessera volume delete db-data",
        "tessera volume delete vol-0123456789abcdef0123456789abcdef --ignore-not-found",
    ),
)
def volume_delete(
    volume: VolumeRef,
    ignore_not_found: Annotated[
        bool, typer.Option(help="exit 0 when there is no such volume (for scripts)")
    ] = False,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Delete a volume by name or ID (refused while it is attached to a node)."""
    check_ref(volume)
    with connect(state_dir, management, token_file) as client:
        delete_found(volume, "volume", client.find_volume, client.delete_volume, ignore_not_found)


class Named(Protocol):
    """What management answers for a volume or a snapshot, as far as delete says it."""

    id: str
    name: str


def delete_found(
    ref: str,
    noun: str,
    find: Callable[[str], Named],
    delete: Callable[[str], object],
    ignore_not_found: bool,
) -> None:
    """`tessera <noun> delete`: find `ref` by name or ID, delete it by ID, say which.

    Not found is an error unless --ignore-not-found, which scripts use to
    make a delete that may be retried exit 0.
    """
    try:
        found = find(ref)
        delete(found.id)
    except NotFound:
        if not ignore_not_found:
            raise
        console.print(f"no {noun} {ref!r}; nothing to delete", markup=False, soft_wrap=True)
        return
    console.print(f"deleted {found.id} ({found.name})", markup=False, soft_wrap=True)


def print_made(made: BaseModel, output: Output, line: str) -> None:
    """What a create command answers: the model for -o json/yaml, else one line."""
    if output in (Output.JSON, Output.YAML):
        print_object(made, [], output)
        return
    console.print(line, markup=False, soft_wrap=True)


def check_ref(value: str, what: str = "NAME|ID") -> str:
    """What only the command line can get wrong; management judges the rest."""
    if not value.strip():
        raise usage(f"{what} must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise usage(f"{what} is not valid UTF-8") from None
    return value


def _size(text: str) -> int:
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise usage(f"--size: {exc}") from None
    if size <= 0:
        raise usage(f"--size must be more than 0, e.g. 1G (got {text!r})")
    return size


def _display(v: Volume) -> dict[str, str]:
    return {
        "id": v.id,
        "name": v.name,
        "size": f"{format_size(v.size_bytes)} ({v.size_bytes} bytes)",
        "state": v.state.value,
        "vpg": v.vpg,
        "node": v.node_id,
        "pool": v.pool,
        "published on": ", ".join(v.published_nodes) or "-",
        "legs": _legs(v),
        "condition": v.condition or "ok",
        "parameters": _parameters(v),
        "cloned from": _source(v),
        "qos": _qos(v),
        "created": when(v.created_at),
    }


def _source(v: Volume) -> str:
    src = v.content_source
    if src is None:
        return "-"
    return f"snapshot {src.snapshot_id}" if src.snapshot_id else f"volume {src.volume_id}"


def _qos(v: Volume) -> str:
    limits = v.qos.model_dump()
    return ", ".join(f"{k}={val}" for k, val in limits.items() if val) or "unlimited"


def _legs(v: Volume) -> str:
    if len(v.legs) > 1:
        live = sum(leg.state != LegState.STALE for leg in v.legs)
        return f"{live} (each on its own node, below)"
    return (
        ", ".join(f"{leg.node_id}/{leg.pool} {format_size(leg.size_bytes)}" for leg in v.legs)
        or "-"
    )


def _leg_line(leg: Leg, attachments: Sequence[Attachment] = ()) -> str:
    """`n2/p 1.0 GiB in_sync, n1 over nbd`: and how each node using the volume reaches
    the leg (loop, nvme-tcp or nbd: each leg picks its own); a stale leg says it goes
    when its node returns."""
    line = f"{leg.node_id}/{leg.pool} {format_size(leg.size_bytes)} {leg.state.value}"
    if leg.state == LegState.STALE:
        line += f" (never read again; deleted when {leg.node_id} answers)"
    reached = [
        f"{a.node_id} over {c.transport.value}"
        for a in attachments
        for c in a.connection.legs
        if (c.index, c.node_id) == (leg.index, leg.node_id)
    ]
    return ", ".join([line, *reached])


@app.command(
    "repair",
    epilog=examples(
        "tessera volume repair db-data",
        "tessera volume repair db-data --wait",
        "tessera volume repair db-data -o json",
    ),
)
def volume_repair(
    volume: VolumeRef,
    wait: Annotated[
        bool, typer.Option(help="keep going, showing resync progress, until every leg is in sync")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.05, help="seconds between two steps with --wait")
    ] = 2.0,
    timeout: Annotated[
        float, typer.Option(min=0, help="give up waiting after this many seconds (0: never)")
    ] = 3600.0,
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Replace the failed legs of a mirrored (raid1/raid10) volume and resync them.

    A leg whose node is unreachable or fenced, or that the node using the
    volume reports failed, is made stale (never read again, its file deleted
    when its node returns); a new leg on a node holding no leg of the volume
    is added to the array, which copies the data onto it. Safe to run again.
    """
    check_ref(volume)
    with connect(state_dir, management, token_file) as client:
        v = client.repair_volume(client.find_volume(volume).id)
        _say_repair(v, output)
        deadline = time.monotonic() + timeout if timeout else None
        while wait and _rebuilding(v):
            if deadline is not None and time.monotonic() > deadline:
                raise CliError(f"volume {v.name} is still rebuilding after {timeout:.0f} s")
            time.sleep(interval)
            v = client.repair_volume(v.id)
            _say_repair(v, output)


def _rebuilding(v: Volume) -> bool:
    return any(leg.state == LegState.REBUILDING for leg in v.legs)


def _say_repair(v: Volume, output: Output) -> None:
    if output in (Output.JSON, Output.YAML):
        print_object(v, [], output)
        return
    legs = "; ".join(f"leg {leg.index} on {leg.node_id} {leg.state.value}" for leg in v.legs)
    state = v.condition or ("in sync" if not _rebuilding(v) else "rebuilding")
    console.print(f"volume {v.name} ({v.id}): {legs}: {state}", markup=False, soft_wrap=True)


def _parameters(v: Volume) -> str:
    return ", ".join(f"{k}={val}" for k, val in sorted(v.parameters.items())) or "-"
