"""`tessera dev up` as a user runs it: a real process, stopped with a signal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from tessera.system.loopdev import bound_under
from tessera.system.mounts import mounts_under
from tests.conftest import needs_root

pytestmark = needs_root


def start_dev_up(state: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tessera.cli", "dev", "up", "--state-dir", str(state),
         "--pool-size", "2G", "--node-id", "it-node", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_for_stack(state: Path, proc: subprocess.Popen[str]) -> dict[str, str]:
    deadline = time.monotonic() + 90
    while not (state / "stack.json").exists():
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline, "dev up did not become ready"
        time.sleep(0.1)
    return json.loads((state / "stack.json").read_text())


def test_sigterm_stops_everything_and_leaves_nothing_behind(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = start_dev_up(state)
    info = wait_for_stack(state, proc)
    assert Path(info["csi_endpoint"].removeprefix("unix://")).is_socket()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert bound_under(state) == []
    assert mounts_under(state) == []
    assert not (state / "stack.json").exists()


def test_demo_writes_and_reads_back_intact_data(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = start_dev_up(state, "--exit-after-demo")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "intact" in out
    assert bound_under(state) == []
    assert mounts_under(state) == []


def test_restart_keeps_volumes(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = start_dev_up(state)
    info = wait_for_stack(state, proc)
    create = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "volume", "create", "keep-me", "--size", "64M",
         "--state-dir", info["state_dir"]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert create.returncode == 0, create.stderr
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    proc = start_dev_up(state)
    try:
        wait_for_stack(state, proc)
        listing = subprocess.run(
            [sys.executable, "-m", "tessera.cli", "volume", "list", "--state-dir", str(state)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert "keep-me" in listing.stdout, listing.stdout + listing.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
