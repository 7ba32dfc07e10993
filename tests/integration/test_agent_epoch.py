"""What an agent does with heartbeat replies it must not trust, and how fast it answers them.

Real parts throughout: nbdkit exports, an nbdfuse + loop connection on the
consumer side, a real management process on SQLite. What a user would
notice if these broke: every pod's filesystem turning to EIO after
management lost its database, or a healthy node marked unreachable while
its agent closes exports.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent.agent import Agent
from node_agent.exports import CLOSE_GRACE
from node_agent.registration import EPOCH_FILE, Follower, Registrar
from tessera.clients import ManagementClient
from tessera.ids import new_volume_id
from tessera.models import (
    AgentExportCreate,
    AgentKey,
    Connection,
    ExportRef,
    HeartbeatReply,
    NodeState,
    Transport,
)
from tests.conftest import needs_root
from tests.integration.processes import processes as management_processes
from tests.integration.test_exports import (
    CLIENT,
    TOKEN,
    AgentNode,
    MiB,
    agent_nodes,
    exporting_agent,
    in_process_agent,
    nbd_client,
    new_key,
    new_volume,
    read_range,
)

pytestmark = [needs_root, pytest.mark.root]

ONLINE = NodeState.ONLINE


@pytest.fixture
def owner(tmp_path: Path) -> Iterator[Agent]:
    with exporting_agent(tmp_path) as agent:
        yield agent


def export_one(agent: Agent, key: str | None = None) -> str:
    volume_id = new_volume_id()
    agent.create_volume(volume_id, "default", 8 * MiB)
    with open(agent.pools["default"].volume_path(volume_id), "r+b") as f:
        f.write(os.urandom(8 * MiB))
    req = AgentExportCreate(psk_identity=CLIENT, psk_key=key or new_key())
    agent.export(volume_id, CLIENT, req)
    return volume_id


def exported(agent: Agent) -> set[str]:
    return {e.volume_id for e in agent.exports.list()}


def test_a_replaced_management_database_closes_no_export_and_no_connection_until_adopted(
    tmp_path: Path, owner: Agent, caplog: pytest.LogCaptureFixture
) -> None:
    consumer = in_process_agent(tmp_path, CLIENT, with_transports=True)
    key = new_key()
    volume_id = export_one(owner, key)
    exp = owner.exports.of_volume(volume_id)[0]
    consumer.put_key(volume_id, AgentKey(psk_identity=CLIENT, psk_key=key))
    connection = Connection(
        transport=Transport.NBD, owner_node="owner", host=exp.host, port=exp.port,
        psk_identity=CLIENT,
    )  # fmt: skip
    attachment = consumer.attach(volume_id, False, connection)
    try:
        owners, consumers = Follower(owner), Follower(consumer)
        wanted = [ExportRef(volume_id=volume_id, client_node=CLIENT)]
        assert owners.follow(
            HeartbeatReply(state=ONLINE, epoch="db-1", exports=wanted), owners.mark()
        )
        assert consumers.follow(
            HeartbeatReply(state=ONLINE, epoch="db-1", attachments=[volume_id]), consumers.mark()
        )
        epoch_file = owner.state_dir / EPOCH_FILE
        assert epoch_file.read_text() == "db-1\n" and epoch_file.stat().st_mode & 0o777 == 0o600

        # management lost its database (a new one: db-2), or an older management without
        # epochs answers: either lists nothing of this node
        with caplog.at_level(logging.ERROR, logger="node_agent.registration"):
            for epoch in ("db-2", "db-2", "", "db-2"):
                lost = HeartbeatReply(state=ONLINE, epoch=epoch)
                assert not owners.follow(lost, owners.mark())
                assert not consumers.follow(lost, consumers.mark())
        assert exported(owner) == {volume_id}
        assert [a.volume_id for a in consumer.list_attachments()] == [volume_id]
        expected = owner.pools["default"].volume_path(volume_id).read_bytes()[:MiB]
        assert read_range(Path(attachment.backing_device), 0, MiB) == expected
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 4, "one error per follower and distinct epoch, not one per beat"
        assert "db-2" in errors[0] and "db-1" in errors[0] and str(epoch_file) in errors[0]
        assert "not the one this node registered with" in errors[0]
        assert epoch_file.read_text() == "db-1\n"

        # the admin says the database was replaced on purpose: the next beat adopts it
        epoch_file.unlink()
        (consumer.state_dir / EPOCH_FILE).unlink()
        lost = HeartbeatReply(state=ONLINE, epoch="db-2")
        assert owners.follow(lost, owners.mark())
        assert consumers.follow(lost, consumers.mark())
        assert exported(owner) == set()
        assert consumer.list_attachments() == []
        assert epoch_file.read_text() == "db-2\n"
    finally:
        for att in consumer.list_attachments():
            consumer.detach(att.volume_id)


def test_an_older_management_without_epochs_is_followed_while_no_epoch_is_known(
    owner: Agent,
) -> None:
    kept, dropped = export_one(owner), export_one(owner)
    follower = Follower(owner)
    old = HeartbeatReply(state=ONLINE, exports=[ExportRef(volume_id=kept, client_node=CLIENT)])
    assert follower.follow(old, follower.mark())
    assert exported(owner) == {kept} and dropped not in exported(owner)
    assert not (owner.state_dir / EPOCH_FILE).exists(), "an empty epoch is never persisted"


# ---- real processes -----------------------------------------------------------------------


def test_management_restarted_on_an_empty_database_closes_no_export_of_a_running_agent(
    tmp_path: Path,
) -> None:
    with management_processes(tmp_path) as procs, agent_nodes(tmp_path) as nodes:
        procs.token_file.write_text(TOKEN + "\n")
        procs.start_management()
        node = AgentNode(tmp_path, "n1", management=procs.management_url)
        node.extra = ["--heartbeat-interval", "0.2"]
        nodes.append(node)
        client = node.start()
        epoch_file = node.state / EPOCH_FILE
        wait_for(lambda: epoch_file.exists(), node, "the first epoch was not persisted")
        first = epoch_file.read_text().strip()

        # management goes away; meanwhile management (the old one) exported a volume
        procs.procs["management"].send_signal(signal.SIGTERM)
        procs.procs["management"].wait(timeout=30)
        vid = new_volume(client, node)
        key = new_key()
        host, port = node.export(client, vid, key)
        (tmp_path / "management.db").unlink()  # its database is lost
        procs.start_management()
        log_has = "is not the one this node registered with"
        wait_for(lambda: log_has in node.log.read_text(), node, "no error about the epoch")
        time.sleep(1.0)  # five more beats, each answered by the new database
        text = node.log.read_text()
        assert text.count(log_has) == 1 and first in text
        assert [e.volume_id for e in client.list_exports()] == [vid]
        with nbd_client(tmp_path, host, port, key) as data:
            assert read_range(data, 0, MiB) == node.volume_file(vid).read_bytes()[:MiB]

        epoch_file.unlink()  # the admin: the new database is meant
        wait_for(lambda: not client.list_exports(), node, "the export was not reaped")
        assert epoch_file.read_text().strip() not in ("", first)
        client.close()


def wait_for(condition: object, node: AgentNode, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}:\n{node.log.read_text()}"
        time.sleep(0.05)


def test_closing_exports_with_connected_clients_does_not_delay_the_next_heartbeat(
    tmp_path: Path, owner: Agent
) -> None:
    """Each busy export takes CLOSE_GRACE to stop (nbdkit serves its clients on SIGTERM)."""
    keys = [new_key() for _ in range(3)]
    volumes = [export_one(owner, key) for key in keys]
    with management_processes(tmp_path) as procs:
        procs.token_file.write_text(TOKEN + "\n")
        procs.start_management()
        mgmt = ManagementClient(procs.management_url, TOKEN)
        registrar = Registrar(
            mgmt, "owner", "unix:///nowhere.sock", owner.pool_capacities,
            follower=Follower(owner),
        )  # fmt: skip
        registrar.register()
        with (
            nbd_client(tmp_path, "127.0.0.1", _port(owner, volumes[0]), keys[0]) as a,
            nbd_client(tmp_path, "127.0.0.1", _port(owner, volumes[1]), keys[1]) as b,
            nbd_client(tmp_path, "127.0.0.1", _port(owner, volumes[2]), keys[2]) as c,
        ):
            for data in (a, b, c):
                assert read_range(data, 0, 4096)  # connected and served
            started = time.monotonic()
            registrar.beat()  # management knows none of them: all three are unwanted
            beat = time.monotonic() - started
            assert registrar.settle(60)
            cleanup = time.monotonic() - started
        mgmt.close()
    assert exported(owner) == set()
    assert cleanup >= 2 * CLOSE_GRACE, "the clients did not hold their exports open"
    assert beat < CLOSE_GRACE, f"the heartbeat waited {beat:.1f}s for the exports to close"


def _port(agent: Agent, volume_id: str) -> int:
    return agent.exports.of_volume(volume_id)[0].port
