"""QoS enforced on the data path, measured with fio (docs/data-services.md, QoS).

Consumer side: a cgroup of the test's own plays the pod (the agent's
--cgroup-root points at a kubepods tree made for the test), fio runs in it
against the volume's real loop device, and what it measures must be within
15 % of the limit; a modify changes it live. Owner side: an export's nbdkit
rate filter, read through a real TLS-PSK NBD connection, before and after a
live change. Each fio run takes about 3 s.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.agent import Agent
from node_agent.pools import Pool
from node_agent.qos import UNKNOWN_POD, export_rate_bits
from tessera.clients import AgentClient
from tessera.ids import new_volume_id
from tessera.models import AgentExportCreate, QosLimits
from tessera.system import cgroups, mounts
from tests.conftest import needs_root
from tests.integration.test_node_agent_loop import release_loops
from tests.integration.test_node_agent_process import TOKEN as AGENT_TOKEN
from tests.integration.test_node_agent_process import AgentProcess

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2
BLKIO = Path("/sys/fs/cgroup/blkio")
#: how far a measured rate may be from the limit
TOLERANCE = 0.15
RUNTIME = 3


def _v1_blkio() -> bool:
    return (BLKIO / "blkio.throttle.read_bps_device").is_file()


needs_blkio = pytest.mark.skipif(
    not _v1_blkio(), reason="needs the cgroup v1 blkio hierarchy (this test's host layout)"
)


class FakeNode:
    """A kubepods tree of the test's own under the blkio hierarchy, with one pod."""

    def __init__(self, root: Path, pod_uid: str) -> None:
        self.root = root
        self.pod_uid = pod_uid
        self.pod = root / "kubepods" / "besteffort" / f"pod{pod_uid}"

    def make(self) -> None:
        self.pod.mkdir(parents=True)

    def remove(self) -> None:
        """rmdir from the leaves up: a cgroup goes once its processes have exited."""
        for path in (self.pod, self.pod.parent, self.pod.parent.parent, self.root):
            for _ in range(50):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[FakeNode]:
    if not _v1_blkio():
        pytest.skip("needs the cgroup v1 blkio hierarchy (this test's host layout)")
    fake = FakeNode(BLKIO / f"tessera-qos-{uuid.uuid4().hex[:8]}", str(uuid.uuid4()))
    fake.make()
    try:
        yield fake
    finally:
        fake.remove()
    assert not fake.root.exists()


@pytest.fixture
def agent(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Agent]:
    """An agent whose --cgroup-root is the test's kubepods tree (when the test has one)."""
    (tmp_path / "pool").mkdir()
    pool = Pool.open("default", tmp_path / "pool")
    state = tmp_path / "state"
    wants_node = "node" in request.fixturenames
    root = request.getfixturevalue("node").root if wants_node else tmp_path / "no-cgroups"
    try:
        yield Agent(
            "qos-node", {"default": pool}, tmp_path / "dev", state_dir=state, cgroup_root=root
        )
    finally:
        release_loops(tmp_path)


def attached_volume(agent: Agent, size: int = 256 * MiB) -> tuple[str, str]:
    vid = new_volume_id()
    agent.create_volume(vid, "default", size)
    return vid, agent.attach(vid, readonly=False).device


def fio(device: str, cgroup: Path, rw: str, bs: str) -> dict[str, float]:
    """Run fio in `cgroup` (as the pod's process) for RUNTIME s; bytes/s and IOs/s."""
    procs = cgroup / "cgroup.procs"

    def join_cgroup() -> None:
        procs.write_text(str(os.getpid()))

    argv = [
        "fio", "--name=qos", f"--filename={device}", f"--rw={rw}", f"--bs={bs}",
        "--direct=1", "--ioengine=libaio", "--iodepth=16", "--time_based",
        f"--runtime={RUNTIME}", "--ramp_time=1", "--output-format=json",
    ]  # fmt: skip
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=RUNTIME + 60,
        check=True,
        preexec_fn=join_cgroup,
    )
    job = json.loads(done.stdout)["jobs"][0]
    side = job["read"] if "read" in rw else job["write"]
    return {"bps": float(side["bw_bytes"]), "iops": float(side["iops"])}


def assert_near(measured: float, limit: float, what: str) -> None:
    print(f"{what}: measured {measured:.0f}, limit {limit:.0f}")  # the figures, with -s
    assert abs(measured - limit) <= TOLERANCE * limit, (
        f"{what}: measured {measured:.0f}, limit {limit:.0f} (±{TOLERANCE:.0%})"
    )


# ---- consumer side: the pod's cgroup ---------------------------------------------------


@needs_blkio
def test_a_pods_reads_and_writes_stay_within_the_volumes_byte_limits(
    agent: Agent, node: FakeNode
) -> None:
    vid, device = attached_volume(agent)
    agent.add_consumer(vid, node.pod_uid)
    agent.set_qos(
        vid, QosLimits(max_read_bytes_per_second=8 * MiB, max_write_bytes_per_second=4 * MiB)
    )
    assert_near(fio(device, node.pod, "read", "64k")["bps"], 8 * MiB, "read bytes/s")
    assert_near(fio(device, node.pod, "write", "64k")["bps"], 4 * MiB, "write bytes/s")


@needs_blkio
def test_a_pods_random_io_stays_within_the_volumes_iops_limits(
    agent: Agent, node: FakeNode
) -> None:
    vid, device = attached_volume(agent)
    agent.add_consumer(vid, node.pod_uid)
    agent.set_qos(vid, QosLimits(max_read_iops=300, max_write_iops=150))
    assert_near(fio(device, node.pod, "randread", "4k")["iops"], 300, "read IOPS")
    assert_near(fio(device, node.pod, "randwrite", "4k")["iops"], 150, "write IOPS")


@needs_blkio
def test_a_modify_changes_the_limit_of_a_running_pod_without_a_restart(
    agent: Agent, node: FakeNode
) -> None:
    vid, device = attached_volume(agent)
    agent.add_consumer(vid, node.pod_uid)
    agent.set_qos(vid, QosLimits(max_read_bytes_per_second=4 * MiB))
    loop = os.path.realpath(device)
    assert_near(fio(device, node.pod, "read", "64k")["bps"], 4 * MiB, "read bytes/s before")
    agent.set_qos(vid, QosLimits(max_read_bytes_per_second=12 * MiB))
    assert os.path.realpath(device) == loop  # the same device: nothing was reattached
    assert_near(fio(device, node.pod, "read", "64k")["bps"], 12 * MiB, "read bytes/s after")
    agent.set_qos(vid, QosLimits())
    h = cgroups.hierarchy(node.root)
    assert h is not None
    rules = cgroups.read_limits(h, node.pod, cgroups.device_number(device))
    assert rules == cgroups.IoLimits()  # unlimited again: no rule left


@needs_blkio
def test_a_container_started_after_the_publish_is_limited_too(agent: Agent, node: FakeNode) -> None:
    """cgroup v1 is not hierarchical: the containers' own cgroups need the rule."""
    vid, device = attached_volume(agent)
    agent.set_qos(vid, QosLimits(max_read_bytes_per_second=5 * MiB))
    agent.add_consumer(vid, node.pod_uid)
    container = node.pod / "container-1"
    container.mkdir()
    try:
        agent.qos.reapply()  # what the agent's watcher does every WATCH_SECONDS
        assert_near(fio(device, container, "read", "64k")["bps"], 5 * MiB, "read bytes/s")
    finally:
        container.rmdir()


@needs_blkio
def test_limits_set_before_the_pod_arrives_apply_when_it_publishes(
    agent: Agent, node: FakeNode
) -> None:
    """Management pushes limits at attach time, before NodePublish names the pod."""
    vid, device = attached_volume(agent)
    agent.set_qos(vid, QosLimits(max_write_iops=100))
    agent.add_consumer(vid, node.pod_uid)
    h = cgroups.hierarchy(node.root)
    assert h is not None
    assert cgroups.read_limits(h, node.pod, cgroups.device_number(device)).wiops == 100
    agent.remove_consumer(vid, node.pod_uid)
    assert cgroups.read_limits(h, node.pod, cgroups.device_number(device)).wiops == 0


@needs_blkio
def test_a_pod_whose_cgroup_is_unknown_is_limited_in_the_kubepods_cgroup(
    agent: Agent, node: FakeNode
) -> None:
    vid, device = attached_volume(agent)
    agent.set_qos(vid, QosLimits(max_read_bytes_per_second=6 * MiB))
    agent.add_consumer(vid, UNKNOWN_POD)
    h = cgroups.hierarchy(node.root)
    assert h is not None
    kubepods = node.root / "kubepods"
    rules = cgroups.read_limits(h, kubepods, cgroups.device_number(device))
    assert rules.rbps == 6 * MiB
    # and the kernel enforces it for a pod below it
    assert_near(fio(device, node.pod, "read", "64k")["bps"], 6 * MiB, "read bytes/s")
    assert agent.qos.condition(vid) == ""


def test_limits_survive_an_agent_restart_and_reach_a_later_pod(
    tmp_path: Path, agent: Agent, node: FakeNode
) -> None:
    vid, device = attached_volume(agent)
    agent.set_qos(vid, QosLimits(max_read_iops=77))
    again = Agent(
        "qos-node",
        agent.pools,
        agent.dev_dir,
        state_dir=tmp_path / "state",
        cgroup_root=node.root,
    )
    assert again.qos.limits(vid) == QosLimits(max_read_iops=77)
    again.add_consumer(vid, node.pod_uid)
    h = cgroups.hierarchy(node.root)
    assert h is not None
    assert cgroups.read_limits(h, node.pod, cgroups.device_number(device)).riops == 77


def test_without_any_cgroup_the_attachment_says_limits_are_not_enforced(
    tmp_path: Path,
) -> None:
    (tmp_path / "pool").mkdir()
    (tmp_path / "no-cgroups").mkdir()
    agent = Agent(
        "qos-node",
        {"default": Pool.open("default", tmp_path / "pool")},
        tmp_path / "dev",
        state_dir=tmp_path / "state",
        cgroup_root=tmp_path / "no-cgroups",
    )
    try:
        vid, _ = attached_volume(agent)
        agent.set_qos(vid, QosLimits(max_read_iops=10))
        agent.add_consumer(vid, str(uuid.uuid4()))
        # NodeGetVolumeStats reports the attachment's condition as abnormal
        assert "not enforced" in agent.get_attachment(vid).condition
    finally:
        release_loops(tmp_path)


# ---- owner side: the export's rate filter ------------------------------------------------


def _nbd_read_rate(port: int, psk_file: Path, identity: str, total: int) -> float:
    """Bytes/s of reading `total` bytes through the export after its burst allowance."""
    uri = f"nbds://{identity}@127.0.0.1:{port}/?tls-psk-file={psk_file}"
    burst = subprocess.run(
        ["nbdcopy", "--requests=1", "--connections=1", uri, "null:"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert burst.returncode == 0, burst.stderr
    start = time.monotonic()
    subprocess.run(
        ["nbdcopy", "--requests=1", "--connections=1", uri, "null:"],
        capture_output=True,
        timeout=120,
        check=True,
    )
    return total / (time.monotonic() - start)


def test_an_exports_rate_limit_holds_for_a_remote_client_and_changes_live(
    tmp_path: Path, agent: Agent
) -> None:
    """A client that bypasses its own cgroup still meets the owner's limit."""
    agent.exports.address = "127.0.0.1"
    vid = new_volume_id()
    size = 8 * MiB
    agent.create_volume(vid, "default", size)
    with open(agent.pools["default"].volume_path(vid), "r+b") as f:
        f.write(os.urandom(size))  # data everywhere: nbdcopy skips holes
    key = secrets.token_hex(32)
    export = agent.export(vid, "client-a", AgentExportCreate(psk_identity="client-a", psk_key=key))
    psk = tmp_path / "client.psk"
    psk.write_text(f"client-a:{key}\n")
    psk.chmod(0o600)
    try:
        limits = QosLimits(max_read_bytes_per_second=2 * MiB, max_write_bytes_per_second=2 * MiB)
        agent.set_qos(vid, limits)
        assert export_rate_bits(limits) == 16 * MiB
        time.sleep(1.5)  # nbdkit rereads its rate file
        # each nbdcopy reads 8 MiB; the first spends the 2 s burst bucket
        rate = _nbd_read_rate(export.port, psk, "client-a", size)
        assert_near(rate, 2 * MiB, "export read bytes/s")
        agent.set_qos(
            vid, QosLimits(max_read_bytes_per_second=4 * MiB, max_write_bytes_per_second=1 * MiB)
        )
        time.sleep(1.5)
        rate = _nbd_read_rate(export.port, psk, "client-a", size)
        assert_near(rate, 4 * MiB, "export read bytes/s after the change")
    finally:
        agent.close_export(vid, "client-a")


# ---- the CSI node plugin names the pod: a real agent process and the node service -------------


@needs_blkio
def test_a_published_pod_is_limited_and_unpublishing_lifts_its_limits(
    tmp_path: Path, node: FakeNode
) -> None:
    """NodePublish hands the agent the pod (pod.uid); the agent process writes its rules."""
    from csi_driver._gen import csi_pb2
    from csi_driver.config import Mode, PluginConfig
    from csi_driver.server import build_server
    from tessera.system import loopdev
    from tessera_dev.csi_client import CsiClient, block_capability

    proc = AgentProcess(tmp_path)
    flags = ["--state-dir", str(tmp_path / "state"), "--cgroup-root", str(node.root)]
    agent = _start_with(proc, flags)
    config = PluginConfig(
        mode=Mode.NODE,
        endpoint=f"unix://{tmp_path / 'csi.sock'}",
        node_id="proc-node",
        token=AGENT_TOKEN,
        agent_url=f"unix://{proc.socket}",
    )
    server = build_server(config)
    server.start()
    csi = CsiClient(config.endpoint)
    vid = new_volume_id()
    # where the kubelet publishes a block volume: NodeUnpublish finds the pod there
    publish = tmp_path / "plugins/kubernetes.io/csi/volumeDevices/publish/pv-1"
    staging, target = tmp_path / "staging", publish / node.pod_uid
    try:
        agent.create_volume(vid, "default", 16 * MiB)
        agent.set_qos(vid, QosLimits(max_read_iops=120, max_write_bytes_per_second=MiB))
        staging.mkdir()
        csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=vid,
                staging_target_path=str(staging),
                volume_capability=block_capability(),
            )
        )
        csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=vid,
                staging_target_path=str(staging),
                target_path=str(target),
                volume_capability=block_capability(),
                volume_context={"csi.storage.k8s.io/pod.uid": node.pod_uid},
            )
        )
        h = cgroups.hierarchy(node.root)
        assert h is not None
        device = cgroups.device_number(agent.get_attachment(vid).backing_device)
        rules = cgroups.read_limits(h, node.pod, device)
        assert (rules.riops, rules.wbps) == (120, MiB)
        csi.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target))
        )
        assert cgroups.read_limits(h, node.pod, device) == cgroups.IoLimits()
        csi.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging))
        )
    finally:
        csi.channel.close()
        server.stop(None).wait()
        agent.close()
        for mounted in reversed(mounts.mounts_under(tmp_path)):
            mounts.unmount(mounted)
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)
        release_loops(tmp_path)
    assert loopdev.bound_under(tmp_path) == []


def _start_with(proc: AgentProcess, flags: list[str]) -> AgentClient:
    """AgentProcess.start with extra flags (its own argument list takes none)."""
    tmp = proc.tmp
    args = [
        sys.executable, "-m", "node_agent", "--node-id", "proc-node",
        "--management", f"unix://{tmp / 'no-management.sock'}",
        "--token-file", str(tmp / "token"), "--pool", f"default={tmp / 'pool'}",
        "--socket", str(proc.socket), "--dev-dir", str(tmp / "dev"), *flags,
    ]  # fmt: skip
    with open(proc.log, "ab") as log:
        proc.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    client = AgentClient(f"unix://{proc.socket}", AGENT_TOKEN)
    deadline = time.monotonic() + 30
    while not client.healthy():
        assert proc.proc.poll() is None, proc.log.read_text()
        assert time.monotonic() < deadline, "agent did not start: " + proc.log.read_text()
        time.sleep(0.1)
    return client
