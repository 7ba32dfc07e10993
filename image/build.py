"""Build the Tessera image from scratch, with no registry and no container engine.

The same image as image/Containerfile, made the long way round:

1. base: `debootstrap --variant=minbase bookworm` with the packages of
   image/packages.txt, upgraded from bookworm-updates/-security, stripped of
   apt lists, caches and docs, with the `tessera` user (65532:65532). Cached
   under the cache dir, keyed by a hash of everything that shapes it, as a
   rootfs and its finished layer: a rebuild never runs debootstrap again.
2. app: the project's wheel and its dependencies' wheels (`pip wheel` on a
   clean copy of the checkout, dependencies from PyPI), installed into the
   venv /opt/tessera inside a throwaway copy of the base rootfs (chroot, so
   the venv points at the image's own python3). Its layer holds /opt only.
3. an OCI image layout (oci-layout, index.json, blobs: two gzip'd tar layers,
   config, manifest) written directly and tarred into
   build/image/tessera-<version>.oci.tar, named ghcr.io/tessera-csi/tessera:<version>.

Layers are written with numeric ownership from the rootfs (root, except what
Debian itself gives another owner), setuid/setgid bits and file capabilities
(security.capability xattrs) kept, no device nodes (the runtime makes /dev),
and mtimes clamped to the commit time (SOURCE_DATE_EPOCH's rule: nothing in
the image claims to be newer than its source). Builds are not bit-for-bit
reproducible: Debian's and PyPI's latest releases are taken, and pip stamps
the bytecode it compiles with the install time.

Run as root (debootstrap, chroot): `image/build.sh`, or
`.venv/bin/python image/build.py --help`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tessera.system.mounts import mounts_under  # noqa: E402

IMAGE_NAME = "ghcr.io/tessera-csi/tessera"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
PACKAGES_FILE = REPO / "image" / "packages.txt"
#: bump when the base recipe below changes in a way the package list does not show
BASE_RECIPE = "5"
UID = GID = 65532
VENV = "/opt/tessera"
ENV = [
    f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "PYTHONUNBUFFERED=1",
    "PYTHONDONTWRITEBYTECODE=1",
]
ENTRYPOINT = ["tini", "--"]
CMD = ["tessera", "--help"]

#: left out of the base rootfs after install: the image never runs apt, nor reads docs
STRIPPED = [
    "var/lib/apt/lists",
    "var/cache/apt",
    "var/cache/debconf/templates.dat-old",
    "var/cache/debconf/config.dat-old",
    "var/log",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "etc/resolv.conf",  # the build host's; the runtime provides one
    "etc/hostname",
]
#: directories whose content belongs to the runtime, not the image
RUNTIME_DIRS = {"dev", "proc", "sys", "tmp"}
#: xattrs that carry meaning into a container (file capabilities); SELinux labels do not
KEPT_XATTR_PREFIXES = ("security.capability", "user.")

MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"


@dataclass(frozen=True)
class Blob:
    path: str
    digest: str  # sha256:... of the blob as stored
    size: int
    diff_id: str = ""  # sha256:... of the uncompressed tar (layers only)


# ---- helpers -----------------------------------------------------------------


_STARTED = time.monotonic()


def log(msg: str) -> None:
    print(f"build-image [{time.monotonic() - _STARTED:5.1f}s]: {msg}", file=sys.stderr, flush=True)


def run(args: list[str], **kwargs: object) -> None:
    subprocess.run(args, check=True, **kwargs)  # type: ignore[call-overload]


def chroot(root: Path, args: list[str]) -> None:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root",
           "DEBIAN_FRONTEND": "noninteractive"}  # fmt: skip
    run(["chroot", str(root), *args], env=env)


def remove_tree(path: Path) -> None:
    """rm -rf a build directory, never through a mount left inside it."""
    if not path.exists():
        return
    if mounts := mounts_under(path):
        raise RuntimeError(f"not removing {path}: still mounted there: {mounts}")
    shutil.rmtree(path)


def packages() -> list[str]:
    lines = PACKAGES_FILE.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


#: never part of the source when the tree is not a git checkout (mirrors .gitignore)
NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "_gen", ".state*", ".*_cache",
    ".hypothesis", ".cache",
)  # fmt: skip


def git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *args], check=True, capture_output=True)
    return out.stdout.decode().strip()


def in_git() -> bool:
    """A git checkout of this repository (CI may hand over an exported tree instead)."""
    try:
        return Path(git("rev-parse", "--show-toplevel")).resolve() == REPO
    except (OSError, subprocess.CalledProcessError):
        return False


def source_epoch() -> int:
    """SOURCE_DATE_EPOCH if set, else the commit's time: the clamp for every mtime."""
    if env := os.environ.get("SOURCE_DATE_EPOCH"):
        return int(env)
    return int(git("log", "-1", "--format=%ct")) if in_git() else int(time.time())


# ---- layers ------------------------------------------------------------------


class _Hashing:
    """A write-only file that hashes and counts what passes through it."""

    def __init__(self, sink: IO[bytes] | None) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        if self.sink is not None:
            self.sink.write(data)
        return len(data)

    def flush(self) -> None:
        if self.sink is not None:
            self.sink.flush()


def _walk(root: Path, top: str) -> Iterator[str]:
    """Relative paths under root/top in a stable order, parents before children."""
    yield top
    base = root / top
    if base.is_symlink() or not base.is_dir():
        return
    for name in sorted(os.listdir(base)):
        rel = f"{top}/{name}"
        if (root / rel).is_dir() and not (root / rel).is_symlink():
            if top == "." and name in RUNTIME_DIRS:
                yield rel  # the directory itself, empty
                continue
            yield from _walk(root, rel)
        else:
            yield rel


def _xattrs(path: Path) -> dict[str, str]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    kept = {}
    for name in names:
        if name.startswith(KEPT_XATTR_PREFIXES):
            value = os.getxattr(path, name, follow_symlinks=False)
            # tarfile writes a PAX record as hdrcharset=BINARY when it is not UTF-8
            kept[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    return kept


def write_layer(root: Path, tops: list[str], out: Path, epoch: int) -> Blob:
    """Tar root/<tops> (gzip'd) into out; return its digest and diff_id."""
    with out.open("wb") as raw:
        compressed = _Hashing(raw)
        with gzip.GzipFile(fileobj=compressed, mode="wb", compresslevel=6, mtime=0) as gz:  # type: ignore[arg-type]
            plain = _Hashing(gz)
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
                for top in tops:
                    for rel in _walk(root, top):
                        _add(tar, root, rel, epoch)
    return Blob(
        path=str(out),
        digest=f"sha256:{compressed.sha.hexdigest()}",
        size=compressed.size,
        diff_id=f"sha256:{plain.sha.hexdigest()}",
    )


def _add(tar: tarfile.TarFile, root: Path, rel: str, epoch: int) -> None:
    if rel == ".":
        return  # no entry for / itself: the runtime owns the root's mode, as with any layer
    path = root / rel
    arcname = rel.removeprefix("./")
    info = tar.gettarinfo(str(path), arcname)  # records hard links by inode
    if info.ischr() or info.isblk():
        return
    # numeric ownership only: names would be looked up against the runtime's idea
    info.uname = info.gname = ""
    info.mtime = min(int(info.mtime), epoch)
    if info.isreg() or info.isdir():
        if xattrs := _xattrs(path):
            info.pax_headers = {**info.pax_headers, **xattrs}
    if info.isreg():
        with path.open("rb") as f:
            tar.addfile(info, f)
    else:
        tar.addfile(info)


# ---- base rootfs ---------------------------------------------------------------


def base_key(mirror: str, security_mirror: str) -> str:
    h = hashlib.sha256()
    for part in (BASE_RECIPE, SUITE, mirror, security_mirror, *packages()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def ensure_base(cache: Path, mirror: str, security_mirror: str, epoch: int) -> tuple[Path, Blob]:
    """The cached base rootfs and its layer, made first when missing."""
    key = base_key(mirror, security_mirror)
    done = cache / f"base-{key}"
    if (done / "layer.json").exists():
        log(f"base {key}: cached in {done}")
        return done / "rootfs", Blob(**json.loads((done / "layer.json").read_text()))
    cache.mkdir(parents=True, exist_ok=True)
    work = cache / f"tmp-base-{key}-{os.getpid()}"
    remove_tree(work)
    work.mkdir()
    try:
        rootfs = work / "rootfs"
        debootstrap(rootfs, mirror)
        configure_base(rootfs, mirror, security_mirror)
        log("base: writing its layer")
        blob = write_layer(rootfs, ["."], work / "layer.tar.gz", epoch)
        blob = Blob(**{**asdict(blob), "path": str(done / "layer.tar.gz")})
        (work / "layer.json").write_text(json.dumps(asdict(blob)))
        # A finished base appears whole or not at all: the rename is the commit.
        try:
            work.rename(done)
        except OSError:
            if not (done / "layer.json").exists():
                raise
            log(f"base {key}: a concurrent build finished it first; using that one")
            blob = Blob(**json.loads((done / "layer.json").read_text()))
    finally:
        remove_tree(work)
    for old in [*cache.glob("base-*"), *abandoned(cache, "tmp-base-")]:
        if old != done:
            log(f"removing the outdated or abandoned {old}")
            remove_tree(old)
    return done / "rootfs", blob


def abandoned(directory: Path, prefix: str) -> list[Path]:
    """Work directories named <prefix>...-<pid> whose build is no longer running."""
    found = []
    for path in directory.glob(f"{prefix}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            found.append(path)
    return found


def debootstrap(rootfs: Path, mirror: str) -> None:
    log(f"base: debootstrap {SUITE} from {mirror} (the slow step, once per package list)")
    run(["debootstrap", "--variant=minbase", f"--include={','.join(packages())}",
         SUITE, str(rootfs), mirror])  # fmt: skip


def configure_base(rootfs: Path, mirror: str, security_mirror: str) -> None:
    (rootfs / "etc/apt/sources.list").write_text(
        f"deb {mirror} {SUITE} main\n"
        f"deb {mirror} {SUITE}-updates main\n"
        f"deb {security_mirror} {SUITE}-security main\n"
    )
    log("base: upgrading from bookworm-updates and bookworm-security")
    chroot(rootfs, ["apt-get", "update", "-qq"])
    chroot(rootfs, ["apt-get", "-y", "-qq", "-o", "Dpkg::Use-Pty=0", "upgrade"])
    chroot(rootfs, ["apt-get", "clean"])
    chroot(rootfs, ["groupadd", "--system", "--gid", str(GID), "tessera"])
    chroot(rootfs, ["useradd", "--system", "--uid", str(UID), "--gid", str(GID),
                    "--no-create-home", "--home-dir", "/nonexistent",
                    "--shell", "/usr/sbin/nologin", "tessera"])  # fmt: skip
    strip(rootfs)


def strip(rootfs: Path) -> None:
    for rel in STRIPPED:
        path = rootfs / rel
        if path.is_dir() and not path.is_symlink():
            remove_tree(path)
            path.mkdir()  # apt and dpkg expect these directories to exist
        elif path.exists() or path.is_symlink():
            path.unlink()
    # documentation, but each package's copyright file stays (licences travel with the image)
    for dirpath, _dirs, files in os.walk(rootfs / "usr/share/doc"):
        for name in files:
            if name != "copyright":
                (Path(dirpath) / name).unlink()
    for rel in RUNTIME_DIRS:
        if (rootfs / rel).is_dir():
            for child in (rootfs / rel).iterdir():
                if child.is_dir() and not child.is_symlink():
                    remove_tree(child)
                elif not (child.is_char_device() or child.is_block_device()):
                    child.unlink()


# ---- application layer ---------------------------------------------------------


def build_wheels(dest: Path) -> None:
    """The project's wheel from a clean copy of the checkout, plus every dependency's."""
    src = dest.parent / "src"
    copy_source(src)
    log("app: pip wheel (dependencies from PyPI)")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run([*pip, "wheel", "--wheel-dir", str(dest), str(src)])
    run([*pip, "download", "--only-binary=:all:", "--no-deps", "--dest", str(dest / "pip"), "pip"])


def copy_source(dest: Path) -> None:
    """The source without build debris (a stale build/ or _gen/ would end up in the wheel).

    In a git checkout: tracked files and untracked ones git does not ignore,
    so uncommitted work is built. Otherwise the tree minus NOT_SOURCE.
    """
    if not in_git():
        shutil.copytree(REPO, dest, symlinks=True, ignore=NOT_SOURCE)
        return
    files = git("ls-files", "-z", "--cached", "--others", "--exclude-standard")
    for rel in filter(None, files.split("\0")):
        if (REPO / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dest / rel)


def build_app(base_rootfs: Path, work: Path, epoch: int) -> Blob:
    wheels = work / "wheels"
    build_wheels(wheels)
    rootfs = work / "rootfs"
    log("app: installing the wheels into a copy of the base")
    run(["cp", "-a", "--reflink=auto", str(base_rootfs), str(rootfs)])
    shutil.copytree(wheels, rootfs / "tmp/wheels")
    pip_whl = next((rootfs / "tmp/wheels/pip").glob("pip-*.whl")).name
    chroot(rootfs, ["python3", "-m", "venv", "--without-pip", VENV])
    # pip runs from its wheel and is not installed: the image carries no installer
    chroot(rootfs, [f"{VENV}/bin/python", f"/tmp/wheels/pip/{pip_whl}/pip", "install", "-q",
                    "--no-index", "--no-cache-dir", "--disable-pip-version-check",
                    "--find-links", "/tmp/wheels", "tessera"])  # fmt: skip
    log("app: writing its layer")
    return write_layer(rootfs, ["./opt"], work / "app.tar.gz", epoch)


# ---- OCI layout ------------------------------------------------------------------


def json_blob(obj: object, directory: Path) -> Blob:
    data = json.dumps(obj, indent=None, separators=(",", ":"), sort_keys=True).encode()
    digest = hashlib.sha256(data).hexdigest()
    path = directory / digest
    path.write_bytes(data)
    return Blob(path=str(path), digest=f"sha256:{digest}", size=len(data))


def labels(version: str, epoch: int) -> dict[str, str]:
    revision = "unknown"
    if in_git():
        revision = git("rev-parse", "HEAD")
        if git("status", "--porcelain", "--untracked-files=no"):
            revision += "-dirty"
    return {
        "org.opencontainers.image.title": "tessera",
        "org.opencontainers.image.description": "Tessera: parallel NVMe-backed block volumes "
        "for Kubernetes and their CSI driver",
        "org.opencontainers.image.source": "https://github.com/tessera-csi/tessera",
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.revision": revision,
        "org.opencontainers.image.created": rfc3339(epoch),
        "org.opencontainers.image.base.name": f"debian:{SUITE} (debootstrap --variant=minbase)",
    }


def rfc3339(epoch: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def write_archive(layers: list[Blob], version: str, epoch: int, out: Path, work: Path) -> None:
    meta = work / "meta"
    meta.mkdir()
    created = rfc3339(epoch)
    config = json_blob(
        {
            "created": created,
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "User": f"{UID}:{GID}",
                "Env": ENV,
                "Entrypoint": ENTRYPOINT,
                "Cmd": CMD,
                "WorkingDir": "/",
                "StopSignal": "SIGTERM",
                "Labels": labels(version, epoch),
            },
            "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in layers]},
            "history": [
                {"created": created, "created_by": f"debootstrap --variant=minbase {SUITE} "
                 "+ image/packages.txt, user tessera 65532"},
                {"created": created, "created_by": f"pip install tessera=={version} into {VENV}"},
            ],
        },
        meta,
    )  # fmt: skip
    manifest = json_blob(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config.digest, "size": config.size},
            "layers": [
                {"mediaType": MEDIA_LAYER, "digest": b.digest, "size": b.size} for b in layers
            ],
        },
        meta,
    )
    ref = f"{IMAGE_NAME}:{version}"
    index = {
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_MANIFEST,
                "digest": manifest.digest,
                "size": manifest.size,
                "platform": {"architecture": "amd64", "os": "linux"},
                # ref.name is the OCI way; containerd's import names the image after
                # io.containerd.image.name when it is there
                "annotations": {
                    "org.opencontainers.image.ref.name": ref,
                    "io.containerd.image.name": ref,
                },
            }
        ],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}', epoch)
        _add_bytes(tar, "index.json", json.dumps(index, sort_keys=True).encode(), epoch)
        for blob in [config, manifest, *layers]:
            info = tar.gettarinfo(blob.path, f"blobs/sha256/{blob.digest.removeprefix('sha256:')}")
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            info.mtime = epoch
            with open(blob.path, "rb") as f:
                tar.addfile(info, f)
    tmp.rename(out)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, epoch: int) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = epoch
    tar.addfile(info, io.BytesIO(data))


# ---- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="image/build.sh", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--output-dir",
        type=Path,
        default=REPO / "build" / "image",
        help="where tessera-<version>.oci.tar goes (default: build/image)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("TESSERA_IMAGE_CACHE", REPO / "build/image/cache")),
        help="the base rootfs cache (default: $TESSERA_IMAGE_CACHE or build/image/cache;"
        " /var/cache/tessera-image shares it between checkouts)",
    )
    p.add_argument("--mirror", default=MIRROR)
    p.add_argument("--security-mirror", default=SECURITY_MIRROR)
    return p.parse_args(argv)  # fmt: skip


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("build-image: run as root (debootstrap and chroot need it)")
    if sys.version_info[:2] != (3, 11):
        # the dependencies' wheels are picked for this interpreter; the image's is bookworm's 3.11
        sys.exit(f"build-image: run with Python 3.11 (bookworm's), not {sys.version.split()[0]}")
    started = time.monotonic()
    version = project_version()
    epoch = source_epoch()
    base_rootfs, base_layer = ensure_base(args.cache_dir.resolve(), args.mirror,
                                          args.security_mirror, epoch)  # fmt: skip
    args.output_dir.mkdir(parents=True, exist_ok=True)
    # what a build that was killed left behind
    for old in abandoned(args.output_dir, "work-"):
        remove_tree(old)
    for partial in abandoned(args.output_dir, f"tessera-{version}.oci.tar.tmp-"):
        partial.unlink()
    work = args.output_dir / f"work-{os.getpid()}"
    remove_tree(work)
    work.mkdir()
    try:
        app_layer = build_app(base_rootfs, work, epoch)
        out = args.output_dir / f"tessera-{version}.oci.tar"
        write_archive([base_layer, app_layer], version, epoch, out, work)
    finally:
        remove_tree(work)
    log(f"{out}: {IMAGE_NAME}:{version}, {out.stat().st_size / 2**20:.0f} MiB, "
        f"{time.monotonic() - started:.0f}s")  # fmt: skip
    return out


if __name__ == "__main__":
    main()
