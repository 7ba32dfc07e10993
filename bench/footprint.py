"""Footprint benchmark: RSS and CPU of every Tessera process, idle and with
volumes attached, and the Kubernetes requests/limits they suggest.

    sudo .venv/bin/python -m bench.footprint [--volumes 50] [--remote 4] [--window 30]

Starts a real two-node stack (`tessera dev up --nodes 2`: management, the
CSI controller, and per node a node-agent and a CSI node plugin, each its
own process, heartbeats at the production 10 s), then measures each
process (with its children: nbdkit and nbdfuse run in their own sessions,
so they are not counted with the agent but on their own lines):

1. idle: nothing provisioned;
2. loaded: `--volumes` block volumes created on n1 and attached there
   (ControllerPublish + NodeStage + NodePublish: a loop device each), and
   `--remote` volumes owned by n1 published on n2 (an nbdkit export on
   n1, an nbdfuse NBD client with its `nbdkit -s` on n2).

RSS is sampled at the end of each window; CPU is the process's user+system
time over a quiet window divided by the window (100% = one core). The
suggestion: requests = measured (rounded up), memory limit = 2x the loaded
RSS (Python's heap grows with request bursts the quiet window does not
show), plus per remote volume the export's or client's RSS for the node-agent
container, which holds those processes in a cluster; no CPU limit on the data
path containers (throttling nbdkit stalls pods' I/O), a CPU limit of 1 core on
the others.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.datapath import Csi, Node, remove_unless_mounted, rss_mib
from tessera_dev.multinode import MultiNodeStack

MiB = 1024**2
VOLUME_SIZE = 64 * MiB
#: production cadence: the dev stack's 1 s heartbeats would inflate idle CPU tenfold
HEARTBEAT = ["--heartbeat-interval", "10"]
CONTAINERS = {  # chart container -> stack process names (n1's node-side ones)
    "management": "management",
    "csi-controller": "csi-controller",
    "node-agent": "n1-agent",
    "csi-node": "n1-csi",
}


@dataclass(frozen=True)
class Sample:
    rss_mib: float
    cpu_percent: float


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


DATA_PATH = ("nbdkit", "nbdfuse")


def family(pid: int, *, data_path: bool = True) -> list[int]:
    """The process and its children; without the data path's nbdkit/nbdfuse when
    `data_path` is False (the agent's NBD clients are its children: they get lines
    of their own)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    keep = []
    for child in children:
        try:
            if data_path or child.name() not in DATA_PATH:
                keep.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return [pid, *keep]


def datapath_groups(state: Path) -> dict[str, list[list[int]]]:
    """nbdkit exports and NBD clients (nbdfuse with its `nbdkit -s`) of this stack's nodes."""
    groups: dict[str, list[list[int]]] = {"nbdkit export": [], "nbd client": []}
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmd = proc.info["cmdline"] or []
        text = " ".join(cmd)
        if proc.info["name"] == "nbdfuse" and str(state) in text:
            groups["nbd client"].append(family(proc.pid))
        elif proc.info["name"] == "nbdkit" and str(state) in text and "-s" not in cmd:
            groups["nbdkit export"].append(family(proc.pid))
    return groups


def measure(groups: dict[str, list[list[int]]], window: float) -> dict[str, Sample]:
    """Per group: RSS (summed over its members, then averaged per member for data-path
    groups) and CPU % over `window` seconds of nothing happening."""
    before = {name: [cpu_seconds(m) for m in members] for name, members in groups.items()}
    time.sleep(window)
    result = {}
    for name, members in groups.items():
        if not members:
            continue
        cpu = [cpu_seconds(m) - b for m, b in zip(members, before[name], strict=True)]
        result[name] = Sample(
            rss_mib=sum(rss_mib(m) for m in members) / len(members),
            cpu_percent=100 * sum(cpu) / len(cpu) / window,
        )
    return result


def cpu_of(groups: dict[str, list[list[int]]]) -> dict[str, float]:
    """CPU seconds so far of each chart container's process."""
    return {c: cpu_seconds(groups[c][0]) for c in CONTAINERS}


def groups_of(stack_procs: dict[str, int], state: Path) -> dict[str, list[list[int]]]:
    groups = {c: [family(stack_procs[p], data_path=False)] for c, p in CONTAINERS.items()}
    groups.update(datapath_groups(state))
    return groups


@dataclass(frozen=True)
class Suggestion:
    cpu_request_m: int
    mem_request_mi: int
    cpu_limit_m: int | None
    mem_limit_mi: int


def round_up(value: float, step: int) -> int:
    return max(step, math.ceil(value / step) * step)


def suggest(
    container: str, idle: Sample, loaded: Sample, per_remote_mib: float, remote_budget: int
) -> Suggestion:
    """requests = loaded steady state; memory limit = 2x (plus the data path's processes
    for the node-agent); CPU limit only where throttling cannot stall pod I/O."""
    cpu_req = round_up(max(idle.cpu_percent, loaded.cpu_percent) * 10, 10)  # % of a core -> m
    mem_req = round_up(loaded.rss_mib, 16)
    mem_limit = round_up(2 * loaded.rss_mib, 64)
    if container == "node-agent":
        mem_limit = round_up(2 * loaded.rss_mib + remote_budget * per_remote_mib, 64)
    cpu_limit = None if container in ("node-agent", "csi-node") else 1000
    return Suggestion(cpu_req, mem_req, cpu_limit, mem_limit)


def print_table(idle: dict[str, Sample], loaded: dict[str, Sample], volumes: int) -> None:
    print(
        f"\n{'process':<16} {'idle RSS':>10} {'idle CPU':>9} {'loaded RSS':>11} {'loaded CPU':>11}"
    )
    for name in [*CONTAINERS, "nbdkit export", "nbd client"]:
        i, lo = idle.get(name), loaded.get(name)
        idle_text = f"{i.rss_mib:7.1f} MiB {i.cpu_percent:7.2f}%" if i else f"{'-':>10} {'-':>9}"
        load_text = f"{lo.rss_mib:8.1f} MiB {lo.cpu_percent:9.2f}%" if lo else ""
        each = " (each)" if name.startswith("nbd") else ""
        print(f"{name:<16} {idle_text} {load_text}{each}")
    print(f"(loaded: {volumes} local block volumes attached and published on n1)")


def print_suggestions(
    idle: dict[str, Sample], loaded: dict[str, Sample], remote_budget: int
) -> None:
    per_remote = max(
        (loaded[k].rss_mib for k in ("nbdkit export", "nbd client") if k in loaded), default=16.0
    )
    print(
        f"\nsuggested resources (requests = loaded steady state rounded up; memory limit = 2x, "
        f"node-agent + {remote_budget} x {per_remote:.0f} MiB for the nbdkit/nbdfuse it holds; "
        "no CPU limit on the data-path containers)"
    )
    for container in CONTAINERS:
        s = suggest(container, idle[container], loaded[container], per_remote, remote_budget)
        limits = f"memory: {s.mem_limit_mi}Mi" + (
            f", cpu: {s.cpu_limit_m}m" if s.cpu_limit_m else ""
        )
        print(
            f"  {container + ':':<16} requests: {{cpu: {s.cpu_request_m}m, "
            f"memory: {s.mem_request_mi}Mi}}  limits: {{{limits}}}"
        )


@contextmanager
def started_stack(state: Path, volumes: int) -> Iterator[tuple[str, list[Node], dict[str, int]]]:
    """(controller endpoint, nodes, pid by process name) of a two-node stack."""
    extra = {"management": HEARTBEAT, "n1-agent": HEARTBEAT, "n2-agent": HEARTBEAT}
    # room for every volume on n1 with its reserve: a full pool would send the
    # rest to n2 and turn "local" volumes into remote ones
    pool_size = max(2048 * MiB, 2 * (volumes + 4) * VOLUME_SIZE)
    stack = MultiNodeStack(state, nodes=2, pool_size=pool_size, extra_args=extra)
    try:  # stop() also undoes a start that failed half way
        info = stack.start()
        nodes = [
            Node(n.node_id, n.netns, n.address, n.csi_endpoint, n.agent_socket, n.pool_dir)
            for n in info.nodes
        ]
        yield info.csi_endpoint, nodes, {name: p.pid for name, p in stack.procs.items()}
    finally:
        stack.stop()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--volumes", type=int, default=50, help="local volumes attached on n1")
    p.add_argument("--remote", type=int, default=4, help="n1's volumes published on n2")
    p.add_argument("--window", type=float, default=30.0, help="seconds per quiet window")
    p.add_argument(
        "--remote-budget",
        type=int,
        default=32,
        help="remote volumes a node-agent's memory limit leaves room for",
    )
    return p.parse_args()


def attach_all(csi: Csi, nodes: list[Node], args: argparse.Namespace, work: Path) -> ExitStack:
    """Every volume created and published; the ExitStack undoes it all."""
    undo = ExitStack()
    try:
        for consumer, count in ((nodes[0], args.volumes), (nodes[1], args.remote)):
            for _ in range(count):
                vid = csi.create_on(nodes[0].node_id, VOLUME_SIZE)
                undo.callback(csi.delete, vid)
                undo.enter_context(csi.published(vid, consumer.node_id, work))
    except BaseException:
        undo.close()
        raise
    return undo


def check_placement(state: Path, remote: int) -> None:
    """Every volume on n1, as asked: else "local" figures would hide NBD clients."""
    clients = len(datapath_groups(state)["nbd client"])
    if clients != remote:
        print(f"WARNING: {clients} NBD clients, {remote} expected: volumes were placed "
              "elsewhere than n1 (pool full?)", file=sys.stderr)  # fmt: skip


def main() -> int:
    args = parse_args()
    if os.geteuid() != 0:
        print("bench/footprint.py needs root (loop devices, namespaces, FUSE)", file=sys.stderr)
        return 2
    state = Path(tempfile.mkdtemp(prefix="tessera-bench-fp-"))
    work = Path(tempfile.mkdtemp(prefix="tessera-bench-fp-mnt-"))
    started = time.monotonic()
    try:
        with started_stack(state, args.volumes + args.remote) as (endpoint, nodes, procs):
            time.sleep(5)  # start-up imports and first registration settle
            idle = measure(groups_of(procs, state), args.window)
            csi = Csi(endpoint, nodes)
            try:
                busy_start, before = time.monotonic(), cpu_of(groups_of(procs, state))
                with attach_all(csi, nodes, args, work):
                    after = cpu_of(groups_of(procs, state))
                    check_placement(state, args.remote)
                    busy = {
                        c: 100 * (after[c] - before[c]) / (time.monotonic() - busy_start)
                        for c in CONTAINERS
                    }
                    time.sleep(5)
                    loaded = measure(groups_of(procs, state), args.window)
            finally:
                csi.close()
    finally:
        remove_unless_mounted(work, state)
    print_table(idle, loaded, args.volumes)
    print("CPU while creating and attaching them (a burst, 100% = one core): " + ", ".join(
        f"{c} {busy[c]:.0f}%" for c in CONTAINERS))  # fmt: skip
    print(f"({args.remote} of n1's volumes published on n2: one export and one client each)")
    print_suggestions(idle, loaded, args.remote_budget)
    print(f"\n(window {args.window:.0f} s, {os.cpu_count()} CPUs, total "
          f"{time.monotonic() - started:.0f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
