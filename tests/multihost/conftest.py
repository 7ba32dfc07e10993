"""One three-node stack per test module (network namespaces n1..n3, each with
its own pool, agent and CSI node plugin), and a per-test Kube that cleans up
what the test made. The module's teardown asserts the machine is as clean as
before: no namespaces, mounts, loop devices or processes left behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera_dev.multinode import MultiNodeStack
from tests.multihost.support import Cluster, Kube, running_cluster

POOL_SIZE = 2 * 1024**3


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, loop devices, FUSE and mounts")
    # Short paths: unix sockets live below the state directory (~107 bytes max).
    state = Path(tempfile.mkdtemp(prefix="tmh-"))
    work = Path(tempfile.mkdtemp(prefix="tmh-k-"))
    stack = MultiNodeStack(state, nodes=3, pool_size=POOL_SIZE)
    with running_cluster(stack, state, work) as cluster:
        yield cluster


@pytest.fixture
def kube(cluster: Cluster) -> Iterator[Kube]:
    k = Kube(cluster)
    try:
        yield k
    finally:
        k.cleanup()
