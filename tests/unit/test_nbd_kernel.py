"""The kernel nbd client's pure parts: command lines, timeouts, device names, capability.

The client itself (bridge, nbd-client, /dev/nbdN) runs in the VM:
tests/vm/guest/test_nbd_kernel.py. This host has no nbd module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from node_agent import capabilities
from node_agent.transports import nbd
from node_agent.transports.nbd_kernel import (
    MIRROR,
    SINGLE,
    KernelNbdClient,
    bridge_argv,
    client_argv,
    socket_path,
)
from tessera.errors import FailedPrecondition, Internal
from tessera.system import nbd_kernel

HOME = Path("/var/lib/tessera/connections/vol-0123456789abcdef/kernel")
KEY = Path("/var/lib/tessera/keys/vol-0123456789abcdef.psk")


def test_a_mirror_leg_fails_stuck_requests_after_30s_and_never_retries_the_owner() -> None:
    bridge = bridge_argv(HOME, "10.0.0.5", 10809, KEY, "node-b", False, MIRROR)
    assert not any("retry" in a for a in bridge)
    client = client_argv(HOME, "/dev/nbd3", False, MIRROR)
    assert client[client.index("-timeout") + 1] == "30"


def test_a_single_volume_waits_on_the_kernel_and_retries_the_owner_for_ten_minutes() -> None:
    bridge = bridge_argv(HOME, "10.0.0.5", 10809, KEY, "node-b", False, SINGLE)
    assert "--filter=retry" in bridge
    assert {"retries=300", "retry-delay=2", "retry-exponential=no"} <= set(bridge)
    assert SINGLE.retries * SINGLE.retry_delay == 600  # like nvme's ctrl_loss_tmo
    assert "-timeout" not in client_argv(HOME, "/dev/nbd3", False, SINGLE)


def test_the_bridge_requires_tls_and_never_has_the_key_on_its_command_line() -> None:
    bridge = bridge_argv(HOME, "10.0.0.5", 10809, KEY, "node-b", True, SINGLE)
    assert {"tls=require", f"tls-psk={KEY}", "tls-username=node-b", "-r"} <= set(bridge)
    assert str(socket_path(HOME)) in bridge  # how a restarted agent finds the device
    client = client_argv(HOME, "/dev/nbd3", True, SINGLE)
    # the marker that finds the device again, ioctl mode, 512-byte sectors
    assert {str(socket_path(HOME)), "-nonetlink", "-nofork", "-readonly"} <= set(client)
    assert client[client.index("-b") + 1] == "512"


@pytest.mark.parametrize("device", ["/dev/sda", "/dev/nbd0\n", "/dev/nbd", "/dev/nbd1p1", "nbd0"])
def test_only_dev_nbd_devices_reach_nbd_client_or_sysfs(device: str) -> None:
    with pytest.raises(Internal):
        nbd_kernel.check_device(device)


def test_devices_are_listed_in_number_order_and_partitions_are_not_devices(tmp_path: Path) -> None:
    for name in ("nbd10", "nbd2", "nbd0", "nbd2p1", "loop0", "nbdx"):
        (tmp_path / name).mkdir()
    assert nbd_kernel.devices(tmp_path) == ["/dev/nbd0", "/dev/nbd2", "/dev/nbd10"]


def test_the_kernel_client_is_offered_only_with_module_and_both_tools() -> None:
    no_module = capabilities.kernel_nbd_missing(available=set())
    assert "kernel module nbd" in no_module or Path("/sys/module/nbd").exists()
    tools_missing = [t for t in ("nbd-client", "nbdkit") if not shutil.which(t)]
    with_module = capabilities.kernel_nbd_missing(available={"nbd"})
    assert with_module == [f"{t} (not installed)" for t in tools_missing]


def test_a_host_without_the_kernel_client_keeps_attaching_with_nbdfuse(tmp_path: Path) -> None:
    transport = nbd.NbdTransport(tmp_path, lambda v: tmp_path / f"{v}.psk")
    assert transport.uses_kernel() == (capabilities.kernel_nbd_missing() == [])


def test_a_record_from_before_the_kernel_client_is_an_nbdfuse_connection(tmp_path: Path) -> None:
    (tmp_path / "record.json").write_text(json.dumps({"connection": {}, "readonly": False}))
    assert nbd._record_client(tmp_path) == nbd.NBDFUSE_CLIENT


@pytest.mark.skipif(shutil.which("nbd-client") is not None, reason="nbd-client is installed here")
def test_connecting_without_nbd_client_names_what_is_missing_and_starts_nothing(
    tmp_path: Path,
) -> None:
    client = KernelNbdClient(tmp_path / "kernel")
    with pytest.raises(FailedPrecondition) as err:
        client.connect("127.0.0.1", 10809, KEY, "node-b", readonly=False, timeouts=SINGLE,
                       what="volume vol-0123456789abcdef")  # fmt: skip
    assert "nbd-client" in str(err.value) and "vol-0123456789abcdef" in str(err.value)
    assert not client.home.exists()


def test_a_bridge_socket_fits_a_unix_socket_path_whatever_the_state_directory() -> None:
    deep = Path("/var/lib/" + "x" * 200) / "composed" / ("vol-" + "a" * 59) / "nbd-leg-15"
    assert len(os.fsencode(socket_path(deep))) < 108
    assert socket_path(deep) != socket_path(deep.parent / "nbd-leg-14")  # one per home
    assert socket_path(deep) == socket_path(deep / "x" / "..")  # the same home, however spelt
