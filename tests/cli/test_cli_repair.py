"""`tessera volume show` / `tessera volume repair [--wait]` on a mirrored volume, and
management's `--auto-repair`, as an operator runs them.

Management runs as its own process on a unix socket; three agents (real sparse files,
the consumer side reporting what the composed transport would: md itself runs in the
VM suite) serve n1..n3 in this process; the CLI runs as the installed console script
in an 80-column terminal.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from tessera.clients import ManagementClient
from tessera.models import (
    AccessMode,
    AgentAttach,
    VolumeCreate,
    VpgCreate,
)
from tests.cli.conftest import TESSERA
from tests.integration.processes import spawn_module
from tests.unit.management_fixtures import FakeAgent, served_agent

TOKEN = "cli-repair-token-0123456789"
NVME = ["loop", "nbd", "nvme-tcp"]
GiB = 1024**3


@dataclass
class Mirror:
    client: ManagementClient
    agents: dict[str, FakeAgent]
    env: dict[str, str]
    volume_id: str
    other: str  # the node of leg 1


@contextmanager
def mirror(
    tmp_path: Path, *flags: str, offers: dict[str, list[str]] | None = None
) -> Iterator[Mirror]:
    """A raid1 volume on n1 (leg 0) and another node, attached to n1, n3 spare.

    Every node offers nvme-tcp unless `offers` says otherwise; n1 has the kernel nbd
    client (nbd legs can come to it)."""
    sock_dir = Path(tempfile.mkdtemp(prefix="tcr-"))
    url = f"unix://{sock_dir / 'm.sock'}"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    db = f"sqlite:///{tmp_path / 'm.db'}"
    args = ["management", "--listen", url, "--db", db, "--token-file", str(token_file)]
    proc = spawn_module([*args, "--vpg", "safe=raid1", *flags], tmp_path / "management.log")
    client = ManagementClient(url, TOKEN)
    try:
        with ExitStack() as stack:
            agents = {}
            for n in ("n1", "n2", "n3"):
                agent = FakeAgent(
                    root=tmp_path / n, socket=sock_dir / f"{n}.sock", token=TOKEN, node_id=n
                )
                agents[n] = stack.enter_context(served_agent(agent))
            deadline = time.monotonic() + 20
            while not client.healthy():
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            for n, agent in agents.items():
                transports = (offers or {}).get(n, NVME)
                client.register_node(n, agent.url, {}, 0, transports, kernel_nbd=n == "n1")
                client.register_pool(n, "p", 10 * GiB)
            client.create_vpg(VpgCreate(name="safe", layout="raid1"))
            vol = client.create_volume(
                VolumeCreate(name="db", size_bytes=GiB, vpg="safe", requisite_nodes=["n1"])
            )
            att = client.attach(vol.id, "n1", AccessMode.SINGLE_NODE_WRITER, False)
            agents["n1"].attached[vol.id] = AgentAttach(connection=att.connection)
            env = {
                "PATH": "/usr/bin:/bin",
                "COLUMNS": "80",
                "TESSERA_MANAGEMENT": url,
                "TESSERA_TOKEN_FILE": str(token_file),
            }
            yield Mirror(client, agents, env, vol.id, vol.legs[1].node_id)
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(sock_dir, ignore_errors=True)


def tessera(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    import subprocess

    done = subprocess.run(
        [str(TESSERA), *args], capture_output=True, text=True, env=env, timeout=60,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return done.returncode, done.stdout, done.stderr


def test_volume_show_lists_each_leg_and_repair_wait_follows_the_resync(tmp_path: Path):
    with mirror(tmp_path) as m:
        code, out, err = tessera(m.env, "volume", "show", "db")
        assert code == 0, err
        assert "n1/p 1.0 GiB in_sync" in out and f"{m.other}/p 1.0 GiB in_sync" in out
        m.agents["n1"].conditions[m.volume_id] = f"degraded: leg 1 ({m.other}) failed"
        code, out, err = tessera(m.env, "volume", "show", "db")
        assert f"degraded: leg 1 on {m.other}: failed" in out.replace("\n", " "), out

        spare = ({"n2", "n3"} - {m.other}).pop()
        code, out, err = tessera(m.env, "volume", "repair", "db")
        assert code == 0, err
        assert f"leg 1 on {spare} rebuilding" in out and f"leg 1 on {m.other} stale" in out

        m.agents["n1"].conditions[m.volume_id] = f"resyncing leg 1 ({spare}): 43%"
        finish = threading.Timer(
            1.0, lambda: m.agents["n1"].conditions.__setitem__(m.volume_id, "")
        )
        finish.start()
        try:
            code, out, err = tessera(m.env, "volume", "repair", "db", "--wait", "--interval", "0.2")
        finally:
            finish.cancel()
        assert code == 0, err
        lines = out.strip().splitlines()
        assert any("43%" in line for line in lines), out  # progress shown while it ran
        assert lines[-1].endswith(": in sync") and f"leg 1 on {spare} in_sync" in lines[-1]
        code, out, _ = tessera(m.env, "volume", "show", "db", "-o", "json")
        legs = json.loads(out)["legs"]
        assert [(leg["node_id"], leg["state"]) for leg in legs] == [
            ("n1", "in_sync"),
            (spare, "in_sync"),
            (m.other, "stale"),
        ]


def test_repairing_a_volume_that_cannot_be_repaired_is_one_line_saying_why(tmp_path: Path):
    with mirror(tmp_path) as m:
        concat = m.client.create_volume(VolumeCreate(name="plain", size_bytes=GiB))
        code, out, err = tessera(m.env, "volume", "repair", concat.name)
        assert code == 1 and out == ""
        assert "only mirrored volumes" in err and "Traceback" not in err


def test_auto_repair_replaces_a_failed_leg_by_itself(tmp_path: Path):
    with mirror(tmp_path, "--auto-repair", "--auto-repair-interval", "0.2") as m:
        m.agents["n1"].conditions[m.volume_id] = f"degraded: leg 1 ({m.other}) failed"
        deadline = time.monotonic() + 30
        while True:
            legs = m.client.get_volume(m.volume_id).legs
            if any(leg.state == "stale" for leg in legs):
                break
            assert time.monotonic() < deadline, legs
            time.sleep(0.1)
        assert legs[1].node_id not in ("n1", m.other)
        m.agents["n1"].conditions[m.volume_id] = ""
        while m.client.get_volume(m.volume_id).legs[1].state != "in_sync":
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_without_auto_repair_a_failed_leg_waits_for_the_operator(tmp_path: Path):
    with mirror(tmp_path, "--auto-repair-interval", "0.2") as m:
        m.agents["n1"].conditions[m.volume_id] = f"degraded: leg 1 ({m.other}) failed"
        time.sleep(1.0)  # five intervals in which an enabled loop would have acted
        assert m.agents["n1"].calls.count(("get_attachment", m.volume_id)) == 0
        got = m.client.get_volume(m.volume_id)  # shows it (asking the consumer), repairs not
        assert [leg.node_id for leg in got.legs] == ["n1", m.other]
        assert f"degraded: leg 1 on {m.other}: failed" in got.condition


def test_volume_show_says_over_which_transport_the_using_node_reaches_each_leg(tmp_path: Path):
    with mirror(tmp_path, offers={"n2": ["loop", "nbd"]}) as m:
        over = {"n2": "nbd", "n3": "nvme-tcp"}[m.other]  # n2 serves nbd only
        code, out, err = tessera(m.env, "volume", "show", "db")
        assert code == 0, err
        text = " ".join(out.split())  # the value column may wrap
        assert "n1/p 1.0 GiB in_sync, n1 over loop" in text, out
        assert f"{m.other}/p 1.0 GiB in_sync, n1 over {over}" in text, out
        plain = m.client.create_volume(
            VolumeCreate(name="plain", size_bytes=GiB, requisite_nodes=["n3"])
        )
        m.client.attach(plain.id, "n1", AccessMode.SINGLE_NODE_WRITER, False)
        code, out, err = tessera(m.env, "volume", "show", "plain")
        assert code == 0, err
        assert "n1 (SINGLE_NODE_WRITER) over nvme-tcp" in " ".join(out.split()), out
