"""NBD exports of this node's volumes to other nodes (the owner side).

One `nbdkit` per (volume, client node), TLS-PSK with the attachment's
key, so closing one export (revocation) never touches another node's
connection, and a key is good for exactly one volume on one node:

    nbdkit --tls=require --tls-psk=<psk file> [-r] -i <address> -p <port>
           --pidfile <pid file> [--filter=ip] --filter=rate file file=<volume file>
           [allow=<client address> deny=all] rate-file=<rate file>

nbdkit forks into the background once it listens (no `-f`), so when the
start command returns the port is open, and a non-zero exit is a start
that failed (most often "address in use": the next port is tried). It runs
in its own session: an agent restart or crash never takes live I/O along.

State, per export, in `<state-dir>/exports/<volume_id>/<client_node>.*`:
`json` (what was exported; written before nbdkit starts, so no nbdkit of
ours ever runs without a record that finds it again), `psk` (the key, 0600),
`pid` (nbdkit's pid file) and `rate` (QoS: bits/s, 0 unlimited, rewritten live
by node_agent/qos.py). At start the agent re-adopts every export
whose pid is nbdkit on that volume file with that key file (/proc cmdline:
a pid alone proves nothing after a reboot) and restarts the dead ones on
their recorded address and port, never elsewhere: management's record and
the consumer's connection point there. What no attachment wants any more
is reaped after management's heartbeat reply says so (`unwanted`).

A resize is not announced: NBD has no resize notice, so a connected client
keeps the size it negotiated and sees the new size when it reconnects (the
consumer side reconnects to grow).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

from node_agent.keys import holds_key, psk_line, write_private
from tessera.errors import FailedPrecondition, Internal, InvalidArgument, ResourceExhausted
from tessera.ids import check_node_id, check_volume_id, is_volume_id
from tessera.models import CLIENT_ADDRESS_PATTERN, AgentExport, AgentExportCreate
from tessera.system import processes

log = logging.getLogger(__name__)

NBDKIT = "nbdkit"
#: the default --export-ports range (10809 is NBD's registered port)
DEFAULT_PORTS = (10809, 10999)
#: SIGTERM, then SIGKILL after this long: a closed export must stop serving now
CLOSE_GRACE = 2.0
START_TIMEOUT = 30.0
#: how long the forked nbdkit may take to write its pid file
PIDFILE_WAIT = 5.0

Key = tuple[str, str]
R = TypeVar("R")


@dataclass(frozen=True)
class ExportRecord:
    """What `<client_node>.json` says: enough to find, compare and restart the export."""

    volume_id: str
    client_node: str
    host: str
    port: int
    readonly: bool
    client_address: str
    volume_file: str
    psk_identity: str

    def model(self) -> AgentExport:
        return AgentExport(
            volume_id=self.volume_id,
            client_node=self.client_node,
            host=self.host,
            port=self.port,
            readonly=self.readonly,
        )


def parse_port_range(text: str) -> tuple[int, int]:
    """`LO-HI` (inclusive) as given to --export-ports."""
    lo, sep, hi = text.partition("-")
    try:
        low, high = int(lo), int(hi if sep else lo)
    except ValueError:
        raise ValueError(f"{text!r} is not a port range LO-HI") from None
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{text!r} is not a port range LO-HI within 1-65535")
    return low, high


def check_client_address(value: str) -> str:
    """Empty, an IP address or a host name (AgentExportCreate's pattern says the same)."""
    if not value or _is_ip(value):
        return value
    if not re.fullmatch(CLIENT_ADDRESS_PATTERN, value):
        raise InvalidArgument(
            "client_address must be empty (any address), a host name or an IP address",
            field="client_address",
        )
    return value


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _addresses_of(client_address: str) -> list[str]:
    """The IP addresses `client_address` stands for: itself, or what its name resolves to."""
    if _is_ip(client_address):
        return [client_address]
    try:
        infos = socket.getaddrinfo(client_address, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    # only what ipaddress accepts reaches nbdkit's command line
    return sorted({str(info[4][0]) for info in infos if _is_ip(str(info[4][0]))})


class Exports:
    """The exports of this node; the caller (Agent) holds the volume's lock around changes."""

    def __init__(self, directory: Path, address: str, ports: tuple[int, int] = DEFAULT_PORTS):
        self.directory = directory
        #: where exports listen and what AgentExport.host says (the node's data address)
        self.address = address
        self.ports = ports
        #: exports opened by this process and when, by a counter (see `mark`)
        self._born: dict[Key, int] = {}
        self._serial = 0
        self._serial_lock = threading.Lock()
        #: choosing a port and starting nbdkit on it: one at a time
        self._start_lock = threading.Lock()
        self._ip_filter: bool | None = None

    # ---- paths and records ---------------------------------------------------------

    def _file(self, volume_id: str, client_node: str, suffix: str) -> Path:
        return self.directory / volume_id / f"{client_node}.{suffix}"

    def _read(self, volume_id: str, client_node: str) -> ExportRecord | None:
        return load_record(self._file(volume_id, client_node, "json"), ExportRecord, "export")

    def _records(self, volume_id: str | None = None) -> Iterator[ExportRecord]:
        for path in record_paths(self.directory, volume_id):
            record = load_record(path, ExportRecord, "export")
            if record is not None:
                yield record

    def _pid(self, record: ExportRecord) -> int | None:
        """nbdkit's pid while it is the process serving this record (key file and volume file)."""
        psk = self._file(record.volume_id, record.client_node, "psk")
        markers = [f"--tls-psk={psk}", f"file={record.volume_file}"]
        return processes.running(
            self._file(record.volume_id, record.client_node, "pid"), NBDKIT, markers
        )

    # ---- the heartbeat's view of time --------------------------------------------------

    def mark(self) -> int:
        """A point in time: exports opened after it are never reaped by `unwanted(…, mark)`.

        Taken before a heartbeat is sent. An attach racing that heartbeat
        opens its export after the mark, so a reply computed before the
        attachment existed cannot close it.
        """
        with self._serial_lock:
            return self._serial

    def _stamp(self, key: Key) -> None:
        with self._serial_lock:
            self._serial += 1
            self._born[key] = self._serial

    def _older_than(self, key: Key, mark: int) -> bool:
        """Opened at or before `mark` (exports found at start are older than any mark)."""
        with self._serial_lock:
            return self._born.get(key, 0) <= mark

    def unwanted(self, wanted: set[Key], mark: int) -> list[Key]:
        """Exports older than `mark` that are not in `wanted` (volume id, client node)."""
        keys = [(r.volume_id, r.client_node) for r in self._records()]
        return [k for k in keys if k not in wanted and self._older_than(k, mark)]

    def reap(self, volume_id: str, client_node: str, mark: int) -> bool:
        """Close the export if it is still older than `mark` (it may have been replaced)."""
        if not self._older_than((volume_id, client_node), mark):
            return False
        if self._read(volume_id, client_node) is None:
            return False
        self.close(volume_id, client_node)
        log.info("volume %s to node %s was not wanted by management", volume_id, client_node)
        return True

    # ---- the API's operations ------------------------------------------------------------

    def list(self) -> list[AgentExport]:
        return [r.model() for r in self._records()]

    def of_volume(self, volume_id: str) -> list[AgentExport]:
        return [r.model() for r in self._records(volume_id)]

    def set_rate(self, volume_id: str, bits_per_second: int) -> None:
        """Every export of the volume to this many bits/s each way (0: unlimited), live.

        nbdkit's rate filter rereads the file (replaced atomically, as it
        asks) within a moment; a record opened later starts from it.
        """
        for record in self._records(volume_id):
            path = self._file(record.volume_id, record.client_node, "rate")
            write_private(path, f"{bits_per_second}\n".encode())

    def liveness(self) -> list[bool]:
        """Per export record: whether its nbdkit is running (for the agent's /metrics)."""
        return [self._pid(r) is not None for r in self._records()]

    def open(
        self, volume_id: str, client_node: str, volume_file: Path, req: AgentExportCreate
    ) -> AgentExport:
        """Export the volume to `client_node`; the same key and flags again: the running one."""
        check_volume_id(volume_id)
        check_node_id(client_node, "client_node")
        client_address = check_client_address(req.client_address)
        if not self.address:
            raise FailedPrecondition(
                "this agent has no address to export on: start it with --export-address "
                "(or --listen/--advertise)"
            )
        key = (volume_id, client_node)
        self._stamp(key)  # before anything is written: see `mark`
        old = self._read(volume_id, client_node)
        if old is not None and self._serves(old, volume_file, req, client_address):
            return old.model()
        if old is not None:
            # Another key or flags: the old nbdkit must not serve a moment longer, and
            # none of its files may survive to mix with the new ones after a crash.
            self._stop(volume_id, client_node)
            self._remove(volume_id, client_node)
        record = ExportRecord(
            volume_id=volume_id,
            client_node=client_node,
            host=self.address,
            port=old.port if old is not None else 0,
            readonly=req.readonly,
            client_address=client_address,
            volume_file=str(volume_file),
            psk_identity=req.psk_identity,
        )
        started = self._start(record, psk_line(req.psk_identity, req.psk_key))
        log.info(
            "exported volume %s to node %s on %s:%d%s",
            volume_id, client_node, started.host, started.port,
            " read-only" if started.readonly else "",
        )  # fmt: skip
        return started.model()

    def close(self, volume_id: str, client_node: str) -> None:
        """Stop serving (every connection of the client drops) and forget the key; idempotent."""
        check_volume_id(volume_id)
        check_node_id(client_node, "client_node")
        record = self._read(volume_id, client_node)
        self._stop(volume_id, client_node)
        self._remove(volume_id, client_node)
        with self._serial_lock:
            self._born.pop((volume_id, client_node), None)
        if record is not None:
            log.info("closed export of volume %s to node %s", volume_id, client_node)

    # ---- lifecycle ---------------------------------------------------------------------

    def recover(self, volume_file_of: Callable[[str], Path | None]) -> list[AgentExport]:
        """At start: re-adopt live exports, restart dead ones; never kill a live one."""
        kept = []
        for record in list(self._records()):
            self._sweep_temporaries(record.volume_id)
            if self._pid(record) is not None:
                log.info(
                    "re-adopted export of volume %s to node %s",
                    record.volume_id,
                    record.client_node,
                )
                kept.append(record.model())
                continue
            restarted = self._restart(record, volume_file_of(record.volume_id))
            if restarted is not None:
                kept.append(restarted.model())
        return kept

    def _restart(self, record: ExportRecord, volume_file: Path | None) -> ExportRecord | None:
        """Bring a dead export back where it was; drop it if its volume or key is gone.

        Only on the recorded address and port: the consumer's connection
        and management's record point there, so an export restarted
        elsewhere would serve nobody while looking healthy. When that
        address or port cannot be had, the record stays (listed, closed by
        a detach, restarted by the next start or replaced by management's
        next export call) and an error says what to do.
        """
        key_file = self._file(record.volume_id, record.client_node, "psk")
        if volume_file is None or not key_file.is_file():
            log.warning(
                "dropped the record of the dead export of volume %s to node %s: %s",
                record.volume_id, record.client_node,
                "the volume is not on this node" if volume_file is None else "its key is gone",
            )  # fmt: skip
            self._remove(record.volume_id, record.client_node)
            return None
        moved = ExportRecord(**{**asdict(record), "volume_file": str(volume_file)})
        with self._start_lock:
            failure = self._relaunch(moved)
            if failure is None:
                log.info(
                    "restarted the dead export of volume %s to node %s on %s:%d",
                    record.volume_id, record.client_node, moved.host, moved.port,
                )  # fmt: skip
                return moved
        log.error(
            "could not restart the dead export of volume %s to node %s on its recorded address "
            "%s:%d (%s); management's record and node %s's connection still point there, so it "
            "is not served elsewhere: the volume is unreachable from node %s until the export "
            "is opened again (unpublish and publish the volume there, or restart this agent "
            "once the address is free)",
            record.volume_id, record.client_node, moved.host, moved.port, failure,
            record.client_node, record.client_node,
        )  # fmt: skip
        return None

    def _relaunch(self, record: ExportRecord) -> str | None:
        """`_launch` on the record's own address and port only; None when it serves."""
        try:
            if not _bindable(record.host, record.port):
                return "the port is taken, or the address is not this node's any more"
            # the pool may have moved: the record must find the nbdkit about to run
            write_private(
                self._file(record.volume_id, record.client_node, "json"),
                json.dumps(asdict(record)).encode(),
            )
            return self._launch(record)
        except OSError as err:
            return str(err)
        except Internal as err:
            return err.message

    # ---- nbdkit ------------------------------------------------------------------------

    def _serves(
        self, record: ExportRecord, volume_file: Path, req: AgentExportCreate, client_address: str
    ) -> bool:
        """Whether the running export is exactly what `req` asks for."""
        return (
            record.readonly == req.readonly
            and record.client_address == client_address
            and record.volume_file == str(volume_file)
            and record.host == self.address
            and holds_key(
                self._file(record.volume_id, record.client_node, "psk"),
                req.psk_identity,
                req.psk_key,
            )
            and self._pid(record) is not None
        )

    def _start(self, record: ExportRecord, psk: bytes | None = None) -> ExportRecord:
        """Start nbdkit for `record` on its old port if free, else the first free one.

        The record is written first, then the key (`psk`; None: already in
        place), then nbdkit starts: a crash in between leaves a record
        without a key (dropped at start) or a complete one (restarted at
        start), never an nbdkit no record finds.
        """
        with self._start_lock:
            for port in self._candidate_ports(record):
                placed = ExportRecord(**{**asdict(record), "port": port})
                write_private(
                    self._file(record.volume_id, record.client_node, "json"),
                    json.dumps(asdict(placed)).encode(),
                )
                if psk is not None:
                    write_private(self._file(record.volume_id, record.client_node, "psk"), psk)
                    psk = None
                try:
                    failure = self._launch(placed)
                except Internal:
                    self._remove(record.volume_id, record.client_node)
                    raise
                if failure is None:
                    return placed
                if "in use" in failure:
                    continue  # someone took the port since the bind test
                self._remove(record.volume_id, record.client_node)
                raise Internal(
                    f"nbdkit could not export volume {record.volume_id} to node "
                    f"{record.client_node}: {failure}"
                )
            self._remove(record.volume_id, record.client_node)
        low, high = self.ports
        raise ResourceExhausted(f"no free port for an export in --export-ports {low}-{high}")

    def _launch(self, record: ExportRecord) -> str | None:
        """Run nbdkit for `record` (its files in place); None when it serves, else why not.

        Whatever went wrong, no nbdkit of this export is left running: one
        that started but whose pid file never confirmed it is found by its
        key file and stopped, since nothing else would ever find it again.
        """
        self._file(record.volume_id, record.client_node, "pid").unlink(missing_ok=True)
        result = self._run_nbdkit(record)
        if result.returncode == 0 and self._wait_for_pid(record):
            return None
        self._stop(record.volume_id, record.client_node)
        if result.returncode == 0:
            return f"nbdkit started but did not confirm within {PIDFILE_WAIT:g} s; stopped it"
        detail = result.stderr.decode(errors="replace").strip()[-400:]
        return f"exit {result.returncode}: {detail or 'no message'}"

    def _wait_for_pid(self, record: ExportRecord) -> bool:
        """nbdkit's daemon writes its pid file just after its parent exits: give it a moment."""
        deadline = time.monotonic() + PIDFILE_WAIT
        while self._pid(record) is None:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _run_nbdkit(self, record: ExportRecord) -> subprocess.CompletedProcess[bytes]:
        psk = self._file(record.volume_id, record.client_node, "psk")
        pid = self._file(record.volume_id, record.client_node, "pid")
        argv = [NBDKIT, "--tls=require", f"--tls-psk={psk}"]
        if record.readonly:
            argv.append("-r")
        argv += ["-i", record.host, "-p", str(record.port), "--pidfile", str(pid)]
        allow = self._ip_filter_args(record.client_address)
        if allow:
            argv.append("--filter=ip")
        # the rate filter always: QoS changes its rate file live (node_agent/qos.py)
        rate = self._file(record.volume_id, record.client_node, "rate")
        argv.append("--filter=rate")
        argv += ["file", f"file={record.volume_file}", *allow, f"rate-file={rate}"]
        try:
            return subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,  # outlives the agent, and a SIGINT to the agent's group
                close_fds=True,
                timeout=START_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            self._stop(record.volume_id, record.client_node)  # a hung start may have forked
            raise Internal(f"could not run nbdkit: {err}") from err

    def _ip_filter_args(self, client_address: str) -> list[str]:
        """`allow=<client's addresses> deny=all` when nbdkit's ip filter can parse addresses.

        The filter is defence in depth; the access control is the
        per-attachment TLS-PSK key. So where it cannot work the export
        relies on the key alone, with a warning: nbdkit 1.32's filter
        rejects every literal address ("don't know how to parse rule"), and
        a client host name may not resolve here.
        """
        if not client_address:
            return []
        if self._ip_filter is None:
            probe = [NBDKIT, "--filter=ip", "null", "allow=127.0.0.1", "deny=all", "--dump-plugin"]
            try:
                done = subprocess.run(
                    probe, capture_output=True, timeout=START_TIMEOUT, check=False
                )
                self._ip_filter = done.returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                self._ip_filter = False
            if not self._ip_filter:
                log.warning(
                    "this nbdkit's ip filter cannot restrict exports to an address; "
                    "exports rely on their TLS-PSK key alone"
                )
        if not self._ip_filter:
            return []
        addresses = _addresses_of(client_address)
        if not addresses:
            log.warning(
                "client address %s does not resolve here; the export relies on its key alone",
                client_address,
            )
            return []
        return [f"allow={','.join(addresses)}", "deny=all"]

    def _candidate_ports(self, record: ExportRecord) -> Iterator[int]:
        low, high = self.ports
        held = {
            r.port
            for r in self._records()
            if (r.volume_id, r.client_node) != (record.volume_id, record.client_node)
        }
        order = [record.port] if low <= record.port <= high else []
        order += [p for p in range(low, high + 1) if p != record.port]
        for port in order:
            if port not in held and _bindable(record.host, port):
                yield port

    def _stop(self, volume_id: str, client_node: str) -> None:
        """Stop every nbdkit serving with this export's key file, whatever volume file it has.

        Found by the key file on its command line in /proc, not only by the
        pid file: an nbdkit that started but never wrote its pid file (or
        whose pid file a crash lost) must not keep serving the key.
        """
        for pid in self._serving_with_key(volume_id, client_node):
            processes.terminate(pid, NBDKIT, grace=CLOSE_GRACE)

    def _serving_with_key(self, volume_id: str, client_node: str) -> list[int]:
        """The nbdkit processes whose command line holds this export's key file."""
        marker = f"--tls-psk={self._file(volume_id, client_node, 'psk')}"
        pid = processes.running(self._file(volume_id, client_node, "pid"), NBDKIT, [marker])
        found = set(processes.matching(lambda a: Path(a[0]).name == NBDKIT and marker in a))
        return sorted(found | ({pid} if pid is not None else set()))

    def _remove(self, volume_id: str, client_node: str) -> None:
        """Delete the export's files, the record last (it is what finds the others)."""
        for suffix in ("psk", "pid", "rate", "json"):
            self._file(volume_id, client_node, suffix).unlink(missing_ok=True)
        try:
            (self.directory / volume_id).rmdir()
        except OSError:
            pass  # other clients' exports of the volume remain (or it is gone)

    def _sweep_temporaries(self, volume_id: str) -> None:
        for tmp in (self.directory / volume_id).glob(".tmp-*"):
            tmp.unlink(missing_ok=True)


def record_paths(directory: Path, volume_id: str | None = None) -> Iterator[Path]:
    """Every `<volume_id>/<client_node>.json` record below `directory`, or one volume's.

    Shared with the nvme-tcp exports (node_agent/nvme_exports.py), which keep
    their records in the same layout; names that are not volume ids are
    skipped, so a stray directory never becomes a record.
    """
    if not directory.is_dir():
        return
    dirs = [directory / volume_id] if volume_id else sorted(directory.iterdir())
    for vdir in dirs:
        if is_volume_id(vdir.name) and vdir.is_dir():
            yield from sorted(vdir.glob("*.json"))


def load_record(path: Path, kind: Callable[..., R], what: str) -> R | None:
    """The record `kind(**json)` at `path`; None when it is gone or unreadable (a torn
    or foreign file is logged and skipped: one bad record must not stop the rest)."""
    try:
        return kind(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as err:
        log.warning("ignored the unreadable %s record %s: %s", what, path, err)
        return None


def _bindable(host: str, port: int) -> bool:
    """Whether nothing listens on host:port now (nbdkit may still lose a race: retried)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                return False
            raise
    return True
