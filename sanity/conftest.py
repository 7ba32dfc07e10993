"""Tessera's CSI conformance suite: fixtures.

One real stack per session: `python -m tessera.cli dev up` in a temporary
state directory (management, a node-agent with a 4 GiB file-backed pool,
and the CSI plugin in `all` mode), driven over gRPC on its unix socket the
way kubelet and the CSI sidecars drive it. At the end the stack is stopped
with SIGTERM and must exit 0 and leave no loop device or mount behind.

    pytest sanity                        # mount and block
    pytest sanity --access-type block    # one access type only

Needs root (loop devices, mkfs, mounts); without it the suite is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from sanity.support import (
    MAX_VOLUMES_PER_NODE,
    NODE_ID,
    SECOND_NODE_ID,
    TOPOLOGY_KEY,
    Csi,
    Kind,
    Stack,
    loop_devices_backed_by,
    mounts_under,
)

REPO = Path(__file__).resolve().parent.parent
SANITY_DIR = Path(__file__).resolve().parent
STARTUP_TIMEOUT = 120.0
STOP_TIMEOUT = 90.0
NOT_ROOT = "the CSI sanity suite needs root: it creates loop devices, filesystems and mounts"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--access-type",
        choices=("mount", "block", "both"),
        default="both",
        help="CSI sanity: run lifecycle tests for mount volumes, block volumes, or both",
    )
    parser.addoption(
        "--stack-dir",
        default=None,
        help="CSI sanity: use the `tessera dev up` already running with this state directory "
        "(its node must be started with --node-id sanity-node --max-volumes-per-node 8) "
        "instead of starting one; it is left running",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason=NOT_ROOT)
    for item in items:
        if SANITY_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(skip)


def _kinds(config: pytest.Config, with_xfs: bool) -> list[Kind]:
    choice = config.getoption("--access-type")
    kinds = []
    if choice in ("mount", "both"):
        kinds.append(Kind("ext4"))
        if with_xfs:
            kinds.append(Kind("xfs"))
    if choice in ("block", "both"):
        kinds.append(Kind("block"))
    return kinds


#: parametrized fixture -> (with xfs, access types it keeps)
KIND_FIXTURES = {
    "kind": (False, ("mount", "block")),  # ext4 and block
    "fs_kind": (True, ("mount", "block")),  # ext4, xfs and block: where the filesystem matters
    "mount_kind": (False, ("mount",)),  # ext4
    "mount_fs_kind": (True, ("mount",)),  # ext4 and xfs
    "block_kind": (False, ("block",)),  # block
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test for the access types chosen with --access-type."""
    for name, (with_xfs, keep) in KIND_FIXTURES.items():
        if name in metafunc.fixturenames:
            kinds = [k for k in _kinds(metafunc.config, with_xfs) if k.access_type in keep]
            metafunc.parametrize(name, kinds, ids=[k.name for k in kinds])


# ---- the stack ---------------------------------------------------------------------


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} unreadable)"


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
            return -9
    return proc.returncode


def _open_channel(info: dict[str, str]) -> grpc.Channel:
    channel = grpc.insecure_channel(info["csi_endpoint"])
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
    except grpc.FutureTimeoutError:
        channel.close()
        raise
    return channel


@pytest.fixture(scope="session")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    if os.geteuid() != 0:
        pytest.skip(NOT_ROOT)
    existing = request.config.getoption("--stack-dir")
    if existing:
        info = json.loads((Path(existing) / "stack.json").read_text())
        channel = _open_channel(info)
        yield Stack(info=info, channel=channel)
        channel.close()
        return
    base = Path(tempfile.mkdtemp(prefix="tessera-sanity-"))
    state = base / "state"
    log_path = base / "dev-up.log"
    cmd = [
        sys.executable, "-m", "tessera.cli", "dev", "up",
        "--state-dir", str(state),
        "--pool-size", "4G",
        "--max-volumes-per-node", str(MAX_VOLUMES_PER_NODE),
        "--node-id", NODE_ID,
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    stack_file = state / "stack.json"
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not stack_file.exists():
        if proc.poll() is not None:
            pytest.fail(
                f"`tessera dev up` exited with {proc.returncode} before it was ready:\n"
                f"{_tail(log_path)}\n(logs of each process: {state}/logs)",
                pytrace=False,
            )
        if time.monotonic() > deadline:
            _stop(proc)
            pytest.fail(
                f"`tessera dev up` did not write {stack_file} within {STARTUP_TIMEOUT:.0f}s:\n"
                f"{_tail(log_path)}",
                pytrace=False,
            )
        time.sleep(0.2)
    info = json.loads(stack_file.read_text())
    try:
        channel = _open_channel(info)
    except grpc.FutureTimeoutError:
        _stop(proc)
        pytest.fail(f"no CSI server answers on {info['csi_endpoint']}", pytrace=False)

    yield Stack(info=info, channel=channel)

    channel.close()
    code = _stop(proc)
    problems = []
    if code != 0:
        problems.append(f"`tessera dev up` exited {code} on SIGTERM:\n{_tail(log_path)}")
    loops = loop_devices_backed_by(state)
    if loops:
        problems.append(f"loop devices left behind: {loops}")
    left = mounts_under(state)
    if left:
        problems.append(f"mounts left behind: {[m.mount_point for m in left]}")
    if problems:
        pytest.fail(
            "stopping the stack: " + "\n".join(problems) + f"\n(state kept in {base})",
            pytrace=False,
        )
    if not mounts_under(base):
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def csi(stack: Stack, tmp_path: Path) -> Iterator[Csi]:
    """A fresh work directory for staging/target paths, and a cleanup registry.

    Whatever the test created is unpublished, unstaged, controller-unpublished
    and deleted afterwards, even when the test failed; a failed cleanup or a
    mount left under the work directory fails the test.
    """
    workdir = tmp_path / "csi"
    workdir.mkdir()
    c = Csi(stack, workdir)
    yield c
    problems = c.cleanup()
    left = mounts_under(workdir)
    if left:
        problems.append(
            "mounts left under the test's directory after cleanup: "
            + ", ".join(m.mount_point for m in left)
        )
    for volume_id in c.deleted_volumes:
        if os.path.lexists(f"/dev/tessera/{volume_id}"):
            problems.append(f"/dev/tessera/{volume_id} still exists after the volume was deleted")
    if problems:
        pytest.fail("cleanup after the test:\n" + "\n".join(problems), pytrace=False)


class SecondNode:
    """A second node: a real node-agent on loopback TCP, registered over REST.

    Enough for cross-node ControllerPublish: management decides by its
    attachment records, has the stack's node export the volume (nbdkit on
    127.0.0.1) and hands this agent the key. Its CSI node plugin is not
    needed: staging on a second node is what tests/multihost does.
    """

    def __init__(self, stack: Stack, node_id: str = SECOND_NODE_ID, max_volumes: int = 0) -> None:
        self.id = node_id
        self._stack = stack
        self._max_volumes = max_volumes
        url = stack.info["management_url"]
        headers = {"Authorization": f"Bearer {stack.token}"}
        if url.startswith("unix://"):
            transport = httpx.HTTPTransport(uds=url.removeprefix("unix://"))
            self.http = httpx.Client(
                base_url="http://localhost", transport=transport, headers=headers, timeout=30
            )
        else:
            self.http = httpx.Client(base_url=url, headers=headers, timeout=30)
        self.port = _free_port()
        self.dir = stack.state_dir / node_id
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """The agent serves locally only (--no-register): register() says where it is."""
        for sub in ("pool", "state", "dev"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        args = [
            sys.executable, "-m", "node_agent", "--node-id", self.id,
            "--management", self._stack.info["management_url"],
            "--token-file", self._stack.info["token_file"],
            "--pool", f"default={self.dir / 'pool'}", "--socket", str(self.dir / "agent.sock"),
            "--dev-dir", str(self.dir / "dev"), "--state-dir", str(self.dir / "state"),
            "--listen", f"127.0.0.1:{self.port}", "--no-register",
        ]  # fmt: skip
        with open(self.dir / "agent.log", "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not (self.dir / "agent.sock").is_socket() or not self._answers():
            assert self.proc.poll() is None, _tail(self.dir / "agent.log")
            assert time.monotonic() < deadline, _tail(self.dir / "agent.log")
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).is_success
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        self.http.close()
        if self.proc is not None:
            assert _stop(self.proc) == 0, _tail(self.dir / "agent.log")

    def register(self) -> None:
        body = {
            "agent_url": f"http://127.0.0.1:{self.port}",
            "topology": {TOPOLOGY_KEY: self.id},
            "max_volumes": self._max_volumes,
        }
        resp = self.http.put(f"/v1/nodes/{self.id}", json=body)
        assert resp.status_code in (200, 201), f"PUT /v1/nodes/{self.id}: {resp.text}"
        self.heartbeat()

    def heartbeat(self) -> None:
        resp = self.http.post(f"/v1/nodes/{self.id}/heartbeat")
        assert resp.status_code in (200, 204), f"heartbeat of {self.id}: {resp.text}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def second_agent(stack: Stack) -> Iterator[SecondNode]:
    node = SecondNode(stack)
    node.start()
    yield node
    node.stop()


@pytest.fixture
def second_node(second_agent: SecondNode) -> SecondNode:
    second_agent.register()
    return second_agent
