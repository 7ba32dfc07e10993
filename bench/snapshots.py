"""Snapshot benchmark: snapshot, clone and changed-block metadata against full copies and reads.

    sudo .venv/bin/python -m bench.snapshots [--size-gib 10] [--written-gib 2] [--rounds 5]

In one run, on one reflink XFS pool (a loop-mounted sparse image, as the
agent's --file-pool makes it), with a volume of --size-gib whose
--written-gib are written in 4 MiB chunks scattered over it:

(a) snapshot: the agent's snapshot cut (FICLONE into a temporary, fsync,
    link, fsync) against a full copy of the same file on the same pool
    (`cp --reflink=never --sparse=always`, then sync: the bytes land);
(b) clone: a volume created from that snapshot, grown by 1 GiB, against the
    same full copy;
(c) changed-block metadata: after 1 % of the volume's blocks are rewritten
    (4 KiB writes at random offsets), the delta between the two snapshots
    from their extent maps, paged as a backup tool asks, against reading
    both snapshot files and comparing them (page cache dropped first).

Times are medians of --rounds; ratios are ours / baseline. Goal:
snapshot and clone in constant time, <= 100 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from node_agent.agent import Agent
from node_agent.file_pools import ensure_file_pool, release_file_pool
from node_agent.pools import Pool
from tessera.ids import new_snapshot_id, new_volume_id
from tessera.models import AgentSource, AgentSourceKind

GiB, MiB, KiB = 1024**3, 1024**2, 1024
CHUNK = 4 * MiB
GOAL_SECONDS = 0.100


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_scattered(path: str, size: int, written: int, rng: random.Random) -> None:
    """`written` bytes in CHUNK pieces at distinct random chunk-aligned offsets."""
    slots = rng.sample(range(size // CHUNK), written // CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for slot in sorted(slots):
            os.pwrite(fd, rng.randbytes(CHUNK), slot * CHUNK)
        os.fsync(fd)
    finally:
        os.close(fd)


def change_blocks(path: str, size: int, fraction: float, rng: random.Random) -> int:
    """Rewrite `fraction` of the 4 KiB blocks (random, distinct); how many."""
    blocks = rng.sample(range(size // (4 * KiB)), int(size // (4 * KiB) * fraction))
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        for block in sorted(blocks):
            os.pwrite(fd, rng.randbytes(4 * KiB), block * 4 * KiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(blocks)


def full_copy(src: str, dst: Path) -> None:
    subprocess.run(
        ["cp", "--reflink=never", "--sparse=always", src, str(dst)], check=True, timeout=600
    )
    os.sync()


def read_and_compare(a: str, b: str) -> int:
    """What a backup tool without metadata does: read both, count differing chunks."""
    differ = 0
    with open(a, "rb", buffering=0) as fa, open(b, "rb", buffering=0) as fb:
        while True:
            x, y = fa.read(CHUNK), fb.read(CHUNK)
            if not x:
                return differ
            differ += x != y


def delta_all(agent: Agent, target: str, base: str) -> int:
    """Every changed range, paged through next_offset; how many ranges."""
    count, offset = 0, 0
    while True:
        page = agent.snapshot_extents(target, base, offset)
        count += len(page.extents)
        if page.next_offset is None:
            return count
        offset = page.next_offset


def run(args: argparse.Namespace, work: Path) -> dict[str, float]:
    size, written = args.size_gib * GiB, args.written_gib * GiB
    mountpoint = work / "pool"
    mountpoint.mkdir()
    image = work / "pool.img"
    ensure_file_pool(image, mountpoint, size + 4 * written + 4 * GiB)
    try:
        agent = Agent("bench", {"p": Pool.open("p", mountpoint)}, work / "dev", state_dir=work)
        return measure(agent, args, size, written)
    finally:
        release_file_pool(image, mountpoint)


def measure(agent: Agent, args: argparse.Namespace, size: int, written: int) -> dict[str, float]:
    rng = random.Random(args.seed)
    vid = new_volume_id()
    path = agent.create_volume(vid, "p", size).path
    write_scattered(path, size, written, rng)
    snap_t, clone_t, copy_t = [], [], []
    for i in range(args.rounds):
        sid = new_snapshot_id()
        snap_t.append(timed(lambda s=sid: agent.create_snapshot(s, "p", vid)))
        source = AgentSource(kind=AgentSourceKind.SNAPSHOT, id=sid)
        cid = new_volume_id()
        clone_t.append(
            timed(lambda c=cid, s=source: agent.create_volume(c, "p", size + GiB, source=s))
        )
        agent.delete_volume(cid)
        agent.delete_snapshot(sid)
        drop_caches()
        dst = Path(agent.pools["p"].directory) / f"copy-{i}"
        copy_t.append(timed(lambda d=dst: full_copy(path, d)))
        dst.unlink()
    base = new_snapshot_id()
    agent.create_snapshot(base, "p", vid)
    changed = change_blocks(path, size, 0.01, rng)
    target = new_snapshot_id()
    agent.create_snapshot(target, "p", vid)
    delta_t, ranges = [], 0
    for _ in range(args.rounds):
        start = time.perf_counter()
        ranges = delta_all(agent, target, base)
        delta_t.append(time.perf_counter() - start)
    drop_caches()
    read_t = timed(
        lambda: read_and_compare(
            agent.pools["p"].snapshot_path(base).as_posix(),
            agent.pools["p"].snapshot_path(target).as_posix(),
        )
    )
    for sid in (base, target):
        agent.delete_snapshot(sid)
    agent.delete_volume(vid)
    med = statistics.median
    return {
        "snapshot_s": med(snap_t),
        "snapshot_max_s": max(snap_t),
        "clone_s": med(clone_t),
        "clone_max_s": max(clone_t),
        "full_copy_s": med(copy_t),
        "snapshot_ratio": med(snap_t) / med(copy_t),
        "clone_ratio": med(clone_t) / med(copy_t),
        "changed_blocks": changed,
        "delta_ranges": ranges,
        "delta_s": med(delta_t),
        "read_both_s": read_t,
        "delta_ratio": med(delta_t) / read_t,
    }


def report(r: dict[str, float], args: argparse.Namespace) -> None:
    print(f"volume {args.size_gib} GiB, {args.written_gib} GiB written; medians of {args.rounds}")
    print(f"  full copy (cp --reflink=never --sparse=always + sync): {r['full_copy_s']:.3f} s")
    for name in ("snapshot", "clone"):
        ok = "ok" if r[f"{name}_max_s"] <= GOAL_SECONDS else "ABOVE GOAL"
        print(
            f"  {name:8}: {r[f'{name}_s'] * 1000:7.1f} ms (max {r[f'{name}_max_s'] * 1000:.1f})"
            f"  ratio vs full copy {r[f'{name}_ratio']:.4f}  [{ok}: <= 100 ms]"
        )
    print(
        f"  delta of {int(r['changed_blocks'])} changed 4 KiB blocks (1 %): "
        f"{r['delta_s'] * 1000:.1f} ms, {int(r['delta_ranges'])} ranges; reading both "
        f"snapshots: {r['read_both_s']:.3f} s; ratio {r['delta_ratio']:.4f}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-gib", type=int, default=10)
    p.add_argument("--written-gib", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("bench.snapshots needs root (loop devices, mounts)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tessera-bench-snap-", dir="/var/tmp") as tmp:
        results = run(args, Path(tmp))
    report(results, args)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
