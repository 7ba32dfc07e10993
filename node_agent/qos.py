"""QoS on this node's data path: cgroup I/O limits for consumers, a rate limit on exports.

Management sends a volume's limits (PUT /v1/attachments/{vid}/qos) to every
node on its data path: each consumer node, and the owner when it exports
the volume to another node. The agent keeps them in
`<state-dir>/qos/<vid>.json` with the volume's consumers on this node, so a
restart changes nothing and a pod that starts later is limited too.

Consumer side: the CSI node plugin names each pod that publishes the volume
(PUT /v1/attachments/{vid}/consumers/{pod_uid}; `unknown-pod` when the
CSIDriver does not pass podInfoOnMount). For every consumer and every
device of the volume on this node (the primary and its read-only views),
the kernel's rule is written into the pod's cgroup (on cgroup v1 into every
cgroup below it too: v1 is not hierarchical, and the containers' cgroups
appear after the publish, so a watcher re-applies every few seconds). A pod
whose cgroup cannot be found, and the unknown pod, are limited in the
kubepods cgroup instead (v2: all such pods together; v1: each pod's
cgroups, so each pod alone). Where there is no kubepods cgroup either (not a
kubelet node), nothing can be enforced: the agent logs it and `condition`
says so (docs/data-services.md, QoS).

Owner side: every export's nbdkit runs the rate filter with a rate file the
agent rewrites (nbdkit rereads it: no restart, no dropped connection).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from node_agent.keys import write_private
from tessera.errors import FailedPrecondition
from tessera.ids import check_volume_id
from tessera.models import QosLimits
from tessera.system import cgroups
from tessera.system.cgroups import UNKNOWN_POD

log = logging.getLogger(__name__)

#: how often rules are re-applied (v1: containers' cgroups appear after the publish)
WATCH_SECONDS = 2.0


def export_rate_bits(limits: QosLimits) -> int:
    """The export's rate in bits/s; 0: none.

    nbdkit 1.32's rate filter takes one rate, applied to reads and writes
    separately. The export-side limit is the backstop against a client that
    bypasses its cgroup, so it must never slow a well-behaved client below
    its limits: the larger of the two when both are limited, else none.
    """
    read, write = limits.max_read_bytes_per_second, limits.max_write_bytes_per_second
    if not read or not write:
        return 0
    return max(read, write) * 8


def io_limits(limits: QosLimits) -> cgroups.IoLimits:
    return cgroups.IoLimits(
        rbps=limits.max_read_bytes_per_second,
        wbps=limits.max_write_bytes_per_second,
        riops=limits.max_read_iops,
        wiops=limits.max_write_iops,
    )


class Qos:
    """Limits and consumers per volume; the caller holds the volume's lock around changes."""

    def __init__(
        self,
        directory: Path,
        cgroup_root: Path,
        devices_of: Callable[[str], list[str]],
        set_export_rate: Callable[[str, int], None],
    ) -> None:
        self.directory = directory
        self.cgroup_root = cgroup_root
        self._devices_of = devices_of
        self._set_export_rate = set_export_rate
        #: why limits are not enforced, per volume ("" when they are)
        self._unenforced: dict[str, str] = {}
        #: one writer of rules at a time: a change never races the watcher's re-apply
        self._lock = threading.RLock()
        self._stop = threading.Event()

    # ---- state ------------------------------------------------------------------------

    def _file(self, volume_id: str) -> Path:
        return self.directory / f"{check_volume_id(volume_id)}.json"

    def _load(self, volume_id: str) -> tuple[QosLimits, list[str]]:
        try:
            data = json.loads(self._file(volume_id).read_text())
            return QosLimits.model_validate(data["limits"]), list(data["consumers"])
        except FileNotFoundError:
            return QosLimits(), []
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("volume %s: unreadable QoS record, taken as unlimited: %s", volume_id, err)
            return QosLimits(), []

    def _save(self, volume_id: str, limits: QosLimits, consumers: list[str]) -> None:
        if limits.unlimited() and not consumers:
            self._file(volume_id).unlink(missing_ok=True)
            return
        body = {"limits": limits.model_dump(mode="json"), "consumers": sorted(set(consumers))}
        write_private(self._file(volume_id), json.dumps(body).encode())

    def limits(self, volume_id: str) -> QosLimits:
        return self._load(volume_id)[0]

    def condition(self, volume_id: str) -> str:
        """Why the volume's limits are not enforced on this node; "" when they are."""
        return self._unenforced.get(volume_id, "")

    # ---- the API's operations ------------------------------------------------------------

    def set(self, volume_id: str, limits: QosLimits) -> None:
        """Store and apply everywhere on this node: consumers' cgroups and exports."""
        with self._lock:
            _, consumers = self._load(volume_id)
            self._save(volume_id, limits, consumers)
            self.apply(volume_id)

    def add_consumer(self, volume_id: str, pod_uid: str) -> None:
        if pod_uid != UNKNOWN_POD:
            cgroups.check_pod_uid(pod_uid)
        with self._lock:
            limits, consumers = self._load(volume_id)
            if pod_uid not in consumers:
                self._save(volume_id, limits, [*consumers, pod_uid])
            self.apply(volume_id, exports=False)

    def remove_consumer(self, volume_id: str, pod_uid: str) -> None:
        """The pod stopped using the volume: its rules go (absent is fine)."""
        with self._lock:
            limits, consumers = self._load(volume_id)
            if pod_uid in consumers:
                self._apply_consumer(volume_id, pod_uid, QosLimits())
                self._save(volume_id, limits, [c for c in consumers if c != pod_uid])

    def forget_consumers(self, volume_id: str) -> None:
        """Detached (NodeUnstage): no pod here uses the volume any more. The limits stay:
        a re-stage without a new ControllerPublish (no new push) must find them."""
        with self._lock:
            limits, consumers = self._load(volume_id)
            if consumers:
                self._save(volume_id, limits, [])
            self._unenforced.pop(volume_id, None)

    def forget_unless_used(self, volume_id: str, *, attached: bool, exported: bool) -> None:
        """An export closed: the limits go once nothing here serves or uses the volume."""
        if attached or exported:
            return
        with self._lock:
            self._file(volume_id).unlink(missing_ok=True)
            self._unenforced.pop(volume_id, None)

    def apply(self, volume_id: str, *, exports: bool = True) -> None:
        """Make the kernel (and nbdkit) enforce what is stored; writes only what differs."""
        with self._lock:
            limits, consumers = self._load(volume_id)
            if exports:
                self._set_export_rate(volume_id, export_rate_bits(limits))
            problems = [self._apply_consumer(volume_id, c, limits) for c in consumers]
            why = "; ".join(p for p in problems if p)
            if why:
                self._unenforced[volume_id] = why
            else:
                self._unenforced.pop(volume_id, None)

    def reapply(self) -> None:
        """Every volume's consumer rules again: cgroups made since (v1 containers) get them."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("vol-*.json")):
            try:
                self.apply(path.stem, exports=False)
            except Exception:  # noqa: BLE001 - one volume must not stop the others
                log.exception("volume %s: re-applying QoS limits failed", path.stem)

    def watch(self, interval: float = WATCH_SECONDS) -> threading.Thread:
        """Re-apply in the background until `stop`."""

        def loop() -> None:
            while not self._stop.wait(interval):
                self.reapply()

        thread = threading.Thread(target=loop, name="qos-watch", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    # ---- consumers' cgroups ------------------------------------------------------------------

    def _apply_consumer(self, volume_id: str, pod_uid: str, limits: QosLimits) -> str:
        """Write the rules for every device of the volume; "" or why it could not be done."""
        h = cgroups.hierarchy(self.cgroup_root)
        cgroup = None
        if h is not None:
            if pod_uid != UNKNOWN_POD:
                cgroup = cgroups.pod_cgroup(h, pod_uid)
            cgroup = cgroup or cgroups.kubepods_cgroup(h)
        if h is None or cgroup is None:
            why = (
                f"QoS limits of volume {volume_id} are not enforced for pod {pod_uid}: "
                f"no cgroup of it, nor a kubepods cgroup, under {self.cgroup_root}"
            )
            if not limits.unlimited():
                log.warning("%s", why)
                return why
            return ""
        changed = False
        for device in self._devices_of(volume_id):
            try:
                number = cgroups.device_number(device)
                for target in cgroups.targets(h, cgroup):
                    changed |= cgroups.set_limits(h, target, number, io_limits(limits))
            except (OSError, FailedPrecondition) as err:
                log.warning("volume %s: %s", volume_id, err)
                return f"QoS limits of volume {volume_id} on {device}: {err}"
        if changed:
            log.info(
                "volume %s: QoS %s for pod %s in %s", volume_id, _brief(limits), pod_uid, cgroup
            )
        return ""


def _brief(limits: QosLimits) -> str:
    values = limits.model_dump()
    return ", ".join(f"{k}={v}" for k, v in values.items() if v) or "unlimited"
