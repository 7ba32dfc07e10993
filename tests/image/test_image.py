"""The container image, built from scratch and run with containerd + runc as a cluster would.

One image build and one private containerd per session (tests/image/containerd.py);
every container is removed after it ran, and the session ends with no
containerd, shim, container, snapshot mount or process left.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from csi_driver import DRIVER_NAME
from csi_driver._gen import csi_pb2
from tessera.system.loopdev import bound_under
from tessera.system.mounts import mounts_under
from tessera.system.processes import matching
from tessera_dev.csi_client import CsiClient
from tessera_dev.stack import DevStack
from tests.conftest import needs_root
from tests.image.containerd import SHIM_SOCKET_DIR, Bind, Containerd, archive_with_user

REPO = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
REF = f"ghcr.io/tessera-csi/tessera:{VERSION}"
#: the same image as root: what the chart's securityContext does for the node plugin
ROOT_REF = f"localhost/tessera-as-root:{VERSION}"
ENTRYPOINT = ["tini", "--"]
TOOLS = ["debootstrap", "containerd", "ctr", "runc"]

pytestmark = needs_root


@pytest.fixture(scope="session")
def image_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """image/build.py, once per session (after the first build the base comes from its cache)."""
    if missing := [t for t in TOOLS if shutil.which(t) is None]:
        pytest.fail(f"{', '.join(missing)} missing: scripts/bootstrap.sh installs them")
    log = tmp_path_factory.mktemp("image-build") / "build.log"
    with log.open("wb") as out:
        res = subprocess.run([sys.executable, str(REPO / "image/build.py")], stdout=out,
                             stderr=subprocess.STDOUT, timeout=1200)  # fmt: skip
    if res.returncode != 0:
        pytest.fail(f"image/build.py failed:\n{log.read_text()[-4000:]}")
    archive = REPO / "build" / "image" / f"tessera-{VERSION}.oci.tar"
    assert archive.is_file()
    return archive


@pytest.fixture(scope="session")
def ctd(image_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    base = tmp_path_factory.mktemp("containerd")
    daemon = Containerd(base)
    made_by_us = [d for d in (SHIM_SOCKET_DIR.parent, SHIM_SOCKET_DIR) if not d.exists()]
    try:
        daemon.start()
        assert daemon.import_image(image_archive) == [REF]
        as_root = archive_with_user(image_archive, "0:0", ROOT_REF, base / "as-root.oci.tar")
        assert daemon.import_image(as_root) == [ROOT_REF]
        yield daemon
    finally:
        daemon.stop()
        leftovers = {
            "mounts": mounts_under(base),
            "processes": matching(lambda args: any(str(base) in a for a in args)),
        }
        assert leftovers == {"mounts": [], "processes": []}
        assert not any(d.exists() for d in made_by_us), "shim socket directories left behind"
        shutil.rmtree(base)  # the content store and snapshots: hundreds of MiB


def run_ok(ctd: Containerd, name: str, args: list[str], ref: str = REF) -> str:
    res = ctd.run(ref, name, args)
    assert res.returncode == 0, f"{args}: exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout


def shell(script: str) -> list[str]:
    """The image's entrypoint around `sh -c script`: what Kubernetes runs for `args:`."""
    return [*ENTRYPOINT, "sh", "-c", script]


def test_tessera_csi_version_in_the_image_is_the_package_version(ctd: Containerd) -> None:
    out = run_ok(ctd, "version", [*ENTRYPOINT, "tessera-csi", "--version"])
    assert out.strip() == f"tessera-csi {VERSION}"


def test_every_daemon_in_the_image_reports_the_package_version(ctd: Containerd) -> None:
    daemons = ["tessera-management", "tessera-node-agent", "tessera-csi"]
    out = run_ok(ctd, "versions", shell(f"for p in {' '.join(daemons)}; do $p --version; done"))
    assert out.splitlines() == [f"{p} {VERSION}" for p in daemons]


def test_every_executable_is_on_the_path_and_the_default_command_runs(ctd: Containerd) -> None:
    out = run_ok(ctd, "path", shell(
        "for p in tessera tessera-management tessera-node-agent tessera-csi; do command -v $p; done"
    ))  # fmt: skip
    assert out.split() == [
        f"/opt/tessera/bin/{p}"
        for p in ("tessera", "tessera-management", "tessera-node-agent", "tessera-csi")
    ]
    # no args: the image's own Entrypoint + Cmd (tini -- tessera --help)
    assert "Usage" in run_ok(ctd, "default", [])


def test_image_runs_as_uid_65532_under_tini_with_its_setuid_bits(ctd: Containerd) -> None:
    config = ctd.image_config(REF)["config"]
    assert config["Entrypoint"] == ENTRYPOINT
    assert config["User"] == "65532:65532"
    out = run_ok(ctd, "identity", shell(
        "id -u; id -g; id -un; cat /proc/1/comm;"
        " stat -c '%u %a' /usr/bin/mount /usr/bin/fusermount3"
    )).splitlines()  # fmt: skip
    assert out == ["65532", "65532", "tessera", "tini", "0 4755", "0 4755"]


def test_the_data_path_tools_are_in_the_image(ctd: Containerd) -> None:
    out = run_ok(ctd, "tools", shell(
        "nbdkit --version; nbdfuse --version | head -1; nbd-client -V 2>&1 | head -1;"
        " mkfs.xfs -V; mkfs.ext4 -V 2>&1 | head -1;"
        " nvme version | head -1; losetup --version; modprobe --version; ip -V"
    ))  # fmt: skip
    for expected in ("nbdkit 1.", "nbdfuse 1.", "nbd-client", "mkfs.xfs version", "mke2fs 1.",
                     "nvme version",
                     "losetup from util-linux", "kmod version", "ip utility"):  # fmt: skip
        assert expected in out, out


#: a daemonized nbdkit exits; is it still in the process table after 5 s?
DAEMON_EXITS = (
    "nbdkit --pidfile /tmp/nbdkit.pid --unix /tmp/nbd.sock memory 1M"
    # the daemon writes its pid file after nbdkit's first process has returned
    " && for i in $(seq 50); do [ -s /tmp/nbdkit.pid ] && break; sleep 0.1; done"
    " && pid=$(cat /tmp/nbdkit.pid)"
    # nbdkit's first process may still be on its way out: wait for the daemon to be orphaned
    " && for i in $(seq 50); do [ $(awk '{print $4}' /proc/$pid/stat) = 1 ] && break; sleep 0.1;"
    " done && echo parent=$(awk '{print $4}' /proc/$pid/stat)"
    " && kill $pid && for i in $(seq 50); do [ -e /proc/$pid ] || break; sleep 0.1; done"
    " && if [ -e /proc/$pid ]; then awk '/^State/ {print $2}' /proc/$pid/status;"
    " else echo reaped; fi"
)
#: the command is a Python process, like every Tessera executable: it never reaps strangers
AS_PYTHON = [
    "python3", "-c",
    "import subprocess, sys; sys.exit(subprocess.run(['sh', '-c', sys.argv[1]]).returncode)",
]  # fmt: skip


def test_a_daemonized_nbdkit_that_exits_is_reaped_not_left_a_zombie(ctd: Containerd) -> None:
    # nbdkit forks into the background as the node-agent starts it; its parent
    # becomes PID 1, and only a PID 1 that reaps (tini) makes it go away on exit
    out = run_ok(ctd, "reap", [*ENTRYPOINT, *AS_PYTHON, DAEMON_EXITS]).split()
    assert out == ["parent=1", "reaped"]
    # the same with the Python command as PID 1 (a pod spec's `command:` drops tini)
    out = run_ok(ctd, "no-tini", [*AS_PYTHON, DAEMON_EXITS]).split()
    assert out == ["parent=1", "Z"]


def wait_ready(client: CsiClient, socket: Path, container: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert container.poll() is None, "the node plugin container exited"
        if socket.is_socket():
            try:
                reply = client.identity.Probe(csi_pb2.ProbeRequest(), timeout=5)
            except grpc.RpcError:
                reply = None
            if reply is not None and reply.ready.value:
                return
        time.sleep(0.2)
    raise AssertionError("the node plugin in the container never answered Probe ready=true")


def test_node_plugin_in_the_image_serves_probe_and_node_info_on_a_host_socket(
    ctd: Containerd, tmp_path: Path
) -> None:
    stack = DevStack(tmp_path / "stack", pool_size=1 << 30, node_id="image-node")
    csi_dir = tmp_path / "csi"
    csi_dir.mkdir()
    socket = csi_dir / "csi.sock"
    log = tmp_path / "node-plugin.log"
    try:
        info = stack.start()
        container = ctd.start_container(ROOT_REF, "csi-node", [
            *ENTRYPOINT, "tessera-csi", "--mode", "node", "--endpoint", "unix:///csi/csi.sock",
            "--node-id", info.node_id, "--agent-socket", "/run/tessera/agent.sock",
            "--token-file", "/run/tessera/token",
        ], [Bind(csi_dir, "/csi"), Bind(Path(info.state_dir), "/run/tessera")], log)  # fmt: skip
        try:
            with CsiClient(f"unix://{socket}") as client:
                wait_ready(client, socket, container)
                node = client.node.NodeGetInfo(csi_pb2.NodeGetInfoRequest(), timeout=5)
                plugin = client.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=5)
        finally:
            code = ctd.stop_container("csi-node", container)
        assert node.node_id == "image-node"
        assert (plugin.name, plugin.vendor_version) == (DRIVER_NAME, VERSION)
        # SIGTERM reached the plugin through tini: a clean exit that removed its socket
        assert code == 0, log.read_text()[-3000:]
        assert not socket.exists()
    finally:
        stack.stop()
    assert (mounts_under(tmp_path), bound_under(tmp_path)) == ([], [])
