"""`dev up --nodes N`: nodes as network namespaces on one machine, and nothing left behind.

One three-node stack serves the tests that only look at it; the teardown
tests make their own leftovers (a crashed agent's NBD export and client,
a filesystem mounted on it) or their own failed start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from csi_driver._gen import csi_pb2
from tessera.clients import AgentClient, ManagementClient
from tessera.system import filesystems, loopdev, mounts
from tessera.topology import TOPOLOGY_KEY
from tessera_dev import netns, teardown
from tessera_dev.csi_client import CsiClient, mount_capability
from tessera_dev.multinode import MultiNodeStack, MultiStackInfo, StackError
from tests.conftest import needs_root

pytestmark = [needs_root, pytest.mark.root]

NODES = 3
POOL_SIZE = 512 * 1024**2
EXPORT_PORT = 10890


def short_dir(prefix: str) -> Path:
    """A state dir short enough for every unix socket path under it (tmp_path may not be)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


def leftovers(state: Path) -> list[str]:
    """Everything of this state dir still on the machine, described; [] when clean."""
    tag = netns.tag_of(state)
    found = [f"namespace {n}" for n in netns.namespaces(tag)]
    found += [f"link {n}" for n in netns.links(tag)]
    found += [f"mount {m}" for m in mounts.mounts_under(state)]
    found += [f"loop {b.path} on {b.backing}" for b in loopdev.bound_under(state)]
    programs = teardown.DATA_PATH + teardown.MODULES
    found += [f"process {pid}" for pid in teardown.stack_processes(state, programs)]
    found += [f"device link {p}" for p in state.glob("nodes/*/dev/*") if p.is_symlink()]
    return found


@pytest.fixture(scope="module")
def stack() -> Iterator[MultiNodeStack]:
    state = short_dir("tdm-")
    stack = MultiNodeStack(state, nodes=NODES, pool_size=POOL_SIZE)
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()
        remove(state)


def remove(state: Path) -> None:
    """The state dir, only once nothing is mounted under it (never delete through a mount)."""
    assert mounts.mounts_under(state) == [], f"still mounted under {state}"
    shutil.rmtree(state)


def info_of(stack: MultiNodeStack) -> MultiStackInfo:
    assert stack.info is not None
    return stack.info


def token(stack: MultiNodeStack) -> str:
    return Path(info_of(stack).token_file).read_text().strip()


def connect_argv(address: str, port: int) -> list[str]:
    return [sys.executable, "-c",
            "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 3)",
            address, str(port)]  # fmt: skip


def test_every_node_registers_with_its_own_address_and_answers_there(
    stack: MultiNodeStack,
) -> None:
    info = info_of(stack)
    mgmt = ManagementClient(info.management_url, token(stack))
    try:
        registered = {n.id: n.agent_url for n in mgmt.list_nodes().items}
    finally:
        mgmt.close()
    assert registered == {n.node_id: n.agent_url for n in info.nodes}
    assert len({n.address for n in info.nodes}) == NODES
    for node in info.nodes:
        agent = AgentClient(node.agent_url, token(stack))
        try:
            assert agent.node().node_id == node.node_id
        finally:
            agent.close()


def test_each_node_plugin_answers_with_its_own_node_id(stack: MultiNodeStack) -> None:
    for node in info_of(stack).nodes:
        with CsiClient(node.csi_endpoint) as csi:
            reply = csi.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=10)
        assert reply.node_id == node.node_id
    with CsiClient(info_of(stack).csi_endpoint) as csi:
        caps = csi.controller.ControllerGetCapabilities(
            csi_pb2.ControllerGetCapabilitiesRequest(), timeout=10
        )
    assert caps.capabilities, "the controller plugin answers in the root namespace"


def test_each_node_runs_in_a_namespace_of_its_own(stack: MultiNodeStack) -> None:
    seen = set()
    for node in info_of(stack).nodes:
        expected = os.stat(netns.NETNS_DIR / node.netns).st_ino
        for name in (f"{node.node_id}-agent", f"{node.node_id}-csi"):
            assert os.stat(f"/proc/{stack.procs[name].pid}/ns/net").st_ino == expected, name
        seen.add(expected)
    assert len(seen) == NODES
    assert (
        os.stat(f"/proc/{stack.procs['management'].pid}/ns/net").st_ino
        == os.stat("/proc/self/ns/net").st_ino
    )


def test_nodes_reach_each_others_agents(stack: MultiNodeStack) -> None:
    nodes = info_of(stack).nodes
    for source in nodes:
        for target in nodes:
            if target is not source:
                res = stack.run_in(source.node_id, connect_argv(target.address, 7700))
                assert res.returncode == 0, f"{source.node_id} -> {target.node_id}: {res.stderr}"


def test_a_cut_off_node_is_unreachable_until_restored(stack: MultiNodeStack) -> None:
    n1, n3 = info_of(stack).node("n1"), info_of(stack).node("n3")
    stack.cut_off("n3")
    try:
        assert stack.procs["n3-agent"].poll() is not None, "a dead host's agent is gone"
        res = stack.run_in("n1", connect_argv(n3.address, 7700))
        assert res.returncode != 0, "n1 still reaches the cut-off n3"
        assert stack.failed_process() is None, "a node cut off on purpose is not a failure"
    finally:
        stack.restore("n3")
    res = stack.run_in("n1", connect_argv(n3.address, 7700))
    assert res.returncode == 0, res.stderr
    assert stack.run_in("n3", connect_argv(n1.address, 7700)).returncode == 0


def test_killed_agent_respawns_and_registers_again(stack: MultiNodeStack) -> None:
    stack.kill_agent("n2")
    assert stack.procs["n2-agent"].poll() is not None
    stack.respawn_agent("n2")
    assert ready(stack, "n2")


def test_a_second_dev_up_on_the_same_dir_is_refused_and_leaves_the_first_running(
    stack: MultiNodeStack,
) -> None:
    second = MultiNodeStack(stack.dir, nodes=1)
    with pytest.raises(StackError, match="another"):
        second.start()
    second.stop()  # as `dev up` does after a failed start: must not touch the first
    assert (stack.dir / "stack.json").exists()
    assert stack.failed_process() is None
    assert [n.node_id for n in info_of(stack).nodes if not ready(stack, n.node_id)] == []


@contextmanager
def crashed_remote_attachment(stack: MultiNodeStack) -> Iterator[tuple[Path, str]]:
    """What a crashed agent leaves: an export on n1, nbdfuse + loop + mounted ext4 on n2.

    Yields (staging mountpoint, loop device). Whatever the stack's teardown
    did not remove is removed here, so a failing test leaves nothing either.
    """
    info = info_of(stack)
    n1, n2 = info.node("n1"), info.node("n2")
    volume = Path(n1.pool_dir) / "leftover.img"
    with open(volume, "xb") as f:
        f.truncate(64 * 1024**2)
    export_pid = Path(n1.state_dir) / "exports" / "leftover.pid"
    export_pid.parent.mkdir(parents=True, exist_ok=True)
    fuse = Path(n2.state_dir) / "connections" / "leftover" / "fuse"
    fuse.mkdir(parents=True)
    staging = short_dir("tdm-stage-")
    client = None
    device = ""
    try:
        res = stack.run_in("n1", ["nbdkit", "--pidfile", str(export_pid), "-i", n1.address,
                                  "-p", str(EXPORT_PORT), "file", str(volume)])  # fmt: skip
        assert res.returncode == 0, res.stderr
        client = subprocess.Popen(
            netns.in_netns(n2.netns, ["nbdfuse", str(fuse / "volume"), "--command", "nbdkit",
                                      "-s", "--exit-with-parent", "nbd",
                                      f"hostname={n1.address}", f"port={EXPORT_PORT}"]),
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        wait_for(lambda: (fuse / "volume").exists(), "nbdfuse to mount")
        device, _ = loopdev.attach(str(fuse / "volume"), readonly=False, direct_io=False)
        filesystems.make_filesystem(device, "ext4", [])
        mounts.mount(device, str(staging), "ext4", [])
        yield staging, device
    finally:
        with suppress(Exception):
            mounts.unmount(str(staging))
        if device and any(b.path == device for b in loopdev.bound_devices()):
            loopdev.detach(device)
        if client is not None and client.poll() is None:
            client.kill()
            client.wait(timeout=10)
        staging.rmdir()


def publish_remotely(stack: MultiNodeStack, work: Path) -> list[Path]:
    """A volume on n1 mounted by a pod on n2 (over NBD), as Kubernetes would; its mounts."""
    cap = mount_capability("ext4")
    with CsiClient(info_of(stack).csi_endpoint) as csi:
        volume = csi.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name="stop-while-in-use",
                capacity_range=csi_pb2.CapacityRange(required_bytes=64 * 1024**2),
                volume_capabilities=[cap],
                parameters={"locality": "preferred"},
                accessibility_requirements=csi_pb2.TopologyRequirement(
                    preferred=[csi_pb2.Topology(segments={TOPOLOGY_KEY: "n1"})]
                ),
            ),
            timeout=60,
        ).volume
        context = csi.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(
                volume_id=volume.volume_id, node_id="n2", volume_capability=cap
            ),
            timeout=60,
        ).publish_context
    assert context["transport"] == "nbd", dict(context)
    staging, target = work / "staging", work / "target"
    staging.mkdir()
    with CsiClient(info_of(stack).node("n2").csi_endpoint) as csi:
        csi.node.NodeStageVolume(
            csi_pb2.NodeStageVolumeRequest(
                volume_id=volume.volume_id, publish_context=context,
                staging_target_path=str(staging), volume_capability=cap,
            ),
            timeout=60,
        )  # fmt: skip
        csi.node.NodePublishVolume(
            csi_pb2.NodePublishVolumeRequest(
                volume_id=volume.volume_id, publish_context=context,
                staging_target_path=str(staging), target_path=str(target),
                volume_capability=cap,
            ),
            timeout=60,
        )  # fmt: skip
    return [staging, target]


def test_stop_while_volumes_are_in_use_leaves_no_namespace_link_mount_loop_or_process(
    stack: MultiNodeStack,
) -> None:
    """Ctrl-C with a pod using a remote volume, and a crashed agent's leftovers beside it."""
    work = short_dir("tdm-work-")
    try:
        in_use = publish_remotely(stack, work)
        with crashed_remote_attachment(stack) as (staging, device):
            assert all(mounts.is_mount(str(m)) for m in in_use)
            exports = teardown.stack_processes(stack.dir, ("nbdkit",))
            assert len(exports) >= 2, "an export of the agent's and the crashed one's"
            stack.stop()
            assert not mounts.is_mount(str(staging))
            assert device not in [b.path for b in loopdev.bound_devices()]
            assert [m for m in in_use if mounts.is_mount(str(m))] == []
            assert leftovers(stack.dir) == []
            assert not (stack.dir / "stack.json").exists()
    finally:
        stack.stop()
        remove(work)


def ready(stack: MultiNodeStack, node_id: str) -> bool:
    agent = AgentClient(info_of(stack).node(node_id).agent_url, token(stack))
    try:
        return agent.registered()
    finally:
        agent.close()


def test_a_failed_start_leaves_nothing_behind() -> None:
    state = short_dir("tdm-fail-")
    stack = MultiNodeStack(
        state, nodes=2, pool_size=POOL_SIZE, extra_args={"n2-agent": ["--no-such-flag"]}
    )
    try:
        with pytest.raises(StackError, match="n2-agent exited"):
            stack.start()
        assert leftovers(state) == []
        assert not (state / "stack.json").exists()
    finally:
        stack.stop()
        remove(state)


def wait_for(condition: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_ctrl_c_while_starting_stops_the_start_and_leaves_nothing_behind() -> None:
    state = short_dir("tdm-cancel-")
    cancel = threading.Event()
    cancel.set()  # as `dev up`'s signal handler does on Ctrl-C
    stack = MultiNodeStack(state, nodes=2, pool_size=POOL_SIZE, cancel=cancel)
    try:
        with pytest.raises(StackError, match="interrupted"):
            stack.start()
        assert leftovers(state) == []
    finally:
        stack.stop()
        remove(state)


def test_two_state_dirs_never_share_a_namespace_an_interface_or_a_subnet(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    net_a, net_b = netns.network_for(a), netns.network_for(b)
    assert net_a.tag != net_b.tag and not net_a.subnet.overlaps(net_b.subnet)
    assert net_a.netns(1) != net_b.netns(1) and net_a.bridge != net_b.bridge
    names = [net_a.bridge, net_a.veth(netns.MAX_NODES), net_b.veth(netns.MAX_NODES)]
    assert max(len(n) for n in names) <= 15, names  # IFNAMSIZ - 1
    assert netns.network_for(a) == net_a, "a restart keeps its addresses"


def test_a_recorded_subnet_taken_meanwhile_by_another_network_is_given_up(tmp_path: Path) -> None:
    recorded = netns.network_for(tmp_path)
    squatter = f"tsq-{recorded.tag}"
    # a veth pair: this kernel has no dummy interfaces; deleting one end deletes both
    netns.ip("link", "add", squatter, "type", "veth", "peer", "name", f"tsr-{recorded.tag}")
    try:
        netns.ip("addr", "add", f"{recorded.address(5)}/24", "dev", squatter)
        moved = netns.network_for(tmp_path)
        assert not moved.subnet.overlaps(recorded.subnet)
    finally:
        netns.ip("link", "del", squatter)
