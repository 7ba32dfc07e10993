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
from node_agent.nvme_exports import DEFAULT_NVME_PORT
from node_agent.pools import Pool
from node_agent.transports.nvme_tcp import NvmeTcpTransport
from tessera.errors import FailedPrecondition, InvalidArgument
from tessera.ids import new_volume_id
from tessera.models import Connection, Transport
from tessera.nvme_names import dhchap_secret, host_nqn, subsystem_nqn
from tessera.system import nvme_host, nvmet

KEY = "0123456789abcdef" * 4
SECRET = dhchap_secret(KEY)
TOKEN = "s3cret"
MiB = 1024**2


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
    nvme_host.FABRICS_DEVICE.exists(), reason="this host can connect: see the VM suite"
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
    nvme_host.FABRICS_DEVICE.exists(), reason="this host can connect: see the VM suite"
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
