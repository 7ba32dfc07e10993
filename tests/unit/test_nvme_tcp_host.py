"""nvme-tcp on the host side, where it can be real without the nvme modules.

The kernel data path itself (nvmet in configfs, DH-HMAC-CHAP, the namespace
in sysfs) is tested in the VM: tests/vm/guest/test_nvme_tcp.py. Here: what
this host offers (checked against modinfo, an independent reader of the
same kernel), the connect options and refusals (no secret in any message
or log line), and the validation both sides do before touching the kernel.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from node_agent import capabilities
from node_agent.__main__ import parse_args
from node_agent.agent import Agent
from node_agent.api import create_app
from node_agent.nvme_exports import DEFAULT_NVME_PORT, NvmeExports, NvmeRecord
from node_agent.pools import Pool
from node_agent.transports.nvme_tcp import NvmeTcpTransport
from tessera.errors import FailedPrecondition, InvalidArgument, Unavailable
from tessera.ids import new_volume_id
from tessera.models import AgentExportCreate, Connection, Transport
from tessera.nvme_names import (
    ctrl_secret_of,
    dhchap_ctrl_secret,
    dhchap_secret,
    host_nqn,
    subsystem_nqn,
)
from tessera.system import nvme_host, nvmet

KEY = "0123456789abcdef" * 4
SECRET = dhchap_secret(KEY)
TOKEN = "s3cret"
MiB = 1024**2


#: as root where nvme-tcp is loadable, connect() would load it and really connect
_HOST_MODULES_MISSING = bool(capabilities.missing_modules(("nvme_tcp",)))


def _target(volume_id: str = "vol-1") -> nvme_host.Target:
    return nvme_host.Target(
        "10.0.0.2",
        4420,
        subsystem_nqn(volume_id, "node-a"),
        host_nqn("node-b", volume_id),
        "6c1f7f3e-0000-4000-8000-000000000000",
    )


# ---- what this host offers -----------------------------------------------------------


def _modinfo_knows(module: str) -> bool:
    """modinfo (kmod) finds loadable and built-in modules of the running kernel."""
    done = subprocess.run(["modinfo", module], capture_output=True, check=False)
    return done.returncode == 0 or Path(f"/sys/module/{module}").exists()


@pytest.mark.skipif(shutil.which("modinfo") is None, reason="needs modinfo (package kmod)")
def test_nvme_tcp_is_offered_exactly_when_the_kernel_has_its_modules() -> None:
    offered = capabilities.host_transports()
    assert offered[0] == Transport.LOOP
    kernel_has = all(_modinfo_knows(m) for m in capabilities.NVME_MODULES)
    if not kernel_has:
        assert Transport.NVME_TCP not in offered
        missing = capabilities.nvme_tcp_missing()
        assert any(m in " ".join(missing) for m in capabilities.NVME_MODULES), missing
    elif capabilities.configfs_usable():
        assert Transport.NVME_TCP in offered


def test_nbd_is_offered_exactly_when_nbdkit_and_nbdfuse_are_installed() -> None:
    tools = shutil.which("nbdkit") is not None and shutil.which("nbdfuse") is not None
    assert (Transport.NBD in capabilities.host_transports()) == tools


def test_loadable_modules_are_read_from_modules_dep_and_builtin(tmp_path: Path) -> None:
    release = tmp_path / "6.12.0-test"
    release.mkdir()
    (release / "modules.dep").write_text(
        "kernel/drivers/nvme/host/nvme-tcp.ko.xz: kernel/drivers/nvme/host/nvme-fabrics.ko.xz\n"
        "kernel/drivers/nvme/target/nvmet-tcp.ko.xz: kernel/drivers/nvme/target/nvmet.ko.xz\n"
    )
    (release / "modules.builtin").write_text("kernel/drivers/md/dm-mod.ko\n")
    found = capabilities.kernel_modules("6.12.0-test", tmp_path)
    assert {"nvme_tcp", "nvmet_tcp", "dm_mod"} <= found
    assert "nvme_auth" not in found
    no_sys = tmp_path / "no-sys-module"
    assert capabilities.missing_modules(capabilities.NVME_MODULES, found, no_sys) == ["nvme_auth"]


def test_the_nvme_port_flag_defaults_to_4420_and_refuses_a_non_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["--node-id", "n1", "--management", "unix:///x", "--token-file", "t", "--socket", "s",
            "--pool", "p=/tmp"]  # fmt: skip
    assert parse_args(base).nvme_port == DEFAULT_NVME_PORT == 4420
    assert parse_args([*base, "--nvme-port", "4421"]).nvme_port == 4421
    for bad in ("0", "65536", "x"):
        with pytest.raises(SystemExit):
            parse_args([*base, "--nvme-port", bad])
        assert "--nvme-port" in capsys.readouterr().err


# ---- connect options and refusals: never the secret --------------------------------------


def test_connect_options_carry_the_identity_key_and_loss_policy() -> None:
    single = nvme_host.fabrics_options(_target(), SECRET, nvme_host.SINGLE_LEG).split(",")
    assert "transport=tcp" in single and "traddr=10.0.0.2" in single and "trsvcid=4420" in single
    assert f"nqn={subsystem_nqn('vol-1', 'node-a')}" in single
    assert f"hostnqn={host_nqn('node-b', 'vol-1')}" in single
    assert "hostid=6c1f7f3e-0000-4000-8000-000000000000" in single
    assert f"dhchap_secret={SECRET}" in single
    # a whole volume waits for its target; a mirror leg fails fast so md carries on
    assert {"ctrl_loss_tmo=600", "reconnect_delay=2", "fast_io_fail_tmo=-1"} <= set(single)
    mirror = nvme_host.fabrics_options(_target(), SECRET, nvme_host.MIRROR_LEG).split(",")
    assert {"ctrl_loss_tmo=60", "fast_io_fail_tmo=5"} <= set(mirror)


def test_an_option_that_would_smuggle_in_another_is_refused_without_echoing_it() -> None:
    bad = nvme_host.Target("10.0.0.2,nqn=x", 4420, "nqn.a", "nqn.b")
    with pytest.raises(ValueError, match="traddr") as err:
        nvme_host.fabrics_options(bad, SECRET, nvme_host.SINGLE_LEG)
    assert "nqn=x" not in str(err.value)
    with pytest.raises(ValueError, match="dhchap_secret") as err:
        nvme_host.fabrics_options(_target(), SECRET + ",x=1", nvme_host.SINGLE_LEG)
    assert SECRET not in str(err.value)


def test_a_refused_connect_says_why_and_names_the_target_never_the_key() -> None:
    target = _target()
    message = nvme_host._refusal(target, OSError(errno.EKEYREJECTED, "Key was rejected"))
    assert "authentication failed" in message and target.subsystem_nqn in message
    assert "10.0.0.2:4420" in message and SECRET not in message and KEY not in message
    refused = nvme_host._refusal(target, OSError(errno.ECONNREFUSED, "Connection refused"))
    assert "no nvmet port listening" in refused


@pytest.mark.skipif(
    nvme_host.FABRICS_DEVICE.exists() or (os.geteuid() == 0 and not _HOST_MODULES_MISSING),
    reason="this host can connect (or load nvme-tcp and then connect): see the VM suite",
)
def test_connecting_without_the_nvme_modules_fails_plainly_and_logs_no_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(FailedPrecondition, match="cannot attach over nvme-tcp") as err:
        nvme_host.connect(_target(), SECRET, nvme_host.SINGLE_LEG)
    assert SECRET not in str(err.value) and SECRET not in caplog.text


# ---- validation before the kernel ------------------------------------------------------------


def test_only_well_formed_nqns_become_configfs_names_and_only_our_own_subsystems_are_touched() -> (
    None
):
    volume_id = new_volume_id()
    ours = subsystem_nqn(volume_id, "node-a")
    assert nvmet.check_nqn(ours) == ours
    for bad in ("nqn.x/../../ports", "iqn.2001-04.com.example:x", "nqn." + "a" * 230, "nqn.a b"):
        with pytest.raises(ValueError):
            nvmet.check_nqn(bad)
    assert nvmet.owned_subsystem(ours, "node-a") == volume_id
    assert nvmet.owned_subsystem(ours, "node-b") is None  # another node's, same kernel
    assert nvmet.owned_subsystem(subsystem_nqn(volume_id, "a"), "node-a") is None
    with pytest.raises(ValueError, match="not node node-b's"):
        nvmet.Nvmet("node-b", Path("/nonexistent")).remove_subsystem(ours)


def _write_key(directory: Path, volume_id: str, identity: str = "node-b") -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / f"{volume_id}.psk"
    path.write_text(f"{identity}:{KEY}\n")
    return path


def _connection(volume_id: str, owner: str = "node-a") -> Connection:
    return Connection(
        transport=Transport.NVME_TCP,
        owner_node=owner,
        host="10.0.0.2",
        port=4420,
        psk_identity="node-b",
        subsystem_nqn=subsystem_nqn(volume_id, owner),
    )


def test_the_consumer_refuses_read_only_and_another_volumes_subsystem_before_connecting(
    tmp_path: Path,
) -> None:
    volume_id, other = new_volume_id(), new_volume_id()
    keys = tmp_path / "keys"
    transport = NvmeTcpTransport(tmp_path / "conn", lambda v: keys / f"{v}.psk")
    _write_key(keys, volume_id)
    with pytest.raises(InvalidArgument) as err:
        transport.connect(volume_id, _connection(volume_id), readonly=True)
    assert err.value.field == "readonly"
    forged = _connection(volume_id).model_copy(
        update={"subsystem_nqn": subsystem_nqn(other, "node-a")}
    )
    with pytest.raises(InvalidArgument, match="not volume") as err:
        transport.connect(volume_id, forged, readonly=False)
    assert err.value.field == "publish_context"
    missing = new_volume_id()
    with pytest.raises(FailedPrecondition, match="no key"):
        transport.connect(missing, _connection(missing), readonly=False)
    assert transport.connections() == {} and transport.devices() == []


@pytest.mark.skipif(
    nvme_host.FABRICS_DEVICE.exists() or (os.geteuid() == 0 and not _HOST_MODULES_MISSING),
    reason="this host can connect (or load nvme-tcp and then connect): see the VM suite",
)
def test_a_failed_first_connect_leaves_no_record_and_no_key_in_its_error(tmp_path: Path) -> None:
    volume_id = new_volume_id()
    keys = tmp_path / "keys"
    _write_key(keys, volume_id)
    transport = NvmeTcpTransport(tmp_path / "conn", lambda v: keys / f"{v}.psk")
    with pytest.raises(FailedPrecondition) as err:
        transport.connect(volume_id, _connection(volume_id), readonly=False)
    assert KEY not in str(err.value) and SECRET not in str(err.value)
    assert transport.connections() == {}
    assert not any((tmp_path / "conn").glob("*.json"))


@pytest.fixture
def agent_client(tmp_path: Path) -> tuple[Agent, TestClient]:
    (tmp_path / "p").mkdir()
    pools = {"default": Pool.open("default", tmp_path / "p")}
    agent = Agent(
        "node-a", pools, tmp_path / "dev", {}, state_dir=tmp_path / "state",
        export_address="127.0.0.1",
    )  # fmt: skip
    client = TestClient(create_app(agent, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})
    return agent, client


def test_a_read_only_nvme_tcp_export_is_refused_naming_readonly(
    agent_client: tuple[Agent, TestClient],
) -> None:
    agent, client = agent_client
    vid = new_volume_id()
    assert client.put(f"/v1/volumes/{vid}", json={"pool": "default", "size_bytes": MiB}).is_success
    body = {"transport": "nvme-tcp", "psk_identity": "node-b", "psk_key": KEY, "readonly": True}
    resp = client.put(f"/v1/exports/{vid}/node-b", json=body)
    assert 400 <= resp.status_code < 500 and resp.json()["field"] == "readonly", resp.text
    assert KEY not in resp.text
    assert client.get("/v1/exports").json() == {"items": []}
    assert not any((agent.state_dir / "nvme-exports").rglob("*.*"))


@pytest.mark.skipif(
    not capabilities.missing_modules(("nvmet_tcp",)) or Path("/sys/kernel/config/nvmet").exists(),
    reason="this host has nvmet: exporting would really start serving (see the VM suite)",
)
def test_an_nvme_tcp_export_where_nvmet_is_missing_is_refused_and_leaves_no_record(
    agent_client: tuple[Agent, TestClient],
) -> None:
    agent, client = agent_client
    vid = new_volume_id()
    assert client.put(f"/v1/volumes/{vid}", json={"pool": "default", "size_bytes": MiB}).is_success
    body = {"transport": "nvme-tcp", "psk_identity": "node-b", "psk_key": KEY}
    resp = client.put(f"/v1/exports/{vid}/node-b", json=body)
    assert resp.status_code in (400, 409, 412), resp.text
    assert "nvme-tcp" in resp.text and KEY not in resp.text and SECRET not in resp.text
    assert client.get("/v1/exports").json() == {"items": []}
    assert not any((agent.state_dir / "nvme-exports").rglob("*.*"))
    # the volume can be deleted: nothing counts as exported
    assert client.delete(f"/v1/volumes/{vid}").status_code == 204


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nbdkit") is None, reason="needs root, nbdkit"
)
@pytest.mark.skipif(
    not capabilities.missing_modules(("nvmet_tcp",)) or Path("/sys/kernel/config/nvmet").exists(),
    reason="this host has nvmet: exporting would really start serving (see the VM suite)",
)
def test_a_switch_to_nvme_tcp_that_fails_keeps_the_nbd_export_serving(
    agent_client: tuple[Agent, TestClient],
) -> None:
    agent, client = agent_client
    vid = new_volume_id()
    assert client.put(f"/v1/volumes/{vid}", json={"pool": "default", "size_bytes": MiB}).is_success
    nbd = client.put(f"/v1/exports/{vid}/node-b", json={"psk_identity": "node-b", "psk_key": KEY})
    assert nbd.status_code == 200, nbd.text
    try:
        body = {"transport": "nvme-tcp", "psk_identity": "node-b", "psk_key": KEY}
        assert client.put(f"/v1/exports/{vid}/node-b", json=body).status_code >= 400
        listed = client.get("/v1/exports").json()["items"]
        assert [(e["transport"], e["port"]) for e in listed] == [("nbd", nbd.json()["port"])]
        assert agent.exports.liveness() == [True]
    finally:
        assert client.delete(f"/v1/exports/{vid}/node-b").status_code == 204
    assert client.get("/v1/exports").json() == {"items": []}


# ---- the owner's bookkeeping around configfs ----------------------------------------------
#
# This host has no nvmet: `NoKernel` skips the configfs step (`_apply`, which the
# VM suite runs for real) and keeps everything around it real: records, keys, the
# NBD export beside it, and configfs trees laid out as nvmet lays them out.


class NoKernel(NvmeExports):
    """NvmeExports whose kernel step records what it was asked, or fails when told to."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.applied: list[NvmeRecord] = []
        self.fail: Exception | None = None

    def _apply(self, record: NvmeRecord, key_hex: str) -> None:
        self.applied.append(record)
        if self.fail is not None:
            raise self.fail


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("nbdkit") is None, reason="needs root, nbdkit"
)
def test_an_export_switched_from_nbd_to_nvme_tcp_survives_a_heartbeat_sent_before_the_switch(
    agent_client: tuple[Agent, TestClient], tmp_path: Path
) -> None:
    agent, client = agent_client
    agent.exports.nvme = NoKernel(
        agent.state_dir / "nvme-exports", "node-a", "127.0.0.1", configfs=tmp_path / "no-cfs"
    )
    vid = new_volume_id()
    assert client.put(f"/v1/volumes/{vid}", json={"pool": "default", "size_bytes": MiB}).is_success
    nbd = client.put(f"/v1/exports/{vid}/node-b", json={"psk_identity": "node-b", "psk_key": KEY})
    assert nbd.status_code == 200, nbd.text
    try:
        mark = agent.exports.mark()  # a heartbeat goes out; its reply comes after the switch
        body = {"transport": "nvme-tcp", "psk_identity": "node-b", "psk_key": KEY}
        switched = client.put(f"/v1/exports/{vid}/node-b", json=body)
        assert switched.status_code == 200, switched.text
        assert agent.reap_exports(set(), mark) == []
        listed = client.get("/v1/exports").json()["items"]
        assert [e["transport"] for e in listed] == ["nvme-tcp"]
        # a heartbeat sent after the switch that does not list it: reaped
        assert agent.reap_exports(set(), agent.exports.mark()) == [(vid, "node-b")]
    finally:
        client.delete(f"/v1/exports/{vid}/node-b")
    assert client.get("/v1/exports").json() == {"items": []}


def test_a_new_key_still_drops_old_controllers_when_the_first_try_crashed(tmp_path: Path) -> None:
    exports = NoKernel(tmp_path / "nvme", "node-a", "127.0.0.1", configfs=tmp_path / "no-cfs")
    vid, other = new_volume_id(), "ab" * 32
    req = AgentExportCreate(transport=Transport.NVME_TCP, psk_identity="node-b", psk_key=KEY)
    exports.open(vid, "node-b", tmp_path / "v.img", req)
    assert exports.applied[-1].rekey is False  # a first export: nobody to drop
    exports.fail = FailedPrecondition("crashed after the new key was written")
    rekey = req.model_copy(update={"psk_key": other})
    with pytest.raises(FailedPrecondition):
        exports.open(vid, "node-b", tmp_path / "v.img", rekey)
    exports.fail = None
    exports.open(vid, "node-b", tmp_path / "v.img", rekey)  # the retry: same (new) key
    assert exports.applied[-1].rekey is True, "the retry must still drop old controllers"
    exports.open(vid, "node-b", tmp_path / "v.img", rekey)
    assert exports.applied[-1].rekey is False  # done once: a later call drops nobody
    exports.close(vid, "node-b")


def _configfs(root: Path, owner: str, vid: str, hosts: list[str]) -> tuple[Path, Path]:
    """A configfs tree as nvmet has it for one subsystem on one port: (nvmet, port link)."""
    nvmet_dir = root / "nvmet"
    subnqn = subsystem_nqn(vid, owner)
    subsystem = nvmet_dir / "subsystems" / subnqn
    (subsystem / "allowed_hosts").mkdir(parents=True)
    (subsystem / "namespaces" / "1").mkdir(parents=True)
    (subsystem / "namespaces" / "1" / "enable").write_text("1\n")
    for client in hosts:
        host = nvmet_dir / "hosts" / host_nqn(client, vid)
        host.mkdir(parents=True)
        (subsystem / "allowed_hosts" / host.name).symlink_to(host)
    port = nvmet_dir / "ports" / "7"
    (port / "subsystems").mkdir(parents=True)
    for name, value in (("addr_trtype", "tcp"), ("addr_traddr", "127.0.0.1")):
        (port / name).write_text(value + "\n")
    (port / "addr_trsvcid").write_text("4420\n")
    (port / "subsystems" / subnqn).symlink_to(subsystem)
    return nvmet_dir, port / "subsystems" / subnqn


def test_closing_an_export_that_never_served_leaves_other_clients_connected(
    tmp_path: Path,
) -> None:
    vid = new_volume_id()
    _, link = _configfs(tmp_path, "node-a", vid, ["node-b", "node-c"])
    exports = NvmeExports(tmp_path / "nvme", "node-a", "127.0.0.1", configfs=tmp_path)
    before = os.lstat(link).st_ino
    exports.close(vid, "node-x")  # a pure-NBD export's close, a retried DELETE
    assert os.lstat(link).st_ino == before, "node-b's and node-c's connections were dropped"
    exports.close(vid, "node-c")  # a host that was linked: its connection must end
    assert link.is_symlink() and os.lstat(link).st_ino != before


def test_a_bounce_leaves_the_subsystem_served_on_our_port_even_after_a_failed_relink(
    tmp_path: Path,
) -> None:
    vid = new_volume_id()
    nvmet_dir, link = _configfs(tmp_path, "node-a", vid, ["node-b"])
    link.unlink()  # a bounce that crashed between its unlink and relink
    nvmet.Nvmet("node-a", nvmet_dir).bounce(link.name, link.parent.parent)
    assert link.is_symlink()


def test_a_record_that_cannot_be_served_at_start_keeps_its_live_subsystem(tmp_path: Path) -> None:
    vid, broken = new_volume_id(), new_volume_id()
    _configfs(tmp_path, "node-a", vid, ["node-b"])
    exports = NoKernel(tmp_path / "nvme", "node-a", "127.0.0.1", configfs=tmp_path)
    req = AgentExportCreate(transport=Transport.NVME_TCP, psk_identity="node-b", psk_key=KEY)
    for volume_id in (vid, broken):
        exports.open(volume_id, "node-b", tmp_path / f"{volume_id}.img", req)
    exports.fail = ValueError("nvmet said no")  # any one record's failure
    kept = exports.recover(lambda v: tmp_path / f"{v}.img")
    assert sorted(e.volume_id for e in kept) == sorted([vid, broken])
    assert (tmp_path / "nvmet" / "subsystems" / subsystem_nqn(vid, "node-a")).is_dir()


def test_a_configfs_write_the_kernel_refuses_names_the_attribute_never_the_key(
    tmp_path: Path,
) -> None:
    attribute = tmp_path / "hosts" / "gone" / "dhchap_key"
    with pytest.raises(FailedPrecondition) as err:
        nvmet._write(attribute, SECRET)
    assert str(attribute) in str(err.value) and SECRET not in str(err.value)


def test_the_target_key_is_derived_from_the_attachment_key_alike_on_both_ends() -> None:
    ctrl = dhchap_ctrl_secret(KEY)
    assert ctrl_secret_of(SECRET) == ctrl and ctrl != SECRET
    assert ctrl.startswith("DHHC-1:00:") and dhchap_ctrl_secret("ab" * 32) != ctrl
    options = nvme_host.fabrics_options(_target(), SECRET, nvme_host.SINGLE_LEG).split(",")
    assert f"dhchap_ctrl_secret={ctrl}" in options


def test_nvme_tcp_is_not_offered_without_dh_hmac_chap_in_the_kernel() -> None:
    full = {"CONFIG_NVME_AUTH": "m", "CONFIG_NVME_TARGET_AUTH": "y"}
    assert capabilities.auth_missing(full) == []
    bookworm = {"CONFIG_NVME_TCP": "m", "CONFIG_NVME_TARGET_TCP": "m"}  # 6.1: no auth
    missing = capabilities.auth_missing(bookworm)
    assert any("CONFIG_NVME_TARGET_AUTH" in m for m in missing), missing


def test_a_controller_that_will_not_go_keeps_the_connection_known(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nvme_host, "SYSFS_NVME", tmp_path)
    (tmp_path / "nvme7").mkdir()
    (tmp_path / "nvme7" / "delete_controller").write_text("")
    with pytest.raises(Unavailable, match="nvme7 is still there"):
        nvme_host.delete_controller("nvme7", wait=0.05)
