"""The kernel data-path suite (tests/vm/guest/) run inside the VM, booted once.

nvmet, nvme-tcp, md and dm exist only in the VM's kernel (docs/vm-tests.md):
this test builds the VM image when its recipe changed, boots it, runs
`pytest tests/vm/guest` in it with a junit xml written to the results
share, and fails with the guest's failures (test names and their first
lines) when anything in there failed. The guest's full output is kept in
the test's tmp dir (output.log, console.log) for a closer look.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.vm import vm

#: the guest suite's own budget; CI gives the whole VM step 25 min with the image build
GUEST_TIMEOUT = 1200.0
FAILURE_LINES = 12

pytestmark = pytest.mark.skipif(vm.skip_reason() is not None, reason=str(vm.skip_reason()))


def failures(junit: Path) -> list[str]:
    """`name: first lines of the failure` for every failed or erroring guest test."""
    found = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for bad in [*case.findall("failure"), *case.findall("error")]:
            text = (bad.get("message") or "") + "\n" + (bad.text or "")
            lines = [ln for ln in text.strip().splitlines() if ln.strip()][:FAILURE_LINES]
            name = f"{case.get('classname')}::{case.get('name')}"
            found.append(f"{name} ({bad.tag}):\n    " + "\n    ".join(lines))
    return found


def test_the_kernel_data_path_suite_passes_in_the_vm(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    junit = results / "junit.xml"
    argv = [str(vm.REPO / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "-rfE",
            "-p", "no:cacheprovider", f"--junitxml={junit}", "tests/vm/guest"]  # fmt: skip
    with open(tmp_path / "output.log", "wb") as out:
        run = vm.run(argv, timeout=GUEST_TIMEOUT, results=results, output=out)
    output = (tmp_path / "output.log").read_text(errors="replace").splitlines()
    where = f"(guest output: {tmp_path / 'output.log'}, kernel console: {results / 'console.log'})"
    assert not run.timed_out, (
        f"the guest suite did not finish in {GUEST_TIMEOUT:.0f}s {where}; last output:\n"
        + "\n".join(output[-30:])
    )
    assert junit.exists(), (
        f"the guest suite wrote no junit xml (exit {run.exit_code}) {where}; output:\n"
        + "\n".join(output[-30:])
        + "\nkernel console:\n"
        + run.console_tail
    )
    failed = failures(junit)
    assert not failed, f"{len(failed)} guest test(s) failed {where}:\n" + "\n".join(failed)
    assert run.exit_code == 0, f"the guest pytest exited {run.exit_code} {where}:\n" + "\n".join(
        output[-30:]
    )
