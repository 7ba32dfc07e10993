"""N Tessera nodes on one machine, each a network namespace: `dev up --nodes N`.

Layout of the state directory (DIR):

    token, management.db      as in the single-node stack
    csi.sock                  the CSI controller plugin (root namespace)
    network.json              the subnet this DIR uses (see netns.py)
    stack.json                written once everything answers; removed on stop
    logs/<process>.log        management, csi-controller, nK-agent, nK-csi
    nodes/nK/pool.img, pool/  node K's file-backed pool and its mountpoint
    nodes/nK/agent.sock       its agent's local API (for its CSI node plugin)
    nodes/nK/csi.sock         its CSI node plugin
    nodes/nK/dev/             its /dev/tessera
    nodes/nK/state/           its agent's exports, keys and connections

Management listens on TCP on the bridge address (the root side of every
node's link); the agents listen on their node's address and register it.
Unix sockets are paths, not network endpoints, so the CSI plugins reach
their agent (and the tests reach everything) across namespaces.

One `dev up` per DIR at a time (an exclusive lock); whatever a crashed
earlier run left behind is torn down before a start.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from tessera.clients import AgentClient, ManagementClient
from tessera.errors import TesseraError
from tessera_dev import netns, supervise, teardown
from tessera_dev import pool as dev_pool

MANAGEMENT_PORT = 7600
AGENT_PORT = 7700
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_MISSES = 3
READY_TIMEOUT = 90.0
#: sun_path is 108 bytes with its terminating NUL
MAX_SOCKET_PATH = 107
RUN_TIMEOUT = 60.0


class StackError(RuntimeError):
    """The stack could not start or stop; the message says what and where to look."""


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    netns: str
    address: str
    csi_endpoint: str
    agent_socket: str
    agent_url: str
    pool_dir: str
    dev_dir: str
    state_dir: str


@dataclass(frozen=True)
class MultiStackInfo:
    state_dir: str
    csi_endpoint: str
    management_url: str
    token_file: str
    subnet: str
    bridge: str
    nodes: list[NodeInfo] = field(default_factory=list)

    def node(self, node_id: str) -> NodeInfo:
        for node in self.nodes:
            if node.node_id == node_id:
                return node
        raise KeyError(f"no node {node_id!r} in this stack (nodes: {self.node_ids})")

    @property
    def node_ids(self) -> list[str]:
        return [n.node_id for n in self.nodes]


class MultiNodeStack:
    """Management, the CSI controller and N nodes (namespace, pool, agent, CSI node plugin).

    `extra_args` adds arguments to one process by its log name
    (`management`, `csi-controller`, `nK-agent`, `nK-csi`): tests use it to
    make a start fail.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        nodes: int = 3,
        pool_size: int = 2 * 1024**3,
        max_volumes_per_node: int = 0,
        extra_args: dict[str, list[str]] | None = None,
        cancel: threading.Event | None = None,
    ) -> None:
        if not 1 <= nodes <= netns.MAX_NODES:
            raise StackError(f"--nodes must be between 1 and {netns.MAX_NODES}, not {nodes}")
        self.dir = state_dir.resolve()
        self.count = nodes
        self.pool_size = pool_size
        self.max_volumes = max_volumes_per_node
        self.extra_args = extra_args or {}
        #: set (by Ctrl-C) while starting: stop starting and tear down what is up
        self.cancel = cancel or threading.Event()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        #: processes stopped on purpose (kill_agent, cut_off): not failures
        self.down: set[str] = set()
        self.network: netns.Network | None = None
        self.info: MultiStackInfo | None = None
        self._lock: IO[bytes] | None = None

    # ---- start -------------------------------------------------------------

    def start(self) -> MultiStackInfo:
        """Everything up and answering, or everything torn down and StackError raised."""
        self._take_lock()
        try:
            self._prepare_dirs()
            self._clean_leftovers()
            self.network = netns.network_for(self.dir)
            self.info = self._describe(self.network)
            self._check_socket_paths(self.info)
            token = supervise.ensure_token(self.dir / "token")
            netns.create(self.network, self.count)
            for node in self.info.nodes:
                self._check_cancelled()
                self._ensure_pool(node)
            self._spawn("management", self._management_args())
            for node in self.info.nodes:
                self._spawn(f"{node.node_id}-agent", self._agent_args(node), node.netns)
            self._spawn("csi-controller", self._controller_args())
            for node in self.info.nodes:
                self._spawn(f"{node.node_id}-csi", self._node_csi_args(node), node.netns)
            self._wait_ready(token, self.info.nodes)
        except BaseException as exc:
            # Also on Ctrl-C while starting: nothing half-made stays behind.
            problems = self._teardown()
            if problems:
                exc.add_note("teardown left: " + "; ".join(problems))
            raise
        supervise.write_json(self._stack_file, asdict(self.info))
        return self.info

    @property
    def _stack_file(self) -> Path:
        return self.dir / "stack.json"

    def _prepare_dirs(self) -> None:
        for sub in ("logs", "nodes"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self._stack_file.unlink(missing_ok=True)

    def _take_lock(self) -> None:
        try:
            self._lock = supervise.lock_state_dir(self.dir)
        except supervise.StateDirBusy as exc:
            raise StackError(str(exc)) from None

    def _describe(self, network: netns.Network) -> MultiStackInfo:
        nodes = []
        for index in range(1, self.count + 1):
            home = self.dir / "nodes" / f"n{index}"
            for sub in ("dev", "state"):
                (home / sub).mkdir(parents=True, exist_ok=True)
            address = network.address(index)
            nodes.append(
                NodeInfo(
                    node_id=f"n{index}",
                    netns=network.netns(index),
                    address=address,
                    csi_endpoint=f"unix://{home / 'csi.sock'}",
                    agent_socket=str(home / "agent.sock"),
                    agent_url=f"http://{address}:{AGENT_PORT}",
                    pool_dir=str(home / "pool"),
                    dev_dir=str(home / "dev"),
                    state_dir=str(home / "state"),
                )
            )
        return MultiStackInfo(
            state_dir=str(self.dir),
            csi_endpoint=f"unix://{self.dir / 'csi.sock'}",
            management_url=f"http://{network.bridge_address}:{MANAGEMENT_PORT}",
            token_file=str(self.dir / "token"),
            subnet=str(network.subnet),
            bridge=network.bridge,
            nodes=nodes,
        )

    @staticmethod
    def _check_socket_paths(info: MultiStackInfo) -> None:
        longest = max(
            (info.csi_endpoint, *(n.csi_endpoint for n in info.nodes)), key=len
        ).removeprefix("unix://")
        if len(longest.encode()) > MAX_SOCKET_PATH:
            raise StackError(
                f"--state-dir {info.state_dir} is too long: {longest} exceeds the "
                f"{MAX_SOCKET_PATH} bytes a unix socket path may have; use a shorter directory"
            )

    def _ensure_pool(self, node: NodeInfo) -> None:
        image = Path(node.pool_dir).with_suffix(".img")
        try:
            dev_pool.ensure_pool(image, Path(node.pool_dir), self.pool_size)
        except dev_pool.PoolError as exc:
            raise StackError(f"{node.node_id}: {exc}") from exc

    # ---- the processes -------------------------------------------------------

    def _management_args(self) -> list[str]:
        assert self.network is not None and self.info is not None
        return [
            "management",
            "--listen", f"{self.network.bridge_address}:{MANAGEMENT_PORT}",
            "--db", f"sqlite:///{self.dir / 'management.db'}",
            "--token-file", self.info.token_file,
            "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
            "--heartbeat-misses", str(HEARTBEAT_MISSES),
        ]  # fmt: skip

    def _agent_args(self, node: NodeInfo) -> list[str]:
        assert self.info is not None
        return [
            "node_agent",
            "--node-id", node.node_id,
            "--management", self.info.management_url,
            "--token-file", self.info.token_file,
            "--pool", f"default={node.pool_dir}",
            "--socket", node.agent_socket,
            "--dev-dir", node.dev_dir,
            "--state-dir", node.state_dir,
            "--listen", f"{node.address}:{AGENT_PORT}",
            "--advertise", node.address,
            "--heartbeat-interval", str(HEARTBEAT_INTERVAL),
            "--max-volumes", str(self.max_volumes),
        ]  # fmt: skip

    def _controller_args(self) -> list[str]:
        assert self.info is not None
        return [
            "csi_driver",
            "--mode", "controller",
            "--endpoint", self.info.csi_endpoint,
            "--management", self.info.management_url,
            "--token-file", self.info.token_file,
            "--max-volumes-per-node", str(self.max_volumes),
        ]  # fmt: skip

    def _node_csi_args(self, node: NodeInfo) -> list[str]:
        assert self.info is not None
        return [
            "csi_driver",
            "--mode", "node",
            "--endpoint", node.csi_endpoint,
            "--node-id", node.node_id,
            "--token-file", self.info.token_file,
            "--agent-socket", node.agent_socket,
            "--max-volumes-per-node", str(self.max_volumes),
        ]  # fmt: skip

    def _spawn(self, name: str, args: list[str], in_netns: str = "") -> None:
        prefix = netns.in_netns(in_netns, []) if in_netns else None
        args = [*args, *self.extra_args.get(name, [])]
        self.procs[name] = supervise.spawn(args, self.dir / "logs" / f"{name}.log", prefix)

    def _wait_ready(self, token: str, nodes: list[NodeInfo]) -> None:
        """Until management answers, each node is registered at its TCP address, every Probe."""
        assert self.info is not None
        mgmt = ManagementClient(self.info.management_url, token)
        waiting = {n.node_id for n in nodes}
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            while time.monotonic() < deadline:
                self._check_cancelled()
                self._check_alive()
                if not mgmt.healthy():
                    time.sleep(0.1)
                    continue
                waiting = {n.node_id for n in nodes if not self._node_ready(mgmt, n, token)}
                if not waiting and supervise.csi_ready(self.info.csi_endpoint):
                    return
                time.sleep(0.2)
        finally:
            mgmt.close()
        raise StackError(
            f"the stack did not become ready in {READY_TIMEOUT:.0f}s (waiting for "
            f"{', '.join(sorted(waiting)) or 'the CSI controller'}); see {self.dir}/logs"
        )

    @staticmethod
    def _node_ready(mgmt: ManagementClient, node: NodeInfo, token: str) -> bool:
        """Its agent registered with its TCP address, and its CSI node plugin ready."""
        agent = AgentClient(f"unix://{node.agent_socket}", token)
        try:
            if not agent.registered():
                return False
            if mgmt.get_node(node.node_id).agent_url != node.agent_url:
                return False
        except TesseraError:
            return False
        finally:
            agent.close()
        return supervise.csi_ready(node.csi_endpoint)

    def _check_cancelled(self) -> None:
        if self.cancel.is_set():
            raise StackError("interrupted while starting; everything started was stopped")

    def _check_alive(self) -> None:
        name = self.failed_process()
        if name is not None:
            code = self.procs[name].returncode
            log = self.dir / "logs" / f"{name}.log"
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise StackError(f"{name} exited with code {code}: {tail} (see {log})")

    def failed_process(self) -> str | None:
        """A process that exited on its own (not one a test killed on purpose)."""
        for name, proc in self.procs.items():
            if name not in self.down and proc.poll() is not None:
                return name
        return None

    # ---- failure injection ---------------------------------------------------

    def kill_agent(self, node_id: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Signal a node's agent and wait until it is gone (crash testing; no cleanup)."""
        name = f"{self._node(node_id).node_id}-agent"
        self.down.add(name)
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=supervise.STOP_GRACE)

    def respawn_agent(self, node_id: str) -> None:
        """Start the node's agent again and wait until management has it registered."""
        node = self._node(node_id)
        name = f"{node.node_id}-agent"
        supervise.stop(self.procs.get(name))
        self._spawn(name, self._agent_args(node), node.netns)
        self.down.discard(name)
        self._wait_ready(supervise.ensure_token(self.dir / "token"), [node])

    def cut_off(self, node_id: str) -> None:
        """The node as a dead host: its link down, its agent killed (its data path stays)."""
        node = self._node(node_id)
        assert self.network is not None
        netns.set_link(self.network, self._index(node), up=False)
        self.kill_agent(node_id)

    def restore(self, node_id: str) -> None:
        """The node back on the network, its agent restarted and registered again."""
        node = self._node(node_id)
        assert self.network is not None
        netns.set_link(self.network, self._index(node), up=True)
        self.respawn_agent(node_id)

    def run_in(
        self, node_id: str, argv: list[str], *, timeout: float = RUN_TIMEOUT, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        """A command inside the node's network namespace (same mounts as everyone)."""
        node = self._node(node_id)
        return subprocess.run(
            netns.in_netns(node.netns, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    def _node(self, node_id: str) -> NodeInfo:
        if self.info is None:
            raise StackError("the stack is not started")
        return self.info.node(node_id)

    @staticmethod
    def _index(node: NodeInfo) -> int:
        return int(node.node_id.removeprefix("n"))

    # ---- stop --------------------------------------------------------------

    def stop(self) -> None:
        """Tear everything down (see `_teardown`); StackError names what stayed behind."""
        problems = self._teardown()
        if problems:
            raise StackError("teardown left: " + "; ".join(problems))

    def _teardown(self) -> list[str]:
        """CSI plugins, agents, management, then the data path, pools and network.

        Each step runs whatever the ones before it managed; the problems are
        returned together at the end. Only with DIR's lock: a `stop()` of a
        stack whose start was refused must not tear down the one running.
        """
        if self._lock is None:
            try:
                self._take_lock()
            except StackError:
                return []  # another `dev up` owns DIR and everything in it
        self._stack_file.unlink(missing_ok=True)
        order = sorted(self.procs, key=_stop_rank)
        for name in order:
            supervise.stop(self.procs[name])
        self.procs.clear()
        problems = self._clean_leftovers()
        for sock in self.dir.glob("nodes/*/*.sock"):
            sock.unlink(missing_ok=True)
        (self.dir / "csi.sock").unlink(missing_ok=True)
        if self._lock is not None:
            self._lock.close()
            self._lock = None
        return problems

    def _clean_leftovers(self) -> list[str]:
        """Everything of this DIR found on the machine, in teardown order; what stayed."""
        teardown.kill_stack_processes(self.dir)
        pools = {str(p.resolve()) for p in self.dir.glob("nodes/*/pool.img")}
        problems = teardown.release_data_path(self.dir, keep=pools)
        teardown.remove_device_links(self.dir)
        tag = netns.tag_of(self.dir)
        for name in netns.namespaces(tag):
            teardown.kill_all(netns.pids_in(name))
        for image in sorted(self.dir.glob("nodes/*/pool.img")):
            try:
                dev_pool.release_pool(image, image.with_suffix(""))
            except dev_pool.PoolError as exc:
                problems.append(str(exc))
        problems += netns.destroy(tag)
        return problems


def _stop_rank(name: str) -> int:
    """CSI plugins first (they call the agents), then agents, management last."""
    if name.endswith("-csi") or name == "csi-controller":
        return 0
    return 1 if name.endswith("-agent") else 2


def load_multi_stack_info(state_dir: Path) -> MultiStackInfo:
    data = json.loads((state_dir / "stack.json").read_text())
    nodes = [NodeInfo(**n) for n in data.pop("nodes")]
    return MultiStackInfo(**data, nodes=nodes)
