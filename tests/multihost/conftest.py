"""One three-node stack per test module (network namespaces n1..n3, each with
its own pool, agent and CSI node plugin), and a per-test Kube that cleans up
what the test made. The module's teardown asserts the machine is as clean as
before: no namespaces, mounts, loop devices or processes left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera.system.loopdev import bound_under
from tessera.system.mounts import mounts_under
from tessera_dev import netns
from tessera_dev.multinode import MultiNodeStack
from tests.multihost.support import Cluster, Kube, netns_names, processes_mentioning

POOL_SIZE = 2 * 1024**3


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, loop devices, FUSE and mounts")
    # Short paths: unix sockets live below the state directory (~107 bytes max).
    state = Path(tempfile.mkdtemp(prefix="tmh-"))
    work = Path(tempfile.mkdtemp(prefix="tmh-k-"))
    stack = MultiNodeStack(state, nodes=3, pool_size=POOL_SIZE)
    namespaces: set[str] = set()
    cluster = None
    try:
        info = stack.start()
        namespaces = {n.netns for n in info.nodes}
        cluster = Cluster(stack, info, work, Path(info.token_file).read_text().strip())
        yield cluster
    finally:
        if cluster is not None:
            cluster.close()
        # Looked at before stop(), which sweeps whatever it finds and would hide
        # a leak of ours; asserted after it, so the machine is clean either way.
        try:
            in_use = data_path_in_use(state, work)
        finally:
            stack.stop()
        assert_nothing_left(state, work, namespaces)
        assert not any(in_use.values()), f"the tests' volumes left behind: {in_use}"
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(state, ignore_errors=True)


def data_path_in_use(state: Path, work: Path) -> dict[str, list[str]]:
    """What is still attached once every test cleaned up: only the pools may be."""
    pools = [Path(p).resolve() for p in state.glob("nodes/*/pool")]
    return {
        "mounts": [m for d in (state, work) for m in mounts_under(d) if Path(m) not in pools],
        "loop devices": [
            f"{b.path} ({b.backing})"
            for b in bound_under(state)
            if not b.backing.endswith("/pool.img")
        ],
        "data-path processes": [
            p for p in processes_mentioning(state) if " nbdkit " in f" {p} " or "nbdfuse" in p
        ],
    }


def assert_nothing_left(state: Path, work: Path, namespaces: set[str]) -> None:
    """What `stop()` and the tests' own cleanup must have undone."""
    left = {
        "namespaces": sorted(namespaces & netns_names()),
        "links": netns.links(netns.tag_of(state)),
        "mounts": [m for d in (state, work) for m in mounts_under(d)],
        "loop devices": [b.path for d in (state, work) for b in bound_under(d)],
        "processes": processes_mentioning(state, work),
    }
    assert not any(left.values()), f"left behind after the stack stopped: {left}"


@pytest.fixture
def kube(cluster: Cluster) -> Iterator[Kube]:
    k = Kube(cluster)
    try:
        yield k
    finally:
        k.cleanup()
