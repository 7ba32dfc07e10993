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
from tessera.errors import FailedPrecondition, Internal, ResourceExhausted
from tessera.system import nbd_kernel

HOME = Path("/var/lib/tessera/connections/vol-0123456789abcdef/kernel")
KEY = Path("/var/lib/tessera/keys/vol-0123456789abcdef.psk")


def test_a_mirror_leg_fails_stuck_requests_after_30s() -> None:
    client = client_argv(HOME, "/dev/nbd3", False, MIRROR)
    assert client[client.index("-timeout") + 1] == "30"


def test_a_single_volume_waits_on_the_kernel_for_a_stuck_request() -> None:
    assert "-timeout" not in client_argv(HOME, "/dev/nbd3", False, SINGLE)


@pytest.mark.parametrize("readonly", [False, True])
def test_the_bridge_never_reconnects_to_an_owner_that_may_have_lost_unflushed_writes(
    readonly: bool,
) -> None:
    """A reconnecting bridge (nbdkit's retry filter) would re-send FLUSH to a rebooted
    owner and the consumer's filesystem would commit writes that are gone; it would also
    retry ENOSPC/EIO for minutes and serialize every request."""
    bridge = bridge_argv(HOME, "10.0.0.5", 10809, KEY, "node-b", readonly)
    assert not any("retry" in a or a.startswith("--filter") for a in bridge)


def test_the_bridge_requires_tls_and_never_has_the_key_on_its_command_line() -> None:
    bridge = bridge_argv(HOME, "10.0.0.5", 10809, KEY, "node-b", True)
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


# ---- finding clients in a container (pid namespaces) ---------------------------------------


STATUS = "Name:\tnbd-client\nTgid:\t7\nPid:\t7\nPPid:\t1\nNSpid:\t{}\nNStgid:\t7\n"


@pytest.mark.parametrize(
    ("nspid", "expected"),
    [("4242\t7", 4242), ("4242\t310\t7", 4242), ("7", 7), ("", None)],
)
def test_a_client_in_a_container_is_matched_by_its_pid_in_the_kernels_namespace(
    nspid: str, expected: int | None
) -> None:
    """sysfs shows the init namespace's pid; a node pod without hostPID sees its own."""
    assert nbd_kernel.parse_nspid(STATUS.format(nspid)) == expected


def test_a_kernel_without_nspid_has_no_global_pid() -> None:
    assert nbd_kernel.parse_nspid("Name:\tx\nPid:\t7\n") is None


def test_this_process_outside_a_container_has_its_own_pid_as_global_pid() -> None:
    own = nbd_kernel.global_pid(os.getpid())
    assert own is not None and own > 0
    assert nbd_kernel.global_pid(2**22 + 1) is None  # no such process


# ---- claims -------------------------------------------------------------------------------


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A sysfs with nbd0-3 (all free) and an empty claims directory, as the module reads them."""
    sys_block = tmp_path / "sys"
    for n in range(4):
        (sys_block / f"nbd{n}").mkdir(parents=True)
        (sys_block / f"nbd{n}" / "size").write_text("0\n")
    monkeypatch.setattr(nbd_kernel, "SYS_BLOCK", sys_block)
    monkeypatch.setattr(nbd_kernel, "RUN_DIR", tmp_path / "run")
    return sys_block


def test_a_device_whose_client_died_is_never_handed_to_another_volume(kernel: Path) -> None:
    """The kernel frees a dead client's device (no pid, size 0) while a pod may still
    have its node: only its claim keeps it from the next volume."""
    first = nbd_kernel.claim_device("/state/a")
    assert first == "/dev/nbd0"
    assert (nbd_kernel.RUN_DIR / "nbd0.claim").read_text() == "/state/a"
    # nbd0's client died: sysfs shows it free, exactly like a device never used
    assert nbd_kernel.client_pid(first) is None and nbd_kernel.size_bytes(first) == 0
    assert nbd_kernel.claim_device("/state/b") == "/dev/nbd1"
    assert nbd_kernel.claims() == {"/dev/nbd0": "/state/a", "/dev/nbd1": "/state/b"}


def test_a_connected_or_sized_device_is_never_claimed(kernel: Path) -> None:
    (kernel / "nbd0" / "pid").write_text("4242\n")
    (kernel / "nbd1" / "size").write_text("2048\n")
    assert nbd_kernel.claim_device("/state/a") == "/dev/nbd2"


def test_a_claim_is_released_only_by_its_owner_and_the_device_is_then_free_again(
    kernel: Path,
) -> None:
    device = nbd_kernel.claim_device("/state/a")
    nbd_kernel.release_claim(device, "/state/b")  # another client's release: not ours
    assert nbd_kernel.claims() == {device: "/state/a"}
    nbd_kernel.release_claim(device, "/state/a")
    nbd_kernel.release_claim(device, "/state/a")  # twice is fine
    assert nbd_kernel.claims() == {}
    assert nbd_kernel.claim_device("/state/c") == device


def test_when_every_device_is_claimed_the_error_names_nbds_max(kernel: Path) -> None:
    for n in range(4):
        nbd_kernel.claim_device(f"/state/{n}")
    with pytest.raises(ResourceExhausted) as err:
        nbd_kernel.claim_device("/state/late")
    assert "every kernel nbd device is in use or claimed (4;" in str(err.value)
    assert "nbds_max" in str(err.value)


def test_a_module_loaded_with_no_devices_says_so(kernel: Path) -> None:
    for n in range(4):
        (kernel / f"nbd{n}" / "size").unlink()
        (kernel / f"nbd{n}").rmdir()
    with pytest.raises(ResourceExhausted) as err:
        nbd_kernel.claim_device("/state/a")
    assert "has no devices" in str(err.value) and "in use" not in str(err.value)


def test_a_client_finds_its_claim_alive_or_dead_and_only_its_own(kernel: Path) -> None:
    mine, other = KernelNbdClient(HOME), KernelNbdClient(HOME.parent / "other")
    assert mine.claimed() is None
    nbd_kernel.claim_device(str(other.home))
    device = nbd_kernel.claim_device(str(HOME))
    assert mine.claimed() == device and other.claimed() == "/dev/nbd0"
    assert KernelNbdClient(HOME / "x" / "..").claimed() == device  # however spelt
    assert mine.device() is None  # no client runs: claimed, not connected
