"""Layout and transport ratios, measured inside the test VM (the only kernel
with nvmet, nvme-tcp, md and dm): ratios only, never absolute figures (the VM
is TCG-emulated, so absolute numbers say nothing about real hardware).

    .venv/bin/python -m tests.vm.run -- .venv/bin/python -m bench.layouts [--runtime 4] [--rounds 3]

On a three-node stack (network namespaces, file pools), volumes published
(block) on n1 through the CSI sockets, fio with direct I/O and libaio:

- raid0 over 3 legs vs a 1-leg volume (nvme-tcp), 1 MiB sequential read/write
  and 4k random read: what striping buys;
- raid1 (2 legs) write vs a 1-leg volume: what the second copy costs;
- nvme-tcp vs nbd, 1-leg volumes on n2 published on n1: the kernel's NVMe/TCP
  vs NBD, which here (a kernel with nbd.ko) is the kernel nbd client on a
  local nbdkit TLS-PSK bridge (node_agent/transports/nbd_kernel.py);
- raid1 (2 legs) write with its remote leg over nbd vs over nvme-tcp.

The ratio is the median of per-round ratios (rounds alternate which side
goes first, so load on the machine hits both alike).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from csi_driver._gen import csi_pb2
from tessera_dev import multinode
from tessera_dev.multinode import MultiNodeStack
from tests.multihost.support import RPC_TIMEOUT, TOPOLOGY_KEY, Cluster, Kube, MiB, block_cap

VPGS = ["stripe3=raid0,legs=3", "mirror2=raid1,legs=2"]
JOBS = {
    "1M seqread": ["--rw=read", "--bs=1M", "--iodepth=8"],
    "1M seqwrite": ["--rw=write", "--bs=1M", "--iodepth=8"],
    "4k randread": ["--rw=randread", "--bs=4k", "--iodepth=32"],
}
SIZE = 256 * MiB


def fio(device: str, job: str, runtime: int) -> float:
    """MiB/s of one fio job (IOPS for 4k jobs)."""
    out = subprocess.run(
        ["fio", "--output-format=json", "--name=bench", f"--filename={device}", "--direct=1",
         "--ioengine=libaio", "--time_based", f"--runtime={runtime}", *JOBS[job]],
        capture_output=True, text=True, check=True, timeout=runtime + 120,
    ).stdout  # fmt: skip
    result = json.loads(out)["jobs"][0]
    side = result["write"] if "write" in job else result["read"]
    return float(side["iops"]) if job.startswith("4k") else float(side["bw"]) / 1024


def create(kube: Kube, params: dict[str, str], on: str) -> str:
    reply = kube.c.controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=f"bench-{secrets.token_hex(5)}",
            capacity_range=csi_pb2.CapacityRange(required_bytes=SIZE),
            volume_capabilities=[block_cap()],
            parameters=params,
            accessibility_requirements=csi_pb2.TopologyRequirement(
                preferred=[csi_pb2.Topology(segments={TOPOLOGY_KEY: on})]
            ),
        ),
        timeout=RPC_TIMEOUT,
    )
    vid = reply.volume.volume_id
    kube._undo[("volume", vid)] = lambda: kube.c.controller.DeleteVolume(
        csi_pb2.DeleteVolumeRequest(volume_id=vid), timeout=RPC_TIMEOUT
    )
    return vid


def ratio(ours: str, base: str, job: str, runtime: int, rounds: int) -> float:
    """Median over rounds of fio(ours) / fio(base), which side first alternating."""
    ratios = []
    for r in range(rounds):
        if r % 2:
            b = fio(base, job, runtime)
            o = fio(ours, job, runtime)
        else:
            o = fio(ours, job, runtime)
            b = fio(base, job, runtime)
        ratios.append(o / b if b else float("nan"))
    return statistics.median(ratios)


@contextmanager
def stack() -> Iterator[Cluster]:
    state = Path(tempfile.mkdtemp(prefix="tbl-"))
    work = Path(tempfile.mkdtemp(prefix="tbl-k-"))
    # emulated CPUs: minutes to start, heartbeats late (as tests/vm/guest does)
    multinode.READY_TIMEOUT = 600.0
    args = [a for v in VPGS for a in ("--vpg", v)] + ["--heartbeat-misses", "15"]
    s = MultiNodeStack(state, nodes=3, pool_size=2048 * MiB, extra_args={"management": args})
    info = s.start()
    cluster = Cluster(s, info, work, Path(info.token_file).read_text().strip())
    try:
        yield cluster
    finally:
        cluster.close()
        s.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.layouts", description=__doc__)
    parser.add_argument("--runtime", type=int, default=4, help="seconds per fio run")
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args(argv)
    if os.environ.get("TESSERA_VM") != "1":
        print("bench.layouts runs in the VM: python -m tests.vm.run -- "
              ".venv/bin/python -m bench.layouts", file=sys.stderr)  # fmt: skip
        return 2
    rows: list[tuple[str, str, float]] = []
    with stack() as cluster:
        kube = Kube(cluster)
        try:
            dev = {}
            for name, params, on in [
                ("raid0x3", {"vpg": "stripe3"}, "n1"),
                ("raid1x2", {"vpg": "mirror2"}, "n2"),
                ("nvme", {"transport": "nvme-tcp", "locality": "preferred"}, "n2"),
                ("nbd", {"transport": "nbd", "locality": "preferred"}, "n2"),
                ("raid1x2-nbd", {"vpg": "mirror2", "transport": "nbd"}, "n2"),
            ]:
                dev[name] = str(kube.publish(create(kube, params, on), "n1", block_cap()).target)
            comparisons = [("raid0 x3 / 1 leg (nvme)", "raid0x3", "nvme", list(JOBS)),
                           ("raid1 x2 / 1 leg (nvme)", "raid1x2", "nvme", ["1M seqwrite"]),
                           ("nvme-tcp / nbd", "nvme", "nbd", list(JOBS)),
                           ("raid1 nbd legs / nvme legs", "raid1x2-nbd", "raid1x2",
                            ["1M seqwrite"])]  # fmt: skip
            for what, ours, base, jobs in comparisons:
                for job in jobs:
                    value = ratio(dev[ours], dev[base], job, opts.runtime, opts.rounds)
                    rows.append((what, job, value))
        finally:
            kube.cleanup()
    print(f"{'comparison':28} {'job':12} ratio")
    for what, job, value in rows:
        print(f"{what:28} {job:12} {value:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
