"""Frozen filesystems of attached volumes, each under leases the agent keeps itself.

A caller (management cutting a snapshot) freezes, copies, thaws. If it
dies in between, a filesystem must not stay frozen under a pod: every
freeze carries a lease and a timer thaws when it runs out, whatever
happens to the caller.

Several cuts may freeze one volume at once (two snapshots, a group): each
is a holder with its own lease, and the filesystem is thawed only when
the last holder lets go, so one cut's thaw never ends another's instant.
A renewal by a holder that no longer holds (lapsed, thawed, agent
restarted) is refused with Conflict: the caller learns its instant was
lost instead of cutting an inconsistent copy.

FIFREEZE syncs the filesystem and blocks for as long as its storage does
(an owner that went away): it runs in its own thread under a deadline
shorter than the lease, and only that volume's lock is held meanwhile,
so no other volume's thaw, lease expiry or `thaw_all` waits behind it.
A FIFREEZE that finishes after its caller gave up is thawed again unless
a holder still wants the volume frozen.

What we froze is thawed through the directory fd opened at freeze time:
a path can be unmounted or mounted over meanwhile, and a thaw by path
would then reach another filesystem. What is frozen is also written to
the state directory before the ioctl, so an agent that crashed with
something frozen thaws it at start (by path then, only where the path is
still a mount of the same device); and `thaw_all` runs when the agent stops.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from node_agent.attachments import AttachmentManager
from tessera.errors import Conflict, Unavailable
from tessera.models import AgentFreezeState
from tessera.system import freeze as fs_freeze
from tessera.system.mounts import mount_table

log = logging.getLogger(__name__)

#: FIFREEZE may take this share of the lease before the caller is answered Unavailable
FREEZE_DEADLINE_SHARE = 0.5


@dataclass
class _Job:
    """One FIFREEZE in its own thread; its caller may give up waiting (abandon it) first."""

    mountpoint: str
    device: str
    done: threading.Event = field(default_factory=threading.Event)
    #: decides, once, whether the caller took the result or abandoned it
    guard: threading.Lock = field(default_factory=threading.Lock)
    abandoned: bool = False
    fd: int | None = None
    froze: bool = False
    error: OSError | None = None


@dataclass
class _Volume:
    """What one volume's freezes hold; every field is guarded by `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: holder -> monotonic time its lease runs out ("" is the anonymous holder)
    holders: dict[str, float] = field(default_factory=dict)
    #: mountpoint -> (directory fd, device) of filesystems we froze: ours to thaw, by fd
    fds: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: FIFREEZEs that outlived their caller's deadline and have not finished yet
    stuck: dict[str, _Job] = field(default_factory=dict)
    timer: threading.Timer | None = None


class Freezes:
    def __init__(self, attachments: AttachmentManager, state_dir: Path) -> None:
        self.attachments = attachments
        self.state_dir = state_dir
        #: guards `_volumes` only, never held across an ioctl
        self._guard = threading.Lock()
        #: one entry per volume ever frozen here (small; never removed, so that
        #: two threads can never hold two different locks for one volume)
        self._volumes: dict[str, _Volume] = {}

    # ---- the API --------------------------------------------------------------------

    def freeze(
        self, volume_id: str, lease_seconds: float, holder: str = "", renew: bool = False
    ) -> AgentFreezeState:
        """Freeze every filesystem of the volume mounted here for `holder`, or renew its lease."""
        vol = self._volume(volume_id)
        with vol.lock:
            _drop_lapsed(vol)
            if renew:
                return self._renew(volume_id, vol, lease_seconds, holder)
            seen = self._mountpoints(volume_id)
            try:
                for mountpoint, device in seen:
                    if mountpoint not in vol.fds:
                        self._freeze_one(volume_id, vol, mountpoint, device, lease_seconds)
            except (OSError, Unavailable):
                if not vol.holders:  # nobody else wants it frozen: undo this call's part
                    self._release(volume_id, vol)
                else:
                    self._record(volume_id, vol)
                raise
            vol.holders[holder] = time.monotonic() + lease_seconds
            self._schedule(volume_id, vol)
            self._record(volume_id, vol)
        names = [mountpoint for mountpoint, _ in seen]
        log.info(
            "froze %s for %s for %.1fs: %s",
            volume_id,
            holder or "-",
            lease_seconds,
            names or "not mounted",
        )
        return AgentFreezeState(volume_id=volume_id, frozen=bool(names), mountpoints=names)

    def thaw(self, volume_id: str, holder: str = "") -> AgentFreezeState:
        """Release `holder`'s freeze (every holder's when empty); the last one out thaws."""
        with self._guard:
            vol = self._volumes.get(volume_id)
        if vol is None:
            return AgentFreezeState(volume_id=volume_id, frozen=False, mountpoints=[])
        with vol.lock:
            if holder:
                vol.holders.pop(holder, None)
            else:
                vol.holders.clear()
            _drop_lapsed(vol)
            if vol.holders:  # another cut still needs the instant
                self._schedule(volume_id, vol)
                return _state(volume_id, vol)
            thawed = self._release(volume_id, vol)
        return AgentFreezeState(volume_id=volume_id, frozen=False, mountpoints=thawed)

    def thaw_all(self) -> None:
        with self._guard:
            volume_ids = list(self._volumes)
        for volume_id in volume_ids:
            self.thaw(volume_id)

    def recover(self) -> list[str]:
        """At start: thaw what a crashed agent left frozen; the mountpoints thawed."""
        thawed: list[str] = []
        if not self.state_dir.is_dir():
            return thawed
        for record in sorted(self.state_dir.iterdir()):
            if not record.name.startswith("."):
                for mountpoint, device in _read_record(record):
                    if _thaw_recorded(mountpoint, device):
                        thawed.append(mountpoint)
            record.unlink(missing_ok=True)
        return thawed

    def is_frozen(self, volume_id: str) -> bool:
        """Whether we hold a filesystem of the volume frozen (not: whether a holder is left)."""
        with self._guard:
            vol = self._volumes.get(volume_id)
        return vol is not None and bool(vol.fds)

    def stuck(self, volume_id: str) -> list[str]:
        """Mountpoints of the volume whose FIFREEZE outlived its caller and has not ended."""
        with self._guard:
            vol = self._volumes.get(volume_id)
        if vol is None:
            return []
        with vol.lock:
            return sorted(vol.stuck)

    # ---- holders and leases -----------------------------------------------------------

    def _volume(self, volume_id: str) -> _Volume:
        with self._guard:
            return self._volumes.setdefault(volume_id, _Volume())

    def _renew(
        self, volume_id: str, vol: _Volume, lease_seconds: float, holder: str
    ) -> AgentFreezeState:
        if holder not in vol.holders:
            raise Conflict(
                f"holder {holder or '(anonymous)'} holds no freeze of volume {volume_id} on "
                "this node (its lease ran out, it was thawed, or the agent restarted): the "
                "frozen instant was lost",
                field="holder",
            )
        vol.holders[holder] = time.monotonic() + lease_seconds
        self._schedule(volume_id, vol)
        return _state(volume_id, vol)

    def _schedule(self, volume_id: str, vol: _Volume) -> None:
        """One timer per volume, at the earliest lease end (the caller holds vol.lock)."""
        if vol.timer is not None:
            vol.timer.cancel()
            vol.timer = None
        if vol.holders:
            delay = max(0.0, min(vol.holders.values()) - time.monotonic())
            vol.timer = threading.Timer(delay, self._expire, (volume_id, vol))
            vol.timer.daemon = True
            vol.timer.start()

    def _expire(self, volume_id: str, vol: _Volume) -> None:
        try:
            with vol.lock:
                if vol.timer is not threading.current_thread():
                    return  # rescheduled meanwhile: a newer timer decides
                vol.timer = None
                _drop_lapsed(vol)
                if vol.holders:
                    self._schedule(volume_id, vol)
                    return
                if vol.fds:
                    log.warning("freeze lease of %s ran out: thawing", volume_id)
                self._release(volume_id, vol)
        except Exception:  # noqa: BLE001 - a timer thread has nobody to raise to
            log.exception("thawing %s after its lease failed", volume_id)

    # ---- FIFREEZE under a deadline ----------------------------------------------------

    def _freeze_one(
        self, volume_id: str, vol: _Volume, mountpoint: str, device: str, lease_seconds: float
    ) -> None:
        """FIFREEZE one filesystem in a worker; Unavailable when it outlasts part of the lease."""
        if mountpoint in vol.stuck:
            raise Unavailable(
                f"an earlier freeze of {mountpoint} (volume {volume_id}) has not finished: "
                "its storage is not answering"
            )
        job = _Job(mountpoint, device)
        # recorded first: a crash right after the ioctl still thaws at start
        self._record(volume_id, vol, job)
        threading.Thread(
            target=self._run, args=(volume_id, vol, job), daemon=True, name=f"fifreeze-{volume_id}"
        ).start()
        deadline = lease_seconds * FREEZE_DEADLINE_SHARE
        if not _wait(job, deadline):
            vol.stuck[mountpoint] = job
            raise Unavailable(
                f"freezing {mountpoint} (volume {volume_id}) did not finish within "
                f"{deadline:.1f}s: its storage is not answering; it is thawed again when it does"
            )
        if job.error is not None:
            raise job.error
        if job.froze:
            assert job.fd is not None
            vol.fds[mountpoint] = (job.fd, device)
        elif job.fd is not None:
            os.close(job.fd)  # someone else froze it (EBUSY): frozen, but not ours to thaw

    def _run(self, volume_id: str, vol: _Volume, job: _Job) -> None:
        """The worker: open and FIFREEZE; if the caller gave up, settle the outcome itself."""
        try:
            job.fd = fs_freeze.open_dir(job.mountpoint)
            job.froze = fs_freeze.freeze_fd(job.fd)
        except OSError as exc:
            job.error = exc
            if job.fd is not None:
                os.close(job.fd)
                job.fd = None
        with job.guard:
            job.done.set()
            late = job.abandoned
        if late:
            self._settle_late(volume_id, vol, job)

    def _settle_late(self, volume_id: str, vol: _Volume, job: _Job) -> None:
        """An abandoned FIFREEZE ended: kept only while a holder wants the volume frozen."""
        with vol.lock:
            vol.stuck.pop(job.mountpoint, None)
            _drop_lapsed(vol)
            if job.fd is not None:
                if job.froze and vol.holders and job.mountpoint not in vol.fds:
                    vol.fds[job.mountpoint] = (job.fd, job.device)
                    log.info("late freeze of %s kept: volume %s is held", job.mountpoint, volume_id)
                else:
                    if job.froze:
                        _thaw_late(job.fd, job.mountpoint)
                    os.close(job.fd)
            self._record(volume_id, vol)

    # ---- thawing and records ----------------------------------------------------------

    def _release(self, volume_id: str, vol: _Volume) -> list[str]:
        """Thaw what we froze of the volume, by fd; the mountpoints (the caller holds vol.lock)."""
        vol.holders.clear()
        if vol.timer is not None:
            vol.timer.cancel()
            vol.timer = None
        thawed, failure = [], None
        for mountpoint, (fd, _) in sorted(vol.fds.items()):
            try:
                fs_freeze.thaw_fd(fd)
            except OSError as exc:  # kept (and recorded) for a retry to thaw
                log.error("thawing %s (volume %s) failed: %s", mountpoint, volume_id, exc)
                failure = failure or exc
                continue
            os.close(fd)
            del vol.fds[mountpoint]
            thawed.append(mountpoint)
        self._record(volume_id, vol)
        if failure is not None:
            raise failure
        return thawed

    def _mountpoints(self, volume_id: str) -> list[tuple[str, str]]:
        """(mountpoint, device) per filesystem on the volume's devices (its primary and views).

        Only filesystem mounts, matched by device number: a bind of the device
        node (a block publish) lives on /dev's filesystem, which is not ours
        to freeze. Several mounts of one filesystem share a superblock: one
        freeze covers them all.
        """
        numbers = set()
        for device in self.attachments.devices_of(volume_id):
            try:
                rdev = os.stat(device.path).st_rdev
            except OSError:
                continue
            numbers.add(f"{os.major(rdev)}:{os.minor(rdev)}")
        picked: dict[str, str] = {}
        for mount in mount_table():
            if mount.device in numbers:
                picked.setdefault(mount.device, mount.mountpoint)
        return sorted((mountpoint, device) for device, mountpoint in picked.items())

    def _record(self, volume_id: str, vol: _Volume, job: _Job | None = None) -> None:
        """Write what may be frozen (held, stuck, and `job` about to be); none: no record."""
        entries = {m: d for m, (_, d) in vol.fds.items()}
        entries.update({m: j.device for m, j in vol.stuck.items()})
        if job is not None:
            entries[job.mountpoint] = job.device
        path = self.state_dir / volume_id
        if not entries:
            path.unlink(missing_ok=True)
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / f".{volume_id}.tmp"
        tmp.write_text(
            json.dumps([{"mountpoint": m, "device": d} for m, d in sorted(entries.items())])
        )
        os.replace(tmp, path)


def _drop_lapsed(vol: _Volume) -> None:
    """Forget holders whose lease ran out (a timer may not have fired yet)."""
    now = time.monotonic()
    for holder in [h for h, end in vol.holders.items() if end <= now]:
        del vol.holders[holder]


def _state(volume_id: str, vol: _Volume) -> AgentFreezeState:
    return AgentFreezeState(volume_id=volume_id, frozen=bool(vol.fds), mountpoints=sorted(vol.fds))


def _wait(job: _Job, deadline: float) -> bool:
    """Whether the job ended within the deadline; if not it is abandoned, decided once."""
    job.done.wait(deadline)
    with job.guard:
        if not job.done.is_set():
            job.abandoned = True
            return False
    return True


def _thaw_late(fd: int, mountpoint: str) -> None:
    try:
        fs_freeze.thaw_fd(fd)
    except OSError as exc:  # a worker thread has nobody to raise to
        log.error("thawing %s after its late freeze failed: %s", mountpoint, exc)
        return
    log.warning("a late freeze of %s was thawed again: nobody holds it now", mountpoint)


def _read_record(record: Path) -> list[tuple[str, str | None]]:
    """(mountpoint, device) entries; a record of an older agent lists bare mountpoints."""
    try:
        entries = json.loads(record.read_text())
    except (OSError, ValueError):
        return []
    out: list[tuple[str, str | None]] = []
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, str):
            out.append((entry, None))
        elif isinstance(entry, dict) and isinstance(entry.get("mountpoint"), str):
            device = entry.get("device")
            out.append((entry["mountpoint"], device if isinstance(device, str) else None))
    return out


def _thaw_recorded(mountpoint: str, device: str | None) -> bool:
    """Thaw by path what a crashed agent froze, only while the path is still a mount of `device`.

    The fds died with that agent. If the path was unmounted or mounted over
    meanwhile, a thaw there would hit another filesystem (or nothing): skip it.
    """
    mounted = {m.device for m in mount_table() if m.mountpoint == mountpoint}
    if not mounted or (device is not None and device not in mounted):
        log.warning("%s is no longer a mount of %s: not thawing it by path", mountpoint, device)
        return False
    try:
        fd = fs_freeze.open_dir(mountpoint)
    except OSError:
        return False
    try:
        if device is not None and fs_freeze.device_of(fd) != device:
            return False  # remounted between the table read and the open
        return fs_freeze.thaw_fd(fd)
    except OSError as exc:
        log.error("thawing %s left frozen by a stopped agent failed: %s", mountpoint, exc)
        return False
    finally:
        os.close(fd)
