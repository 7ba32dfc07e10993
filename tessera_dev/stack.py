"""Start, watch and stop the three Tessera processes of a development stack.

Layout of the state directory:

    token              bearer token shared by the processes (0600)
    pool.img, pool/    the file-backed pool and its mountpoint
    management.db      SQLite state
    management.sock    REST API
    agent.sock         node-agent local API
    csi.sock           CSI endpoint (controller + node)
    logs/*.log         one log per process
    stack.json         written once everything answers; removed on stop
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from tessera.clients import AgentClient, ManagementClient
from tessera_dev import pool as dev_pool
from tessera_dev import supervise, teardown
from tessera_dev.release import release_volumes

READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class StackInfo:
    state_dir: str
    node_id: str
    csi_endpoint: str
    management_url: str
    agent_socket: str
    token_file: str
    pool_dir: str
    #: the CSI plugin's /metrics and /healthz (http://127.0.0.1:PORT), loopback only
    csi_metrics_url: str = ""


class DevStack:
    def __init__(
        self,
        state_dir: Path,
        *,
        pool_size: int,
        node_id: str = "node-1",
        max_volumes_per_node: int = 0,
    ) -> None:
        self.dir = state_dir.resolve()
        self.pool_size = pool_size
        self.node_id = node_id
        self.max_volumes = max_volumes_per_node
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock: IO[bytes] | None = None
        self.info = StackInfo(
            state_dir=str(self.dir),
            node_id=node_id,
            csi_endpoint=f"unix://{self.dir / 'csi.sock'}",
            management_url=f"unix://{self.dir / 'management.sock'}",
            agent_socket=str(self.dir / "agent.sock"),
            token_file=str(self.dir / "token"),
            pool_dir=str(self.dir / "pool"),
            csi_metrics_url=f"http://127.0.0.1:{_free_port()}",
        )

    # ---- start -------------------------------------------------------------

    def start(self) -> StackInfo:
        self._lock = supervise.lock_state_dir(self.dir)
        (self.dir / "logs").mkdir(exist_ok=True)
        self._stack_file.unlink(missing_ok=True)
        token = supervise.ensure_token(Path(self.info.token_file))
        dev_pool.ensure_pool(self.dir / "pool.img", Path(self.info.pool_dir), self.pool_size)
        self._spawn("management", self._management_args())
        self._spawn("node-agent", self._agent_args())
        self._spawn("csi", self._csi_args())
        self._wait_ready(token)
        supervise.write_json(self._stack_file, asdict(self.info))
        return self.info

    @property
    def _stack_file(self) -> Path:
        return self.dir / "stack.json"

    def _management_args(self) -> list[str]:
        return [
            "management",
            "--listen",
            self.info.management_url,
            "--db",
            f"sqlite:///{self.dir / 'management.db'}",
            "--token-file",
            self.info.token_file,
        ]

    def _agent_args(self) -> list[str]:
        return [
            "node_agent",
            "--node-id",
            self.node_id,
            "--management",
            self.info.management_url,
            "--token-file",
            self.info.token_file,
            "--pool",
            f"default={self.info.pool_dir}",
            "--socket",
            self.info.agent_socket,
            "--max-volumes",
            str(self.max_volumes),
            # its own records (exports, keys, connections), not the machine's default
            "--state-dir",
            str(self.dir / "agent-state"),
            # a lone node can still export to a node-agent on this host (sanity's
            # second node): loopback only, never reachable from elsewhere
            "--export-address",
            "127.0.0.1",
        ]

    def _csi_args(self) -> list[str]:
        return [
            "csi_driver",
            "--mode",
            "all",
            "--endpoint",
            self.info.csi_endpoint,
            "--node-id",
            self.node_id,
            "--management",
            self.info.management_url,
            "--token-file",
            self.info.token_file,
            "--agent-socket",
            self.info.agent_socket,
            "--max-volumes-per-node",
            str(self.max_volumes),
            "--metrics-listen",
            self.info.csi_metrics_url.removeprefix("http://"),
        ]

    def _spawn(self, name: str, module_args: list[str]) -> None:
        self.procs[name] = supervise.spawn(module_args, self.dir / "logs" / f"{name}.log")

    def _wait_ready(self, token: str) -> None:
        mgmt = ManagementClient(self.info.management_url, token)
        agent = AgentClient(f"unix://{self.info.agent_socket}", token)
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while time.monotonic() < deadline:
                self._check_alive()
                # Registered means the node and its pools: a CreateVolume sent the
                # moment `dev up` returns finds a pool. The plugin's Probe says the
                # same at start, but stays ready once it was, so after a respawn
                # the peers are asked here directly.
                csi_ready = supervise.csi_ready(self.info.csi_endpoint)
                if mgmt.healthy() and agent.registered() and csi_ready:
                    return
                time.sleep(0.1)
        finally:
            mgmt.close()
            agent.close()
        raise RuntimeError(
            f"the stack did not become ready in {READY_TIMEOUT:.0f}s; see {self.dir}/logs"
        )

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with code {proc.returncode}; see {self.dir}/logs/{name}.log"
                )

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Kill one process without any cleanup (crash testing)."""
        proc = self.procs[name]
        proc.send_signal(sig)
        proc.wait(timeout=15)

    def respawn(self, name: str) -> None:
        """Start one process again, as a supervisor would after a crash."""
        args = {
            "management": self._management_args,
            "node-agent": self._agent_args,
            "csi": self._csi_args,
        }[name]()
        self._spawn(name, args)
        token = Path(self.info.token_file).read_text().strip()
        self._wait_ready(token)

    def failed_process(self) -> str | None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                return name
        return None

    # ---- stop --------------------------------------------------------------

    def stop(self) -> None:
        """Stop processes (CSI first, management last), then release the data path.

        Only with the state dir's lock: after a start refused because another
        `dev up` runs there, this leaves that one alone.
        """
        if self._lock is None:
            try:
                self._lock = supervise.lock_state_dir(self.dir)
            except supervise.StateDirBusy:
                return
        try:
            self._stop()
        finally:
            self._lock.close()
            self._lock = None

    def _stop(self) -> None:
        self._stack_file.unlink(missing_ok=True)
        for name in ("csi", "node-agent", "management"):
            supervise.stop(self.procs.get(name))
        # The pool's volumes first: release_volumes also removes their /dev/tessera
        # links, which it finds through the loop devices it detaches.
        release_volumes(Path(self.info.pool_dir))
        # then exports to another agent on this host (nbdkit on volume files hold the pool)
        teardown.release_data_path(self.dir, keep={str(self.dir / "pool.img")})
        dev_pool.release_pool(self.dir / "pool.img", Path(self.info.pool_dir))
        for sock in ("csi.sock", "agent.sock", "management.sock"):
            path = self.dir / sock
            if path.is_socket():
                path.unlink()


def _free_port() -> int:
    """A loopback port nobody listens on now (the kernel's pick for port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def load_stack_info(state_dir: Path) -> StackInfo:
    data = json.loads((state_dir / "stack.json").read_text())
    return StackInfo(**data)
