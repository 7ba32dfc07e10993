"""Data-path benchmark: fio on published volumes against the bare pipelines
they are built from, measured in one run on the same pool filesystem.

    sudo .venv/bin/python -m bench.datapath [--quick] [--size-mib 512] [--runtime 4]

(a) local: a volume on n1 published (block) on n1 through the CSI sockets,
    against a bare `losetup --direct-io=on` on a same-size file in n1's pool;
(b) remote: a volume on n1 published (block) on n2 (nbdkit export on n1,
    nbdfuse + loop on n2), against a bare TLS-PSK nbdkit in n1's network
    namespace + `nbdfuse --command nbdkit -s nbd ... tls=require` + loop in
    n2's, on a same-size file in n1's pool.

Each fio job (4k random read IOPS, 1 MiB sequential read and write, direct
I/O, libaio) is the same argument list for bare and ours; rounds alternate
which goes first, and the ratio is the median of per-round ratios (each
from two runs back to back, so other load on the machine hits both sides
alike; the "bare spread" column shows how noisy the machine was). Also prints the
publish time (ControllerPublish -> NodeStage -> NodePublish) remote vs
local and the RSS of each export and each remote attachment.

Targets: local >= 0.97 and remote >= 0.95 of the bare pipeline; RSS < 16 MiB
per export (the owner's nbdkit) and per remote attachment (the consumer's
nbdfuse with its nbdkit child).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil

from csi_driver._gen import csi_pb2
from tessera.clients import AgentClient
from tessera.system.mounts import mounts_under
from tessera_dev.csi_client import CsiClient
from tessera_dev.multinode import MultiNodeStack
from tessera_dev.netns import in_netns

MiB = 1024**2
TOPOLOGY_KEY = "topology.tessera.io/node"
RPC_TIMEOUT = 120.0
BARE_PORT = 30809  # outside any agent's export range; each node has its own address
LOCAL_TARGET, REMOTE_TARGET, RSS_TARGET_MIB = 0.97, 0.95, 16.0


@dataclass(frozen=True)
class Job:
    name: str
    args: tuple[str, ...]
    unit: str  # "IOPS" or "MiB/s"


JOBS = (
    Job("4k randread", ("--rw=randread", "--bs=4k", "--iodepth=32"), "IOPS"),
    Job("1M seqread", ("--rw=read", "--bs=1M", "--iodepth=8"), "MiB/s"),
    Job("1M seqwrite", ("--rw=write", "--bs=1M", "--iodepth=8"), "MiB/s"),
)


@dataclass(frozen=True)
class Node:
    """What the bench needs of one node of the stack."""

    node_id: str
    netns: str
    address: str
    csi_endpoint: str
    agent_socket: str
    pool_dir: str


@dataclass(frozen=True)
class Opts:
    size: int
    runtime: int
    rounds: int
    publish_rounds: int


# ---- commands --------------------------------------------------------------------


def run(args: list[str], timeout: float = 120) -> str:
    res = subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({res.returncode}): {res.stderr.strip()[-800:]}")
    return res.stdout


def in_node(node: Node, argv: list[str]) -> list[str]:
    """argv in the node's network namespace only: the mount namespace stays the
    host's, so a FUSE mount made there is where losetup and fio look for it."""
    return in_netns(node.netns, argv)


def fio(device: str, job: Job, runtime: int) -> float:
    """One fio job on the device: IOPS or MiB/s."""
    out = run(
        [
            "fio", "--output-format=json", "--name=bench", f"--filename={device}",
            "--direct=1", "--ioengine=libaio", "--time_based", f"--runtime={runtime}",
            "--ramp_time=500ms", "--numjobs=1", *job.args,
        ],
        timeout=runtime + 60,
    )  # fmt: skip
    stats = json.loads(out)["jobs"][0]
    side = stats["write"] if "write" in job.args[0] else stats["read"]
    return float(side["iops"]) if job.unit == "IOPS" else side["bw_bytes"] / MiB


def prefill(device: str) -> None:
    """Write the whole device once so reads hit allocated blocks, not holes."""
    run(["fio", "--name=fill", f"--filename={device}", "--direct=1", "--ioengine=libaio",
         "--rw=write", "--bs=1M", "--iodepth=8", "--size=100%"], timeout=600)  # fmt: skip


def make_file(directory: str, name: str, size: int) -> Path:
    path = Path(directory) / name
    with open(path, "xb") as f:
        f.truncate(size)
    return path


def losetup(file: Path | str) -> str:
    return run(["losetup", "--find", "--show", "--direct-io=on", str(file)]).strip()


def rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / MiB


def with_children(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def pids_matching(name: str, *needles: str) -> list[int]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if proc.info["name"] == name and all(n in cmdline for n in needles):
            found.append(proc.pid)
    return found


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---- bare pipelines ----------------------------------------------------------------


@contextmanager
def bare_loop(pool_dir: str, size: int) -> Iterator[str]:
    image = make_file(pool_dir, f"bench-bare-{secrets.token_hex(4)}.img", size)
    device = ""
    try:
        device = losetup(image)
        yield device
    finally:
        if device:
            run(["losetup", "-d", device])
        image.unlink()


@dataclass
class BarePipeline:
    device: str
    server_pid: int
    client_pid: int


@contextmanager
def bare_nbd(owner: Node, consumer: Node, size: int, work: Path) -> Iterator[BarePipeline]:
    """nbdkit (TLS-PSK) in the owner's namespace, nbdfuse + loop in the consumer's."""
    image = make_file(owner.pool_dir, f"bench-bare-{secrets.token_hex(4)}.img", size)
    psk = work / "bare.psk"
    fd = os.open(psk, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{consumer.node_id}:{secrets.token_hex(32)}\n")
    mnt, server_pidfile, client_pidfile = (
        work / "bare-mnt",
        work / "nbdkit.pid",
        work / "nbdfuse.pid",
    )
    mnt.mkdir()
    with ExitStack() as undo:
        undo.callback(image.unlink)
        run(in_node(owner, [
            "nbdkit", "--tls=require", f"--tls-psk={psk}", "-i", owner.address,
            "-p", str(BARE_PORT), "--pidfile", str(server_pidfile), "file", str(image),
        ]))  # fmt: skip
        wait_for(lambda: server_pidfile.exists() and server_pidfile.read_text().strip() != "",
                 "bare nbdkit")  # fmt: skip
        server_pid = int(server_pidfile.read_text())
        undo.callback(stop_pid, server_pid)
        client = subprocess.Popen(
            in_node(consumer, [
                "nbdfuse", "-P", str(client_pidfile), str(mnt), "--command", "nbdkit", "-s",
                "--exit-with-parent", "nbd", f"hostname={owner.address}", f"port={BARE_PORT}",
                "tls=require", f"tls-psk={psk}", f"tls-username={consumer.node_id}",
            ]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        undo.callback(stop_nbdfuse, client, mnt)
        wait_for(lambda: client_pidfile.exists() or client.poll() is not None, "bare nbdfuse")
        if client.poll() is not None:
            raise RuntimeError(f"nbdfuse exited: {client.stderr.read().decode()[-800:]}")  # type: ignore[union-attr]
        device = losetup(mnt / "nbd")
        undo.callback(run, ["losetup", "-d", device])
        yield BarePipeline(device, server_pid, int(client_pidfile.read_text()))


def remove_unless_mounted(*directories: Path) -> None:
    """Remove a run's scratch directories; one with something still mounted is left (said why)."""
    for leftover in directories:
        if mounts_under(leftover):
            print(f"left {leftover} in place: still mounted", file=sys.stderr)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def stop_pid(pid: int) -> None:
    try:
        proc = psutil.Process(pid)
        proc.terminate()
        proc.wait(timeout=10)
    except psutil.NoSuchProcess:
        pass


def stop_nbdfuse(proc: subprocess.Popen[bytes], mnt: Path) -> None:
    subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30, check=False)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


# ---- ours: published through the CSI sockets ------------------------------------


def block_cap() -> csi_pb2.VolumeCapability:
    mode = csi_pb2.VolumeCapability.AccessMode.Mode.Value("SINGLE_NODE_WRITER")
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),
    )


class Csi:
    """The controller plugin plus each node's plugin, as kubelet and the sidecars use them."""

    def __init__(self, controller_endpoint: str, nodes: list[Node]) -> None:
        self.clients = [CsiClient(controller_endpoint)]
        self.controller = self.clients[0].controller
        self.node_stub = {}
        for node in nodes:
            self.clients.append(CsiClient(node.csi_endpoint))
            self.node_stub[node.node_id] = self.clients[-1].node

    def close(self) -> None:
        for client in self.clients:
            client.close()

    def create_on(self, owner: str, size: int) -> str:
        reply = self.controller.CreateVolume(
            csi_pb2.CreateVolumeRequest(
                name=f"bench-datapath-{secrets.token_hex(4)}",
                capacity_range=csi_pb2.CapacityRange(required_bytes=size),
                volume_capabilities=[block_cap()],
                parameters={"locality": "preferred"},
                accessibility_requirements=csi_pb2.TopologyRequirement(
                    preferred=[csi_pb2.Topology(segments={TOPOLOGY_KEY: owner})]
                ),
            ),
            timeout=RPC_TIMEOUT,
        )
        return reply.volume.volume_id

    def delete(self, volume_id: str) -> None:
        self.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=RPC_TIMEOUT
        )

    @contextmanager
    def published(self, volume_id: str, node_id: str, work: Path) -> Iterator[tuple[str, float]]:
        """(target path of the block device, seconds from ControllerPublish to NodePublish)."""
        node, cap = self.node_stub[node_id], block_cap()
        staging = Path(tempfile.mkdtemp(prefix="staging-", dir=work))
        target = staging.with_name(staging.name.replace("staging-", "target-"))
        with ExitStack() as undo:
            started = time.perf_counter()
            undo.callback(self._controller_unpublish, volume_id, node_id)
            ctx = self.controller.ControllerPublishVolume(
                csi_pb2.ControllerPublishVolumeRequest(
                    volume_id=volume_id, node_id=node_id, volume_capability=cap
                ),
                timeout=RPC_TIMEOUT,
            ).publish_context
            undo.callback(
                node.NodeUnstageVolume,
                csi_pb2.NodeUnstageVolumeRequest(
                    volume_id=volume_id, staging_target_path=str(staging)
                ),
                timeout=RPC_TIMEOUT,
            )
            node.NodeStageVolume(
                csi_pb2.NodeStageVolumeRequest(
                    volume_id=volume_id, publish_context=ctx, staging_target_path=str(staging),
                    volume_capability=cap,
                ),
                timeout=RPC_TIMEOUT,
            )  # fmt: skip
            undo.callback(
                node.NodeUnpublishVolume,
                csi_pb2.NodeUnpublishVolumeRequest(volume_id=volume_id, target_path=str(target)),
                timeout=RPC_TIMEOUT,
            )
            node.NodePublishVolume(
                csi_pb2.NodePublishVolumeRequest(
                    volume_id=volume_id, publish_context=ctx, staging_target_path=str(staging),
                    target_path=str(target), volume_capability=cap,
                ),
                timeout=RPC_TIMEOUT,
            )  # fmt: skip
            yield str(target), time.perf_counter() - started

    def _controller_unpublish(self, volume_id: str, node_id: str) -> None:
        self.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=node_id),
            timeout=RPC_TIMEOUT,
        )


# ---- measuring -------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    bare: float  # median
    ours: float  # median
    ratio: float  # median of the per-round ratios: each pair ran back to back
    noise: float  # spread of the bare runs, (max - min) / median


Results = dict[str, Outcome]  # job name -> outcome


def compare(bare: str, ours: str, opts: Opts) -> Results:
    """Each job on both devices, alternating which goes first.

    The ratio is taken per round, from two runs made back to back, so load
    from other processes on a small machine hits both sides of a ratio alike.
    """
    prefill(bare)
    prefill(ours)
    results: Results = {}
    for job in JOBS:
        b: list[float] = []
        o: list[float] = []
        for i in range(opts.rounds):
            order = ((b, bare), (o, ours)) if i % 2 == 0 else ((o, ours), (b, bare))
            for sink, device in order:
                sink.append(fio(device, job, opts.runtime))
        mid = statistics.median(b)
        results[job.name] = Outcome(
            bare=mid,
            ours=statistics.median(o),
            ratio=statistics.median(x / y for x, y in zip(o, b, strict=True) if y),
            noise=(max(b) - min(b)) / mid if mid else 0.0,
        )
    return results


def publish_times(csi: Csi, volume_id: str, node_id: str, work: Path, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        with csi.published(volume_id, node_id, work) as (_, elapsed):
            times.append(elapsed)
    return statistics.median(times)


def volume_file(node: Node, token: str, volume_id: str) -> str:
    agent = AgentClient(f"unix://{node.agent_socket}", token)
    try:
        return agent.get_volume(volume_id).path
    finally:
        agent.close()


@dataclass
class Report:
    local: Results
    remote: Results | None = None
    publish_local: float = 0.0
    publish_remote: float = 0.0
    rss_export: float = 0.0
    rss_attachment: float = 0.0
    rss_bare_server: float = 0.0
    rss_bare_client: float = 0.0
    remote_error: str = ""


def bench_local(csi: Csi, node: Node, opts: Opts, work: Path, report_pub: list[float]) -> Results:
    vid = csi.create_on(node.node_id, opts.size)
    try:
        report_pub.append(publish_times(csi, vid, node.node_id, work, opts.publish_rounds))
        with (
            csi.published(vid, node.node_id, work) as (target, _),
            bare_loop(node.pool_dir, opts.size) as bare,
        ):
            return compare(bare, target, opts)
    finally:
        csi.delete(vid)


def bench_remote(
    csi: Csi, owner: Node, consumer: Node, token: str, opts: Opts, work: Path, report: Report
) -> Results:
    vid = csi.create_on(owner.node_id, opts.size)
    try:
        report.publish_remote = publish_times(csi, vid, consumer.node_id, work, opts.publish_rounds)
        file = volume_file(owner, token, vid)
        with (
            csi.published(vid, consumer.node_id, work) as (target, _),
            bare_nbd(owner, consumer, opts.size, work) as bare,
        ):
            report.rss_export = rss_mib(pids_matching("nbdkit", file))
            fuse = pids_matching("nbdfuse", vid)
            report.rss_attachment = rss_mib([p for pid in fuse for p in with_children(pid)])
            report.rss_bare_server = rss_mib([bare.server_pid])
            report.rss_bare_client = rss_mib(with_children(bare.client_pid))
            if not fuse:
                print("  (no nbdfuse process names the volume: attachment RSS unknown)")
            return compare(bare.device, target, opts)
    finally:
        csi.delete(vid)


# ---- the stack -------------------------------------------------------------------


@contextmanager
def started_stack(state: Path, pool_size: int) -> Iterator[tuple[str, str, list[Node]]]:
    """(controller endpoint, token file, nodes) of a two-node stack."""
    stack = MultiNodeStack(state, nodes=2, pool_size=pool_size)
    try:  # stop() also undoes a start that failed half way
        info = stack.start()
        nodes = [
            Node(n.node_id, n.netns, n.address, n.csi_endpoint, n.agent_socket, n.pool_dir)
            for n in info.nodes
        ]
        yield info.csi_endpoint, info.token_file, nodes
    finally:
        stack.stop()


# ---- output ----------------------------------------------------------------------


def print_results(title: str, results: Results, bare_name: str) -> None:
    print(f"{title}")
    print(
        f"  {'job':<12} {'bare ' + bare_name:>28} {'tessera':>12} {'ratio':>7} {'bare spread':>12}"
    )
    for job in JOBS:
        r = results[job.name]
        print(
            f"  {job.name:<12} {r.bare:>22.0f} {job.unit:<5} {r.ours:>12.0f} {r.ratio:>7.3f} "
            f"{r.noise * 100:>11.0f}%"
        )


def verdict(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")


def ratio_verdict(name: str, results: Results, target: float) -> None:
    """PASS/FAIL, unless the bare runs alone varied more than the margin being judged:
    then the machine was too busy to tell (other load on a 2-core box), and says so."""
    worst = min(r.ratio for r in results.values())
    noise = max(r.noise for r in results.values())
    detail = f"worst {worst:.3f}, bare spread up to {noise * 100:.0f}%"
    if noise > 2 * (1 - target):
        print(f"NOISY {name}: {detail}: too noisy to judge a {(1 - target) * 100:.0f}% margin; "
              "run again on an idle machine")  # fmt: skip
        return
    verdict(name, worst >= target, detail)


def print_report(report: Report) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nload average at the end: {load} ({os.cpu_count()} CPUs)")
    print_results("(a) local volume vs bare loop", report.local, "losetup")
    if report.remote is not None:
        print_results(
            "(b) remote volume vs bare nbdkit+nbdfuse+loop", report.remote, "nbd pipeline"
        )
    print("publish (ControllerPublish -> NodeStage -> NodePublish, block, median)")
    print(f"  local {report.publish_local * 1000:8.1f} ms", end="")
    if report.remote is not None:
        ratio = report.publish_remote / report.publish_local if report.publish_local else 0
        print(f"   remote {report.publish_remote * 1000:8.1f} ms   remote/local {ratio:.2f}")
        print("RSS (MiB)")
        print(f"  export (owner nbdkit)            {report.rss_export:6.1f}"
              f"   bare nbdkit        {report.rss_bare_server:6.1f}")  # fmt: skip
        print(f"  attachment (nbdfuse + nbdkit)    {report.rss_attachment:6.1f}"
              f"   bare nbdfuse+nbdkit {report.rss_bare_client:6.1f}")  # fmt: skip
    else:
        print()
    print()
    ratio_verdict("local >= 0.97 of bare loop", report.local, LOCAL_TARGET)
    if report.remote is None:
        print(f"FAIL  remote: the remote run failed: {report.remote_error}")
        return
    ratio_verdict("remote >= 0.95 of bare nbd", report.remote, REMOTE_TARGET)
    for what, mib in (("export", report.rss_export), ("remote attachment", report.rss_attachment)):
        verdict(f"RSS per {what} < 16 MiB", 0 < mib < RSS_TARGET_MIB, f"{mib:.1f} MiB")


def parse_args() -> Opts:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: small, short, once")
    parser.add_argument("--size-mib", type=int, default=512, help="volume and bare file size")
    parser.add_argument("--runtime", type=int, default=3, help="seconds per fio job")
    parser.add_argument("--rounds", type=int, default=3, help="runs per job and pipeline")
    args = parser.parse_args()
    if args.quick:
        return Opts(size=64 * MiB, runtime=1, rounds=2, publish_rounds=1)
    return Opts(
        size=args.size_mib * MiB, runtime=args.runtime, rounds=args.rounds, publish_rounds=3
    )


def main() -> int:
    opts = parse_args()
    if os.geteuid() != 0:
        print("bench/datapath.py needs root (loop devices, namespaces, FUSE)", file=sys.stderr)
        return 2
    missing = [t for t in ("fio", "nbdkit", "nbdfuse", "nsenter") if shutil.which(t) is None]
    if missing:
        print(f"bench/datapath.py needs {', '.join(missing)}", file=sys.stderr)
        return 2
    state = Path(tempfile.mkdtemp(prefix="tessera-bench-dp-"))
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-dp-mnt-"))
    started = time.monotonic()
    try:
        with started_stack(state, pool_size=max(2048 * MiB, opts.size * 6)) as (
            endpoint, token_file, nodes,
        ):  # fmt: skip
            token = Path(token_file).read_text().strip()
            csi = Csi(endpoint, nodes)
            try:
                pub: list[float] = []
                report = Report(local=bench_local(csi, nodes[0], opts, work, pub))
                report.publish_local = pub[0]
                try:
                    report.remote = bench_remote(csi, nodes[0], nodes[1], token, opts, work, report)
                except (grpc.RpcError, RuntimeError, OSError) as exc:  # still print (a)
                    report.remote_error = f"{type(exc).__name__}: {exc}"[:600]
            finally:
                csi.close()
    finally:
        remove_unless_mounted(work, state)
    print_report(report)
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
