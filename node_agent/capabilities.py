"""Which transports this host can serve and attach over, as registration reports them.

- loop: always (the loop driver is everywhere we run);
- nbd: nbdkit (exports, and the client nbdfuse starts) and nbdfuse installed;
- the kernel nbd client (`kernel_nbd`, not a transport of its own): the nbd
  module loadable, nbd-client and nbdkit (the local TLS bridge) installed;
- nvme-tcp: the kernel has, loaded or loadable, the NVMe/TCP host (nvme_tcp),
  its DH-HMAC-CHAP support (nvme_auth: every connection authenticates) and
  the target (nvmet_tcp), and configfs is mounted or mountable (nvmet is
  configured there). The target's DH-HMAC-CHAP is a kernel option
  (CONFIG_NVME_TARGET_AUTH), no module: read from the kernel's config, or,
  without one, asked of nvmet itself (the one case that loads a module).
  nvme-cli is not needed: tessera.system.nvme_host talks to
  /dev/nvme-fabrics itself;
- composed: mdadm and dmsetup installed, md (raid1, raid10) and
  device-mapper loadable.

"Loadable" means present in /sys/module (loaded or built in with
parameters) or listed in the running kernel's modules.dep or
modules.builtin: a check that loads nothing, so registering never changes
the host. Management chooses nvme-tcp for a remote volume only when both
ends list it, and falls back to nbd otherwise, so a wrong "no" costs speed
and a wrong "yes" costs a failed attach: hence every piece is checked.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
import subprocess
from pathlib import Path

from tessera.models import Transport
from tessera.nvme_names import NQN_PREFIX

log = logging.getLogger(__name__)

SYS_MODULE = Path("/sys/module")
MODULES_ROOT = Path("/lib/modules")
CONFIGFS = Path("/sys/kernel/config")

NVME_MODULES = ("nvme_tcp", "nvme_auth", "nvmet_tcp")
#: DH-HMAC-CHAP on both ends: the target's is no module, only a kernel option
AUTH_OPTIONS = ("CONFIG_NVME_AUTH", "CONFIG_NVME_TARGET_AUTH")
BOOT = Path("/boot")
COMPOSED_MODULES = ("raid1", "raid10", "dm_mod")


def _norm(name: str) -> str:
    return name.replace("-", "_")


def kernel_modules(release: str | None = None, root: Path = MODULES_ROOT) -> set[str]:
    """Module names (underscored) the running kernel can load or has built in."""
    directory = root / (release or os.uname().release)
    names: set[str] = set()
    for listing in ("modules.dep", "modules.builtin"):
        try:
            lines = (directory / listing).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            path = line.split(":", 1)[0].strip()
            if path:
                names.add(_norm(Path(path).name.split(".ko", 1)[0]))
    return names


def missing_modules(
    wanted: tuple[str, ...], available: set[str] | None = None, sys_module: Path = SYS_MODULE
) -> list[str]:
    """Which of `wanted` are neither loaded nor loadable."""
    loadable = kernel_modules() if available is None else available
    return [m for m in wanted if not (sys_module / m).exists() and _norm(m) not in loadable]


def configfs_usable(configfs: Path = CONFIGFS) -> bool:
    """configfs mounted, or the kernel knows the file system (we mount it when needed)."""
    if os.path.ismount(configfs):
        return True
    try:
        known = Path("/proc/filesystems").read_text().split()
    except OSError:
        return False
    return "configfs" in known and configfs.is_dir()


def kernel_config(release: str | None = None, boot: Path = BOOT) -> dict[str, str] | None:
    """The running kernel's build options (/boot/config-<release>, else /proc/config.gz)."""
    try:
        text = (boot / f"config-{release or os.uname().release}").read_text()
    except OSError:
        try:
            with gzip.open("/proc/config.gz", "rt") as f:
                text = f.read()
        except OSError:
            return None
    pairs = (line.partition("=") for line in text.splitlines() if line.startswith("CONFIG_"))
    return {k: v for k, _, v in pairs}


def auth_missing(config: dict[str, str] | None, configfs: Path = CONFIGFS) -> list[str]:
    """What of DH-HMAC-CHAP (host and target) the kernel lacks; every export and
    connect authenticates, so without it nvme-tcp is useless here.

    From the kernel's config when there is one; else nvmet itself is asked
    (loaded if need be): a host entry there has `dhchap_key` only with
    CONFIG_NVME_TARGET_AUTH.
    """
    if config is not None:
        return [
            f"kernel option {o} (DH-HMAC-CHAP)"
            for o in AUTH_OPTIONS
            if config.get(o) not in ("y", "m")
        ]
    if _target_auth_probe(configfs):
        return []
    return ["DH-HMAC-CHAP in nvmet (no kernel config to read, and nvmet shows no dhchap_key)"]


def _target_auth_probe(configfs: Path) -> bool:
    hosts = configfs / "nvmet" / "hosts"
    if not hosts.is_dir() and os.geteuid() == 0:
        subprocess.run(["modprobe", "nvmet"], capture_output=True, check=False, timeout=60)
    if not hosts.is_dir():
        return False
    probe = hosts / f"{NQN_PREFIX}:capability-probe:{os.getpid()}"
    try:
        probe.mkdir(exist_ok=True)
        try:
            return (probe / "dhchap_key").exists()
        finally:
            probe.rmdir()
    except OSError as err:
        log.warning("could not ask nvmet whether it has DH-HMAC-CHAP: %s", err)
        return False


def nvme_tcp_missing(
    available: set[str] | None = None, config: dict[str, str] | None = None
) -> list[str]:
    """What keeps this host from nvme-tcp; empty when it can use it."""
    missing = [f"kernel module {m}" for m in missing_modules(NVME_MODULES, available)]
    if not configfs_usable():
        missing.append("configfs (mounted at /sys/kernel/config)")
    if not missing:  # only then: the probe may load nvmet
        missing += auth_missing(kernel_config() if config is None else config)
    return missing


def composed_missing(available: set[str] | None = None) -> list[str]:
    missing = [f"{tool} (not installed)" for tool in ("mdadm", "dmsetup") if not shutil.which(tool)]
    return missing + [f"kernel module {m}" for m in missing_modules(COMPOSED_MODULES, available)]


def nbd_missing() -> list[str]:
    return [f"{tool} (not installed)" for tool in ("nbdkit", "nbdfuse") if not shutil.which(tool)]


KERNEL_NBD_MODULES = ("nbd",)
KERNEL_NBD_TOOLS = ("nbd-client", "nbdkit")


def kernel_nbd_missing(available: set[str] | None = None) -> list[str]:
    """What keeps this host from the kernel nbd client (node_agent/transports/nbd_kernel.py):
    the `nbd` module, nbd-client (ioctl mode) and nbdkit (the local TLS bridge). Empty when
    it can: one-leg nbd attachments then use it, and management may give composed
    volumes nbd legs here (registration's `kernel_nbd`)."""
    tools = [f"{t} (not installed)" for t in KERNEL_NBD_TOOLS if not shutil.which(t)]
    return tools + [f"kernel module {m}" for m in missing_modules(KERNEL_NBD_MODULES, available)]


def has_kernel_nbd() -> bool:
    """Registration's `kernel_nbd`; logs why not."""
    missing = kernel_nbd_missing()
    if missing:
        log.info("the kernel nbd client is not offered: missing %s", ", ".join(missing))
    return not missing


def host_transports() -> list[Transport]:
    """The transports this host offers, in the order management lists them; logs why
    the others are not offered."""
    available = kernel_modules()
    offered = [Transport.LOOP]
    for transport, missing in (
        (Transport.NBD, nbd_missing()),
        (Transport.NVME_TCP, nvme_tcp_missing(available)),
        (Transport.COMPOSED, composed_missing(available)),
    ):
        if missing:
            log.info("transport %s is not offered: missing %s", transport, ", ".join(missing))
        else:
            offered.append(transport)
    return offered
