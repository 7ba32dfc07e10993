"""`tessera-node-agent --file-pool NAME=IMAGE:SIZE`: a pool in a sparse image, kept across restarts.

Real agent processes, real loop devices, mkfs.xfs and mounts: what a node
with a file-backed pool (the chart's laptop option, `tessera dev up`) sees.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node_agent import file_pools
from tessera.clients import AgentClient
from tessera.errors import FailedPrecondition, InvalidArgument
from tessera.ids import new_volume_id
from tessera.system import loopdev, mounts
from tessera_dev.release import release_volumes
from tests.conftest import needs_root

MiB = 1024**2
SIZE = 512 * MiB
TOKEN = "file-pool-test-token"


class FilePoolAgent:
    """One `python -m node_agent --file-pool default=<tmp>/img/pool.img:SIZE` at a time."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.image = tmp / "img" / "pool.img"
        self.state = tmp / "state"
        self.mountpoint = self.state / "file-pools" / "default"
        self.socket = tmp / "agent.sock"
        self.log = tmp / "agent.log"
        (tmp / "token").write_text(TOKEN + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self, *file_pool: str) -> list[str]:
        specs = file_pool or (f"default={self.image}:{SIZE}",)
        return [
            sys.executable, "-m", "node_agent", "--node-id", "file-pool-node",
            "--management", f"unix://{self.tmp / 'no-management.sock'}", "--no-register",
            "--token-file", str(self.tmp / "token"), "--socket", str(self.socket),
            "--state-dir", str(self.state), "--dev-dir", str(self.tmp / "dev"),
            *[arg for spec in specs for arg in ("--file-pool", spec)],
        ]  # fmt: skip

    def start(self) -> AgentClient:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT)
        client = AgentClient(f"unix://{self.socket}", TOKEN)
        deadline = time.monotonic() + 60
        while not client.healthy():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "agent did not start: " + self.log.read_text()
            time.sleep(0.1)
        return client

    def refused(self, *file_pool: str) -> str:
        """Run the agent expecting it to refuse to start; its stderr."""
        res = subprocess.run(
            self.args(*file_pool), capture_output=True, text=True, timeout=60, check=False
        )
        assert res.returncode == 2, res.stdout + res.stderr
        return res.stderr

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)

    def image_device(self) -> str:
        bound = [b for b in loopdev.bound_under(self.image)]
        assert len(bound) == 1, bound
        return bound[0].path


@pytest.fixture
def node(tmp_path: Path) -> Iterator[FilePoolAgent]:
    fp = FilePoolAgent(tmp_path)
    try:
        yield fp
    finally:
        if fp.proc is not None and fp.proc.poll() is None:
            fp.proc.kill()
            fp.proc.wait(timeout=30)
        if fp.mountpoint.is_dir() and mounts.is_mount(str(fp.mountpoint)):
            release_volumes(fp.mountpoint)
        file_pools.release_file_pool(fp.image, fp.mountpoint)
    assert loopdev.bound_under(tmp_path) == []
    assert mounts.mounts_under(tmp_path) == []


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@needs_root
def test_agent_with_only_a_file_pool_makes_it_and_keeps_its_volumes_across_restarts(
    node: FilePoolAgent,
) -> None:
    client = node.start()
    device = node.image_device()
    assert mounts.mount_of_device(str(node.mountpoint), device) is not None
    assert node.image.stat().st_size == SIZE
    assert node.image.stat().st_blocks * 512 < SIZE // 4, "the image is not sparse"
    vid = new_volume_id()
    client.create_volume(vid, "default", 32 * MiB)
    (node.mountpoint / "marker").write_text("written before the restart")
    client.close()
    node.stop()

    # restart with everything still in place: same device, same mount, nothing formatted
    client = node.start()
    assert node.image_device() == device
    assert len(mounts.mounts_at(str(node.mountpoint))) == 1, "the pool was mounted twice"
    assert client.get_volume(vid).path == str(node.mountpoint / "volumes" / f"{vid}.img")
    client.close()
    node.stop()

    # a restarted agent container: its mount is gone, the loop device stays bound
    mounts.unmount(str(node.mountpoint))
    client = node.start()
    assert node.image_device() == device, "a second loop device on the image would corrupt it"
    assert (node.mountpoint / "marker").read_text() == "written before the restart"
    assert client.get_volume(vid).path == str(node.mountpoint / "volumes" / f"{vid}.img")
    client.close()


@needs_root
def test_a_rebooted_node_reattaches_its_file_pool_without_formatting_it(
    node: FilePoolAgent,
) -> None:
    node.start().close()
    (node.mountpoint / "marker").write_text("survives a reboot")
    node.stop()
    file_pools.release_file_pool(node.image, node.mountpoint)  # what a reboot leaves
    assert loopdev.bound_under(node.image) == []

    node.start().close()
    assert (node.mountpoint / "marker").read_text() == "survives a reboot"


@needs_root
def test_an_image_holding_another_filesystem_is_refused_and_left_untouched(
    node: FilePoolAgent,
) -> None:
    node.image.parent.mkdir()
    with open(node.image, "xb") as f:
        f.truncate(SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(node.image)], check=True, timeout=120)
    before = digest(node.image)

    err = node.refused()
    assert "holds ext4, not an XFS pool; refusing to touch it" in err
    assert digest(node.image) == before
    assert not mounts.is_mount(str(node.mountpoint))


@needs_root
def test_a_smaller_size_than_the_image_is_refused_never_shrunk(node: FilePoolAgent) -> None:
    node.start().close()
    node.stop()
    err = node.refused(f"default={node.image}:400M")
    assert "never shrunk" in err and f"at least {SIZE} bytes" in err
    assert node.image.stat().st_size == SIZE


@needs_root
def test_a_larger_size_grows_the_pool_and_keeps_its_files(node: FilePoolAgent) -> None:
    node.start().close()
    (node.mountpoint / "marker").write_text("kept while growing")
    before = os.statvfs(node.mountpoint).f_blocks
    node.stop()

    device = file_pools.ensure_file_pool(node.image, node.mountpoint, 2 * SIZE)
    assert node.image.stat().st_size == 2 * SIZE
    assert os.statvfs(node.mountpoint).f_blocks > before * 3 // 2
    assert (node.mountpoint / "marker").read_text() == "kept while growing"
    # a start after the grow changes nothing
    assert file_pools.ensure_file_pool(node.image, node.mountpoint, 2 * SIZE) == device


@needs_root
def test_an_image_on_two_loop_devices_is_refused_rather_than_guessed(node: FilePoolAgent) -> None:
    node.start().close()
    node.stop()
    mounts.unmount(str(node.mountpoint))
    second, _ = loopdev.attach(str(node.image), readonly=False, direct_io=False)
    assert len(loopdev.bound_under(node.image)) == 2
    err = node.refused()
    assert "bound to several loop devices" in err and second in err
    assert not mounts.is_mount(str(node.mountpoint))


@needs_root
def test_another_mount_on_the_pool_directory_is_refused(node: FilePoolAgent) -> None:
    node.mountpoint.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(node.mountpoint)], check=True)
    try:
        with pytest.raises(FailedPrecondition, match="another filesystem mounted"):
            file_pools.ensure_file_pool(node.image, node.mountpoint, SIZE)
    finally:
        mounts.unmount(str(node.mountpoint))


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("default=", "expected NAME=IMAGE:SIZE"),
        ("=/var/lib/tessera/pool.img:1G", "expected NAME=IMAGE:SIZE"),
        ("default=/var/lib/tessera/pool.img", "expected NAME=IMAGE:SIZE"),
        ("default=/var/lib/tessera/pool.img:", "expected NAME=IMAGE:SIZE"),
        ("default=/var/lib/tessera/pool.img:lots", "is not a size"),
        ("default=/var/lib/tessera/pool.img:10M", "XFS needs at least 300 MiB"),
        ("../x=/var/lib/tessera/pool.img:1G", "the pool name"),
        ("default=pool.img:1G", "must be an absolute path"),
        ("default=/var/lib/tessera/../pool.img:1G", "must be an absolute path without '..'"),
    ],
)
def test_bad_file_pool_specs_are_refused_naming_what_is_wrong(spec: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match="--file-pool") as err:
        file_pools.parse_file_pool_spec(spec)
    assert says in str(err.value)


def test_the_same_pool_name_twice_is_refused_before_any_image_is_made(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="given twice"):
        file_pools.open_file_pools(
            [f"fast={tmp_path / 'a.img'}:1G"], tmp_path / "state", taken={"fast"}
        )
    assert not (tmp_path / "a.img").exists()


def test_the_agent_refuses_to_start_without_any_pool(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "node_agent", "--node-id", "n", "--management", "unix:///x",
         "--token-file", "/x", "--socket", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert res.returncode == 2
    assert "give at least one --pool NAME=DIR or --file-pool NAME=IMAGE:SIZE" in res.stderr


@needs_root
def test_a_bad_file_pool_spec_stops_the_agent_with_the_reason(node: FilePoolAgent) -> None:
    err = node.refused("default=relative/pool.img:1G")
    assert "tessera-node-agent: --file-pool 'default=relative/pool.img:1G'" in err
    assert "absolute path" in err
    assert not node.state.exists() or not any(node.state.iterdir())
