"""`tessera reconcile [--fix]`: compare what the agents hold with management's rows.

Management does the comparison (`POST /v1/reconcile`); this prints its
report: one finding a line (a file no row names, a row whose file is
missing, a create or delete left half done, ...) and whether `--fix`
repaired it. Management repairs only what is provably safe, so `--fix` may
be run at any time. The exit code is 0 whenever the check ran, findings or
not (scripts count `.findings` in `-o json`); 1 when it could not run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tessera.cli.connect import Management, StateDir, TokenFile, connect
from tessera.cli.output import Column, Output, OutputOpt, console, dump, examples, print_rows

COLUMNS = [
    Column("#", lambda nf: str(nf[0])),
    Column("KIND", lambda nf: nf[1].kind.value),
    Column("NODE", lambda nf: nf[1].node_id, fold=True),
    Column("VOLUME ID", lambda nf: nf[1].volume_id or "-"),
    Column("FIXED", lambda nf: "yes" if nf[1].fixed else "no"),
    Column("POOL", lambda nf: nf[1].pool or "-", drop=1),
    # Details are sentences: under the table, a paragraph each, unless -o wide.
    Column("DETAIL", lambda nf: nf[1].detail, wide_only=True),
]

EPILOG = examples("tessera reconcile", "tessera reconcile --fix", "tessera reconcile -o json")


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
        dump(report.model_dump(mode="json"), output)
        return
    nodes = ", ".join(report.nodes_checked) or "none"
    if not report.findings:
        console.print(f"no differences (nodes checked: {nodes})", markup=False, soft_wrap=True)
        return
    numbered = list(enumerate(report.findings, start=1))
    print_rows(numbered, COLUMNS, output)
    if output == Output.TABLE:
        for number, finding in numbered:
            console.print(f"\n{number}  {finding.detail}", markup=False)
    fixed = sum(f.fixed for f in report.findings)
    summary = f"{len(report.findings)} difference(s), {fixed} fixed (nodes checked: {nodes})"
    if not fix:
        summary += "; --fix repairs those that are provably safe to repair"
    console.print(f"\n{summary}", markup=False)
