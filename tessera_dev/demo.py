"""A short tour of the stack, driven through CSI the way Kubernetes drives it."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from csi_driver._gen import csi_pb2
from tessera_dev.csi_client import CsiClient, mount_capability
from tessera_dev.stack import StackInfo

GiB = 1024**3
PAYLOAD_BYTES = 4 * 1024 * 1024


class Demo:
    """Create, publish, write, tear down, publish again, verify, delete."""

    def __init__(self, info: StackInfo, console: Console) -> None:
        self.info = info
        self.console = console
        self.work = Path(tempfile.mkdtemp(prefix="tessera-demo-"))
        self.staging = self.work / "staging"
        self.target = self.work / "pod" / "data"
        self.csi = CsiClient(info.csi_endpoint)
        self.identity, self.controller, self.node = (
            self.csi.identity,
            self.csi.controller,
            self.csi.node,
        )
        self.cap = mount_capability("ext4")
        self.table = Table("step", "result", "ms", title="CSI demo")
        self.volume: csi_pb2.Volume | None = None
        self.publish_context: dict[str, str] = {}

    def step(self, title: str, action: Callable[[], Any], describe: Callable[[Any], str]) -> Any:
        started = time.perf_counter()
        result = action()
        elapsed = (time.perf_counter() - started) * 1000
        self.table.add_row(title, describe(result), f"{elapsed:.1f}")
        return result

    def run(self) -> bool:
        payload = os.urandom(PAYLOAD_BYTES)
        digest = hashlib.sha256(payload).hexdigest()
        data = self.target / "demo.bin"
        try:
            self.step(
                "GetPluginInfo",
                lambda: self.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest()),
                lambda r: f"{r.name} {r.vendor_version}",
            )
            self.create()
            self.publish()
            self.step(
                "write 4 MiB in the pod",
                lambda: data.write_bytes(payload),
                lambda _: f"sha256 {digest[:16]}…",
            )
            self.unpublish()
            self.publish()
            readback = self.step(
                "read it back after a full teardown",
                lambda: hashlib.sha256(data.read_bytes()).hexdigest(),
                lambda d: "intact" if d == digest else "CORRUPTED",
            )
            self.unpublish()
            self.delete()
            return readback == digest
        finally:
            self.console.print(self.table)
            self.csi.close()
            if not os.path.ismount(self.target) and not os.path.ismount(self.staging):
                shutil.rmtree(self.work, ignore_errors=True)

    def create(self) -> None:
        self.volume = self.step(
            "CreateVolume demo-volume (1 GiB, ext4)",
            lambda: (
                self.controller.CreateVolume(
                    csi_pb2.CreateVolumeRequest(
                        name="demo-volume",
                        capacity_range=csi_pb2.CapacityRange(required_bytes=GiB),
                        volume_capabilities=[self.cap],
                        parameters={"csi.storage.k8s.io/fstype": "ext4"},
                    )
                ).volume
            ),
            lambda v: f"{v.volume_id} ({v.capacity_bytes // GiB} GiB)",
        )

    def publish(self) -> None:
        vol = self.volume
        assert vol is not None
        reply = self.step(
            "ControllerPublishVolume",
            lambda: self.controller.ControllerPublishVolume(
                csi_pb2.ControllerPublishVolumeRequest(
                    volume_id=vol.volume_id, node_id=self.info.node_id, volume_capability=self.cap
                )
            ),
            lambda r: ", ".join(f"{k}={v}" for k, v in sorted(r.publish_context.items())),
        )
        self.publish_context = dict(reply.publish_context)
        common = {
            "volume_id": vol.volume_id,
            "publish_context": self.publish_context,
            "staging_target_path": str(self.staging),
            "volume_capability": self.cap,
            "volume_context": vol.volume_context,
        }
        self.step(
            "NodeStageVolume (attach, format if blank, mount)",
            lambda: self.node.NodeStageVolume(csi_pb2.NodeStageVolumeRequest(**common)),
            lambda _: f"/dev/tessera/{vol.volume_id} on {self.staging}",
        )
        self.step(
            "NodePublishVolume (bind into the pod)",
            lambda: self.node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(target_path=str(self.target), **common)
            ),
            lambda _: str(self.target),
        )

    def unpublish(self) -> None:
        assert self.volume is not None
        volume_id = self.volume.volume_id
        self.step(
            "NodeUnpublishVolume",
            lambda: self.node.NodeUnpublishVolume(
                csi_pb2.NodeUnpublishVolumeRequest(
                    volume_id=volume_id, target_path=str(self.target)
                )
            ),
            lambda _: "unmounted",
        )
        self.step(
            "NodeUnstageVolume",
            lambda: self.node.NodeUnstageVolume(
                csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=volume_id, staging_target_path=str(self.staging)
                )
            ),
            lambda _: "unmounted, detached",
        )
        self.step(
            "ControllerUnpublishVolume",
            lambda: self.controller.ControllerUnpublishVolume(
                csi_pb2.ControllerUnpublishVolumeRequest(
                    volume_id=volume_id, node_id=self.info.node_id
                )
            ),
            lambda _: "attachment removed",
        )

    def delete(self) -> None:
        assert self.volume is not None
        volume_id = self.volume.volume_id
        self.step(
            "DeleteVolume",
            lambda: self.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id)),
            lambda _: "deleted",
        )


def run_demo(info: StackInfo, console: Console) -> None:
    if not Demo(info, console).run():
        raise RuntimeError("demo: the data read back differs from what was written")
