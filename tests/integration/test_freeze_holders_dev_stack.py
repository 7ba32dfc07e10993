"""Management's cuts against the real node-agent's freeze holders (dev stack, real ext4 mount).

The agent keeps a filesystem frozen while any holder's lease is live and
refuses a renewal (409) by a holder that no longer holds the freeze. These
tests drive management's own `frozen` (the context every cut runs in) with
the stack's database and agent, so what they prove is management's answer
to the real agent's refusal, not a fake's.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from csi_driver._gen import csi_pb2
from management import snapshots
from management.agents import AgentClients
from management.context import Context
from management.db import Database
from management.schema import NodeRow
from tessera import ids
from tessera_dev.csi_client import CsiClient, mount_capability
from tests.conftest import needs_root
from tests.integration.test_snapshots_dev_stack import dev, stage, unstage

__all__ = ["dev"]  # the fixture, shared with the snapshot tests

MiB = 1024**2


def start_write(directory: Path) -> subprocess.Popen[bytes]:
    """An fsync'd write to the filesystem (it cannot finish while the filesystem is frozen)."""
    write = [
        sys.executable,
        "-c",
        "import os, sys; fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT); "
        "os.write(fd, b'x'); os.fsync(fd)",
        str(directory / "probe"),
    ]
    return subprocess.Popen(write)


@needs_root
def test_a_freeze_the_real_agent_no_longer_holds_drops_the_cut(dev, tmp_path, monkeypatch):
    """The holder's freeze ends mid-cut (as when the agent restarts): the renewal is refused,
    management raises FreezeLapsed (the cut is dropped) and the filesystem is thawed."""
    monkeypatch.setattr(snapshots, "FREEZE_LEASE_SECONDS", 1.5)
    info, client = dev
    staging = tmp_path / "st"
    staging.mkdir()
    token = Path(info.token_file).read_text().strip()
    db = Database(f"sqlite:///{Path(info.state_dir) / 'management.db'}")
    ctx = Context(db=db, agents=AgentClients(token))
    with CsiClient(info.csi_endpoint) as csi:
        vol = csi.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name="held",
                capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
                volume_capabilities=[mount_capability("ext4")],
            ),
            timeout=60,
        ).volume
        stage(csi, info.node_id, vol.volume_id, staging)
        try:
            with db.read() as s:
                url = s.execute(select(NodeRow.agent_url)).scalar_one()
            holder = ids.new_snapshot_id()
            with pytest.raises(snapshots.FreezeLapsed) as lost:
                with snapshots.frozen(ctx, [vol.volume_id], holder):
                    writer = start_write(staging)
                    time.sleep(0.5)
                    assert writer.poll() is None  # frozen for the cut: the fsync waits
                    ctx.agents.get(url).thaw(vol.volume_id, holder=holder)  # its freeze ends
                    time.sleep(1.0)  # past a third of the lease: the renewer's turn
            assert vol.volume_id in lost.value.message
            assert writer.wait(timeout=10) == 0  # thawed
        finally:
            unstage(csi, info.node_id, vol.volume_id, staging)
            client.delete_volume(vol.volume_id)
            db.dispose()
