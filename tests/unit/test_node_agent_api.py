"""The node-agent API over a fake transport: contract, auth, problems (no root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from node_agent.agent import Agent
from node_agent.api import create_app
from node_agent.exports import _addresses_of, check_client_address
from node_agent.pools import Pool
from node_agent.transports import BlockDevice, Transport, available_transports
from tessera.errors import InvalidArgument, NotFound
from tessera.ids import new_volume_id
from tessera.models import Connection

MiB = 1024**2
TOKEN = "s3cret"


class FakeTransport:
    """A kernel stand-in: devices live in a dict, sizes are frozen until extended."""

    name = "loop"

    def __init__(self, pools: dict[str, Pool] | None = None) -> None:
        self.pools = pools or {}
        self.by_path: dict[str, BlockDevice] = {}
        self.sizes: dict[str, int] = {}
        self.attach_calls = 0

    def connect(self, volume_id: str, connection: Connection, readonly: bool) -> BlockDevice:
        self.attach_calls += 1
        files = [p.volume_path(volume_id) for p in self.pools.values()]
        volume_file = next((str(f) for f in files if f.is_file()), None)
        if volume_file is None:
            raise NotFound(f"volume {volume_id} is not in any pool on this node")
        dev = BlockDevice(volume_id, f"/dev/fake{len(self.by_path)}", volume_file, readonly, "loop")
        self.by_path[dev.path] = dev
        self.sizes[dev.path] = os.path.getsize(volume_file)
        return dev

    def add_view(self, primary: BlockDevice, view_key: str) -> BlockDevice:
        dev = BlockDevice(
            primary.volume_id, f"/dev/fake{len(self.by_path)}", primary.backing, True, "loop",
            view_key,
        )  # fmt: skip
        self.by_path[dev.path] = dev
        self.sizes[dev.path] = os.path.getsize(primary.backing)
        return dev

    def devices(self) -> list[BlockDevice]:
        return list(self.by_path.values())

    def connection_of(self, device: BlockDevice) -> Connection:
        return Connection()

    def is_current(self, device: BlockDevice, connection: Connection) -> bool:
        return True

    def release(self, device: BlockDevice) -> None:
        self.by_path.pop(device.path, None)

    def disconnect(self, volume_id: str) -> None:
        pass

    def extend(self, device: BlockDevice, min_size_bytes: int = 0) -> None:
        self.sizes[device.path] = os.path.getsize(device.backing)

    def size_bytes(self, device: BlockDevice) -> int:
        return self.sizes[device.path]

    def condition(self, device: BlockDevice, probe: bool = False) -> str:
        return ""

    def connections(self) -> dict[str, float]:
        return {}


@pytest.fixture
def fake() -> FakeTransport:
    return FakeTransport()


@pytest.fixture
def agent(tmp_path: Path, fake: FakeTransport) -> Agent:
    pools = {}
    for name in ("default", "fast"):
        (tmp_path / name).mkdir()
        pools[name] = Pool.open(name, tmp_path / name)
    fake.pools = pools
    return Agent("node-1", pools, tmp_path / "dev", {"loop": fake})


@pytest.fixture
def client(agent: Agent) -> TestClient:
    return TestClient(create_app(agent, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})


def test_transport_protocol_and_registry() -> None:
    assert isinstance(FakeTransport(), Transport)
    assert "loop" in available_transports()


def test_healthz_is_open_and_v1_needs_the_token(agent: Agent) -> None:
    anon = TestClient(create_app(agent, TOKEN))
    assert anon.get("/healthz").json() == {"status": "ok"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        resp = anon.get("/v1/attachments", headers=headers)
        assert resp.status_code == 401
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.json()["type"].endswith("/unauthenticated")


def test_volume_lifecycle(client: TestClient) -> None:
    vid = new_volume_id()
    body = {"pool": "default", "size_bytes": 8 * MiB}
    first = client.put(f"/v1/volumes/{vid}", json=body)
    assert first.status_code == 200, first.text
    assert first.json()["path"].endswith(f"/volumes/{vid}.img")
    assert client.put(f"/v1/volumes/{vid}", json=body).json() == first.json()
    clash = client.put(f"/v1/volumes/{vid}", json={"pool": "default", "size_bytes": MiB})
    assert clash.status_code == 409 and clash.json()["type"].endswith("/already-exists")
    other_pool = client.put(f"/v1/volumes/{vid}", json={"pool": "fast", "size_bytes": 8 * MiB})
    assert other_pool.status_code == 409
    grown = client.post(f"/v1/volumes/{vid}/resize", json={"size_bytes": 16 * MiB})
    assert grown.json()["size_bytes"] == 16 * MiB
    shrink = client.post(f"/v1/volumes/{vid}/resize", json={"size_bytes": MiB})
    assert shrink.status_code == 422 and shrink.json()["field"] == "size_bytes"
    assert client.delete(f"/v1/volumes/{vid}").status_code == 204
    assert client.delete(f"/v1/volumes/{vid}").status_code == 204


def test_validation_errors_are_problems_naming_the_field(client: TestClient) -> None:
    vid = new_volume_id()
    resp = client.put(f"/v1/volumes/{vid}", json={"pool": "default", "size_bytes": 0})
    assert resp.status_code == 422
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["field"] == "size_bytes"
    resp = client.put(f"/v1/volumes/{vid}", json={"pool": "default", "size_bytes": 1, "x": 1})
    assert resp.status_code == 422 and resp.json()["field"] == "x"
    resp = client.put(f"/v1/volumes/{vid}", json={"pool": "nope", "size_bytes": MiB})
    assert resp.status_code == 404 and resp.json()["field"] == "pool"
    resp = client.put("/v1/volumes/not-a-volume", json={"pool": "default", "size_bytes": MiB})
    assert resp.status_code == 422 and resp.json()["field"] == "volume_id"
    assert client.put("/v1/attachments/vol-..", json={}).status_code == 404


def test_attach_is_idempotent_refreshes_and_blocks_delete(
    client: TestClient, agent: Agent, fake: FakeTransport
) -> None:
    vid = new_volume_id()
    client.put(f"/v1/volumes/{vid}", json={"pool": "fast", "size_bytes": 8 * MiB})
    att = client.put(f"/v1/attachments/{vid}", json={})
    assert att.status_code == 200, att.text
    data = att.json()
    link = agent.dev_dir / vid
    assert data["device"] == str(link) and os.readlink(link) == data["backing_device"]
    assert data["readonly"] is False and data["transport"] == "loop"
    # grow behind the device's back: re-attach must refresh, not attach again
    Path(agent.pools["fast"].volume_path(vid)).open("r+b").truncate(12 * MiB)
    again = client.put(f"/v1/attachments/{vid}", json={"readonly": False}).json()
    assert again["backing_device"] == data["backing_device"] and again["size_bytes"] == 12 * MiB
    assert fake.attach_calls == 1
    ro = client.put(f"/v1/attachments/{vid}", json={"readonly": True})
    assert ro.status_code == 409 and ro.json()["field"] == "readonly"
    grown = client.post(f"/v1/volumes/{vid}/resize", json={"size_bytes": 32 * MiB})
    assert grown.status_code == 200
    assert client.get(f"/v1/attachments/{vid}").json()["size_bytes"] == 32 * MiB
    assert [a["volume_id"] for a in client.get("/v1/attachments").json()["items"]] == [vid]
    busy = client.delete(f"/v1/volumes/{vid}")
    assert busy.status_code == 409 and busy.json()["type"].endswith("/failed-precondition")
    assert client.delete(f"/v1/attachments/{vid}").status_code == 204
    assert client.delete(f"/v1/attachments/{vid}").status_code == 204
    assert not link.is_symlink()
    assert client.get(f"/v1/attachments/{vid}").status_code == 404
    assert client.delete(f"/v1/volumes/{vid}").status_code == 204


def test_attach_unknown_volume_is_not_found(client: TestClient) -> None:
    resp = client.put(f"/v1/attachments/{new_volume_id()}", json={})
    assert resp.status_code == 404 and resp.json()["type"].endswith("/not-found")


def test_recover_repairs_links_and_drops_stale_ones(
    client: TestClient, agent: Agent, fake: FakeTransport
) -> None:
    vid, gone = new_volume_id(), new_volume_id()
    client.put(f"/v1/volumes/{vid}", json={"pool": "default", "size_bytes": MiB})
    backing = client.put(f"/v1/attachments/{vid}", json={}).json()["backing_device"]
    (agent.dev_dir / vid).unlink()
    (agent.dev_dir / gone).symlink_to("/dev/fake99")  # device of a volume no longer here
    (agent.dev_dir / "unrelated").write_text("left alone")
    fresh = Agent("node-1", agent.pools, agent.dev_dir, {"loop": fake})
    adopted = fresh.recover()
    assert [a.backing_device for a in adopted] == [backing]
    assert os.readlink(agent.dev_dir / vid) == backing
    assert not (agent.dev_dir / gone).is_symlink()
    assert (agent.dev_dir / "unrelated").read_text() == "left alone"
    assert fake.attach_calls == 1
    fresh.detach(vid)


# ---- exports and keys: validation and the key store (no nbdkit needed) -------------------


@pytest.fixture
def stateful(tmp_path: Path, fake: FakeTransport) -> tuple[Agent, TestClient]:
    """An agent whose state directory (keys, exports) is under tmp_path."""
    (tmp_path / "p").mkdir()
    pools = {"default": Pool.open("default", tmp_path / "p")}
    fake.pools = pools
    agent = Agent(
        "node-1", pools, tmp_path / "dev", {"loop": fake}, state_dir=tmp_path / "state",
        export_address="127.0.0.1",
    )  # fmt: skip
    client = TestClient(create_app(agent, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})
    return agent, client


KEY = "0123456789abcdef" * 4


def test_keys_are_stored_0600_as_identity_colon_key_and_deleted(
    stateful: tuple[Agent, TestClient],
) -> None:
    agent, client = stateful
    vid = new_volume_id()
    body = {"psk_identity": "node-2", "psk_key": KEY}
    assert client.put(f"/v1/keys/{vid}", json=body).status_code == 204
    assert client.put(f"/v1/keys/{vid}", json=body).status_code == 204  # a retry
    path = agent.keys.path(vid)
    assert path.read_text() == f"node-2:{KEY}\n"
    assert path.stat().st_mode & 0o777 == 0o600 and path.parent.stat().st_mode & 0o777 == 0o700
    assert agent.keys.exists(vid)
    assert client.delete(f"/v1/keys/{vid}").status_code == 204
    assert client.delete(f"/v1/keys/{vid}").status_code == 204  # already gone
    assert not agent.keys.exists(vid)


def test_bad_keys_and_export_bodies_are_refused_naming_the_field_never_the_key(
    stateful: tuple[Agent, TestClient],
) -> None:
    _, client = stateful
    vid = new_volume_id()
    client.put(f"/v1/volumes/{vid}", json={"pool": "default", "size_bytes": MiB})
    short = KEY[:-1]
    cases = [
        (f"/v1/keys/{vid}", {"psk_identity": "node-2", "psk_key": short}, "psk_key"),
        (f"/v1/keys/{vid}", {"psk_identity": "../x", "psk_key": KEY}, "psk_identity"),
        ("/v1/keys/not-a-volume", {"psk_identity": "node-2", "psk_key": KEY}, "volume_id"),
        (f"/v1/exports/{vid}/node-2", {"psk_identity": "node-2", "psk_key": short}, "psk_key"),
        (
            f"/v1/exports/{vid}/node-2",
            {"psk_identity": "node-2", "psk_key": KEY, "client_address": "all,deny=x"},
            "client_address",
        ),
        (f"/v1/exports/{vid}/-bad", {"psk_identity": "node-2", "psk_key": KEY}, "client_node"),
    ]
    for path, body, field in cases:
        resp = client.put(path, json=body)
        assert resp.status_code == 422, (path, resp.text)
        assert resp.json()["field"] == field
        assert KEY not in resp.text and short not in resp.text
    assert client.get("/v1/exports").json() == {"items": []}


def test_exporting_a_volume_this_node_does_not_hold_is_not_found(
    stateful: tuple[Agent, TestClient],
) -> None:
    _, client = stateful
    body = {"psk_identity": "node-2", "psk_key": KEY}
    resp = client.put(f"/v1/exports/{new_volume_id()}/node-2", json=body)
    assert resp.status_code == 404 and KEY not in resp.text
    assert client.delete(f"/v1/exports/{new_volume_id()}/node-2").status_code == 204


def test_a_client_named_by_host_name_is_pinned_to_the_addresses_it_resolves_to() -> None:
    assert "127.0.0.1" in _addresses_of("localhost")
    assert _addresses_of("10.1.2.3") == ["10.1.2.3"]
    assert _addresses_of("no-such-host.invalid") == []
    assert check_client_address("node-2.example") == "node-2.example"
    for bad in ("all,anyipv6", "a b", "x\n"):
        with pytest.raises(InvalidArgument):
            check_client_address(bad)
