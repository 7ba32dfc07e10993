"""What a user sees when a node's agent dies or the node drops off the network.

A writer process in n2's network namespace writes and fsyncs block after
block of a volume that lives on n1, logging each write whose fsync returned:
those are the writes that must survive anything that follows. The cut-off
test runs last in this module: it fences n2, and unfences it (as an admin
does once the node was repaired) only at its end.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from csi_driver._gen import csi_pb2
from tessera.models import FenceReport, NodeState
from tests.multihost.support import (
    BLOCK,
    RPC_TIMEOUT,
    Cluster,
    Code,
    Kube,
    MiB,
    Published,
    assert_code,
    block_cap,
    call_error,
    errno_name,
    logged,
    needs_root,
    needs_tools,
    stop_process,
    wait_until,
)

pytestmark = [needs_root, needs_tools]

#: the writer cycles over the first 16 MiB of the 64 MiB volume
BLOCKS = 16 * MiB // BLOCK
#: far from the writer's blocks: where the fenced node tries one last write
FENCED_WRITE_AT = 32 * MiB


def fsynced(log: Path) -> int:
    return sum(1 for line in logged(log) if line.isdigit())


def errors_in(log: Path) -> list[str]:
    return [line for line in logged(log) if line.startswith("errno")]


def served_by(cluster: Cluster, node_id: str, owner: bool) -> set[str]:
    """Volumes the node's agent lists: its exports (owner) or its attachments (consumer)."""
    agent = cluster.agent(node_id)
    try:
        if owner:
            return {e.volume_id for e in agent.list_exports()}
        return {a.volume_id for a in agent.list_attachments()}
    finally:
        agent.close()


@pytest.mark.parametrize("victim", ["n2", "n1"], ids=["consumer-agent", "owner-agent"])
def test_io_continues_while_an_agent_is_killed_and_the_restarted_agent_readopts(
    cluster: Cluster, kube: Kube, tmp_path: Path, victim: str
) -> None:
    vid = kube.create(block_cap(), on="n1")
    pub = kube.publish(vid, "n2", block_cap())
    log = tmp_path / "writes.log"
    writer = cluster.start_writer("n2", str(pub.target), log, BLOCKS)
    try:
        wait_until(lambda: fsynced(log) >= 20, "the writer's first fsync'd writes")
        cluster.stack.kill_agent(victim, signal.SIGKILL)
        before = fsynced(log)
        wait_until(lambda: fsynced(log) >= before + 50 or writer.poll() is not None,
                   f"writes to go on with the {victim} agent dead")  # fmt: skip
        assert writer.poll() is None, f"the writer stopped: {errors_in(log)}"
        cluster.stack.respawn_agent(victim)  # returns once management has it registered
        assert vid in served_by(cluster, victim, owner=victim == "n1")
        resumed = fsynced(log)
        wait_until(lambda: fsynced(log) >= resumed + 20, "writes to go on after the respawn")
    finally:
        stop_process(writer)
    assert errors_in(log) == []
    assert cluster.io("n2", "verify", pub.target, log, BLOCKS) == "ok"
    kube.unpublish(pub)  # the respawned agents tear down what their predecessors set up


def test_a_dead_export_shows_as_an_abnormal_volume_naming_the_owner_and_writes_fail(
    cluster: Cluster, kube: Kube
) -> None:
    vid = kube.create(block_cap(), on="n1")
    pub = kube.publish(vid, "n2", block_cap())
    assert not volume_stats_condition(cluster, pub).abnormal
    # The export's nbdkit dies (the owner's data path, not its agent).
    pid_file = Path(cluster.node("n1").state_dir) / "exports" / vid / "n2.pid"
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert errno_name(cluster.io("n2", "trywrite", pub.target, 0)) == "EIO"
    condition = volume_stats_condition(cluster, pub)
    assert condition.abnormal and "n1" in condition.message, condition
    kube.unpublish(pub)  # a dead connection still tears down


def volume_stats_condition(cluster: Cluster, pub: Published) -> csi_pb2.VolumeCondition:
    reply = cluster.node_csi[pub.node_id].NodeGetVolumeStats(
        csi_pb2.NodeGetVolumeStatsRequest(volume_id=pub.volume_id, volume_path=str(pub.target)),
        timeout=RPC_TIMEOUT,
    )
    return reply.volume_condition


def controller_condition(cluster: Cluster, vid: str) -> csi_pb2.VolumeCondition:
    reply = cluster.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=vid), timeout=RPC_TIMEOUT
    )
    return reply.status.volume_condition


def node_state_in_cli(cluster: Cluster, node_id: str) -> str:
    res = cluster.tessera("node", "list", "-o", "json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    rows = data["items"] if isinstance(data, dict) else data
    return next(row["state"] for row in rows if row["id"] == node_id)


def test_a_cut_off_node_is_fenced_before_its_volume_moves_and_cannot_write_any_more(
    cluster: Cluster, kube: Kube, tmp_path: Path
) -> None:
    vid = kube.create(block_cap(), on="n1")
    old = kube.publish(vid, "n2", block_cap())
    log = tmp_path / "writes.log"
    writer = cluster.start_writer("n2", str(old.target), log, BLOCKS)
    try:
        wait_until(lambda: fsynced(log) >= 20, "the writer's first fsync'd writes")
        cluster.stack.cut_off("n2")
        try:
            wait_until(lambda: cluster.mgmt.get_node("n2").state == NodeState.UNREACHABLE,
                       "management to see n2 unreachable")  # fmt: skip
            assert node_state_in_cli(cluster, "n2") == "unreachable"
            condition = controller_condition(cluster, vid)
            assert condition.abnormal and "n2" in condition.message, condition
            # Not fenced yet: n2 may still be writing, so nobody else may take the volume.
            err = call_error(lambda: kube.controller_publish(vid, "n3", block_cap()))
            assert_code(err, Code.FAILED_PRECONDITION, "n2", "fence")
            # Nothing new is attached to a node that does not answer (CO retries UNAVAILABLE).
            other = kube.create(block_cap(), on="n1")
            err = call_error(lambda: kube.controller_publish(other, "n2", block_cap()))
            assert_code(err, Code.UNAVAILABLE, "n2")

            fence = cluster.tessera("node", "fence", "n2", "-o", "json")
            assert fence.returncode == 0, fence.stdout + fence.stderr
            report = FenceReport.model_validate_json(fence.stdout)
            assert (report.state, report.released) == (NodeState.FENCED, [vid]), report
            assert cluster.mgmt.get_node("n2").state == NodeState.FENCED
            new = kube.publish(vid, "n3", block_cap())
            assert cluster.io("n3", "verify", new.target, log, BLOCKS) == "ok"
            untouched = cluster.io("n3", "read", new.target, FENCED_WRITE_AT, BLOCK)
        finally:
            cluster.stack.restore("n2")
        # Back on the network and beating: fencing is sticky, so n2 stays fenced (its old
        # pod may still run) and gets nothing new until an admin lifts the fence.
        registered_at = cluster.mgmt.get_node("n2").last_heartbeat
        wait_until(lambda: cluster.mgmt.get_node("n2").last_heartbeat > registered_at,
                   "n2's agent to beat again")  # fmt: skip
        assert cluster.mgmt.get_node("n2").state == NodeState.FENCED
        assert node_state_in_cli(cluster, "n2") == "fenced"
        err = call_error(lambda: kube.controller_publish(other, "n2", block_cap()))
        assert_code(err, Code.UNAVAILABLE, "n2 is fenced", "tessera node unfence n2")
        # Its old client finds its export closed.
        answer = cluster.io("n2", "trywrite", old.target, FENCED_WRITE_AT, timeout=120)
        # EIO: the export is gone. (ENOSPC would mean the loop device under the
        # pod's bind was released, and its number could go to another volume.)
        assert errno_name(answer) == "EIO", f"n2's old client answered {answer}"
        wait_until(lambda: writer.poll() is not None, "n2's old writer to fail")
        assert errors_in(log), "n2's old writer stopped without a write error"
        assert cluster.io("n3", "read", new.target, FENCED_WRITE_AT, BLOCK) == untouched
        # kubelet on the returning node tears its side down; the data on n3 is untouched.
        kube.unpublish(old)
        assert cluster.io("n3", "verify", new.target, log, BLOCKS) == "ok"
        assert cluster.mgmt.get_node("n2").state == NodeState.FENCED
        # The admin lifts the fence: n2 is online and may attach again.
        unfence = cluster.tessera("node", "unfence", "n2")
        assert unfence.returncode == 0, unfence.stdout + unfence.stderr
        assert cluster.mgmt.get_node("n2").state == NodeState.ONLINE
        back = kube.publish(other, "n2", block_cap())
        kube.unpublish(back)
    finally:
        stop_process(writer)
