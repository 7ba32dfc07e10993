"""Build (once) the VM the kernel-side tests run in: kernel, initramfs, root disk.

The sandbox's and CI's own kernel lack nvmet, nvme-tcp, md and dm, so
everything that drives them is tested inside a qemu VM running Debian
bookworm-backports' 6.12 kernel (bookworm's 6.1 has no NVME_AUTH /
NVME_TARGET_AUTH: no DH-HMAC-CHAP).

Recipe (all cached under build/vm/<key>/, key = hash of the recipe and of
this module's and the guest init's source, so editing either rebuilds):

1. rootfs: `debootstrap --variant=minbase bookworm` with GUEST_PACKAGES, then
   bookworm-backports' linux-image-amd64 installed in a chroot with
   update-initramfs diverted to a no-op (the VM boots our own initramfs).
2. kernel: the package's bzImage (vmlinuz) and, when the `zstd` tool is
   there, the uncompressed ELF vmlinux extracted from it, which qemu boots
   through its PVH entry point (no real-mode decompression step).
3. initramfs: busybox-static plus the modules the root disk needs
   (virtio_blk, ext4 and their dependencies, decompressed from .ko.xz and
   listed in modules.dep order); its /init mounts the disk and switch_roots
   to /sbin/tessera-vm-init (tests/vm/guest_init.py).
4. root.img: an ext4 image made from the rootfs with `mkfs.ext4 -d` (no
   mount); each run boots it with `snapshot=on`, so the image never changes.

A build goes to a temporary directory renamed into place when complete:
a cache entry is whole or absent.  Needs root (debootstrap, chroot).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "build" / "vm"
HERE = Path(__file__).resolve().parent
GUEST_INIT = HERE / "guest_init.py"
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
KERNEL_SUITE = "bookworm-backports"
KERNEL_PACKAGE = "linux-image-amd64"
#: what the guest runs: the kernel data path's tools and the stack's own needs
#: (scripts/bootstrap.sh's list, minus what only the host-side suite uses)
GUEST_PACKAGES = [
    "nvme-cli", "mdadm", "dmsetup", "nbd-client", "e2fsprogs", "xfsprogs", "fio",
    "python3", "kmod", "iproute2", "util-linux", "mount", "udev", "nbdkit",
    "libnbd-bin", "fuse3", "psmisc", "procps", "ca-certificates",
]  # fmt: skip
#: modules the initramfs loads to reach the root disk (their dependencies come along)
#: (ext4 asks the crypto API for crc32c at mount: no modprobe here to load it then)
ROOT_MODULES = ["virtio_blk", "crc32c_generic", "ext4"]
#: bump when the recipe changes in a way the inputs hashed below do not show
RECIPE = "1"

INITRAMFS_INIT = """#!/bin/sh
# tessera VM initramfs: load the root disk's modules, mount it, switch_root.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for m in $(/bin/busybox cat /modules.order); do /bin/busybox insmod /modules/$m.ko || true; done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 100 ]; do /bin/busybox sleep 0.1; n=$((n+1)); done
if ! /bin/busybox mount -t ext4 -o ro /dev/vda /newroot; then
  echo "initramfs: cannot mount the root disk"; /bin/busybox reboot -f
fi
/bin/busybox umount /proc
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/tessera-vm-init
"""

#: the bzImage payload's compression: magic -> how to undo it
COMPRESSIONS = [(b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"), (b"\x1f\x8b\x08", "gzip")]

_STARTED = time.monotonic()


@dataclass(frozen=True)
class Image:
    """A finished VM image in the cache."""

    directory: Path
    kernel: Path  # vmlinux (PVH) when extracted, else the bzImage
    bzimage: Path
    initrd: Path
    root: Path
    kernel_release: str


def log(msg: str) -> None:
    print(f"vm-image [{time.monotonic() - _STARTED:6.1f}s]: {msg}", file=sys.stderr, flush=True)


def run(args: list[str], **kwargs: object) -> None:
    subprocess.run(args, check=True, **kwargs)  # type: ignore[call-overload]


def chroot(root: Path, args: list[str], **env: str) -> None:
    base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root",
            "DEBIAN_FRONTEND": "noninteractive"}  # fmt: skip
    run(["chroot", str(root), *args], env={**base, **env})


def base_key() -> str:
    """Hash of what shapes the rootfs (debootstrap + kernel): the slow stage."""
    return _hash([RECIPE, SUITE, KERNEL_SUITE, KERNEL_PACKAGE, MIRROR, *GUEST_PACKAGES])


def recipe_key() -> str:
    """Hash of everything that shapes the image: rebuilt only when it changes.
    The rootfs stage is kept apart (base-<key>) so that editing the init or this
    builder costs a re-pack (seconds), not a debootstrap (minutes)."""
    sources = [Path(__file__).read_text(), GUEST_INIT.read_text()]
    return _hash([base_key(), INITRAMFS_INIT, *ROOT_MODULES, *sources])


def _hash(parts: list[str]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def cached() -> Image | None:
    """The current recipe's image when already built."""
    done = CACHE / recipe_key()
    meta = done / "image.json"
    if not meta.exists():
        return None
    info = json.loads(meta.read_text())
    return Image(
        directory=done,
        kernel=done / info["kernel"],
        bzimage=done / "bzImage",
        initrd=done / "initrd.cpio.gz",
        root=done / "root.img",
        kernel_release=info["kernel_release"],
    )


def ensure() -> Image:
    """The VM image for the current recipe, built first when missing."""
    if (image := cached()) is not None:
        return image
    if os.geteuid() != 0:
        raise PermissionError("building the VM image needs root (debootstrap, chroot)")
    key = recipe_key()
    CACHE.mkdir(parents=True, exist_ok=True)
    work = CACHE / f"tmp-{key}-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        build(work)
        try:
            work.rename(CACHE / key)  # the commit: whole or absent
        except OSError:
            if cached() is None:
                raise
            log("a concurrent build finished first; using that one")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    remove_outdated(key)
    image = cached()
    assert image is not None
    return image


def remove_outdated(key: str) -> None:
    for old in CACHE.iterdir():
        if old.name in (key, f"base-{base_key()}"):
            continue
        pid = old.name.rsplit("-", 1)[-1] if old.name.startswith("tmp-") else ""
        if pid and Path(f"/proc/{pid}").exists():
            continue  # another build in progress
        log(f"removing outdated {old}")
        shutil.rmtree(old, ignore_errors=True)


def build(work: Path) -> None:
    started = time.monotonic()
    rootfs, release = ensure_base()
    install_init(rootfs)
    shutil.copyfile(rootfs / "boot" / f"vmlinuz-{release}", work / "bzImage")
    kernel = "vmlinux" if extract_vmlinux(work / "bzImage", work / "vmlinux") else "bzImage"
    write_initramfs(rootfs, release, work / "initrd.cpio.gz")
    make_root_disk(rootfs, work / "root.img")
    took = round(time.monotonic() - started, 1)
    meta = {"kernel": kernel, "kernel_release": release, "build_seconds": took}
    (work / "image.json").write_text(json.dumps(meta))
    log(f"built in {took}s (kernel {release}, boots {kernel})")


def ensure_base() -> tuple[Path, str]:
    """The rootfs with the kernel installed (cached as base-<key>) and the kernel release."""
    done = CACHE / f"base-{base_key()}"
    if not (done / "release").exists():
        work = CACHE / f"tmp-base-{os.getpid()}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        try:
            debootstrap(work / "rootfs")
            (work / "release").write_text(install_kernel(work / "rootfs"))
            work.rename(done)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return done / "rootfs", (done / "release").read_text()


def debootstrap(rootfs: Path) -> None:
    log(f"debootstrap {SUITE} (the slow step)")
    run(["debootstrap", "--variant=minbase", f"--include={','.join(GUEST_PACKAGES)}",
         SUITE, str(rootfs), MIRROR])  # fmt: skip


def install_kernel(rootfs: Path) -> str:
    """bookworm-backports' kernel, without building an initramfs."""
    log(f"installing {KERNEL_PACKAGE} from {KERNEL_SUITE}")
    (rootfs / "etc/apt/sources.list.d/backports.list").write_text(
        f"deb {MIRROR} {KERNEL_SUITE} main\n"
    )
    # the VM boots our own initramfs: Debian's would only cost minutes and disk
    chroot(rootfs, ["dpkg-divert", "--local", "--rename", "--add", "/usr/sbin/update-initramfs"])
    noop = rootfs / "usr/sbin/update-initramfs"
    noop.write_text("#!/bin/sh\nexit 0\n")
    noop.chmod(0o755)
    chroot(rootfs, ["apt-get", "update", "-qq"])
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends"]
    install += ["-o", "Dpkg::Use-Pty=0"]
    chroot(rootfs, [*install, "-t", KERNEL_SUITE, KERNEL_PACKAGE], INITRD="No")
    chroot(rootfs, ["apt-get", "clean"])
    shutil.rmtree(rootfs / "var/lib/apt/lists", ignore_errors=True)
    (rootfs / "var/lib/apt/lists/partial").mkdir(parents=True)
    releases = sorted(p.name for p in (rootfs / "lib/modules").iterdir())
    return releases[-1]


def install_init(rootfs: Path) -> None:
    target = rootfs / "sbin/tessera-vm-init"
    shutil.copyfile(GUEST_INIT, target)
    target.chmod(0o755)
    # no getty, no login: the VM only ever runs one command as root
    (rootfs / "etc/hostname").write_text("tessera-vm\n")


def extract_vmlinux(bzimage: Path, out: Path) -> bool:
    """The ELF vmlinux inside a bzImage (for a PVH boot), when it can be had."""
    data = bzimage.read_bytes()
    for magic, tool in COMPRESSIONS:
        at = data.find(magic)
        if at < 0:
            continue
        try:
            payload = decompress(data[at:], tool)
        except (OSError, lzma.LZMAError, subprocess.CalledProcessError, FileNotFoundError):
            continue
        if payload.startswith(b"\x7fELF"):
            out.write_bytes(payload)
            return True
    log("no vmlinux extracted from the bzImage: booting the bzImage")
    return False


def decompress(stream: bytes, tool: str) -> bytes:
    if tool == "gzip":
        return gzip.GzipFile(fileobj=io.BytesIO(stream)).read()
    if tool == "xz":
        return lzma.LZMADecompressor().decompress(stream)
    # zstd: no stdlib module before 3.14; the CLI stops at the frame's end and
    # complains about the trailing bytes, so its exit status is not the verdict
    proc = subprocess.run(["zstd", "-dc"], input=stream, capture_output=True)
    return proc.stdout


def module_paths(rootfs: Path, release: str, names: list[str]) -> list[str]:
    """The modules `names` need, dependencies first (modules.dep order)."""
    moddir = rootfs / "lib/modules" / release
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[Path(path).name.split(".ko")[0].replace("-", "_")] = path
    ordered: list[str] = []

    def visit(path: str) -> None:
        if path in ordered:
            return
        for dep in deps[path]:
            visit(dep)
        ordered.append(path)

    for name in names:
        visit(by_name[name])
    return ordered


def write_initramfs(rootfs: Path, release: str, out: Path) -> None:
    log("initramfs")
    tree = out.parent / "initramfs"
    for sub in ("bin", "proc", "dev", "newroot", "modules"):
        (tree / sub).mkdir(parents=True, exist_ok=True)
    shutil.copyfile("/bin/busybox", tree / "bin/busybox")
    (tree / "bin/busybox").chmod(0o755)
    (tree / "bin/sh").symlink_to("busybox")
    order = []
    for rel in module_paths(rootfs, release, ROOT_MODULES):
        src = rootfs / "lib/modules" / release / rel
        name = Path(rel).name.split(".ko")[0]
        raw = src.read_bytes()
        if rel.endswith(".xz"):
            raw = lzma.decompress(raw)
        elif rel.endswith(".zst"):
            raw = subprocess.run(["zstd", "-dc"], input=raw, capture_output=True, check=True).stdout
        (tree / "modules" / f"{name}.ko").write_bytes(raw)
        order.append(name)
    (tree / "modules.order").write_text("\n".join(order) + "\n")
    init = tree / "init"
    init.write_text(INITRAMFS_INIT)
    init.chmod(0o755)
    out.write_bytes(gzip.compress(newc_archive(tree), compresslevel=6))
    shutil.rmtree(tree)


def newc_archive(tree: Path) -> bytes:
    """A cpio (newc) archive of `tree` plus /dev/console, which the kernel opens
    for init's stdio before anything could mknod it (no cpio tool needed)."""
    buf = io.BytesIO()
    entries: list[tuple[str, int, int, bytes]] = [("dev/console", 0o020600, os.makedev(5, 1), b"")]
    for path in sorted(tree.rglob("*")):
        rel = str(path.relative_to(tree))
        st = path.lstat()
        if path.is_symlink():
            entries.append((rel, st.st_mode, 0, os.readlink(path).encode()))
        elif path.is_dir():
            entries.append((rel, st.st_mode, 0, b""))
        else:
            entries.append((rel, st.st_mode, 0, path.read_bytes()))
    entries.sort(key=lambda e: e[0])
    for ino, (name, mode, rdev, data) in enumerate([*entries, ("TRAILER!!!", 0, 0, b"")], 1):
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, os.major(rdev), os.minor(rdev),
                  len(name) + 1, 0]  # fmt: skip
        buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        buf.write(name.encode() + b"\0")
        buf.write(b"\0" * (-buf.tell() % 4))
        buf.write(data)
        buf.write(b"\0" * (-buf.tell() % 4))
    return buf.getvalue()


def make_root_disk(rootfs: Path, out: Path) -> None:
    used = int(subprocess.run(["du", "-sxb", str(rootfs)], capture_output=True, text=True,
                              check=True).stdout.split()[0])  # fmt: skip
    size_mib = used * 13 // 10 // 2**20 + 256
    log(f"root disk: ext4, {size_mib} MiB")
    mkfs = ["mkfs.ext4", "-q", "-F", "-L", "tessera-vm", "-d", str(rootfs), str(out)]
    mkfs.append(f"{size_mib}M")
    run(mkfs, stdout=sys.stderr)  # stdout is the command's, in `python -m tests.vm.run`


if __name__ == "__main__":
    print(ensure())
