"""The real `python -m node_agent` process: serves without management, survives SIGKILL."""

from __future__ import annotations

import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tessera.clients import AgentClient
from tessera.ids import new_volume_id
from tessera.system.loopdev import bound_under
from tests.conftest import needs_root
from tests.integration.test_node_agent_loop import release_loops

pytestmark = [needs_root, pytest.mark.root]
MiB = 1024**2
TOKEN = "process-test-token"


class AgentProcess:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.socket = tmp / "agent.sock"
        self.log = tmp / "agent.log"
        (tmp / "pool").mkdir()
        (tmp / "token").write_text(TOKEN + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentClient:
        args = [
            sys.executable, "-m", "node_agent", "--node-id", "proc-node",
            "--management", f"unix://{self.tmp / 'no-management.sock'}",
            "--token-file", str(self.tmp / "token"), "--pool", f"default={self.tmp / 'pool'}",
            "--socket", str(self.socket), "--dev-dir", str(self.tmp / "dev"),
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = AgentClient(f"unix://{self.socket}", TOKEN)
        deadline = time.monotonic() + 30
        while not client.healthy():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "agent did not start: " + self.log.read_text()
            time.sleep(0.1)
        return client

    def stop(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


@pytest.fixture
def agent_proc(tmp_path: Path) -> Iterator[AgentProcess]:
    ap = AgentProcess(tmp_path)
    try:
        yield ap
    finally:
        if ap.proc is not None and ap.proc.poll() is None:
            ap.proc.kill()
            ap.proc.wait(timeout=30)
        release_loops(tmp_path)
    assert bound_under(tmp_path) == []


def test_serves_without_management_and_readopts_after_sigkill(agent_proc: AgentProcess) -> None:
    client = agent_proc.start()
    assert stat.S_IMODE(agent_proc.socket.stat().st_mode) == 0o600
    vid = new_volume_id()
    client.create_volume(vid, "default", 32 * MiB)
    first = client.attach(vid)
    client.close()
    assert "registration failed" in agent_proc.log.read_text()

    assert agent_proc.stop(signal.SIGKILL) == -signal.SIGKILL
    assert agent_proc.socket.is_socket(), "a SIGKILLed agent leaves its socket behind"
    client = agent_proc.start()  # must replace the stale socket
    try:
        assert client.get_attachment(vid) == first
        assert client.attach(vid) == first
        assert [a.volume_id for a in client.list_attachments()] == [vid]
        assert len(bound_under(agent_proc.tmp)) == 1
    finally:
        client.close()

    assert agent_proc.stop(signal.SIGTERM) == 0, agent_proc.log.read_text()
    assert not agent_proc.socket.exists()
    assert [b.path for b in bound_under(agent_proc.tmp)] == [first.backing_device], (
        "SIGTERM must not detach volumes"
    )

    client = agent_proc.start()
    try:
        client.detach(vid)
        client.delete_volume(vid)
        assert client.list_attachments() == []
    finally:
        client.close()
    assert bound_under(agent_proc.tmp) == []
    assert agent_proc.stop(signal.SIGTERM) == 0


def test_refuses_to_replace_a_live_socket(agent_proc: AgentProcess) -> None:
    agent_proc.start().close()
    second = subprocess.run(
        [sys.executable, "-m", "node_agent", "--node-id", "n2", "--management", "unix:///x",
         "--token-file", str(agent_proc.tmp / "token"),
         "--pool", f"default={agent_proc.tmp / 'pool'}", "--socket", str(agent_proc.socket),
         "--dev-dir", str(agent_proc.tmp / "dev"), "--no-register"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert second.returncode != 0 and "another process is serving" in second.stderr
    assert AgentClient(f"unix://{agent_proc.socket}", TOKEN).healthy()
    assert agent_proc.stop(signal.SIGTERM) == 0
