"""Real management and node-agent processes on unix sockets, and a loop-mounted pool.

For tests that need the processes as users run them (argument parsing,
registration, capacity reporting, the agent's own API), not in-process apps.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tessera.clients import AgentClient, ManagementClient
from tessera.errors import TesseraError
from tessera.system import filesystems, loopdev, mounts

TOKEN = "processes-test-token-0123456789"
START_TIMEOUT = 30.0


def spawn_module(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m <args>` as a real process, its output appended to log, no stdin."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


class Processes:
    """One management and any number of agents, sockets in a short temporary directory."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        # unix socket paths are limited to ~107 bytes; tmp_path can be longer
        self.sockets = Path(tempfile.mkdtemp(prefix="tsp-"))
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.clients: list[AgentClient | ManagementClient] = []

    @property
    def management_url(self) -> str:
        return f"unix://{self.sockets / 'management.sock'}"

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def _spawn(self, name: str, args: list[str]) -> None:
        self.procs[name] = spawn_module(args, self.tmp / f"{name}.log")

    def _wait(self, name: str, ready: object) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():  # type: ignore[operator]
            proc = self.procs[name]
            assert proc.poll() is None, f"{name} exited:\n{self.log(name)}"
            assert time.monotonic() < deadline, f"{name} did not start:\n{self.log(name)}"
            time.sleep(0.05)

    def start_management(self, *extra: str) -> ManagementClient:
        args = [
            "management", "--listen", self.management_url,
            "--db", f"sqlite:///{self.tmp / 'management.db'}",
            "--token-file", str(self.token_file), *extra,
        ]  # fmt: skip
        self._spawn("management", args)
        client = ManagementClient(self.management_url, TOKEN)
        self.clients.append(client)
        self._wait("management", client.healthy)
        return client

    def start_agent(self, node_id: str, pools: dict[str, Path], *extra: str) -> AgentClient:
        """An agent registered with management (waits until its pools are known)."""
        return self.start_agents({node_id: pools}, *extra)[node_id]

    def start_agents(
        self, nodes: dict[str, dict[str, Path]], *extra: str
    ) -> dict[str, AgentClient]:
        """Agents started at once (node id -> its pools), each registered when this returns."""
        clients = {}
        for node_id, pools in nodes.items():
            socket = self.sockets / f"{node_id}.sock"
            args = [
                "node_agent", "--node-id", node_id, "--management", self.management_url,
                "--token-file", str(self.token_file), "--socket", str(socket),
                "--dev-dir", str(self.tmp / f"dev-{node_id}"), *extra,
            ]  # fmt: skip
            for name, directory in pools.items():
                args += ["--pool", f"{name}={directory}"]
            self._spawn(node_id, args)
            clients[node_id] = AgentClient(f"unix://{socket}", TOKEN)
            self.clients.append(clients[node_id])
        mgmt = ManagementClient(self.management_url, TOKEN)
        self.clients.append(mgmt)
        for node_id, pools in nodes.items():
            self._wait(node_id, lambda n=node_id, p=pools: self._registered(mgmt, clients[n], n, p))
        return clients

    @staticmethod
    def _registered(
        mgmt: ManagementClient, agent: AgentClient, node_id: str, pools: dict[str, Path]
    ) -> bool:
        try:
            known = {p.name for p in mgmt.list_pools().items if p.node_id == node_id}
        except TesseraError:
            return False
        return agent.healthy() and known == set(pools)

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for sock in self.sockets.glob("*"):
            sock.unlink()
        self.sockets.rmdir()


@contextmanager
def processes(tmp: Path) -> Iterator[Processes]:
    procs = Processes(tmp)
    try:
        yield procs
    finally:
        procs.stop()


@contextmanager
def mounted_pool(tmp: Path, fs_type: str, size: int) -> Iterator[Path]:
    """A sparse image of `size` bytes, with `fs_type` on it, loop-mounted at tmp/<fs>-pool."""
    image = tmp / f"{fs_type}-pool.img"
    with open(image, "xb") as f:
        f.truncate(size)
    device, _ = loopdev.attach(str(image), readonly=False, direct_io=True)
    mountpoint = tmp / f"{fs_type}-pool"
    mountpoint.mkdir()
    try:
        filesystems.make_filesystem(device, fs_type, [])
        mounts.mount(device, str(mountpoint), fs_type, [])
        try:
            yield mountpoint
        finally:
            mounts.unmount(str(mountpoint))
    finally:
        loopdev.detach(device)
