"""`tessera reconcile [--fix]`: compare what the agents hold with management's rows.

Management does the comparison (`POST /v1/reconcile`); this prints its
report: one finding a line (an orphan file no row names, a row whose file
is missing, ...) and whether `--fix` repaired it. Only what is provably
safe is ever fixed, so `--fix` is safe to run at any time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tessera.cli.connect import Management, StateDir, TokenFile, connect
from tessera.cli.output import Column, Output, OutputOpt, console, examples, print_list

COLUMNS = [
    Column("KIND", lambda f: str(f.kind)),
    Column("NODE", lambda f: f.node_id or "-", fold=True),
    Column("VOLUME ID", lambda f: f.volume_id or "-"),
    Column("FIXED", lambda f: "yes" if f.fixed else "no"),
    Column("DETAIL", lambda f: f.detail, fold=True),
]


def reconcile(
    fix: Annotated[
        bool, typer.Option("--fix", help="also repair what is provably safe to repair")
    ] = False,
    output: OutputOpt = Output.TABLE,
    state_dir: StateDir = Path(".state"),
    management: Management = None,
    token_file: TokenFile = None,
) -> None:
    """Compare every node's volume files and attachments with management's records."""
    with connect(state_dir, management, token_file) as client:
        report = client.reconcile(fix=fix)
    if output in (Output.JSON, Output.YAML):
        from tessera.cli.output import dump

        dump(report.model_dump(mode="json"), output)
        return
    print_list(report.findings, COLUMNS, output, noun="differences")
    if report.findings and not fix:
        console.print("run again with --fix to repair what is safe to repair", markup=False)


EPILOG = examples("tessera reconcile", "tessera reconcile --fix", "tessera reconcile -o json")
