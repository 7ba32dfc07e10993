"""`POST /v1/reconcile` and the periodic check, against real agent processes and real files.

Management and agents run as processes on unix sockets with plain
directory pools; the differences a crash or power loss leaves are made the
way they happen: a file made behind management's back, a file removed, a
row whose last commit was lost (changed in the real SQLite file), a device
attached without a record. "Old" rows are aged in the database: rows
younger than the reconciler's grace period are never judged.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from management.reconcile import GRACE_SECONDS
from tessera.clients import AgentClient, ManagementClient
from tessera.ids import new_volume_id
from tessera.models import AccessMode, FindingKind, ReconcileReport, VolumeCreate
from tessera.system.loopdev import bound_under
from tests.conftest import needs_root
from tests.integration.processes import Processes, processes
from tests.integration.test_node_agent_loop import release_loops

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2


@dataclass
class Cluster:
    procs: Processes
    mgmt: ManagementClient
    agents: dict[str, AgentClient]
    pools: dict[str, Path]

    def sql(self, statement: str, *params: object) -> None:
        """Change management's real database, as a lost commit or an old row would leave it."""
        db = sqlite3.connect(self.procs.tmp / "management.db")
        try:
            with db:
                db.execute(statement, params)
        finally:
            db.close()

    def age(self, volume_id: str) -> None:
        old = time.time() - 10 * GRACE_SECONDS
        self.sql("UPDATE volumes SET created_at = ? WHERE id = ?", old, volume_id)
        self.sql("UPDATE attachments SET created_at = ? WHERE volume_id = ?", old, volume_id)

    def volume(self, name: str, node: str = "n1", size: int = 8 * MiB) -> str:
        req = VolumeCreate(name=name, size_bytes=size, requisite_nodes=[node])
        volume_id = self.mgmt.create_volume(req).id
        self.age(volume_id)
        return volume_id

    def file(self, node: str, volume_id: str) -> Path:
        return self.pools[node] / "volumes" / f"{volume_id}.img"

    def state(self, volume_id: str) -> str | None:
        db = sqlite3.connect(self.procs.tmp / "management.db")
        try:
            row = db.execute("SELECT state FROM volumes WHERE id = ?", (volume_id,)).fetchone()
        finally:
            db.close()
        return None if row is None else row[0]


def kinds(report: ReconcileReport) -> dict[tuple[FindingKind, str], bool]:
    """(kind, volume id) -> fixed, for every finding."""
    return {(f.kind, f.volume_id): f.fixed for f in report.findings}


def start(tmp_path: Path, procs: Processes, *management_args: str) -> Cluster:
    mgmt = procs.start_management(*management_args)
    pools = {node: tmp_path / f"pool-{node}" for node in ("n1", "n2")}
    for directory in pools.values():
        directory.mkdir()
    agents = procs.start_agents({node: {"p": directory} for node, directory in pools.items()})
    return Cluster(procs, mgmt, agents, pools)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    try:
        with processes(tmp_path) as procs:
            yield start(tmp_path, procs)
    finally:
        release_loops(tmp_path)
    assert bound_under(tmp_path) == []


def write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def test_a_consistent_cluster_reports_nothing(cluster: Cluster) -> None:
    cluster.volume("a")
    cluster.volume("b", node="n2")
    report = cluster.mgmt.reconcile(fix=False)
    assert report.findings == []
    assert report.nodes_checked == ["n1", "n2"]


def test_the_agent_lists_every_volume_file_with_what_it_holds(cluster: Cluster) -> None:
    a, b = cluster.volume("a"), cluster.volume("b")
    write(cluster.file("n1", b), b"x" * 8192)
    (cluster.pools["n1"] / "volumes" / "not-a-volume.img").write_bytes(b"")
    listed = {v.id: v for v in cluster.agents["n1"].list_volumes()}
    assert set(listed) == {a, b}
    assert listed[a].allocated_bytes == 0 and listed[a].size_bytes == 8 * MiB
    assert listed[b].allocated_bytes >= 8192
    assert cluster.agents["n2"].list_volumes() == []


def test_a_file_no_row_names_is_reported_and_never_deleted(cluster: Cluster) -> None:
    # What a create leaves when the agent fsynced its file and the row was lost.
    orphan = new_volume_id()
    cluster.agents["n2"].create_volume(orphan, "p", 4 * MiB)
    write(cluster.file("n2", orphan), b"precious")
    report = cluster.mgmt.reconcile(fix=True)
    assert kinds(report) == {(FindingKind.ORPHAN_FILE, orphan): False}
    (finding,) = report.findings
    assert finding.node_id == "n2" and finding.pool == "p" and "holds" in finding.detail
    assert cluster.file("n2", orphan).read_bytes()[:8] == b"precious"


def test_a_row_whose_file_is_gone_is_reported_as_missing(cluster: Cluster) -> None:
    gone = cluster.volume("gone")
    cluster.file("n1", gone).unlink()  # e.g. a pool that is not mounted
    report = cluster.mgmt.reconcile(fix=True)
    assert kinds(report) == {(FindingKind.MISSING_FILE, gone): False}
    assert cluster.state(gone) == "available"
    assert not cluster.file("n1", gone).exists()  # nothing invented in its place


def test_a_size_mismatch_is_reported_not_repaired(cluster: Cluster) -> None:
    vid = cluster.volume("a")
    os.truncate(cluster.file("n1", vid), 16 * MiB)
    report = cluster.mgmt.reconcile(fix=True)
    assert kinds(report) == {(FindingKind.SIZE_MISMATCH, vid): False}
    assert cluster.file("n1", vid).stat().st_size == 16 * MiB


def test_fix_finishes_a_create_whose_last_commit_was_lost(cluster: Cluster) -> None:
    complete = cluster.volume("complete")
    cluster.sql("UPDATE volumes SET state = 'creating' WHERE id = ?", complete)
    no_file = cluster.volume("no-file")
    cluster.sql("UPDATE volumes SET state = 'creating' WHERE id = ?", no_file)
    cluster.file("n1", no_file).unlink()

    assert kinds(cluster.mgmt.reconcile(fix=False)) == {
        (FindingKind.STUCK_CREATING, complete): False,
        (FindingKind.STUCK_CREATING, no_file): False,
    }
    assert cluster.state(complete) == "creating"  # a report changes nothing

    assert kinds(cluster.mgmt.reconcile(fix=True)) == {
        (FindingKind.STUCK_CREATING, complete): True,
        (FindingKind.STUCK_CREATING, no_file): False,  # a create retry finishes it, not us
    }
    assert cluster.state(complete) == "available"
    assert cluster.state(no_file) == "creating"
    assert cluster.mgmt.reconcile(fix=True).findings[0].volume_id == no_file


def test_fix_finishes_a_delete_that_management_started(cluster: Cluster) -> None:
    with_file = cluster.volume("with-file")
    write(cluster.file("n1", with_file), b"to be deleted")
    cluster.sql("UPDATE volumes SET state = 'deleting' WHERE id = ?", with_file)
    without = cluster.volume("without-file")
    cluster.sql("UPDATE volumes SET state = 'deleting' WHERE id = ?", without)
    cluster.file("n1", without).unlink()

    assert kinds(cluster.mgmt.reconcile(fix=True)) == {
        (FindingKind.STUCK_DELETING, with_file): True,
        (FindingKind.STUCK_DELETING, without): True,
    }
    assert not cluster.file("n1", with_file).exists()
    assert cluster.state(with_file) is None and cluster.state(without) is None
    assert cluster.mgmt.reconcile(fix=True).findings == []


def test_fix_never_deletes_the_file_of_a_volume_attached_on_its_node(cluster: Cluster) -> None:
    vid = cluster.volume("busy")
    device = cluster.agents["n1"].attach(vid)
    cluster.mgmt.attach(vid, "n1", AccessMode.SINGLE_NODE_WRITER, readonly=False)
    cluster.age(vid)
    cluster.sql("UPDATE volumes SET state = 'deleting' WHERE id = ?", vid)
    report = cluster.mgmt.reconcile(fix=True)
    assert kinds(report) == {(FindingKind.STUCK_DELETING, vid): False}
    assert cluster.file("n1", vid).exists()
    assert cluster.agents["n1"].get_attachment(vid).backing_device == device.backing_device
    cluster.agents["n1"].detach(vid)


def test_a_device_attached_without_a_record_is_reported_and_left_attached(
    cluster: Cluster,
) -> None:
    vid = cluster.volume("a")
    device = cluster.agents["n1"].attach(vid)  # behind management's back
    report = cluster.mgmt.reconcile(fix=True)
    assert kinds(report) == {(FindingKind.ORPHAN_ATTACHMENT, vid): False}
    assert device.backing_device in report.findings[0].detail
    assert cluster.agents["n1"].get_attachment(vid).backing_device == device.backing_device
    cluster.agents["n1"].detach(vid)


def test_an_old_attachment_record_without_a_device_is_reported(cluster: Cluster) -> None:
    vid = cluster.volume("a")
    cluster.mgmt.attach(vid, "n2", AccessMode.SINGLE_NODE_WRITER, readonly=False)
    assert cluster.mgmt.reconcile().findings == []  # young: NodeStage may be on its way
    cluster.age(vid)
    report = cluster.mgmt.reconcile(fix=True)
    assert kinds(report) == {(FindingKind.STALE_ATTACHMENT, vid): False}
    assert report.findings[0].node_id == "n2"
    assert [a.node_id for a in cluster.mgmt.list_attachments(vid)] == ["n2"]


def test_a_young_row_is_not_judged_while_its_create_may_be_running(cluster: Cluster) -> None:
    vid = cluster.mgmt.create_volume(VolumeCreate(name="young", size_bytes=MiB)).id
    cluster.file(cluster.mgmt.get_volume(vid).node_id, vid).unlink()
    assert cluster.mgmt.reconcile().findings == []


def test_an_unreachable_node_is_reported_and_the_others_still_checked(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.mgmt.register_node("ghost", f"unix://{tmp_path / 'nobody.sock'}", {})
    orphan = new_volume_id()
    cluster.agents["n1"].create_volume(orphan, "p", MiB)
    report = cluster.mgmt.reconcile(fix=False)
    assert kinds(report) == {
        (FindingKind.NODE_UNREACHABLE, ""): False,
        (FindingKind.ORPHAN_FILE, orphan): False,
    }
    assert report.nodes_checked == ["n1", "n2"]


def test_the_periodic_check_logs_findings_and_never_fixes(tmp_path: Path) -> None:
    try:
        with processes(tmp_path) as procs:
            cluster = start(tmp_path, procs, "--reconcile-interval", "0.2")
            stuck = cluster.volume("stuck")
            cluster.sql("UPDATE volumes SET state = 'creating' WHERE id = ?", stuck)
            orphan = new_volume_id()
            cluster.agents["n2"].create_volume(orphan, "p", MiB)
            deadline = time.monotonic() + 20
            while f"orphan_file on node n2 volume {orphan}" not in procs.log("management"):
                assert time.monotonic() < deadline, procs.log("management")[-3000:]
                time.sleep(0.1)
            assert f"stuck_creating on node n1 volume {stuck}" in procs.log("management")
            assert cluster.state(stuck) == "creating"
            assert cluster.file("n2", orphan).exists()
    finally:
        release_loops(tmp_path)
