"""`tessera node list|fence|unfence` as an admin runs them, against a real management.

Management runs as its own process on a unix socket; the CLI runs through
the installed `tessera` console script in an 80-column terminal, and the
tests read what a person reads: exit code, stdout, stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tessera.clients import ManagementClient
from tests.integration.processes import spawn_module

TOKEN = "cli-node-token-0123456789"
TESSERA = Path(sys.executable).parent / "tessera"


@pytest.fixture
def management(tmp_path: Path) -> Iterator[tuple[ManagementClient, dict[str, str]]]:
    with started(tmp_path) as stack:
        yield stack


@contextmanager
def started(tmp_path: Path, *flags: str) -> Iterator[tuple[ManagementClient, dict[str, str]]]:
    """Management with `flags`, nodes n1 and n2 registered; a client and the CLI's environment."""
    sock_dir = Path(tempfile.mkdtemp(prefix="tsn-"))
    sock = sock_dir / "m.sock"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    url = f"unix://{sock}"
    args = ["management", "--listen", url, "--db", f"sqlite:///{tmp_path / 'm.db'}"]
    proc = spawn_module(
        [*args, "--token-file", str(token_file), *flags], tmp_path / "management.log"
    )
    client = ManagementClient(url, TOKEN)
    try:
        deadline = time.monotonic() + 20
        while not client.healthy():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TESSERA_")}
        env.update(COLUMNS="80", TESSERA_MANAGEMENT=url, TESSERA_TOKEN_FILE=str(token_file))
        for node, transports in (("n1", None), ("n2", ["nvme-tcp", "loop", "nvme-tcp"])):
            client.register_node(node, f"unix://{sock_dir}/{node}.sock", {}, 0, transports)
        yield client, env
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(sock_dir, ignore_errors=True)


def tessera(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TESSERA), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_fencing_a_node_that_still_heartbeats_is_refused_and_says_to_pass_force(management):
    _client, env = management
    run = tessera(env, "node", "fence", "n1")
    assert run.returncode == 1 and run.stdout == ""
    assert len(run.stderr.splitlines()) == 1
    assert "node n1 is online" in run.stderr and "--force" in run.stderr
    listed = tessera(env, "node", "list", "-o", "json")
    states = {n["id"]: n["state"] for n in json.loads(listed.stdout)["items"]}
    assert states == {"n1": "online", "n2": "online"}


def test_forced_fence_reports_the_node_fenced_and_node_list_shows_it(management):
    _client, env = management
    run = tessera(env, "node", "fence", "n2", "--force")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "node n2 is fenced; attachments released: none"
    again = tessera(env, "node", "fence", "n2", "-o", "json")  # idempotent, no --force needed
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"node_id": "n2", "state": "fenced", "released": []}
    table = tessera(env, "node", "list")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["ID", "STATE", "LAST", "HEARTBEAT"]
    rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
    assert rows == {"n1": "online", "n2": "FENCED"}


def test_node_list_shows_what_transports_each_node_offers_old_agents_loop_and_nbd(management):
    _client, env = management
    table = tessera(env, "node", "list")
    assert table.returncode == 0, table.stderr
    assert "TRANSPORTS" in table.stdout.splitlines()[0]
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert "loop,nbd" in rows["n1"]  # registered without transports, as older agents do
    assert "loop,nvme-tcp" in rows["n2"]  # in one order, once each
    listed = json.loads(tessera(env, "node", "list", "-o", "json").stdout)["items"]
    assert {n["id"]: n["transports"] for n in listed} == {
        "n1": ["loop", "nbd"],
        "n2": ["loop", "nvme-tcp"],
    }


def test_a_fenced_node_stays_fenced_when_it_beats_until_the_admin_unfences_it(management):
    client, env = management
    assert tessera(env, "node", "fence", "n2", "--force").returncode == 0
    assert client.heartbeat("n2").state.value == "fenced"  # its agent is told to hold nothing
    assert client.get_node("n2").state.value == "fenced"
    run = tessera(env, "node", "unfence", "n2")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "node n2 is online"
    again = tessera(env, "node", "unfence", "n2", "-o", "json")  # idempotent
    assert again.returncode == 0, again.stderr
    node = json.loads(again.stdout)
    assert (node["id"], node["state"], node["fenced_at"]) == ("n2", "online", 0)
    assert client.heartbeat("n2").state.value == "online"


def test_unfencing_an_unknown_node_fails_naming_it(management):
    _client, env = management
    run = tessera(env, "node", "unfence", "ghost")
    assert run.returncode == 1 and "ghost" in run.stderr and "not registered" in run.stderr


def test_fencing_an_unknown_node_fails_naming_it(management):
    _client, env = management
    run = tessera(env, "node", "fence", "ghost")
    assert run.returncode == 1 and "ghost" in run.stderr and "not registered" in run.stderr


def test_an_empty_node_name_is_a_usage_error_that_changes_nothing(management):
    _client, env = management
    run = tessera(env, "node", "fence", " ")
    assert run.returncode == 2 and "NODE must not be empty" in run.stderr


def test_node_list_shows_a_node_that_stopped_beating_as_unreachable(tmp_path):
    # beats are due every 50 ms and one miss counts: the nodes registered here never beat
    with started(tmp_path, "--heartbeat-interval", "0.05", "--heartbeat-misses", "1") as (
        client,
        env,
    ):
        deadline = time.monotonic() + 30
        while client.get_node("n1").state.value != "unreachable":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        table = tessera(env, "node", "list")
        assert table.returncode == 0, table.stderr
        rows = {line.split()[0]: line.split()[1:] for line in table.stdout.splitlines()[1:]}
        assert rows["n1"][0] == "UNREACHABLE" and rows["n1"][2] == "ago"


def test_node_list_shows_nbd_kernel_where_the_agent_has_the_kernel_nbd_client(management):
    from node_agent import capabilities
    from node_agent.registration import Registrar

    client, env = management
    with_kernel = Registrar(client, "n3", "unix:///run/n3.sock", dict, transports=["loop", "nbd"])
    with_kernel.kernel_nbd = True  # as probed on a host with nbd.ko and nbd-client (the VM's)
    with_kernel.register()
    here = Registrar(client, "n4", "unix:///run/n4.sock", dict, transports=["loop", "nbd"])
    here.register()  # probes this host
    table = tessera(env, "node", "list")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line for line in table.stdout.splitlines()[1:]}
    assert "loop,nbd (kernel)" in rows["n3"]  # nbd legs of composed volumes can come here
    assert "(kernel)" not in rows["n1"]  # an agent that did not say: nbdfuse only
    listed = json.loads(tessera(env, "node", "list", "-o", "json").stdout)["items"]
    kernel = {n["id"]: n["kernel_nbd"] for n in listed}
    assert kernel == {
        "n1": False,
        "n2": False,
        "n3": True,
        "n4": not capabilities.kernel_nbd_missing(),
    }
