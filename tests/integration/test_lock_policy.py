"""One lock and timeout policy, seen from a real agent process.

A busy volume answers "busy" (409, problem type aborted) at once instead of
queueing: the agent used to wait up to 120 s, past the client's 30 s read
timeout, so the caller saw a failure while the queued work still ran later.
And /healthz must answer while every worker thread is stuck in the kernel.

Work is made to hang for real: the pool is an ext4 filesystem on a loop
device, frozen with FIFREEZE, so creating a volume file blocks in the
kernel (holding the volume's lock and a worker thread) until it is thawed.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tessera.clients import AgentClient
from tessera.errors import Aborted
from tessera.ids import new_volume_id
from tessera.system import filesystems, loopdev, mounts
from tests.conftest import needs_root
from tests.integration.test_node_agent_loop import release_loops
from tests.integration.test_node_agent_process import TOKEN, AgentProcess

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2
FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
#: more requests than anyio lends threads to sync routes (40 by default)
SATURATE = 46
#: the caller's patience in this test; a queued request would exceed it
PATIENCE = 5.0
#: how long the stuck calls may take to reach the kernel on a loaded machine
SETTLE = 60.0


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, Path]]:
    proc = AgentProcess(tmp_path)  # makes tmp/pool: the frozen filesystem goes there
    image = tmp_path / "pool.img"
    with open(image, "wb") as f:
        f.truncate(256 * MiB)
    device, _ = loopdev.attach(str(image), readonly=False, direct_io=False)
    pool = tmp_path / "pool"
    try:
        filesystems.make_filesystem(device, "ext4", [])
        mounts.mount(device, str(pool), "ext4", [])
        proc.start().close()
        yield proc, pool
    finally:
        thaw(pool)
        if proc.proc is not None and proc.proc.poll() is None:
            proc.stop(signal.SIGTERM)
        release_loops(pool)
        mounts.unmount(str(pool))
        loopdev.detach(device)
        release_loops(tmp_path)
    assert loopdev.bound_under(tmp_path) == []


def thaw(pool: Path) -> None:
    fd = os.open(pool, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError:
        pass  # not frozen
    finally:
        os.close(fd)


@contextmanager
def frozen(pool: Path) -> Iterator[None]:
    fd = os.open(pool, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    finally:
        os.close(fd)
    try:
        yield
    finally:
        thaw(pool)


def http(proc: AgentProcess, timeout: float) -> httpx.Client:
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=str(proc.socket)),
        base_url="http://agent",
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=timeout,
    )


def create(proc: AgentProcess, vid: str) -> httpx.Response:
    """A create that hangs in the kernel while the pool is frozen.

    Retried while the volume is busy, as every caller does: the test's own
    probe (`volume_busy`) may hold the volume's lock for an instant.
    """
    with http(proc, timeout=120) as c:
        while True:
            answer = c.put(f"/v1/volumes/{vid}", json={"pool": "default", "size_bytes": MiB})
            if answer.status_code != 409 or not answer.json()["type"].endswith("/aborted"):
                return answer
            time.sleep(0.05)


def stuck(proc: AgentProcess, pool: ThreadPoolExecutor, vids: list[str]) -> list[Future]:
    return [pool.submit(create, proc, vid) for vid in vids]


def wait_until(what: str, check: Callable[[], bool], futures: list[Future]) -> None:
    """Poll until check() holds; the stuck calls must stay stuck meanwhile."""
    deadline = time.monotonic() + SETTLE
    while not check():
        done = [f.result().text for f in futures if f.done()]
        assert not done, f"calls that should hang in the frozen pool answered: {done}"
        assert time.monotonic() < deadline, f"not {what} after {SETTLE:.0f}s"
        time.sleep(0.2)


def volume_busy(proc: AgentProcess, vid: str) -> bool:
    """Detach takes the volume's lock: 409 aborted while a call holds it.

    The volume is not attached, so a detach that gets the lock does nothing
    (204); reading an attachment takes no lock, so it cannot be the probe.
    """
    with http(proc, timeout=PATIENCE) as c:
        return c.delete(f"/v1/attachments/{vid}").status_code == 409


def no_thread_free(proc: AgentProcess) -> bool:
    """A sync route that does not touch the pool finds no worker thread to run on."""
    with http(proc, timeout=1.0) as c:
        try:
            c.get("/v1/attachments")
        except httpx.ReadTimeout:
            return True
    return False


def test_a_second_call_on_a_busy_volume_is_aborted_at_once_not_queued(
    agent: tuple[AgentProcess, Path],
) -> None:
    proc, pool = agent
    vid = new_volume_id()
    with ThreadPoolExecutor(max_workers=1) as workers:
        with frozen(pool):
            (first,) = stuck(proc, workers, [vid])
            wait_until("holding the volume's lock", lambda: volume_busy(proc, vid), [first])
            with http(proc, timeout=PATIENCE) as c:
                second = c.put(f"/v1/volumes/{vid}", json={"pool": "default", "size_bytes": MiB})
                attach = c.put(f"/v1/attachments/{vid}", json={"readonly": False})
            assert second.status_code == 409, second.text
            assert second.json()["type"].endswith("/aborted")
            assert "in progress" in second.json()["detail"]
            assert attach.status_code == 409 and attach.json()["type"].endswith("/aborted")
            client = AgentClient(f"unix://{proc.socket}", TOKEN)
            with pytest.raises(Aborted):
                client.detach(vid)  # the typed client: Aborted, i.e. ABORTED over CSI
            client.close()
        assert first.result(timeout=60).status_code == 200, "the first call finishes once thawed"
    AgentClient(f"unix://{proc.socket}", TOKEN).delete_volume(vid)


def test_healthz_answers_while_every_worker_thread_is_stuck(
    agent: tuple[AgentProcess, Path],
) -> None:
    proc, pool = agent
    vids = [new_volume_id() for _ in range(SATURATE)]
    with ThreadPoolExecutor(max_workers=SATURATE) as workers:
        with frozen(pool):
            futures = stuck(proc, workers, vids)
            wait_until("saturated", lambda: no_thread_free(proc), futures)
            with http(proc, timeout=PATIENCE) as c:
                health = c.get("/healthz")
            assert health.status_code == 200 and health.json() == {"status": "ok"}
        assert [f.result(timeout=60).status_code for f in futures] == [200] * SATURATE
    client = AgentClient(f"unix://{proc.socket}", TOKEN)
    for vid in vids:
        client.delete_volume(vid)
    client.close()
