"""Printing what the CLI found: tables for people, JSON and YAML for scripts.

Tables never cut a value short. An ID is the one thing a person copies, so
on a narrow terminal the least important columns go first (see
`Column.drop`), then long free text such as names wraps inside its column;
`-o wide` shows every column at full width. JSON and YAML are the wire
models exactly as management sends them (`model_dump(mode="json")`), keys
sorted, lists as `{"items": [...]}`, so scripts read the same field names
the REST API documents.
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from pydantic import BaseModel

console = Console(highlight=False)

#: spaces between table columns
GAP = 2
#: narrowest a wrapping column gets before the table grows past the terminal
MIN_FOLD = 12


class Output(StrEnum):
    TABLE = "table"
    WIDE = "wide"
    JSON = "json"
    YAML = "yaml"


OutputOpt = Annotated[
    Output,
    typer.Option(
        "--output",
        "-o",
        case_sensitive=False,
        help="table (fits the terminal), wide (every column), json or yaml (for scripts)",
    ),
]


@dataclass(frozen=True)
class Column:
    header: str
    cell: Callable[[Any], str]
    #: 0 = always shown; on a narrow terminal higher numbers are dropped first
    drop: int = 0
    #: long free text (names, URLs): wraps inside the column rather than widen the table
    fold: bool = False
    #: shown only with -o wide
    wide_only: bool = False


def print_list(
    items: Sequence[BaseModel], columns: Sequence[Column], output: Output, *, noun: str
) -> None:
    if output in (Output.JSON, Output.YAML):
        dump({"items": [item.model_dump(mode="json") for item in items]}, output)
        return
    if not items:
        # On stderr, like kubectl's "No resources found": stdout stays empty for pipes.
        Console(stderr=True, highlight=False).print(f"No {noun} found.")
        return
    print_rows(items, columns, output)


def print_rows(items: Sequence[Any], columns: Sequence[Column], output: Output) -> None:
    """A table of `items` (anything the columns' `cell` functions read)."""
    wide = output == Output.WIDE
    shown = [c for c in columns if wide or not c.wide_only]
    rows = [[c.cell(item) for c in shown] for item in items]
    print_table(shown, rows, wide=wide)


def print_object(item: BaseModel, fields: Sequence[tuple[str, str]], output: Output) -> None:
    """One object: its wire model for scripts, `fields` as `key  value` lines for people."""
    if output in (Output.JSON, Output.YAML):
        dump(item.model_dump(mode="json"), output)
        return
    columns = [Column("", lambda r: r[0]), Column("", lambda r: r[1], fold=True)]
    print_table(columns, [list(f) for f in fields], wide=output == Output.WIDE, header=False)


def dump(data: Any, output: Output) -> None:
    """JSON or YAML on stdout, written raw: no wrapping, no markup, no colour."""
    if output == Output.JSON:
        text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    else:
        import yaml  # only scripts asking for YAML pay for the import

        text = yaml.safe_dump(data, sort_keys=True, allow_unicode=True, default_flow_style=False)
    sys.stdout.write(text)


def print_table(
    columns: Sequence[Column], rows: list[list[str]], *, wide: bool, header: bool = True
) -> None:
    natural = [
        max([cell_len(c.header) if header else 0, *(cell_len(row[i]) for row in rows)])
        for i, c in enumerate(columns)
    ]
    keep = list(range(len(columns))) if wide else _fitting(columns, natural, console.width)
    table = Table(
        box=None, pad_edge=False, padding=(0, GAP // 2), show_header=header, header_style=None
    )
    for i in keep:
        c = columns[i]
        if c.fold and not wide:
            table.add_column(c.header, overflow="fold", min_width=min(natural[i], MIN_FOLD))
        else:
            table.add_column(c.header, no_wrap=True, min_width=natural[i])
    for row in rows:
        table.add_row(*(Text(row[i]) for i in keep))
    # Never narrower than the unfoldable columns: rich would otherwise cut them
    # with an ellipsis. Past the terminal's width, the terminal wraps the line.
    least = [
        n if wide or not c.fold else min(n, MIN_FOLD) for c, n in zip(columns, natural, strict=True)
    ]
    _print_plain(table, max(console.width, _width(keep, least)))


def _print_plain(table: Table, width: int) -> None:
    """Plain text without trailing blanks: what `awk`, `grep` and a copy-paste expect."""
    render = Console(width=width, file=io.StringIO(), color_system=None, highlight=False)
    render.print(table)
    text = render.file.getvalue()  # type: ignore[attr-defined]
    sys.stdout.write("".join(line.rstrip() + "\n" for line in text.splitlines()))


def _width(keep: Sequence[int], widths: Sequence[int]) -> int:
    return sum(widths[i] for i in keep) + GAP * max(len(keep) - 1, 0)


def _fitting(columns: Sequence[Column], natural: list[int], width: int) -> list[int]:
    """Indexes of the columns to show: drop the least important until the rest fit."""
    keep = list(range(len(columns)))
    droppable = sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: -columns[i].drop)
    for i in droppable:
        if _width(keep, natural) <= width:
            break
        keep.remove(i)
    return keep


def examples(*lines: str) -> str:
    """A command's help epilog: one example command a line."""
    return "[bold]Examples[/]\n\n" + "\n\n".join(f"  {line}" for line in lines)


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
