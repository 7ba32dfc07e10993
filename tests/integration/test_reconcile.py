"""`POST /v1/reconcile` and the periodic check, against real agent processes and real files.

Management and agents run as processes on unix sockets with plain
directory pools; the differences a crash or power loss leaves are made the
way they happen: a file made behind management's back, a file removed, a
row whose last commit was lost (changed in the real SQLite file), a device
attached without a record. "Old" rows are aged in the database: rows
younger than the reconciler's grace period are never judged.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI

from management.agents import AgentClients
from management.context import Context
from management.db import Database
from management.reconcile import GRACE_SECONDS, _read_node, _volume_findings
from node_agent.agent import Agent
from node_agent.pools import Pool
from tessera.clients import AgentClient, ManagementClient
from tessera.errors import Aborted, NotFound
from tessera.http import Service
from tessera.ids import new_volume_id
from tessera.models import (
    AccessMode,
    AgentAttachment,
    AgentVolume,
    FindingKind,
    ReconcileReport,
    VolumeCreate,
)
from tessera.rest import announce_service, install_problem_handlers
from tessera.system.loopdev import bound_under
from tests.conftest import needs_root
from tests.integration.processes import TOKEN, Processes, processes
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
    vid = cluster.volume("a", node="n2")  # a local attachment: these agents export nothing
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
            # a run may have read the rows before the update and the files after the
            # orphan appeared: wait for a run that saw both, however they interleave
            expected = [
                f"orphan_file on node n2 volume {orphan}",
                f"stuck_creating on node n1 volume {stuck}",
            ]
            deadline = time.monotonic() + 20
            while not all(line in procs.log("management") for line in expected):
                assert time.monotonic() < deadline, procs.log("management")[-3000:]
                time.sleep(0.1)
            assert cluster.state(stuck) == "creating"
            assert cluster.file("n2", orphan).exists()
    finally:
        release_loops(tmp_path)


# ---- a second look that fails, a delete that wins the race ---------------------------------


@contextmanager
def serving(app: FastAPI, socket: Path) -> Iterator[str]:
    """uvicorn on a unix socket in a thread; yields its URL."""
    server = uvicorn.Server(uvicorn.Config(app, uds=str(socket), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, f"{socket} did not start"
        time.sleep(0.01)
    try:
        yield f"unix://{socket}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def busy_agent(orphan_file: str, orphan_device: str) -> FastAPI:
    """An agent whose lists name a file and a device that its second look refuses as busy.

    A stand-in, because the real agent's second-look calls no longer fail
    this way (get_attachment takes no lock); an agent failing or dying
    mid-run answers the same to management, which is what is tested here.
    """
    app = FastAPI()
    install_problem_handlers(app, logging.getLogger("busy-agent"), "node-agent")
    announce_service(app, Service.NODE_AGENT)
    volume = AgentVolume(id=orphan_file, pool="p", size_bytes=MiB, path=f"/x/{orphan_file}.img")
    device = AgentAttachment(
        volume_id=orphan_device,
        device=f"/dev/tessera/{orphan_device}",
        backing_device="/dev/loop9",
        readonly=False,
        size_bytes=MiB,
    )

    @app.get("/v1/volumes")
    def volumes() -> dict[str, object]:
        return {"items": [volume.model_dump()]}

    @app.get("/v1/attachments")
    def attachments() -> dict[str, object]:
        return {"items": [device.model_dump()]}

    @app.get("/v1/volumes/{volume_id}")
    @app.get("/v1/attachments/{volume_id}")
    def busy(volume_id: str) -> None:
        raise Aborted(f"an operation on {volume_id} is already in progress; retry later")

    return app


def test_a_volume_the_agent_cannot_look_at_again_is_reported_and_the_run_goes_on(
    cluster: Cluster,
) -> None:
    orphan_file, orphan_device, orphan = new_volume_id(), new_volume_id(), new_volume_id()
    cluster.agents["n1"].create_volume(orphan, "p", MiB)
    socket = cluster.procs.tmp / "busy.sock"
    with serving(busy_agent(orphan_file, orphan_device), socket) as url:
        cluster.mgmt.register_node("busy", url, {})
        report = cluster.mgmt.reconcile(fix=True)
    assert report.nodes_checked == ["busy", "n1", "n2"]
    assert kinds(report) == {
        (FindingKind.UNCHECKED, orphan_file): False,
        (FindingKind.UNCHECKED, orphan_device): False,
        (FindingKind.ORPHAN_FILE, orphan): False,
    }
    unchecked = [f for f in report.findings if f.kind == FindingKind.UNCHECKED]
    assert {f.node_id for f in unchecked} == {"busy"}
    assert all("already in progress" in f.detail for f in unchecked)


def test_the_agent_describes_an_attachment_while_another_call_on_the_volume_runs(
    tmp_path: Path,
) -> None:
    """NodeGetVolumeStats and reconcile's second look read kernel state: never "busy"."""
    (tmp_path / "pool").mkdir()
    agent = Agent("n1", {"p": Pool.open("p", tmp_path / "pool")}, dev_dir=tmp_path / "dev")
    vid = new_volume_id()
    agent.create_volume(vid, "p", 8 * MiB)
    try:
        attached = agent.attach(vid, readonly=False)
        with agent.locks.hold(vid):  # e.g. a NodeExpandVolume resizing it
            assert agent.get_attachment(vid) == attached
        agent.detach(vid)
    finally:
        release_loops(tmp_path)
    assert bound_under(tmp_path) == []


def test_fix_never_recreates_the_file_of_a_volume_deleted_while_it_ran(
    cluster: Cluster,
) -> None:
    """A create left `creating`: the run reads it, a user's delete completes, the fix acts."""
    vid = cluster.volume("deleted-meanwhile")
    cluster.sql("UPDATE volumes SET state = 'creating' WHERE id = ?", vid)
    ctx = Context(
        db=Database(f"sqlite:///{cluster.procs.tmp / 'management.db'}"), agents=AgentClients(TOKEN)
    )
    try:
        view = _read_node(ctx, "n1", cluster.mgmt.get_node("n1").agent_url)
        assert vid in view.rows and vid in view.files
        cluster.mgmt.delete_volume(vid)  # between the run's look and its fix
        assert not cluster.file("n1", vid).exists()

        found = _volume_findings(ctx, view, fix=True)
    finally:
        ctx.agents.close()
        ctx.db.dispose()
    assert [(f.kind, f.volume_id, f.fixed) for f in found] == [
        (FindingKind.STUCK_CREATING, vid, False)
    ]
    assert not cluster.file("n1", vid).exists(), "an empty orphan file was made"
    assert cluster.state(vid) is None


def test_confirming_a_create_never_makes_a_file(cluster: Cluster) -> None:
    """What reconcile's fix sends: a file that is there is confirmed, a missing one is not made."""
    agent = cluster.agents["n1"]
    gone = new_volume_id()
    with pytest.raises(NotFound):
        agent.create_volume(gone, "p", MiB, must_exist=True)
    assert not cluster.file("n1", gone).exists()
    there = new_volume_id()
    made = agent.create_volume(there, "p", MiB)
    assert agent.create_volume(there, "p", MiB, must_exist=True) == made
