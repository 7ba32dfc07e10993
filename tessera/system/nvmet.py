"""The kernel NVMe target (nvmet) through configfs: this node's exports over NVMe/TCP.

What one export is (node_agent/nvme_exports.py decides when):

    /sys/kernel/config/nvmet/
      ports/<id>/            addr_trtype=tcp addr_adrfam addr_traddr addr_trsvcid
        subsystems/<subnqn>  -> ../../../subsystems/<subnqn>   (the port listens once linked)
      subsystems/<subnqn>/   attr_allow_any_host=0 (never 1: only listed hosts connect)
        namespaces/1/        device_path=/dev/loopN (on the volume file) enable=1
        allowed_hosts/<hostnqn> -> ../../../hosts/<hostnqn>
      hosts/<hostnqn>/       dhchap_key=DHHC-1:00:…: dhchap_ctrl_key=DHHC-1:00:…:
                             dhchap_hash=hmac(sha256)   (key attributes 0600)

configfs is global to the kernel, and where nodes share a kernel (the VM
suite's network-namespace nodes) several agents work in it at once. So
an `Nvmet` acts only on what is its own: subsystems whose NQN names its
owner node (tessera.nvme_names.subsystem_nqn) and the one port with its
own address and service id. Host entries (per client and volume) can be
linked by two owners' subsystems (legs of one volume): they are created
when missing, rewritten only when the key differs, and removed only when
no subsystem links them any more.

Port ids are numbers (u16); ours is derived from the address and service
id, so a port half-made by a crash is found (and finished) again instead
of leaking; a taken id moves on to the next. The listening socket is made
in the network namespace of the process that links the first subsystem
to the port, which is what lets network-namespace nodes each listen on
their own address.

Every operation is idempotent: it looks at what is there and does the
rest, so a call retried after a crash at any point converges. The key is
written to configfs and nowhere else; errors name NQNs and paths, never
a key.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
import socket
import subprocess
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from tessera.errors import FailedPrecondition, Internal
from tessera.nvme_names import NQN_PREFIX, ctrl_secret_of

log = logging.getLogger(__name__)

CONFIGFS = Path("/sys/kernel/config")
#: the namespace id of every export (one volume file per subsystem)
NSID = 1
DHCHAP_HASH = "hmac(sha256)"
#: a host entry's key attributes: the host's key, the controller's (bidirectional)
SECRET_ATTRIBUTES = ("dhchap_key", "dhchap_ctrl_key")
#: NVMe limits an NQN to 223 bytes
MAX_NQN = 223


def check_nqn(nqn: str, what: str = "NQN") -> str:
    """An NQN that is safe as one configfs directory name (no path tricks, within limits)."""
    if (
        not nqn.startswith("nqn.")
        or len(nqn.encode()) > MAX_NQN
        or "/" in nqn
        or any(c.isspace() or ord(c) < 0x20 for c in nqn)
    ):
        raise ValueError(f"{what} {nqn[:80]!r} is not an NQN")
    return nqn


def owned_subsystem(nqn: str, owner_node: str) -> str | None:
    """The volume id of `owner_node`'s subsystem `nqn`, or None when it is not one of its own."""
    prefix, suffix = f"{NQN_PREFIX}:", f":{owner_node}"
    if not nqn.startswith(prefix) or not nqn.endswith(suffix):
        return None
    volume_id = nqn[len(prefix) : -len(suffix)]
    return volume_id if volume_id and ":" not in volume_id else None


def address_family(address: str) -> str:
    """nvmet's addr_adrfam for an IP address."""
    return "ipv6" if ipaddress.ip_address(address).version == 6 else "ipv4"


def resolve(address: str) -> str:
    """nvmet listens on an IP address: a host name is resolved once, here."""
    try:
        ipaddress.ip_address(address)
        return address
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as err:
        raise FailedPrecondition(
            f"the export address {address!r} does not resolve to an IP address: {err}"
        ) from None
    return str(infos[0][4][0])


def namespace_uuid(nqn: str) -> str:
    """The stable UUID (and NGUID) of a subsystem's namespace."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, nqn))


def serial_of(nqn: str) -> str:
    """A stable serial number (20 characters) for a subsystem."""
    return hashlib.sha256(nqn.encode()).hexdigest()[:20]


def port_id_for(address: str, service: int) -> int:
    """The port id this address and service id start looking at (1..65000)."""
    return zlib.crc32(f"tcp:{address}:{service}".encode()) % 65000 + 1


@dataclass(frozen=True)
class Subsystem:
    """What configfs says about one of our subsystems."""

    nqn: str
    volume_id: str
    device_path: str
    enabled: bool
    hosts: tuple[str, ...]
    ports: tuple[str, ...] = field(default=())


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


class ConfigfsError(FailedPrecondition):
    """A configfs write the kernel refused: names the attribute, never the value
    (it may be a key). `errno` says why, for callers that handle one case."""

    def __init__(self, path: Path, err: OSError) -> None:
        super().__init__(f"nvmet refused a change of {path}: {err.strerror or err}")
        self.errno = err.errno


def _write(path: Path, value: str) -> None:
    """Write a configfs attribute (one write: configfs takes each write whole)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as err:
        raise ConfigfsError(path, err) from None


def _mkdir(path: Path) -> bool:
    """mkdir; False when it was there already."""
    try:
        path.mkdir()
    except FileExistsError:
        return False
    except OSError as err:
        raise ConfigfsError(path, err) from None
    return True


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as err:
        raise ConfigfsError(path, err) from None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as err:
        raise ConfigfsError(path, err) from None


def ensure_loaded(root: Path = CONFIGFS) -> Path:
    """configfs mounted and nvmet-tcp loaded: the nvmet directory."""
    nvmet = root / "nvmet"
    if nvmet.is_dir() and Path("/sys/module/nvmet_tcp").exists():
        return nvmet
    if not os.path.ismount(root):
        _run(["mount", "-t", "configfs", "none", str(root)], "mount configfs")
    if not Path("/sys/module/nvmet_tcp").exists():
        _run(["modprobe", "nvmet-tcp"], "modprobe nvmet-tcp")
    deadline = time.monotonic() + 5
    while not nvmet.is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not nvmet.is_dir():
        raise FailedPrecondition(f"this node cannot export over nvme-tcp: no {nvmet}")
    return nvmet


def _run(argv: list[str], what: str) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise FailedPrecondition(f"this node cannot export over nvme-tcp: {what}: {err}") from None
    if done.returncode != 0:
        raise FailedPrecondition(
            f"this node cannot export over nvme-tcp: {what}: {done.stderr.strip() or 'failed'}"
        )


class Nvmet:
    """`owner_node`'s view of nvmet: its port and its subsystems, nothing else."""

    def __init__(self, owner_node: str, root: Path = CONFIGFS / "nvmet") -> None:
        self.owner = owner_node
        self.root = root

    # ---- ports -----------------------------------------------------------------------

    def _port_matches(self, port: Path, address: str, service: int) -> bool:
        return (
            _read(port / "addr_trtype") == "tcp"
            and _read(port / "addr_traddr") == address
            and _read(port / "addr_trsvcid") == str(service)
        )

    def find_port(self, address: str, service: int) -> Path | None:
        ports = self.root / "ports"
        if not ports.is_dir():
            return None
        for port in sorted(ports.iterdir()):
            if self._port_matches(port, address, service):
                return port
        return None

    def ensure_port(self, address: str, service: int) -> Path:
        """This node's port (tcp, address, service id): found, or made.

        A port whose address is still empty and that no subsystem uses is
        a half-made one (a crash between mkdir and its attributes): ours if
        it sits at our id, finished here.
        """
        found = self.find_port(address, service)
        if found is not None:
            return found
        first = port_id_for(address, service)
        for offset in range(256):
            port = self.root / "ports" / str((first - 1 + offset) % 65000 + 1)
            made = _mkdir(port)
            if not made and (_read(port / "addr_traddr") or any((port / "subsystems").iterdir())):
                if self._port_matches(port, address, service):
                    return port  # made by a concurrent call
                continue  # someone else's
            _write(port / "addr_trtype", "tcp")
            _write(port / "addr_adrfam", address_family(address))
            _write(port / "addr_traddr", address)
            _write(port / "addr_trsvcid", str(service))
            log.info("made nvmet port %s for %s:%d", port.name, address, service)
            return port
        raise Internal(f"no free nvmet port id near {first} for {address}:{service}")

    def remove_port_if_unused(self, address: str, service: int) -> bool:
        """Remove this node's port once it serves nothing (it listens no more anyway)."""
        port = self.find_port(address, service)
        if port is None or any((port / "subsystems").iterdir()):
            return False
        try:
            port.rmdir()
        except OSError as err:
            if err.errno in (errno.EBUSY, errno.ENOTEMPTY, errno.ENOENT):
                return False
            raise
        log.info("removed nvmet port %s (%s:%d): it serves nothing", port.name, address, service)
        return True

    def link_port(self, port: Path, nqn: str) -> None:
        """Serve subsystem `nqn` on `port` (the first link makes the port listen)."""
        link = port / "subsystems" / nqn
        if link.is_symlink():
            return
        try:
            os.symlink(self.root / "subsystems" / nqn, link)
        except FileExistsError:
            return
        except OSError as err:
            raise FailedPrecondition(
                f"nvmet could not serve {nqn} on {_read(port / 'addr_traddr')}:"
                f"{_read(port / 'addr_trsvcid')}: {err.strerror} (is that address this "
                "node's, and the port free?)"
            ) from None

    def unlink_ports(self, nqn: str) -> None:
        """Stop serving `nqn` on every port: its controllers (connections) are dropped."""
        ports = self.root / "ports"
        if not ports.is_dir():
            return
        for port in ports.iterdir():
            _unlink(port / "subsystems" / nqn)

    def bounce(self, nqn: str, port: Path | None = None) -> None:
        """Drop every controller of `nqn` (unlink and relink its ports): a revoked host's
        live connection ends; the hosts still allowed reconnect after reconnect_delay.

        `port` (this node's) is linked at the end whether or not it was before:
        a bounce whose relink failed (or crashed) once is finished by the next.
        """
        ports = [
            p for p in (self.root / "ports").iterdir() if (p / "subsystems" / nqn).is_symlink()
        ]
        for linked in ports:
            _unlink(linked / "subsystems" / nqn)
        if port is not None and port not in ports:
            ports.append(port)
        for linked in ports:
            self.link_port(linked, nqn)

    # ---- hosts -----------------------------------------------------------------------

    def ensure_host(self, host_nqn: str, secret: str, ctrl_secret: str | None = None) -> bool:
        """The host entry with these DH-HMAC-CHAP keys (the host's, and the controller's
        for bidirectional authentication: by default the one derived from `secret`, as
        every consumer asks for it); True when a key changed.

        The key attributes are made 0600 before any key is written (configfs
        creates them 0644): no moment in which another local user reads a key.
        """
        host = self.root / "hosts" / check_nqn(host_nqn, "host NQN")
        _mkdir(host)
        for attribute in SECRET_ATTRIBUTES:
            try:
                if (host / attribute).stat().st_mode & 0o077:
                    os.chmod(host / attribute, 0o600)
            except FileNotFoundError as err:
                if not host.is_dir():  # another owner removed the entry just now: retry
                    raise ConfigfsError(host / attribute, err) from None
                raise FailedPrecondition(
                    f"this kernel's nvmet has no DH-HMAC-CHAP ({host / attribute} is missing): "
                    "it needs CONFIG_NVME_TARGET_AUTH"
                ) from None
        if _read(host / "dhchap_hash") != DHCHAP_HASH:
            _write(host / "dhchap_hash", DHCHAP_HASH)
        if ctrl_secret is None:
            ctrl_secret = ctrl_secret_of(secret)
        changed = False
        for attribute, value in zip(SECRET_ATTRIBUTES, (secret, ctrl_secret), strict=True):
            old = _read(host / attribute)
            if old != value:
                _write(host / attribute, value)
                # a new entry had no key: no controller can have authenticated with it
                changed = changed or bool(old)
        return changed

    def remove_host_if_unused(self, host_nqn: str) -> bool:
        """Remove the host entry when no subsystem (any owner's) allows it any more."""
        host = self.root / "hosts" / check_nqn(host_nqn, "host NQN")
        subsystems = self.root / "subsystems"
        if subsystems.is_dir() and any(
            (s / "allowed_hosts" / host_nqn).is_symlink() for s in subsystems.iterdir()
        ):
            return False
        try:
            host.rmdir()
        except FileNotFoundError:
            return False
        except OSError as err:
            if err.errno in (errno.EBUSY, errno.ENOTEMPTY):
                return False  # linked meanwhile by another owner
            raise
        return True

    # ---- subsystems ------------------------------------------------------------------

    def _own(self, nqn: str) -> Path:
        check_nqn(nqn, "subsystem NQN")
        if owned_subsystem(nqn, self.owner) is None:
            raise ValueError(f"subsystem {nqn} is not node {self.owner}'s")
        return self.root / "subsystems" / nqn

    def ensure_subsystem(self, nqn: str, device: Path) -> None:
        """The subsystem, closed to any host not listed, with namespace 1 on `device`
        (the export's loop device on the volume file: see nvme_exports)."""
        subsystem = self._own(nqn)
        if _mkdir(subsystem):
            _write(subsystem / "attr_serial", serial_of(nqn))  # only before a host saw it
        if _read(subsystem / "attr_allow_any_host") != "0":
            _write(subsystem / "attr_allow_any_host", "0")
        namespace = subsystem / "namespaces" / str(NSID)
        _mkdir(namespace)
        enabled = _read(namespace / "enable") == "1"
        if enabled and _read(namespace / "device_path") == str(device):
            return
        if enabled:  # another device (the volume file moved, a new loop): serve the new one
            _write(namespace / "enable", "0")
        _write(namespace / "device_path", str(device))
        # the same identity every time it is made (after a reboot too): a host that
        # reconnects to a namespace whose identifiers changed drops it (EIO)
        ident = namespace_uuid(nqn)
        if _read(namespace / "device_uuid") != ident:
            _write(namespace / "device_uuid", ident)
        if (namespace / "device_nguid").exists() and _read(namespace / "device_nguid") != ident:
            _write(namespace / "device_nguid", ident)
        self._enable(namespace, nqn)

    def _enable(self, namespace: Path, nqn: str) -> None:
        """Enable with O_DIRECT on the file (no second page cache); buffered where the
        file system cannot do direct I/O."""
        if (namespace / "buffered_io").exists():
            _write(namespace / "buffered_io", "0")
        try:
            _write(namespace / "enable", "1")
            return
        except ConfigfsError as err:
            if err.errno != errno.EINVAL or not (namespace / "buffered_io").exists():
                raise FailedPrecondition(
                    f"nvmet could not enable namespace {NSID} of {nqn} on "
                    f"{_read(namespace / 'device_path')}: {err}"
                ) from None
        _write(namespace / "buffered_io", "1")
        try:
            _write(namespace / "enable", "1")
        except ConfigfsError as err:
            raise FailedPrecondition(
                f"nvmet could not enable namespace {NSID} of {nqn} on "
                f"{_read(namespace / 'device_path')}: {err}"
            ) from None
        log.info("%s: the volume file cannot do direct I/O; namespace is buffered", nqn)

    def allow_host(self, nqn: str, host_nqn: str) -> None:
        link = self._own(nqn) / "allowed_hosts" / check_nqn(host_nqn, "host NQN")
        if link.is_symlink():
            return
        try:
            os.symlink(self.root / "hosts" / host_nqn, link)
        except FileExistsError:
            pass
        except OSError as err:
            raise ConfigfsError(link, err) from None

    def disallow_host(self, nqn: str, host_nqn: str) -> bool:
        """Unlink the host from the subsystem; whether it was linked."""
        link = self._own(nqn) / "allowed_hosts" / check_nqn(host_nqn, "host NQN")
        try:
            link.unlink()
        except FileNotFoundError:
            return False
        return True

    def remove_subsystem(self, nqn: str) -> None:
        """Unserve, disable and remove the subsystem; its hosts' entries stay (see
        `remove_host_if_unused`). Gone is fine."""
        subsystem = self._own(nqn)
        if not subsystem.is_dir():
            return
        self.unlink_ports(nqn)
        allowed = subsystem / "allowed_hosts"
        for link in list(allowed.iterdir()) if allowed.is_dir() else []:
            _unlink(link)
        namespaces = subsystem / "namespaces"
        for namespace in list(namespaces.iterdir()) if namespaces.is_dir() else []:
            if _read(namespace / "enable") == "1":
                _write(namespace / "enable", "0")
            _rmdir(namespace)
        _rmdir(subsystem)
        log.info("removed nvmet subsystem %s", nqn)

    def revalidate(self, nqn: str) -> None:
        """Tell connected hosts the namespace changed size (they rescan on the event)."""
        attr = self._own(nqn) / "namespaces" / str(NSID) / "revalidate_size"
        if attr.exists():
            try:
                _write(attr, "1")
            except OSError as err:
                log.warning("%s: could not announce the new size: %s", nqn, err.strerror)

    def subsystem(self, nqn: str) -> Subsystem | None:
        subsystem = self._own(nqn)
        volume_id = owned_subsystem(nqn, self.owner)
        if volume_id is None or not subsystem.is_dir():
            return None
        namespace = subsystem / "namespaces" / str(NSID)
        allowed = subsystem / "allowed_hosts"
        hosts = tuple(sorted(p.name for p in allowed.iterdir())) if allowed.is_dir() else ()
        ports_dir = self.root / "ports"
        ports = tuple(
            sorted(p.name for p in ports_dir.iterdir() if (p / "subsystems" / nqn).is_symlink())
            if ports_dir.is_dir()
            else ()
        )
        return Subsystem(
            nqn=nqn,
            volume_id=volume_id,
            device_path=_read(namespace / "device_path") or "",
            enabled=_read(namespace / "enable") == "1",
            hosts=hosts,
            ports=ports,
        )

    def subsystems(self) -> list[Subsystem]:
        """Every subsystem of this owner that configfs has (for re-adoption)."""
        directory = self.root / "subsystems"
        if not directory.is_dir():
            return []
        found = []
        for entry in sorted(directory.iterdir()):
            if owned_subsystem(entry.name, self.owner) is None:
                continue
            described = self.subsystem(entry.name)
            if described is not None:
                found.append(described)
        return found

    def port_address(self, port: Path) -> tuple[str, int]:
        return _read(port / "addr_traddr") or "", int(_read(port / "addr_trsvcid") or 0)
