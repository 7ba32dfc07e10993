"""Real management and node-agent processes for the REST fuzzers and error-meaning tests.

Management listens on TCP (so a URL can carry a path prefix, right or
wrong); the agent serves its unix socket, registers with management and
keeps its pool on a small loop-mounted XFS image, so nothing a fuzzer asks
for can grow past the image's size. `stop()` leaves the machine as found:
no processes, loop devices, mounts or files outside the temporary directory.
"""

from __future__ import annotations

import selectors
import signal
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tessera.clients import AgentClient, ManagementClient
from tessera.errors import TesseraError
from tessera_dev import pool as dev_pool
from tessera_dev.release import release_volumes
from tests.integration.processes import spawn_module

TOKEN = "rest-fuzz-token"
NODE_ID = "fuzz-node"
POOL = "default"
READY_TIMEOUT = 60.0


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RestStack:
    """management (TCP, SQLite) + one node-agent whose pool is a loop-mounted image."""

    def __init__(self, tmp: Path, *, pool_size: int) -> None:
        self.dir = tmp.resolve()
        self.pool_size = pool_size
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.agent_socket = self.dir / "agent.sock"
        self.agent_url = f"unix://{self.agent_socket}"
        self.pool_dir = self.dir / "pool"
        self.image = self.dir / "pool.img"
        self.token_file = self.dir / "token"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # ---- start -----------------------------------------------------------------------

    def start(self) -> None:
        self.token_file.write_text(TOKEN + "\n")
        self.token_file.chmod(0o600)
        dev_pool.ensure_pool(self.image, self.pool_dir, self.pool_size)
        self.spawn(
            "management",
            ["management", "--listen", f"127.0.0.1:{self.port}",
             "--db", f"sqlite:///{self.dir / 'management.db'}",
             "--token-file", str(self.token_file),
             # nodes the fuzzers register never heartbeat; were they to go offline
             # mid-run, the same request would be answered differently later
             "--heartbeat-interval", "86400"],
        )  # fmt: skip
        self.spawn(
            "node-agent",
            ["node_agent", "--node-id", NODE_ID, "--management", self.url,
             "--token-file", str(self.token_file), "--pool", f"{POOL}={self.pool_dir}",
             "--socket", str(self.agent_socket), "--dev-dir", str(self.dir / "dev"),
             "--state-dir", str(self.dir / "agent-state")],
        )  # fmt: skip
        self.wait_ready()

    def spawn(self, name: str, module_args: list[str]) -> subprocess.Popen[bytes]:
        proc = spawn_module(module_args, self.dir / f"{name}.log")
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_ready(self) -> None:
        """Until both answer and the agent's node and pool are registered."""
        mgmt, agent = self.management(), self.agent()
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while time.monotonic() < deadline:
                for name, proc in self.procs.items():
                    if proc.poll() is not None:
                        raise RuntimeError(f"{name} exited:\n{self.log(name)}")
                if agent.healthy() and self._pool_registered(mgmt):
                    return
                time.sleep(0.1)
        finally:
            mgmt.close()
            agent.close()
        raise RuntimeError("the REST stack did not become ready:\n" + self.log("node-agent"))

    @staticmethod
    def _pool_registered(mgmt: ManagementClient) -> bool:
        try:
            return any(p.node_id == NODE_ID for p in mgmt.list_pools().items)
        except TesseraError:
            return False

    def management(self, url: str | None = None) -> ManagementClient:
        return ManagementClient(url or self.url, TOKEN)

    def agent(self) -> AgentClient:
        return AgentClient(self.agent_url, TOKEN)

    # ---- stop ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop the processes, then release what the agent left attached, then the pool."""
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        if dev_pool.is_mounted(self.pool_dir):
            release_volumes(self.pool_dir)
        dev_pool.release_pool(self.image, self.pool_dir)  # not mounted / attached is fine


class _Relay(socketserver.BaseRequestHandler):
    """Pump bytes between one TCP client and the agent's unix socket, both ways."""

    server: _RelayServer

    def handle(self) -> None:
        # without NODELAY, a reply relayed in two writes waits for a delayed ACK (~40 ms)
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            upstream.connect(self.server.socket_path)
            with selectors.DefaultSelector() as sel:
                sel.register(self.request, selectors.EVENT_READ, upstream)
                sel.register(upstream, selectors.EVENT_READ, self.request)
                while True:
                    for key, _ in sel.select(timeout=60):
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        key.data.sendall(data)
        except OSError:
            return
        finally:
            upstream.close()


class _RelayServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = str(socket_path)
        super().__init__(("127.0.0.1", 0), _Relay)


@contextmanager
def tcp_relay(socket_path: Path) -> Iterator[str]:
    """An http://127.0.0.1:PORT that reaches the agent's unix socket.

    The agent listens only on its socket; HTTP tools that speak only TCP
    (schemathesis' requests transport, including the probes its checks send
    on fresh sessions) reach it through this relay. Bytes pass unchanged.
    """
    server = _RelayServer(socket_path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def running_stack(tmp: Path, pool_size: int) -> Iterator[RestStack]:
    """A started RestStack in tmp; once stopped, no loop device or mount below tmp remains."""
    from tessera.system.loopdev import bound_under
    from tessera.system.mounts import mounts_under

    stack = RestStack(tmp, pool_size=pool_size)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
    assert bound_under(tmp) == [], "leaked loop devices"
    assert mounts_under(tmp) == [], "leaked mounts"
