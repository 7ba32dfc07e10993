"""The node-agent's operations, as the API calls them.

`Agent` ties pools, volume files, transports and attachments together and
serializes work per volume. Every operation is idempotent: kubelet,
the sidecars and management retry after any failure or crash.
"""

from __future__ import annotations

import logging
from pathlib import Path

from node_agent import extents, snapshots, volumes
from node_agent.attachments import DEFAULT_DEV_DIR, AttachmentManager
from node_agent.exports import DEFAULT_PORTS
from node_agent.freezes import Freezes
from node_agent.keys import KeyStore
from node_agent.nvme_exports import DEFAULT_NVME_PORT, NvmeExports, TransportExports
from node_agent.pools import Pool
from node_agent.qos import Qos
from node_agent.transports import Transport, build_transports
from tessera.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from tessera.ids import check_node_id, check_snapshot_id, check_volume_id
from tessera.locks import VolumeLocks
from tessera.models import (
    AgentAttachment,
    AgentExport,
    AgentExportCreate,
    AgentFreezeState,
    AgentKey,
    AgentSnapshot,
    AgentSource,
    AgentSourceKind,
    AgentView,
    AgentVolume,
    Connection,
    ExtentPage,
    PoolRegistration,
    QosLimits,
)
from tessera.system.cgroups import DEFAULT_CGROUP_ROOT

#: where exports, keys and remote connections keep their records
DEFAULT_STATE_DIR = Path("/var/lib/tessera/node-agent")

log = logging.getLogger(__name__)


class Agent:
    def __init__(
        self,
        node_id: str,
        pools: dict[str, Pool],
        dev_dir: Path = DEFAULT_DEV_DIR,
        transports: dict[str, Transport] | None = None,
        state_dir: Path = DEFAULT_STATE_DIR,
        export_address: str = "",
        export_ports: tuple[int, int] = DEFAULT_PORTS,
        cgroup_root: Path = DEFAULT_CGROUP_ROOT,
        nvme_port: int = DEFAULT_NVME_PORT,
    ) -> None:
        self.node_id = check_node_id(node_id)
        self.pools = pools
        self.dev_dir = dev_dir
        self.state_dir = state_dir
        #: consumer side: keys to reach remote volumes; owner side: NBD exports
        self.keys = KeyStore(state_dir / "keys")
        self.exports = TransportExports(
            state_dir / "exports",
            export_address,
            export_ports,
            NvmeExports(state_dir / "nvme-exports", self.node_id, export_address, nvme_port),
        )
        self.transports = (
            transports
            if transports is not None
            else build_transports(pools, state_dir, self.key_path)
        )
        self.locks = VolumeLocks()
        self.attachments = AttachmentManager(pools, dev_dir, self.transports)
        self.freezes = Freezes(self.attachments, state_dir / "freezes")
        #: QoS: cgroup limits for this node's consumers, rate limits on its exports
        self.qos = Qos(
            state_dir / "qos",
            cgroup_root,
            lambda vid: [d.path for d in self.attachments.devices_of(vid)],
            self.exports.set_rate,
        )

    # ---- volumes -------------------------------------------------------------

    def create_volume(
        self,
        volume_id: str,
        pool: str,
        size_bytes: int,
        *,
        must_exist: bool = False,
        source: AgentSource | None = None,
    ) -> AgentVolume:
        """Create the file, or confirm (fsync) the one there; `must_exist`: never create.

        `must_exist` is for a caller finishing a create it did not start
        (management's reconcile): a delete may have completed since it
        looked, and re-creating the file then would leave an empty orphan.
        The check and the fsync run under the volume's lock, which the
        agent's delete takes too.
        """
        check_volume_id(volume_id, missing_is_not_found=False)
        target = self._pool(pool)
        with self.locks.hold(volume_id):
            holder = self._holder(volume_id)
            if holder is not None and holder.name != target.name:
                raise AlreadyExists(
                    f"volume {volume_id} already exists in pool {holder.name}", field="pool"
                )
            if holder is None and must_exist:
                raise NotFound(
                    f"volume {volume_id} is not on node {self.node_id} (must_exist: not created)"
                )
            if holder is not None or source is None:
                return volumes.create(target, volume_id, size_bytes)
            return volumes.create(target, volume_id, size_bytes, self._source_path(target, source))

    def _source_path(self, target: Pool, source: AgentSource) -> Path:
        """The file a clone starts from; it must be in the clone's pool (reflink: one fs)."""
        if source.kind == AgentSourceKind.SNAPSHOT:
            check_snapshot_id(source.id, "source.id")
            holder = self._snapshot_holder(source.id)
            path = holder.snapshot_path(source.id) if holder else None
        else:
            check_volume_id(source.id, "source.id")
            holder = self._holder(source.id)
            path = holder.volume_path(source.id) if holder else None
        if holder is None or path is None:
            raise NotFound(
                f"{source.kind} {source.id} is not on node {self.node_id}", field="source"
            )
        if holder.name != target.name:
            raise FailedPrecondition(
                f"{source.kind} {source.id} is in pool {holder.name}: a clone must be made "
                f"in the same pool, not {target.name}"
            )
        return path

    def resize_volume(self, volume_id: str, size_bytes: int) -> AgentVolume:
        check_volume_id(volume_id)
        with self.locks.hold(volume_id):
            volume = volumes.resize(self._require_holder(volume_id), volume_id, size_bytes)
            self.attachments.refresh(volume_id)
            self.exports.resized(volume_id)  # nvme-tcp serves a loop device on the file
            return volume

    def delete_volume(self, volume_id: str) -> None:
        check_volume_id(volume_id)
        with self.locks.hold(volume_id):
            devices = self.attachments.devices_of(volume_id)
            if devices:
                raise FailedPrecondition(
                    f"volume {volume_id} is attached on this node as "
                    f"{', '.join(d.path for d in devices)}; detach first"
                )
            exported = self.exports.of_volume(volume_id)
            if exported:
                raise FailedPrecondition(
                    f"volume {volume_id} is exported to node(s) "
                    f"{', '.join(e.client_node for e in exported)}; close the exports first"
                )
            for pool in self.pools.values():
                volumes.delete(pool, volume_id)

    def _pool(self, name: str) -> Pool:
        try:
            return self.pools[name]
        except KeyError:
            raise NotFound(f"pool {name!r} is not on node {self.node_id}", field="pool") from None

    def get_volume(self, volume_id: str) -> AgentVolume:
        check_volume_id(volume_id)
        return volumes.describe(self._require_holder(volume_id), volume_id)

    def _holder(self, volume_id: str) -> Pool | None:
        for pool in self.pools.values():
            if volumes.exists(pool, volume_id):
                return pool
        return None

    def _require_holder(self, volume_id: str) -> Pool:
        pool = self._holder(volume_id)
        if pool is None:
            raise NotFound(f"volume {volume_id} is not on node {self.node_id}")
        return pool

    # ---- snapshots ---------------------------------------------------------------

    def create_snapshot(self, snapshot_id: str, pool: str, source_volume_id: str) -> AgentSnapshot:
        """Cut the snapshot file of a volume in its pool; idempotent (same id and source).

        Under the source volume's lock: a delete or resize of the volume waits
        for the cut, so the snapshot is of one instant of one file.
        """
        check_snapshot_id(snapshot_id, missing_is_not_found=False)
        check_volume_id(source_volume_id, "source_volume_id")
        target = self._pool(pool)
        with self.locks.hold(source_volume_id):
            holder = self._snapshot_holder(snapshot_id)
            if holder is not None and holder.name != target.name:
                raise AlreadyExists(
                    f"snapshot {snapshot_id} already exists in pool {holder.name}", field="pool"
                )
            if holder is None and not volumes.exists(target, source_volume_id):
                raise NotFound(
                    f"volume {source_volume_id} is not in pool {pool} on node {self.node_id}",
                    field="source_volume_id",
                )
            source = target.volume_path(source_volume_id)
            return snapshots.create(target, snapshot_id, source_volume_id, source)

    def list_snapshots(self) -> list[AgentSnapshot]:
        return snapshots.list_all(self.pools.values())

    def get_snapshot(self, snapshot_id: str) -> AgentSnapshot:
        check_snapshot_id(snapshot_id)
        return snapshots.describe(self._require_snapshot(snapshot_id), snapshot_id)

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Remove the snapshot file; absent is fine. Clones of it keep their (shared) data."""
        check_snapshot_id(snapshot_id)
        with self.locks.hold(snapshot_id):
            for pool in self.pools.values():
                snapshots.delete(pool, snapshot_id)

    def snapshot_extents(
        self, snapshot_id: str, base_snapshot_id: str = "", offset: int = 0, max_entries: int = 0
    ) -> ExtentPage:
        """Allocated ranges, or with a base the ranges that differ from it (extent maps only)."""
        check_snapshot_id(snapshot_id)
        pool = self._require_snapshot(snapshot_id)
        target = pool.snapshot_path(snapshot_id)
        if not base_snapshot_id:
            return extents.allocated_page(target, offset, max_entries)
        check_snapshot_id(base_snapshot_id, "base")
        base_pool = self._require_snapshot(base_snapshot_id)
        ours = snapshots.describe(pool, snapshot_id).source_volume_id
        theirs = snapshots.describe(base_pool, base_snapshot_id).source_volume_id
        if base_pool.name != pool.name or ours != theirs:
            raise FailedPrecondition(
                f"snapshots {base_snapshot_id} and {snapshot_id} are not of the same volume "
                "in the same pool: no delta between them"
            )
        base = base_pool.snapshot_path(base_snapshot_id)
        return extents.delta_page(base, target, offset, max_entries)

    def _snapshot_holder(self, snapshot_id: str) -> Pool | None:
        for pool in self.pools.values():
            if snapshots.exists(pool, snapshot_id):
                return pool
        return None

    def _require_snapshot(self, snapshot_id: str) -> Pool:
        pool = self._snapshot_holder(snapshot_id)
        if pool is None:
            raise NotFound(f"snapshot {snapshot_id} is not on node {self.node_id}")
        return pool

    # ---- freezes (consumer side: consistency points for snapshots) -----------------

    def freeze(
        self, volume_id: str, lease_seconds: float, holder: str = "", renew: bool = False
    ) -> AgentFreezeState:
        """Freeze the volume's filesystems mounted here for `holder`; thawed after its lease.

        Under the volume's lock (its devices do not change meanwhile); a
        renewal and thaw take none (they look at no device), so they are
        never refused as busy.
        """
        check_volume_id(volume_id)
        if renew:
            return self.freezes.freeze(volume_id, lease_seconds, holder, renew=True)
        with self.locks.hold(volume_id):
            return self.freezes.freeze(volume_id, lease_seconds, holder)

    def thaw(self, volume_id: str, holder: str = "") -> AgentFreezeState:
        """Release `holder`'s freeze (every holder's when empty); thawed when none is left."""
        check_volume_id(volume_id)
        return self.freezes.thaw(volume_id, holder)

    # ---- attachments -----------------------------------------------------------

    def attach(
        self,
        volume_id: str,
        readonly: bool,
        connection: Connection | None = None,
        min_size_bytes: int = 0,
    ) -> AgentAttachment:
        check_volume_id(volume_id)
        with self.locks.hold(volume_id):
            return self.attachments.attach(volume_id, readonly, connection, min_size_bytes)

    def key_path(self, volume_id: str) -> Path:
        """Where the TLS-PSK key to reach a remote volume is (docs/data-path.md, Keys)."""
        return self.keys.path(volume_id)

    def forget_unwanted(self, wanted: set[str], asked_at: float) -> list[str]:
        """Release remote volumes management no longer attaches here; see AttachmentManager."""
        released = []
        for volume_id in self.attachments.forgettable(wanted, asked_at):
            try:
                with self.locks.hold(volume_id):
                    if self.attachments.forget(volume_id, asked_at):
                        self.keys.delete(volume_id)  # its export is closed: the key opens nothing
                        released.append(volume_id)
            except Aborted:
                continue  # busy: an RPC is working on it; the next heartbeat looks again
        return released

    def detach(self, volume_id: str) -> None:
        check_volume_id(volume_id)
        with self.locks.hold(volume_id):
            self.attachments.detach(volume_id)
            self.qos.forget_consumers(volume_id)

    def attach_view(self, volume_id: str, view_key: str) -> AgentView:
        check_volume_id(volume_id)
        with self.locks.hold(volume_id):
            return self.attachments.attach_view(volume_id, view_key)

    def release_view(self, volume_id: str, view_key: str) -> None:
        check_volume_id(volume_id)
        with self.locks.hold(volume_id):
            self.attachments.release_view(volume_id, view_key)

    def get_attachment(self, volume_id: str) -> AgentAttachment:
        """What the kernel has bound for the volume; no lock, like `list_attachments`.

        It only reads kernel state (loop devices, the symlink), which is
        consistent whenever it is read; taking the volume's lock made
        NodeGetVolumeStats and reconcile answer "busy" during any other
        operation on the volume.
        """
        check_volume_id(volume_id)
        attachment = self.attachments.get(volume_id)
        unenforced = self.qos.condition(volume_id)  # QoS limits with no cgroup to hold them
        if unenforced and not attachment.condition:
            attachment = attachment.model_copy(update={"condition": unenforced})
        return attachment

    def list_attachments(self) -> list[AgentAttachment]:
        return self.attachments.list()

    # ---- lifecycle -------------------------------------------------------------

    def recover(self) -> list[AgentAttachment]:
        """At start: drop half-made volume files, re-adopt live devices, fix symlinks."""
        for pool in self.pools.values():
            for path in volumes.sweep_temporaries(pool) + snapshots.sweep_temporaries(pool):
                log.info("removed half-created %s", path)
        for mountpoint in self.freezes.recover():
            log.warning("thawed %s, left frozen by an agent that stopped", mountpoint)
        adopted = self.attachments.recover()
        for att in adopted:
            log.info("re-adopted %s on %s", att.volume_id, att.backing_device)
        return adopted

    # ---- exports (owner side) and keys (consumer side) ------------------------------

    def export(self, volume_id: str, client_node: str, req: AgentExportCreate) -> AgentExport:
        """Serve the volume to `client_node` over NBD with TLS-PSK (docs/data-path.md)."""
        check_volume_id(volume_id)
        with self.locks.hold(volume_id):
            pool = self._require_holder(volume_id)
            opened = self.exports.open(volume_id, client_node, pool.volume_path(volume_id), req)
            self.qos.apply(volume_id)  # its rate file, from the stored limits
            return opened

    def close_export(self, volume_id: str, client_node: str) -> None:
        """Stop serving the volume to `client_node` and drop its key: revocation."""
        check_volume_id(volume_id)
        with self.locks.hold(volume_id):
            self.exports.close(volume_id, client_node)
            self.qos.forget_unless_used(
                volume_id,
                attached=bool(self.attachments.devices_of(volume_id)),
                exported=bool(self.exports.of_volume(volume_id)),
            )

    def reap_exports(self, wanted: set[tuple[str, str]], mark: int) -> list[tuple[str, str]]:
        """Close exports opened before `mark` that management's heartbeat did not list."""
        closed = []
        for volume_id, client_node in self.exports.unwanted(wanted, mark):
            try:
                with self.locks.hold(volume_id):
                    if self.exports.reap(volume_id, client_node, mark):
                        closed.append((volume_id, client_node))
            except Aborted:
                continue  # busy: an export call is working on it; the next heartbeat looks again
        return closed

    def recover_exports(self) -> list[AgentExport]:
        """At start: re-adopt live exports, restart dead ones (never kill a live one)."""
        return self.exports.recover(
            lambda volume_id: (
                pool.volume_path(volume_id) if (pool := self._holder(volume_id)) else None
            )
        )

    # ---- QoS (node_agent/qos.py) ------------------------------------------------------

    def set_qos(self, volume_id: str, limits: QosLimits) -> None:
        check_volume_id(volume_id, missing_is_not_found=False)
        with self.locks.hold(volume_id):
            self.qos.set(volume_id, limits)

    def add_consumer(self, volume_id: str, pod_uid: str) -> None:
        check_volume_id(volume_id)
        with self.locks.hold(volume_id):
            self.qos.add_consumer(volume_id, pod_uid)

    def remove_consumer(self, volume_id: str, pod_uid: str) -> None:
        check_volume_id(volume_id)
        with self.locks.hold(volume_id):
            self.qos.remove_consumer(volume_id, pod_uid)

    # Keys take no volume lock: each write is one atomic rename, and a retried
    # PUT from management must not be refused while NodeStage attaches.
    def put_key(self, volume_id: str, key: AgentKey) -> None:
        self.keys.put(volume_id, key.psk_identity, key.psk_key)

    def delete_key(self, volume_id: str) -> None:
        self.keys.delete(volume_id)

    def pool_capacities(self) -> dict[str, int]:
        return {name: pool.capacity_bytes() for name, pool in self.pools.items()}

    def pool_reports(self) -> dict[str, PoolRegistration]:
        """What each heartbeat tells management: capacity, physical use, snapshot method."""
        return {
            name: PoolRegistration(
                capacity_bytes=pool.capacity_bytes(),
                used_bytes=pool.used_bytes(),
                snapshot_method=pool.snapshot_method(),
            )
            for name, pool in self.pools.items()
        }
