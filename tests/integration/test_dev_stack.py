"""`tessera dev up` as a user runs it: a real process, stopped with a signal."""

from __future__ import annotations

import ast
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from csi_driver._gen import csi_pb2
from tessera.system.loopdev import bound_under
from tessera.system.mounts import mounts_under
from tessera_dev import supervise
from tessera_dev.csi_client import CsiClient, mount_capability
from tessera_dev.release import DEV_DIR
from tessera_dev.stack import DevStack
from tests.conftest import needs_root
from tests.integration.test_dev_multinode import leftovers

REPO = Path(__file__).resolve().parents[2]
#: the packages built on the shared base `tessera`
ABOVE_THE_BASE = {"csi_driver", "node_agent", "management", "tessera_dev"}


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


@needs_root
def test_sigterm_stops_everything_and_leaves_nothing_behind_and_a_second_dev_up_is_refused(
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    proc = start_dev_up(state)
    info = wait_for_stack(state, proc)
    assert Path(info["csi_endpoint"].removeprefix("unix://")).is_socket()
    second = start_dev_up(state)
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 1 and "another `tessera dev up` is running" in out, out
    assert proc.poll() is None and (state / "stack.json").exists(), "the refused one stopped it"
    assert supervise.csi_ready(info["csi_endpoint"])
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert bound_under(state) == []
    assert mounts_under(state) == []
    assert not (state / "stack.json").exists()


@needs_root
def test_demo_writes_and_reads_back_intact_data(tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = start_dev_up(state, "--exit-after-demo")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert "intact" in out
    assert bound_under(state) == []
    assert mounts_under(state) == []


@needs_root
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


@needs_root
def test_ctrl_c_stops_a_three_node_stack_and_leaves_nothing_behind() -> None:
    state = Path(tempfile.mkdtemp(prefix="tds-"))  # unix socket paths under it stay short
    proc = subprocess.Popen(
        [sys.executable, "-m", "tessera.cli", "dev", "up", "--state-dir", str(state),
         "--nodes", "3", "--pool-size", "512M"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        info = wait_for_stack(state, proc)
        assert [n["node_id"] for n in info["nodes"]] == ["n1", "n2", "n3"]
        listing = subprocess.run(
            [sys.executable, "-m", "tessera.cli", "node", "list", "--state-dir", str(state)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        for node in info["nodes"]:
            assert node["agent_url"] in listing.stdout, listing.stdout + listing.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert leftovers(state) == []
    assert mounts_under(state) == []
    shutil.rmtree(state)


@pytest.mark.parametrize(
    "extra, complaint",
    [(["--node-id", "a"], "--node-id is for --nodes 1"), (["--demo"], "--demo runs on --nodes 1"),
     (["--nodes", "0"], "--nodes")],
    ids=["node id", "demo", "no nodes"],
)  # fmt: skip
def test_options_that_do_not_fit_several_nodes_are_usage_errors_and_start_nothing(
    tmp_path: Path, extra: list[str], complaint: str
) -> None:
    nodes = [] if "--nodes" in extra else ["--nodes", "2"]
    res = subprocess.run(
        [sys.executable, "-m", "tessera.cli", "dev", "up", "--state-dir", str(tmp_path / "s"),
         *nodes, *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert complaint in res.stderr
    assert not (tmp_path / "s").exists()


def test_the_shared_base_imports_none_of_the_packages_built_on_it() -> None:
    offenders = []
    for path in sorted((REPO / "tessera").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                if name.partition(".")[0] in ABOVE_THE_BASE:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert offenders == []


@needs_root
def test_stop_with_a_staged_volume_detaches_it_and_removes_its_dev_link(tmp_path: Path) -> None:
    stack = DevStack(tmp_path / "state", pool_size=1024**3, node_id="it-node")
    info = stack.start()
    staging = tmp_path / "staging"
    staging.mkdir()
    try:
        with CsiClient(info.csi_endpoint) as csi:
            volume = csi.controller.CreateVolume(
                csi_pb2.CreateVolumeRequest(
                    name="staged-at-stop",
                    capacity_range=csi_pb2.CapacityRange(required_bytes=64 * 1024**2),
                    volume_capabilities=[mount_capability("ext4")],
                ),
                timeout=60,
            ).volume
            csi.node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=volume.volume_id, staging_target_path=str(staging),
                    volume_capability=mount_capability("ext4"),
                ),
                timeout=60,
            )  # fmt: skip
        link = DEV_DIR / volume.volume_id
        assert link.is_symlink() and mounts_under(staging)
    finally:
        stack.stop()
    assert not link.is_symlink(), f"{link} left pointing at a detached loop device"
    assert mounts_under(staging) == [] and mounts_under(tmp_path) == []
    assert bound_under(tmp_path) == []


def test_python_dash_m_tessera_dev_is_tessera_dev() -> None:
    res = subprocess.run(
        [sys.executable, "-m", "tessera_dev", "up", "--help"],
        capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "--nodes" in res.stdout and "tessera dev up" in res.stdout
