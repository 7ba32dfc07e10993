"""`tessera reconcile` against real management and a real agent: what a person sees."""

from __future__ import annotations

import os
import uuid

import yaml
from rich.cells import cell_len

from tessera.models import FindingKind, ReconcileReport
from tests.cli.conftest import NODE, Stack, assert_one_line_error, run_cli


def test_reconcile_lists_an_orphan_file_with_its_full_id_and_never_deletes_it(
    stack: Stack,
) -> None:
    orphan_id = "vol-" + uuid.uuid4().hex
    orphan = stack.dir / "pool" / "volumes" / f"{orphan_id}.img"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    with open(orphan, "wb") as f:
        f.truncate(1024**2)
    try:
        as_json = run_cli(stack, "reconcile", "-o", "json")
        assert as_json.code == 0, as_json
        report = ReconcileReport.model_validate_json(as_json.out)
        assert NODE in report.nodes_checked
        finding = next(f for f in report.findings if f.volume_id == orphan_id)
        assert finding.kind == FindingKind.ORPHAN_FILE
        as_yaml = run_cli(stack, "reconcile", "-o", "yaml")
        assert ReconcileReport.model_validate(yaml.safe_load(as_yaml.out)) == report
        for args in (["reconcile"], ["reconcile", "--fix"]):
            result = run_cli(stack, *args)
            assert result.code == 0, result
            table = result.out.split("\n\n")[0].splitlines()
            assert all(cell_len(line) <= 80 for line in table), result.out
            row = next(line for line in table if orphan_id in line)
            assert row.split()[1:5] == [FindingKind.ORPHAN_FILE.value, NODE, orphan_id, "no"]
            # the detail follows the table, wrapped as prose
            assert " ".join(finding.detail.split()) in " ".join(result.out.split())
            assert orphan.exists()  # a file without a row may be a user's data
    finally:
        os.unlink(orphan)


def test_reconcile_with_nothing_to_report_says_so_and_which_nodes_it_checked(
    stack: Stack,
) -> None:
    report = ReconcileReport.model_validate_json(run_cli(stack, "reconcile", "-o", "json").out)
    result = run_cli(stack, "reconcile")
    assert result.code == 0, result
    if not report.findings:
        assert result.out == f"no differences (nodes checked: {NODE})\n"
    else:  # other tests' leftovers: each still has its row
        assert len(result.out.split("\n\n")[0].splitlines()) == 1 + len(report.findings)


def test_reconcile_rejects_a_bad_output_format_with_exit_code_2(stack: Stack) -> None:
    line = assert_one_line_error(run_cli(stack, "reconcile", "-o", "csv"), 2)
    assert "'csv' is not one of" in line
