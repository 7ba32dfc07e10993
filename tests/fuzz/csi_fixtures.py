"""A real dev stack for the CSI fuzzer, and what "nothing leaked" means.

One `tessera_dev.stack.DevStack` per session (management, node-agent with a
file-backed pool, CSI plugin in `all` mode, each on a unix socket) lives in a
fresh directory under /tmp. The fuzzer's paths point into `work/` there, or
to `/nonexistent-tessera-fuzz/...`, never anywhere else.

One real volume (`real_volume_id`) exists for the whole run; it is formatted
once here, so no fuzzed request ever reaches mkfs (a NodeStage of it finds
ext4 and mounts, or refuses another filesystem).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from csi_driver._gen import csi_pb2, csi_pb2_grpc
from sanity.support import loop_devices_backed_by, mounts_under
from tessera.clients import ManagementClient
from tessera_dev.stack import DevStack

NODE_ID = "fuzz-node"
MiB = 1024**2
POOL_SIZE = 2 * 1024**3
REAL_VOLUME_NAME = "fuzz-real-volume"
#: the only absolute paths outside the work directory the fuzzer may send
NONEXISTENT_ROOT = "/nonexistent-tessera-fuzz"
RPC_TIMEOUT = 120.0
#: a detached loop device leaves `losetup --list` after its last close, not at once
SETTLE_SECONDS = 3.0


@dataclass(frozen=True)
class MachineState:
    """What a request could leave behind, compared before and after each example."""

    loop_devices: frozenset[tuple[str, str]]
    mounts: frozenset[str]
    pool_files: frozenset[str]
    volumes: frozenset[str]
    attachments: frozenset[tuple[str, str]]

    def diff(self, other: MachineState) -> list[str]:
        out = []
        for name in ("loop_devices", "mounts", "pool_files", "volumes", "attachments"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                out.append(f"{name}: +{sorted(theirs - mine)} -{sorted(mine - theirs)}")
        return out


@dataclass
class FuzzStack:
    base: Path
    dev: DevStack
    channel: grpc.Channel
    mgmt: ManagementClient
    real_volume_id: str = ""
    identity: csi_pb2_grpc.IdentityStub = field(init=False)
    controller: csi_pb2_grpc.ControllerStub = field(init=False)
    node: csi_pb2_grpc.NodeStub = field(init=False)
    #: per RPC: examples run and how often each code came back
    report: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    @property
    def work(self) -> Path:
        return self.base / "work"

    @property
    def pool(self) -> Path:
        return Path(self.dev.info.pool_dir)

    def state(self) -> MachineState:
        pool_files = frozenset(
            os.path.relpath(os.path.join(root, name), self.pool)
            for root, _, files in os.walk(self.pool)
            for name in files
        )
        volumes = self.mgmt.list_volumes().items
        attachments = frozenset(
            (a.volume_id, a.node_id) for v in volumes for a in self.mgmt.list_attachments(v.id)
        )
        return MachineState(
            loop_devices=frozenset(loop_devices_backed_by(self.pool)),
            mounts=frozenset(m.mount_point for m in mounts_under(self.base)),
            pool_files=pool_files,
            volumes=frozenset(v.id for v in volumes),
            attachments=attachments,
        )

    def settled_diff(self, before: MachineState, within: float = SETTLE_SECONDS) -> list[str]:
        """The difference to `before` once the kernel is done: loop devices clear lazily."""
        deadline = time.monotonic() + within
        while True:
            diff = before.diff(self.state())
            if not diff or time.monotonic() > deadline:
                return diff
            time.sleep(0.05)

    def probe_ready(self) -> bool:
        reply = self.identity.Probe(csi_pb2.ProbeRequest(), timeout=30)
        return not reply.HasField("ready") or reply.ready.value

    def count(self, rpc: str, code: grpc.StatusCode) -> None:
        counts = self.report.setdefault(rpc, {})
        counts[code.name] = counts.get(code.name, 0) + 1


def _mount_cap() -> csi_pb2.VolumeCapability:
    Mode = csi_pb2.VolumeCapability.AccessMode
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=Mode(mode=Mode.SINGLE_NODE_WRITER),
    )


def _make_real_volume(fs: FuzzStack) -> str:
    """Create the run's one real volume and put ext4 on it, the way kubelet would."""
    cap = _mount_cap()
    volume = fs.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=REAL_VOLUME_NAME,
            capacity_range=csi_pb2.CapacityRange(required_bytes=64 * MiB),
            volume_capabilities=[cap],
        ),
        timeout=RPC_TIMEOUT,
    ).volume
    vid = volume.volume_id
    ctx = fs.controller.ControllerPublishVolume(
        csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=NODE_ID, volume_capability=cap
        ),
        timeout=RPC_TIMEOUT,
    ).publish_context
    staging = fs.base / "format-staging"
    staging.mkdir()
    fs.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=vid,
            staging_target_path=str(staging),
            volume_capability=cap,
            publish_context=ctx,
            volume_context=dict(volume.volume_context),
        ),
        timeout=RPC_TIMEOUT,
    )
    fs.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging)),
        timeout=RPC_TIMEOUT,
    )
    fs.controller.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE_ID),
        timeout=RPC_TIMEOUT,
    )
    return vid


@contextmanager
def staged_and_published(fs: FuzzStack) -> Iterator[None]:
    """The real volume staged at work/staged and published at work/published, as for a pod."""
    vid, cap = fs.real_volume_id, _mount_cap()
    staging, target = str(fs.work / "staged"), str(fs.work / "published")
    os.makedirs(staging, exist_ok=True)
    ctx = fs.controller.ControllerPublishVolume(
        csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vid, node_id=NODE_ID, volume_capability=cap
        ),
        timeout=RPC_TIMEOUT,
    ).publish_context
    fs.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=vid, staging_target_path=staging, volume_capability=cap, publish_context=ctx
        ),
        timeout=RPC_TIMEOUT,
    )
    fs.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=vid,
            staging_target_path=staging,
            target_path=target,
            volume_capability=cap,
            publish_context=ctx,
        ),
        timeout=RPC_TIMEOUT,
    )
    try:
        yield
    finally:
        fs.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=target),
            timeout=RPC_TIMEOUT,
        )
        fs.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=staging),
            timeout=RPC_TIMEOUT,
        )
        fs.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id=NODE_ID),
            timeout=RPC_TIMEOUT,
        )


def _write_report(request: pytest.FixtureRequest, fs: FuzzStack, seed: int) -> None:
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        return
    lines = [f"CSI fuzz (hypothesis seed {seed}):"]
    for rpc, counts in sorted(fs.report.items()):
        total = sum(counts.values())
        codes = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        lines.append(f"  {rpc}: {total} examples ({codes})")
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in lines:
            reporter.write_line(line)


@pytest.fixture(scope="session")
def fuzz_stack(request: pytest.FixtureRequest) -> Iterator[FuzzStack]:
    if os.geteuid() != 0:
        pytest.skip("the CSI fuzzer needs root: the stack makes loop devices and mounts")
    from tests.fuzz.test_csi_fuzz import FUZZ_SEED

    # short: unix socket paths end at ~107 bytes
    base = Path(tempfile.mkdtemp(prefix="tfuzz-", dir="/tmp"))
    dev = DevStack(base / "state", pool_size=POOL_SIZE, node_id=NODE_ID, max_volumes_per_node=8)
    dev.start()
    channel = grpc.insecure_channel(dev.info.csi_endpoint)
    token = Path(dev.info.token_file).read_text().strip()
    fs = FuzzStack(base, dev, channel, ManagementClient(dev.info.management_url, token))
    (base / "work").mkdir()
    try:
        fs.real_volume_id = _make_real_volume(fs)
        yield fs
    finally:
        _write_report(request, fs, FUZZ_SEED)
        channel.close()
        fs.mgmt.close()
        dev.stop()
    left = [m.mount_point for m in mounts_under(base)]
    loops = loop_devices_backed_by(base)
    if not left:
        shutil.rmtree(base, ignore_errors=True)
    assert not left and not loops, f"after the fuzz run: mounts {left}, loop devices {loops}"
