"""A private containerd for tests: runs OCI archives with Debian's containerd + runc.

Everything lives under one temporary directory (root, state, sockets, runc
state, IO fifos, the content store and the overlay snapshots), nothing
touches a containerd the machine may already run, and `stop` leaves nothing
behind: containers, tasks, snapshot mounts, the daemon and its files.

Two things are not configurable in containerd 1.6 and are tidied instead:
the runc shim puts its sockets in /run/containerd/s, and removes them
itself; the directory is removed when this helper created it and it is
empty.

No CAP_SYS_RESOURCE on hosts like this one: runc cannot lower an
oom_score_adj. `ctr run` never asks it to (the OCI spec ctr writes sets no
oomScoreAdj, and the shim only raises its own score), and the CRI plugin
(where containerd 1.6 keeps `restrict_oom_score_adj`) is disabled here.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

from tessera.system.mounts import mounts_under, unmount

NAMESPACE = "tessera"
SHIM_SOCKET_DIR = Path("/run/containerd/s")
#: plugins a test never needs; the CRI one would want CNI, a pause image and CAP_SYS_RESOURCE
DISABLED_PLUGINS = [
    "io.containerd.grpc.v1.cri",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
]


@dataclass(frozen=True)
class Bind:
    src: Path
    dst: str
    readonly: bool = False

    def option(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"type=bind,src={self.src},dst={self.dst},options=rbind:{mode}"


class Containerd:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.address = str(base / "containerd.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self._made_dirs: list[Path] = []

    # ---- daemon ----------------------------------------------------------------

    def config(self) -> str:
        b = self.base
        plugins = ", ".join(f'"{p}"' for p in DISABLED_PLUGINS)
        return (
            "version = 2\n"
            f'root = "{b / "root"}"\n'
            f'state = "{b / "state"}"\n'
            f"disabled_plugins = [{plugins}]\n"
            "[grpc]\n"
            f'  address = "{self.address}"\n'
            "[ttrpc]\n"
            f'  address = "{self.address}.ttrpc"\n'
            "[debug]\n"
            f'  address = "{b / "debug.sock"}"\n'
            # the opt plugin would otherwise create /opt/containerd
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{b / "opt"}"\n'
        )

    def start(self, timeout: float = 30.0) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        # the shim's socket directories we create, innermost last (removed when empty)
        self._made_dirs = [d for d in (SHIM_SOCKET_DIR.parent, SHIM_SOCKET_DIR) if not d.exists()]
        (self.base / "config.toml").write_text(self.config())
        log = (self.base / "containerd.log").open("wb")
        self.proc = subprocess.Popen(
            ["containerd", "--config", str(self.base / "config.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while self.ctr("version", check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start; see {self.base}/containerd.log")
            time.sleep(0.2)

    def stop(self) -> None:
        """Remove every container (and its snapshot), stop the daemon, unmount what is left."""
        if self.proc is not None and self.proc.poll() is None:
            for name in self.list("containers"):
                self.ctr("task", "kill", "-s", "SIGKILL", name, check=False)
                self.ctr("task", "delete", "--force", name, check=False)
                self.ctr("container", "delete", name, check=False)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # a daemon that died mid-way leaves its overlay mounts; they are ours to undo
        for mountpoint in reversed(mounts_under(self.base)):
            unmount(mountpoint)
        for made in reversed(self._made_dirs):
            if made.is_dir() and not any(made.iterdir()):
                made.rmdir()

    # ---- ctr ---------------------------------------------------------------------

    def ctr(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            ["ctr", "--address", self.address, "--namespace", NAMESPACE, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)} failed ({res.returncode}): {res.stderr}")
        return res

    def list(self, kind: str) -> list[str]:
        return self.ctr(kind, "list", "--quiet").stdout.split()

    def import_image(self, archive: Path) -> list[str]:
        """Import an OCI archive; the image names it brought."""
        before = set(self.list("images"))
        self.ctr("image", "import", str(archive), timeout=300)
        return sorted(set(self.list("images")) - before)

    def image_config(self, ref: str) -> dict:
        """The image's config as containerd stored it (what a runtime builds the process from)."""
        manifest_digest = self._image_target(ref)
        manifest = json.loads(self.ctr("content", "get", manifest_digest).stdout)
        return json.loads(self.ctr("content", "get", manifest["config"]["digest"]).stdout)

    def _image_target(self, ref: str) -> str:
        for line in self.ctr("image", "list").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                return fields[2]
        raise LookupError(ref)

    def _run_args(
        self, ref: str, name: str, args: Sequence[str], binds: Sequence[Bind]
    ) -> list[str]:
        return [
            "ctr", "--address", self.address, "--namespace", NAMESPACE,
            "run", "--rm",
            "--fifo-dir", str(self.base / "fifo"),
            "--runc-root", str(self.base / "runc"),
            *[f"--mount={b.option()}" for b in binds],
            ref, name, *args,
        ]  # fmt: skip

    def run(
        self,
        ref: str,
        name: str,
        args: Sequence[str] = (),
        binds: Sequence[Bind] = (),
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run a container to completion (removed after): its exit code and output.

        Empty args run the image's own Entrypoint + Cmd. Given args, ctr (unlike
        Kubernetes, which keeps the Entrypoint when only `args` are set) replaces
        both: pass the entrypoint yourself to run under it.
        """
        return subprocess.run(
            self._run_args(ref, name, args, binds),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start_container(
        self, ref: str, name: str, args: Sequence[str], binds: Sequence[Bind], log: Path
    ) -> subprocess.Popen[bytes]:
        """Start a long-running container in the background; `stop_container` ends it."""
        with log.open("wb") as out:
            return subprocess.Popen(
                self._run_args(ref, name, args, binds),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def stop_container(self, name: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
        """SIGTERM the container's PID 1 (tini passes it on); wait for ctr's --rm to finish."""
        self.ctr("task", "kill", "--signal", "SIGTERM", name, check=False)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.ctr("task", "kill", "--signal", "SIGKILL", name, check=False)
            return proc.wait(timeout=timeout)


# ---- OCI archives ------------------------------------------------------------------


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def archive_with_user(archive: Path, user: str, ref: str, out: Path) -> Path:
    """A copy of a one-image OCI archive whose config runs as `user`, named `ref`.

    The layers are the same blobs; only the config (User) and the manifest
    differ. What `securityContext.runAsUser: 0` does for the chart's node
    plugin, for `ctr run`, which has no --user in containerd 1.6.
    """
    with tarfile.open(archive) as src:
        index = json.loads(src.extractfile("index.json").read())  # type: ignore[union-attr]
        entry = index["manifests"][0]

        def blob(digest: str) -> bytes:
            return src.extractfile(f"blobs/sha256/{digest.removeprefix('sha256:')}").read()  # type: ignore[union-attr]

        manifest = json.loads(blob(entry["digest"]))
        config = json.loads(blob(manifest["config"]["digest"]))
        config["config"]["User"] = user
        config_bytes = _json_bytes(config)
        manifest["config"] = {
            **manifest["config"],
            "digest": f"sha256:{sha256(config_bytes).hexdigest()}",
            "size": len(config_bytes),
        }
        manifest_bytes = _json_bytes(manifest)
        manifest_digest = f"sha256:{sha256(manifest_bytes).hexdigest()}"
        annotations = {"org.opencontainers.image.ref.name": ref, "io.containerd.image.name": ref}
        new_index = {
            **index,
            "manifests": [
                {**entry, "digest": manifest_digest, "size": len(manifest_bytes),
                 "annotations": annotations}
            ],
        }  # fmt: skip
        with tarfile.open(out, "w") as dst:
            _add(dst, "oci-layout", src.extractfile("oci-layout").read())  # type: ignore[union-attr]
            _add(dst, "index.json", _json_bytes(new_index))
            for data in (config_bytes, manifest_bytes):
                _add(dst, f"blobs/sha256/{sha256(data).hexdigest()}", data)
            for layer in manifest["layers"]:
                member = src.getmember(f"blobs/sha256/{layer['digest'].removeprefix('sha256:')}")
                dst.addfile(member, src.extractfile(member))
    return out
