"""Provisioning benchmark: CreateVolume latency and throughput, and
NodeStage+NodePublish time against the bare commands, measured in one run.

    sudo .venv/bin/python -m bench.provision [--volumes 500] [--rounds 5]

Targets on a 2-core machine: CreateVolume p50 <= 10 ms at concurrency 1,
>= 150 creates/s at concurrency 16, stage+publish ratio <= 1.3.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from csi_driver._gen import csi_pb2
from tessera.system.mounts import mounts_under
from tessera_dev.csi_client import CsiClient, mount_capability

GiB = 1024**3
MiB = 1024**2


def mount_cap() -> csi_pb2.VolumeCapability:
    return mount_capability("ext4")


def run(args: list[str]) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=120)


class Stack:
    """A `tessera dev up` in a temporary state directory."""

    def __init__(self, pool_size: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tessera.cli",
                "dev",
                "up",
                "--state-dir",
                str(self.dir),
                "--pool-size",
                pool_size,
                "--node-id",
                "bench-node",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 90
        while not (self.dir / "stack.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dev up failed: {self.proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        self.info = json.loads((self.dir / "stack.json").read_text())
        self.csi = CsiClient(self.info["csi_endpoint"])
        self.controller, self.node = self.csi.controller, self.csi.node

    def close(self) -> None:
        self.csi.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)
        remove_unmounted(self.dir)


def remove_unmounted(directory: Path) -> None:
    """Remove a scratch directory, unless something is still mounted below it."""
    leftover = mounts_under(directory)
    if leftover:
        print(f"left {directory} in place: still mounted: {leftover}", file=sys.stderr)
        return
    shutil.rmtree(directory, ignore_errors=True)


def create(stack: Stack, name: str, size: int) -> tuple[str, float]:
    started = time.perf_counter()
    reply = stack.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=size),
            volume_capabilities=[mount_cap()],
        )
    )
    return reply.volume.volume_id, time.perf_counter() - started


def create_many(
    stack: Stack, prefix: str, count: int, concurrency: int
) -> tuple[list[float], float, list[str]]:
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: create(stack, f"{prefix}-{i}", 16 * MiB), range(count)))
    wall = time.perf_counter() - started
    return [lat for _, lat in results], wall, [vid for vid, _ in results]


def delete_all(stack: Stack, ids: list[str]) -> None:
    with ThreadPoolExecutor(8) as pool:
        list(
            pool.map(
                lambda v: stack.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=v)),
                ids,
            )
        )


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def stage_publish(stack: Stack, work: Path, i: int) -> float:
    vid, _ = create(stack, f"stage-{i}", GiB)
    cap = mount_cap()
    ctx = stack.controller.ControllerPublishVolume(
        csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vid, node_id="bench-node", volume_capability=cap
        )
    ).publish_context
    staging, target = work / f"s{i}", work / f"t{i}"
    started = time.perf_counter()
    stack.node.NodeStageVolume(
        csi_pb2.NodeStageVolumeRequest(
            volume_id=vid,
            publish_context=ctx,
            staging_target_path=str(staging),
            volume_capability=cap,
        )
    )
    stack.node.NodePublishVolume(
        csi_pb2.NodePublishVolumeRequest(
            volume_id=vid,
            publish_context=ctx,
            staging_target_path=str(staging),
            target_path=str(target),
            volume_capability=cap,
        )
    )
    elapsed = time.perf_counter() - started
    stack.node.NodeUnpublishVolume(
        csi_pb2.NodeUnpublishVolumeRequest(volume_id=vid, target_path=str(target))
    )
    stack.node.NodeUnstageVolume(
        csi_pb2.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=str(staging))
    )
    stack.controller.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=vid, node_id="bench-node")
    )
    stack.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=vid))
    return elapsed


def bare_stage_publish(work: Path, pool_dir: Path, i: int) -> float:
    """The same work with bare commands: losetup + mkfs.ext4 + mount + bind mount."""
    image = pool_dir / f"bare-{i}.img"
    with open(image, "xb") as f:
        f.truncate(GiB)
    staging, target = work / f"bs{i}", work / f"bt{i}"
    staging.mkdir()
    target.mkdir()
    started = time.perf_counter()
    dev = subprocess.run(
        ["losetup", "--find", "--show", "--direct-io=on", str(image)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    run(["mkfs.ext4", "-q", "-F", dev])
    run(["mount", "-t", "ext4", dev, str(staging)])
    run(["mount", "--bind", str(staging), str(target)])
    elapsed = time.perf_counter() - started
    run(["umount", str(target)])
    run(["umount", str(staging)])
    run(["losetup", "-d", dev])
    image.unlink()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--volumes", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/provision.py needs root (loop devices, mkfs, mount)", file=sys.stderr)
        return 2
    stack = Stack(pool_size=f"{max(40, opts.volumes * 2 * 16 // 1024 + 8)}G")
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-mnt-"))
    try:
        print(f"CreateVolume, {opts.volumes} volumes of 16 MiB each")
        for concurrency in (1, 16):
            lat, wall, ids = create_many(stack, f"c{concurrency}", opts.volumes, concurrency)
            print(
                f"  concurrency {concurrency:2d}: p50 {pct(lat, 50) * 1000:6.2f} ms  "
                f"p99 {pct(lat, 99) * 1000:6.2f} ms  {len(lat) / wall:7.1f} creates/s"
            )
            delete_all(stack, ids)
        ours = [stage_publish(stack, work, i) for i in range(opts.rounds)]
        bare = [
            bare_stage_publish(work, Path(stack.info["pool_dir"]), i) for i in range(opts.rounds)
        ]
        ours_ms, bare_ms = statistics.median(ours) * 1000, statistics.median(bare) * 1000
        print(f"NodeStage+NodePublish, fresh 1 GiB ext4 (median of {opts.rounds})")
        print(
            f"  tessera {ours_ms:7.1f} ms   bare losetup+mkfs+mount+bind {bare_ms:7.1f} ms   "
            f"ratio {ours_ms / bare_ms:.2f}"
        )
    finally:
        stack.close()
        remove_unmounted(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
