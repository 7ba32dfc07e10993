"""NBD exports (owner side) with real nbdkit, real nbdfuse clients and real agent processes.

A client reads through the export exactly as a consumer node does
(`nbdfuse --command nbdkit -s nbd … tls-psk=…`), so what is checked is
what a pod on another node would notice: its bytes, a refused key, a
revoked export, a read-only export, an export that survives the agent.
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from node_agent.agent import Agent
from node_agent.keys import psk_line, write_private
from node_agent.pools import Pool
from node_agent.registration import Follower
from tessera.clients import AgentClient
from tessera.errors import FailedPrecondition, InvalidArgument, NotFound, TesseraError
from tessera.ids import new_volume_id
from tessera.models import AgentExportCreate, ExportRef, HeartbeatReply, NodeState
from tessera.system import processes
from tessera.system.mounts import mounts_under
from tests.conftest import needs_root
from tests.integration.processes import processes as management_processes

pytestmark = [needs_root, pytest.mark.root]

TOKEN = "export-test-token-0123456789"
MiB = 1024**2
START_TIMEOUT = 30.0
CLIENT = "consumer-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def export_port_range() -> tuple[int, int]:
    """A private range per agent: other suites use the default 10809-10999 at the same time."""
    base = random.randrange(30000, 39000, 20)
    return base, base + 19


def new_key() -> str:
    return secrets.token_hex(32)


# ---- real agent processes -------------------------------------------------------------


class AgentNode:
    """`python -m node_agent` on a unix socket and on TCP 127.0.0.1, exports on 127.0.0.1."""

    def __init__(self, tmp: Path, node_id: str = "owner", management: str = "") -> None:
        self.tmp = tmp
        self.node_id = node_id
        self.state = tmp / f"state-{node_id}"
        self.pool = tmp / f"pool-{node_id}"
        self.pool.mkdir()
        self.log = tmp / f"{node_id}.log"
        self.token_file = tmp / "token"
        self.token_file.write_text(TOKEN + "\n")
        # unix socket paths are limited to ~107 bytes; tmp_path can be longer
        self.sockets = Path(tempfile.mkdtemp(prefix="tsx-"))
        self.socket = self.sockets / "agent.sock"
        self.port = free_port()
        self.export_ports = export_port_range()
        self.management = management
        self.extra: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None
        #: every key handed to this agent: none may ever show in its log
        self.secrets: set[str] = set()

    def args(self) -> list[str]:
        lo, hi = self.export_ports
        args = [
            "node_agent", "--node-id", self.node_id,
            "--management", self.management or f"unix://{self.sockets / 'none.sock'}",
            "--token-file", str(self.token_file), "--pool", f"default={self.pool}",
            "--socket", str(self.socket), "--dev-dir", str(self.tmp / f"dev-{self.node_id}"),
            "--state-dir", str(self.state), "--listen", f"127.0.0.1:{self.port}",
            "--export-ports", f"{lo}-{hi}", "--log-level", "debug", *self.extra,
        ]  # fmt: skip
        if not self.management:
            args.append("--no-register")
        return args

    def start(self) -> AgentClient:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *self.args()],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        client = AgentClient(f"unix://{self.socket}", TOKEN)
        deadline = time.monotonic() + START_TIMEOUT
        while not client.healthy():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "agent did not start:\n" + self.log.read_text()
            time.sleep(0.05)
        return client

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)

    def export(
        self, client: AgentClient, volume_id: str, key: str, readonly: bool = False
    ) -> tuple[str, int]:
        self.secrets.add(key)
        req = AgentExportCreate(psk_identity=CLIENT, psk_key=key, readonly=readonly)
        exp = client.export(volume_id, CLIENT, req)
        assert (exp.volume_id, exp.client_node, exp.readonly) == (volume_id, CLIENT, readonly)
        return exp.host, exp.port

    def nbdkit_pid(self, volume_id: str) -> int | None:
        return processes.read_pid(self.state / "exports" / volume_id / f"{CLIENT}.pid")

    def volume_file(self, volume_id: str) -> Path:
        return self.pool / "volumes" / f"{volume_id}.img"


def processes_under(prefix: Path) -> list[int]:
    """Processes whose command line names a path under `prefix` (agents, nbdkit, nbdfuse)."""
    return processes.matching(lambda args: any(str(prefix) in a for a in args))


def clean_up(tmp: Path, nodes: list[AgentNode]) -> None:
    """Unmount FUSE mounts, kill every process started under tmp, drop socket directories."""
    for mountpoint in mounts_under(tmp):
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True, check=False)
    for node in nodes:
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(timeout=30)
    for pid in processes_under(tmp):
        processes.terminate(pid, os.path.basename((processes.cmdline(pid) or ["?"])[0]), 1.0)
    for node in nodes:
        for path in node.sockets.glob("*"):
            path.unlink()
        node.sockets.rmdir()


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[AgentNode]]:
    with agent_nodes(tmp_path) as started:
        yield started


@contextmanager
def agent_nodes(tmp_path: Path) -> Iterator[list[AgentNode]]:
    """Agents a test starts; afterwards nothing of theirs runs or stays mounted."""
    started: list[AgentNode] = []
    try:
        yield started
    finally:
        clean_up(tmp_path, started)
    assert mounts_under(tmp_path) == []
    assert processes_under(tmp_path) == []
    for node in started:
        if node.log.exists():
            text = node.log.read_text(errors="replace")
            leaked = [k for k in node.secrets if k in text]
            assert not leaked, "a PSK key reached the agent's log"


@pytest.fixture
def owner(tmp_path: Path, nodes: list[AgentNode]) -> AgentNode:
    node = AgentNode(tmp_path)
    nodes.append(node)
    return node


def new_volume(client: AgentClient, node: AgentNode, size: int = 8 * MiB) -> str:
    """A volume whose file holds random bytes (what the client must read back)."""
    volume_id = new_volume_id()
    client.create_volume(volume_id, "default", size)
    with open(node.volume_file(volume_id), "r+b") as f:
        f.write(os.urandom(size))
    return volume_id


# ---- a consumer: nbdfuse over the export --------------------------------------------


class ConnectFailed(Exception):
    pass


@contextmanager
def nbd_client(tmp: Path, host: str, port: int, key: str, readonly: bool = False) -> Iterator[Path]:
    """The export as a file through nbdfuse (the consumer side's pipeline); unmounted after."""
    workdir = Path(tempfile.mkdtemp(prefix="client-", dir=tmp))
    key_file = workdir / "key.psk"
    write_private(key_file, psk_line(CLIENT, key))
    mountpoint = workdir / "mnt"
    mountpoint.mkdir()
    argv = [
        "nbdfuse", *(["-r"] if readonly else []), str(mountpoint),
        "--command", "nbdkit", "-s", "--exit-with-parent", "nbd",
        f"hostname={host}", f"port={port}", "tls=require",
        f"tls-psk={key_file}", f"tls-username={CLIENT}",
    ]  # fmt: skip
    log = workdir / "nbdfuse.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while str(mountpoint) not in mounts_under(workdir):
            if proc.poll() is not None:
                raise ConnectFailed(log.read_text(errors="replace"))
            assert time.monotonic() < deadline, "nbdfuse did not mount: " + log.read_text()
            time.sleep(0.05)
        yield mountpoint / "nbd"
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def read_range(path: Path, offset: int, length: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


# ---- reading, keys, revocation ------------------------------------------------------------


def test_a_client_with_the_key_reads_the_volumes_exact_bytes(
    tmp_path: Path, owner: AgentNode
) -> None:
    client = owner.start()
    vid = new_volume(client, owner)
    key = new_key()
    host, port = owner.export(client, vid, key)
    assert host == "127.0.0.1" and owner.export_ports[0] <= port <= owner.export_ports[1]
    assert owner.export(client, vid, key) == (host, port), "the same export again is the same"
    assert [(e.volume_id, e.client_node, e.port) for e in client.list_exports()] == [
        (vid, CLIENT, port)
    ]
    with nbd_client(tmp_path, host, port, key) as data:
        assert data.read_bytes() == owner.volume_file(vid).read_bytes()
    psk = owner.state / "exports" / vid / f"{CLIENT}.psk"
    assert psk.stat().st_mode & 0o777 == 0o600
    assert (owner.state / "exports" / vid).stat().st_mode & 0o777 == 0o700


def test_a_wrong_key_cannot_read_the_export(tmp_path: Path, owner: AgentNode) -> None:
    client = owner.start()
    vid = new_volume(client, owner)
    host, port = owner.export(client, vid, new_key())
    with pytest.raises(ConnectFailed, match="(?i)tls|handshake"):
        with nbd_client(tmp_path, host, port, new_key()):
            pass


def test_closing_the_export_drops_the_connected_client_and_its_key_stops_working(
    tmp_path: Path, owner: AgentNode
) -> None:
    client = owner.start()
    vid = new_volume(client, owner, 16 * MiB)
    key = new_key()
    host, port = owner.export(client, vid, key)
    volume = owner.volume_file(vid).read_bytes()
    with nbd_client(tmp_path, host, port, key) as data:
        assert read_range(data, 0, MiB) == volume[:MiB]
        client.close_export(vid, CLIENT)
        with pytest.raises(OSError):
            read_range(data, 15 * MiB, MiB)  # never read before: no cache can answer it
    assert client.list_exports() == []
    assert not (owner.state / "exports" / vid).exists(), "the key file is deleted"
    client.close_export(vid, CLIENT)  # already closed: fine
    with pytest.raises(ConnectFailed):
        with nbd_client(tmp_path, host, port, key):
            pass


def test_a_new_key_replaces_the_export_and_the_old_key_is_refused(
    tmp_path: Path, owner: AgentNode
) -> None:
    client = owner.start()
    vid = new_volume(client, owner)
    old, new = new_key(), new_key()
    host, port = owner.export(client, vid, old)
    first_pid = owner.nbdkit_pid(vid)
    assert owner.export(client, vid, new) == (host, port), "a replaced export keeps its port"
    assert owner.nbdkit_pid(vid) != first_pid
    with pytest.raises(ConnectFailed):
        with nbd_client(tmp_path, host, port, old):
            pass
    with nbd_client(tmp_path, host, port, new) as data:
        assert read_range(data, 0, MiB) == owner.volume_file(vid).read_bytes()[:MiB]


def test_a_read_only_export_refuses_writes(tmp_path: Path, owner: AgentNode) -> None:
    client = owner.start()
    vid = new_volume(client, owner)
    before = owner.volume_file(vid).read_bytes()
    key = new_key()
    host, port = owner.export(client, vid, key, readonly=True)
    with nbd_client(tmp_path, host, port, key) as data:
        assert read_range(data, 0, MiB) == before[:MiB]
        with pytest.raises(OSError):
            fd = os.open(data, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\xff" * 4096, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
    assert owner.volume_file(vid).read_bytes() == before


# ---- what the agent refuses ---------------------------------------------------------------


def test_exports_of_unknown_volumes_and_bad_addresses_are_refused_and_deletes_wait(
    owner: AgentNode,
) -> None:
    client = owner.start()
    key = new_key()
    owner.secrets.add(key)
    req = AgentExportCreate(psk_identity=CLIENT, psk_key=key)
    with pytest.raises(NotFound):
        client.export(new_volume_id(), CLIENT, req)
    vid = new_volume(client, owner)
    # what would widen nbdkit's ip filter ("allow=all,anyipv6 deny=all") never gets through
    bad = AgentExportCreate.model_construct(
        psk_identity=CLIENT, psk_key=key, readonly=False, client_address="all,anyipv6"
    )
    with pytest.raises(InvalidArgument) as err:
        client.export(vid, CLIENT, bad)
    assert err.value.field == "client_address"
    by_name = AgentExportCreate(psk_identity=CLIENT, psk_key=key, client_address="localhost")
    assert client.export(vid, CLIENT, by_name).port > 0, "a client named by host name"
    with pytest.raises(FailedPrecondition, match=CLIENT):
        client.delete_volume(vid)
    client.close_export(vid, CLIENT)
    client.delete_volume(vid)


# ---- the agent's restarts -------------------------------------------------------------------


def test_the_export_serves_through_an_agent_kill_and_the_restarted_agent_readopts_it(
    tmp_path: Path, owner: AgentNode
) -> None:
    client = owner.start()
    vid = new_volume(client, owner, 32 * MiB)
    volume = owner.volume_file(vid).read_bytes()
    key = new_key()
    host, port = owner.export(client, vid, key)
    pid = owner.nbdkit_pid(vid)
    client.close()
    errors: list[BaseException] = []
    with nbd_client(tmp_path, host, port, key) as data:
        reading = threading.Thread(target=_read_all, args=(data, volume, errors))
        reading.start()
        assert owner.stop(signal.SIGKILL) == -signal.SIGKILL  # while the client reads
        reading.join(60)
        assert not reading.is_alive() and errors == []
        assert data.read_bytes() == volume, "reads go on with no agent running"
        client = owner.start()
        assert [(e.volume_id, e.port) for e in client.list_exports()] == [(vid, port)]
        assert owner.nbdkit_pid(vid) == pid, "re-adopted, not restarted"
        assert read_range(data, 0, MiB) == volume[:MiB], "the restart did not drop the client"
    assert "re-adopted export" in owner.log.read_text()


def _read_all(path: Path, expected: bytes, errors: list[BaseException]) -> None:
    try:
        for _ in range(3):
            fd = os.open(path, os.O_RDONLY)
            try:
                for offset in range(0, len(expected), MiB):
                    if os.pread(fd, MiB, offset) != expected[offset : offset + MiB]:
                        raise AssertionError(f"wrong bytes at {offset}")
            finally:
                os.close(fd)
    except BaseException as exc:  # noqa: BLE001 - handed to the test thread
        errors.append(exc)


def test_an_export_whose_nbdkit_died_is_restarted_on_its_port_when_the_agent_starts(
    tmp_path: Path, owner: AgentNode
) -> None:
    client = owner.start()
    vid = new_volume(client, owner)
    key = new_key()
    host, port = owner.export(client, vid, key)
    client.close()
    assert owner.stop(signal.SIGTERM) == 0, "SIGTERM stops the agent cleanly"
    pid = owner.nbdkit_pid(vid)
    assert pid is not None and processes.cmdline(pid), "SIGTERM leaves exports open"
    processes.terminate(pid, "nbdkit", 1.0)
    client = owner.start()
    assert [(e.volume_id, e.port) for e in client.list_exports()] == [(vid, port)]
    assert owner.nbdkit_pid(vid) not in (None, pid)
    with nbd_client(tmp_path, host, port, key) as data:
        assert read_range(data, 0, MiB) == owner.volume_file(vid).read_bytes()[:MiB]


# ---- reaping after heartbeats ------------------------------------------------------------------


def test_an_export_management_does_not_want_is_closed_after_a_heartbeat(
    tmp_path: Path, nodes: list[AgentNode]
) -> None:
    """Real management: an export no attachment of its own stands for is unwanted."""
    with management_processes(tmp_path) as procs:
        procs.token_file.write_text(TOKEN + "\n")
        procs.start_management()
        node = AgentNode(tmp_path, "n1", management=procs.management_url)
        node.extra = ["--heartbeat-interval", "0.3"]
        nodes.append(node)
        client = node.start()
        vid = new_volume(client, node)
        node.export(client, vid, new_key())
        deadline = time.monotonic() + 20
        while client.list_exports():
            assert time.monotonic() < deadline, "not reaped:\n" + node.log.read_text()
            time.sleep(0.1)
        assert node.nbdkit_pid(vid) is None
        assert "was not wanted by management" in node.log.read_text()
        client.close()


def in_process_agent(tmp: Path, node_id: str, with_transports: bool) -> Agent:
    """An agent in this process (no API), its pool and state under `tmp`, exporting on loopback."""
    (tmp / f"pool-{node_id}").mkdir()
    pools = {"default": Pool.open("default", tmp / f"pool-{node_id}")}
    return Agent(
        node_id, pools, tmp / f"dev-{node_id}", None if with_transports else {},
        state_dir=tmp / f"state-{node_id}", export_address="127.0.0.1",
        export_ports=export_port_range(),
    )  # fmt: skip


@contextmanager
def exporting_agent(tmp_path: Path) -> Iterator[Agent]:
    """An in-process owner with real nbdkit exports; none outlives the block."""
    agent = in_process_agent(tmp_path, "owner", with_transports=False)
    try:
        yield agent
    finally:
        for exp in agent.exports.list():
            agent.close_export(exp.volume_id, exp.client_node)
        for pid in processes_under(tmp_path):
            processes.terminate(pid, "nbdkit", 1.0)
    assert processes_under(tmp_path) == []


@pytest.fixture
def local_agent(tmp_path: Path) -> Iterator[Agent]:
    """An in-process agent with real nbdkit exports (the reply is handed to it directly)."""
    with exporting_agent(tmp_path) as agent:
        yield agent


def _local_export(agent: Agent) -> str:
    volume_id = new_volume_id()
    agent.create_volume(volume_id, "default", 4 * MiB)
    agent.export(volume_id, CLIENT, AgentExportCreate(psk_identity=CLIENT, psk_key=new_key()))
    return volume_id


def test_a_heartbeat_reply_closes_only_unlisted_exports_that_existed_when_it_was_sent(
    local_agent: Agent,
) -> None:
    follower = Follower(local_agent)
    listed = _local_export(local_agent)
    _local_export(local_agent)  # unlisted
    mark = follower.mark()  # the heartbeat goes out here ...
    racing = _local_export(local_agent)  # ... while an attach opens another export
    reply = HeartbeatReply(
        state=NodeState.ONLINE, exports=[ExportRef(volume_id=listed, client_node=CLIENT)]
    )
    follower.follow(reply, mark)
    assert {e.volume_id for e in local_agent.exports.list()} == {listed, racing}
    follower.follow(reply, follower.mark())  # the next heartbeat does not list it either
    assert {e.volume_id for e in local_agent.exports.list()} == {listed}


def test_the_agent_refuses_to_export_without_an_address(tmp_path: Path) -> None:
    (tmp_path / "pool").mkdir()
    pools = {"default": Pool.open("default", tmp_path / "pool")}
    agent = Agent("owner", pools, tmp_path / "dev", {}, state_dir=tmp_path / "state")
    volume_id = new_volume_id()
    agent.create_volume(volume_id, "default", MiB)
    req = AgentExportCreate(psk_identity=CLIENT, psk_key=new_key())
    with pytest.raises(FailedPrecondition, match="--export-address"):
        agent.export(volume_id, CLIENT, req)
    assert processes_under(tmp_path) == []


def test_no_port_left_in_the_range_is_resource_exhausted(
    tmp_path: Path, local_agent: Agent
) -> None:
    lo, _ = local_agent.exports.ports
    local_agent.exports.ports = (lo, lo)
    _local_export(local_agent)
    with pytest.raises(TesseraError) as err:
        _local_export(local_agent)
    assert err.value.http_status == 507 and f"{lo}-{lo}" in err.value.message


def test_a_record_left_without_its_key_by_a_crash_is_dropped_not_restarted(
    local_agent: Agent,
) -> None:
    kept = _local_export(local_agent)
    lost = _local_export(local_agent)
    state = local_agent.state_dir / "exports"
    for volume_id in (kept, lost):  # the node rebooted: no nbdkit survived
        pid = processes.read_pid(state / volume_id / f"{CLIENT}.pid")
        assert pid is not None
        processes.terminate(pid, "nbdkit", 1.0)
    (state / lost / f"{CLIENT}.psk").unlink()  # a crash between the record and the key
    recovered = local_agent.recover_exports()
    assert [e.volume_id for e in recovered] == [kept]
    assert [e.volume_id for e in local_agent.exports.list()] == [kept]
    assert not (state / lost).exists()


def test_a_grown_volume_keeps_serving_and_a_reconnecting_client_sees_the_new_size(
    tmp_path: Path, owner: AgentNode
) -> None:
    client = owner.start()
    vid = new_volume(client, owner, 8 * MiB)
    key = new_key()
    host, port = owner.export(client, vid, key)
    with nbd_client(tmp_path, host, port, key) as data:
        assert data.stat().st_size == 8 * MiB
        client.resize_volume(vid, 16 * MiB)
        # NBD has no resize notice: the connected client keeps its size and its I/O
        assert (
            read_range(data, 7 * MiB, MiB) == owner.volume_file(vid).read_bytes()[7 * MiB : 8 * MiB]
        )
    assert [e.port for e in client.list_exports()] == [port]
    with nbd_client(tmp_path, host, port, key) as data:
        assert data.stat().st_size == 16 * MiB


# ---- starts that fail, restarts that cannot go where they were ------------------------------


def test_an_nbdkit_that_started_but_never_confirmed_its_pid_is_stopped_before_the_error(
    tmp_path: Path, local_agent: Agent
) -> None:
    """A real nbdkit starts; its pid file is treated as never found (a slow or full disk)."""
    local_agent.exports._wait_for_pid = lambda record: False  # type: ignore[method-assign]
    volume_id = new_volume_id()
    local_agent.create_volume(volume_id, "default", MiB)
    req = AgentExportCreate(psk_identity=CLIENT, psk_key=new_key())
    with pytest.raises(TesseraError, match="did not confirm") as err:
        local_agent.export(volume_id, CLIENT, req)
    assert err.value.http_status == 500
    assert processes_under(tmp_path) == [], "the unconfirmed nbdkit still serves the key"
    assert local_agent.exports.list() == []
    assert not (local_agent.state_dir / "exports" / volume_id).exists()


def _kill_nbdkit(agent: Agent, volume_id: str) -> None:
    """The export's nbdkit dies (an OOM kill, a reboot) while the agent is down."""
    pid = processes.read_pid(agent.state_dir / "exports" / volume_id / f"{CLIENT}.pid")
    assert pid is not None
    processes.terminate(pid, "nbdkit", 1.0)


def test_a_dead_export_whose_port_was_taken_is_not_served_elsewhere_and_the_error_names_it(
    tmp_path: Path, local_agent: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    key = new_key()
    volume_id = new_volume_id()
    local_agent.create_volume(volume_id, "default", 4 * MiB)
    exp = local_agent.export(volume_id, CLIENT, AgentExportCreate(psk_identity=CLIENT, psk_key=key))
    _kill_nbdkit(local_agent, volume_id)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind((exp.host, exp.port))
    squatter.listen()
    with squatter, caplog.at_level("ERROR", logger="node_agent.exports"):
        assert local_agent.recover_exports() == []
    assert processes_under(tmp_path) == [], "served on another port nobody points at"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert volume_id in errors[0] and CLIENT in errors[0] and f":{exp.port}" in errors[0]
    assert key not in caplog.text
    # the record stays where management's points, and the next start brings it back there
    assert [(e.volume_id, e.port) for e in local_agent.exports.list()] == [(volume_id, exp.port)]
    assert [e.port for e in local_agent.recover_exports()] == [exp.port]
    with nbd_client(tmp_path, exp.host, exp.port, key) as data:
        assert read_range(data, 0, MiB) == _volume_bytes(local_agent, volume_id)[:MiB]


def _volume_bytes(agent: Agent, volume_id: str) -> bytes:
    return agent.pools["default"].volume_path(volume_id).read_bytes()


def test_a_dead_export_comes_back_on_its_recorded_address_after_the_export_address_changed(
    tmp_path: Path, local_agent: Agent
) -> None:
    key = new_key()
    volume_id = new_volume_id()
    local_agent.create_volume(volume_id, "default", 4 * MiB)
    exp = local_agent.export(volume_id, CLIENT, AgentExportCreate(psk_identity=CLIENT, psk_key=key))
    _kill_nbdkit(local_agent, volume_id)
    local_agent.exports.address = "127.0.0.2"  # the agent restarted with another --export-address
    recovered = local_agent.recover_exports()
    assert [(e.host, e.port) for e in recovered] == [(exp.host, exp.port)]
    with nbd_client(tmp_path, exp.host, exp.port, key) as data:
        assert read_range(data, 0, MiB) == _volume_bytes(local_agent, volume_id)[:MiB]
