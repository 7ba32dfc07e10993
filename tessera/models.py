"""Wire models shared by management, the node-agent and their clients.

One definition per JSON document. Request models validate input (and so
produce the 4xx messages users see); response models describe what
servers send back.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from tessera.ids import (
    NAME_PATTERN,
    NODE_ID_PATTERN,
    SNAPSHOT_ID_PATTERN,
    VIEW_KEY_PATTERN,
    VOLUME_ID_PATTERN,
)

GiB = 1024**3
MiB = 1024**2
MAX_VOLUME_NAME = 128
#: the largest byte count anywhere: fits a signed 64-bit column after rounding to MiB
MAX_BYTES = (2**63 - 1) // MiB * MiB
MAX_VOLUMES_PER_NODE = 2**31 - 1

# Form rules live in the models, so the OpenAPI documents state them and
# pydantic enforces them; `FORM_RULES` says each pattern in words for the 4xx.
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]*$"
_PORT = r"(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
#: DNS labels of 1-63 characters (the resolver refuses "a..b" before any lookup)
_HOST = r"[A-Za-z0-9_~-]{1,63}(\.[A-Za-z0-9_~-]{1,63})*\.?"
AGENT_URL_PATTERN = (
    r"^(unix:///[^\x00-\x20\x7f]+"
    r"|https?://" + _HOST + r"(:" + _PORT + r")?(/[^\x00-\x20\x7f]*)?)$"
)
OPTIONAL_NODE_ID_PATTERN = "^$|" + NODE_ID_PATTERN
#: a TLS-PSK key: 256 bits as lower-case hex
PSK_KEY_PATTERN = r"^[0-9a-f]{64}$"
_H = r"[0-9A-Fa-f]{1,4}"
#: empty, a host name or IPv4 address, or an IPv6 address: what the node-agent
#: hands nbdkit's ip filter (resolved), so nothing else may get through
CLIENT_ADDRESS_PATTERN = (
    r"^$|^("
    + _HOST
    + rf"|({_H}:){{7}}{_H}|({_H}:){{1,7}}:|({_H}:){{1,6}}:{_H}"
    + rf"|({_H}:){{1,5}}(:{_H}){{1,2}}|({_H}:){{1,4}}(:{_H}){{1,3}}"
    + rf"|({_H}:){{1,3}}(:{_H}){{1,4}}|({_H}:){{1,2}}(:{_H}){{1,5}}"
    + rf"|{_H}:(:{_H}){{1,6}}|:((:{_H}){{1,7}}|:)"
    + r")$"
)
FORM_RULES = {
    OPTIONAL_NODE_ID_PATTERN: "must be empty or a node ID (letters, digits, '.', '_', '-')",
    TEXT_PATTERN: "must not contain control characters",
    NODE_ID_PATTERN: "must be 1-128 letters, digits, '.', '_' or '-', starting with a letter "
    "or digit, without '..'",
    VOLUME_ID_PATTERN: "must be a Tessera volume ID (vol-<hex>)",
    SNAPSHOT_ID_PATTERN: "must be a Tessera snapshot ID (snap-<hex>)",
    VIEW_KEY_PATTERN: "must be 1-40 characters of a-z, 0-9 and '-'",
    PSK_KEY_PATTERN: "must be 64 lower-case hex digits (a 256-bit key)",
    CLIENT_ADDRESS_PATTERN: "must be empty (any address), a host name or an IP address",
    AGENT_URL_PATTERN: "must be unix:///path/to.sock or http(s)://host[:port][/prefix] "
    "(an IPv6 address by a host name)",
}

#: printable text: control characters cannot be stored or shown safely
Text = Annotated[str, StringConstraints(pattern=TEXT_PATTERN)]
#: for a dict[Text, Text]: pydantic states the key rule as patternProperties, which
#: alone would let any other key (with any value) through in the document
TEXT_MAP: dict[str, Any] = {"additionalProperties": False}
NodeId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NODE_ID_PATTERN)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=NAME_PATTERN)]
ViewKey = Annotated[str, StringConstraints(pattern=VIEW_KEY_PATTERN)]
VolumeId = Annotated[str, StringConstraints(min_length=5, max_length=63, pattern=VOLUME_ID_PATTERN)]


class AccessMode(StrEnum):
    """CSI access modes, by their CSI enum names."""

    SINGLE_NODE_WRITER = "SINGLE_NODE_WRITER"
    SINGLE_NODE_READER_ONLY = "SINGLE_NODE_READER_ONLY"
    MULTI_NODE_READER_ONLY = "MULTI_NODE_READER_ONLY"
    MULTI_NODE_SINGLE_WRITER = "MULTI_NODE_SINGLE_WRITER"
    MULTI_NODE_MULTI_WRITER = "MULTI_NODE_MULTI_WRITER"
    SINGLE_NODE_SINGLE_WRITER = "SINGLE_NODE_SINGLE_WRITER"
    SINGLE_NODE_MULTI_WRITER = "SINGLE_NODE_MULTI_WRITER"


class AccessType(StrEnum):
    BLOCK = "block"
    MOUNT = "mount"


class Locality(StrEnum):
    ANY = "any"
    PREFERRED = "preferred"
    REQUIRED = "required"


class NodeState(StrEnum):
    """A node's liveness as management sees it (see docs/liveness.md)."""

    ONLINE = "online"  # heartbeats arrive
    UNREACHABLE = "unreachable"  # missed --heartbeat-misses beats; its attachments still hold
    FENCED = "fenced"  # an admin (or CSI unpublish) cut it off; its attachments were released


class Transport(StrEnum):
    """How a consumer node reaches a volume's data."""

    LOOP = "loop"  # the volume's file is on this node
    NBD = "nbd"  # another node exports it over NBD (TLS-PSK)
    NVME_TCP = "nvme-tcp"  # another node exports it as an nvmet namespace (DH-HMAC-CHAP)
    COMPOSED = "composed"  # several legs, each loop or remote, composed by md or dm


#: the transports a leg of a composed volume can come over
LEG_TRANSPORTS = (Transport.LOOP, Transport.NVME_TCP, Transport.NBD)


class Layout(StrEnum):
    """How a volume's legs make its blocks (docs/layouts.md)."""

    CONCAT = "concat"  # one leg (today's volumes)
    RAID0 = "raid0"  # striped over `legs` legs, `chunk_bytes` at a time (device-mapper)
    RAID1 = "raid1"  # `legs` full copies, 2 or 3 (md, internal bitmap)
    RAID10 = "raid10"  # striped mirrors: 2 copies of each chunk over `legs` legs (md)


class LegState(StrEnum):
    """Whether a leg holds the volume's current data."""

    IN_SYNC = "in_sync"
    REBUILDING = "rebuilding"  # placed by a repair; being resynced from the others
    STALE = "stale"  # missed writes (its node died): never read again, discarded


class VolumeState(StrEnum):
    CREATING = "creating"
    AVAILABLE = "available"
    DELETING = "deleting"
    ERROR = "error"


class Strict(BaseModel):
    """Unknown fields are refused: a typo must not be silently ignored."""

    model_config = ConfigDict(extra="forbid")


# ---- nodes and pools -------------------------------------------------------


class NodeRegistration(Strict):
    agent_url: str = Field(
        max_length=1024,
        pattern=AGENT_URL_PATTERN,
        description="where management reaches the agent: unix:///path or http://host:port",
    )
    topology: dict[Text, Text] = Field(default_factory=dict, json_schema_extra=TEXT_MAP)
    max_volumes: int = Field(
        default=0, ge=0, le=MAX_VOLUMES_PER_NODE, description="0 means no limit"
    )
    transports: list[Transport] = Field(
        default_factory=lambda: [Transport.LOOP, Transport.NBD],
        max_length=8,
        description="what this host can serve and attach over (modules present, tools installed)",
    )
    kernel_nbd: bool = Field(
        default=False,
        description="the kernel nbd client (nbd module, nbd-client, nbdkit as the local TLS "
        "bridge): what nbd legs of composed volumes need on the consumer",
    )


class Node(BaseModel):
    id: str
    agent_url: str
    topology: dict[str, str]
    max_volumes: int
    transports: list[str] = Field(default_factory=lambda: ["loop", "nbd"])
    kernel_nbd: bool = Field(
        default=False, description="it can attach nbd legs of composed volumes (kernel nbd)"
    )
    last_heartbeat: float
    online: bool
    state: NodeState = NodeState.ONLINE
    fenced_at: float = Field(default=0.0, description="when it was fenced; 0: not fenced")


class FenceRequest(Strict):
    force: bool = Field(
        default=False, description="fence a node that still heartbeats (it may be writing)"
    )


class FenceReport(BaseModel):
    node_id: str
    state: NodeState
    released: list[str] = Field(
        default_factory=list, description="volumes whose attachment on the node was released"
    )


class ExportRef(BaseModel):
    volume_id: str
    client_node: str


class HeartbeatReply(BaseModel):
    """What management wants of the node, so a node that was cut off can clean up."""

    state: NodeState
    epoch: str = Field(
        default="",
        description="identity of management's database: a node acts on a reply only while it "
        "is the database it registered with (a lost or replaced one knows nothing of its exports)",
    )
    attachments: list[str] = Field(
        default_factory=list, description="volumes attached to this node (its consumer role)"
    )
    exports: list[ExportRef] = Field(
        default_factory=list, description="remote attachments of volumes this node owns"
    )


class SnapshotMethod(StrEnum):
    """How a pool makes snapshots and clones (docs/data-services.md)."""

    REFLINK = "reflink"  # FICLONE: constant time; extents shared until one side writes
    COPY = "copy"  # a full copy: --copy-fallback on a filesystem that cannot reflink
    NONE = "none"  # refused: FAILED_PRECONDITION naming the pool


class PoolRegistration(Strict):
    capacity_bytes: int = Field(
        ge=0,
        le=MAX_BYTES,
        description=(
            "what may be promised to volumes in this pool: the space its filesystem can still "
            "give plus what our volume files already hold, minus the agent's reserve, times "
            "the pool's overcommit ratio (0 for a full pool)"
        ),
    )
    used_bytes: int = Field(
        default=0,
        ge=0,
        le=MAX_BYTES,
        description="bytes in use on the pool's filesystem (physical: shared extents once)",
    )
    snapshot_method: SnapshotMethod = SnapshotMethod.NONE


class Pool(BaseModel):
    node_id: str
    name: str
    capacity_bytes: int
    allocated_bytes: int = Field(
        description="logical: the sizes of the legs placed here, plus what snapshots may pin"
    )
    free_bytes: int
    used_bytes: int = Field(default=0, description="physical, as the filesystem reports it")
    snapshot_method: SnapshotMethod = SnapshotMethod.NONE


# ---- volume provisioning groups ---------------------------------------------


class VpgCreate(Strict):
    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN)
    layout: str = "concat"
    legs: int = Field(
        default=0,
        ge=0,
        le=16,
        description="legs per volume (raid0: stripe width >= 2; raid1: copies, 2 or 3; "
        "raid10: >= 3); 0: the layout's default (concat 1, raid0 2, raid1 2, raid10 4)",
    )
    chunk_bytes: int = Field(
        default=0,
        ge=0,
        le=16 * MiB,
        description="stripe chunk (raid0, raid10): a power of two from 4 KiB; 0: 64 KiB",
    )


class Vpg(BaseModel):
    name: str
    layout: str
    legs: int = 1
    chunk_bytes: int = 0


# ---- volumes -----------------------------------------------------------------


SnapshotId = Annotated[
    str, StringConstraints(min_length=6, max_length=63, pattern=SNAPSHOT_ID_PATTERN)
]
MAX_IOPS = 2**31 - 1


class QosLimits(Strict):
    """Per-volume I/O limits, enforced on the data path; 0 means unlimited."""

    max_read_bytes_per_second: int = Field(default=0, ge=0, le=MAX_BYTES)
    max_write_bytes_per_second: int = Field(default=0, ge=0, le=MAX_BYTES)
    max_read_iops: int = Field(default=0, ge=0, le=MAX_IOPS)
    max_write_iops: int = Field(default=0, ge=0, le=MAX_IOPS)

    def unlimited(self) -> bool:
        return not any(self.model_dump().values())


class ContentSource(Strict):
    """What a new volume starts with: a snapshot's data or another volume's (exactly one)."""

    # "exactly one" said in the OpenAPI document too, so clients (and the fuzzer) know it
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {
                    "required": ["snapshot_id"],
                    "properties": {"snapshot_id": {"minLength": 1}, "volume_id": {"maxLength": 0}},
                },
                {
                    "required": ["volume_id"],
                    "properties": {"volume_id": {"minLength": 1}, "snapshot_id": {"maxLength": 0}},
                },
            ]
        }
    )

    snapshot_id: str = Field(default="", pattern="^$|" + SNAPSHOT_ID_PATTERN)
    volume_id: str = Field(default="", pattern="^$|" + VOLUME_ID_PATTERN)

    @model_validator(mode="after")
    def _exactly_one(self) -> ContentSource:
        if bool(self.snapshot_id) == bool(self.volume_id):
            raise ValueError("give exactly one of snapshot_id and volume_id")
        return self


class VolumeCreate(Strict):
    name: str = Field(min_length=1, max_length=MAX_VOLUME_NAME, pattern=TEXT_PATTERN)
    size_bytes: int = Field(gt=0, le=MAX_BYTES)
    limit_bytes: int = Field(default=0, ge=0, le=MAX_BYTES, description="0 means no upper limit")
    vpg: str = "default"
    locality: Locality = Locality.ANY
    #: nodes the volume must be placed on (any of them); empty = anywhere
    requisite_nodes: list[NodeId] = Field(default_factory=list)
    #: nodes to try first, in order
    preferred_nodes: list[NodeId] = Field(default_factory=list)
    parameters: dict[Text, Text] = Field(default_factory=dict, json_schema_extra=TEXT_MAP)
    content_source: ContentSource | None = Field(
        default=None, description="clone this snapshot or volume (placed on its node)"
    )
    qos: QosLimits = Field(default_factory=QosLimits)


class Leg(BaseModel):
    """One piece of a volume: a file in one node's pool (a concat volume has one).

    Legs of one volume are on distinct nodes, so the file on each is still
    `<pool>/volumes/<volume-id>.img` and exports stay keyed by volume id.
    """

    node_id: str
    pool: str
    size_bytes: int
    index: int = Field(default=0, description="the leg's slot in the layout (stripe order)")
    state: LegState = LegState.IN_SYNC


class Volume(BaseModel):
    id: str
    name: str
    size_bytes: int
    vpg: str
    node_id: str = Field(description="the owner: the node of the first leg")
    pool: str = Field(description="the pool of the first leg")
    state: VolumeState
    parameters: dict[str, str]
    created_at: float
    published_nodes: list[str] = Field(default_factory=list)
    legs: list[Leg] = Field(default_factory=list)
    condition: str = Field(
        default="",
        description="empty when healthy; else what is wrong, naming the node (unreachable owner "
        "or consumer)",
    )
    content_source: ContentSource | None = None
    qos: QosLimits = Field(default_factory=QosLimits)


class VolumeModify(Strict):
    """PATCH /v1/volumes/{id}: the mutable parameters (ControllerModifyVolume)."""

    qos: QosLimits


class VolumeExpand(Strict):
    size_bytes: int = Field(gt=0, le=MAX_BYTES)
    limit_bytes: int = Field(default=0, ge=0, le=MAX_BYTES)


class AttachmentCreate(Strict):
    access_mode: AccessMode
    readonly: bool = False


#: an NVMe qualified name as ours are made (tessera.nvme_names): node ids keep their case
#: and may hold '_', both legal in an NQN
NQN_PATTERN = r"^$|^nqn\.[A-Za-z0-9._:-]{1,219}$"


class LegConnection(BaseModel):
    """How a consumer reaches one leg of a composed volume (loop, nvme-tcp or nbd)."""

    index: int = Field(ge=0, le=15)
    node_id: str = Field(max_length=128, pattern=NODE_ID_PATTERN)
    transport: Transport = Transport.LOOP
    host: str = Field(default="", max_length=253, pattern=CLIENT_ADDRESS_PATTERN)
    port: int = Field(default=0, ge=0, le=65535)
    subsystem_nqn: str = Field(default="", max_length=223, pattern=NQN_PATTERN)
    state: LegState = LegState.IN_SYNC


class Connection(BaseModel):
    """How a consumer node reaches the volume: publish_context, without any secret.

    The TLS-PSK key of an `nbd` connection is never here: Kubernetes stores
    publish_context in VolumeAttachment objects many can read. Management
    hands the key to the two agents over their authenticated APIs.
    """

    transport: Transport = Transport.LOOP
    owner_node: str = ""
    host: str = Field(
        default="",
        max_length=253,
        pattern=CLIENT_ADDRESS_PATTERN,
        description="the owner's export address: a host name or IP address (nbd)",
    )
    port: int = Field(default=0, ge=0, le=65535)
    psk_identity: str = Field(
        default="",
        max_length=128,
        pattern=OPTIONAL_NODE_ID_PATTERN,
        description="the TLS-PSK identity: the consumer's node id (nbd)",
    )

    subsystem_nqn: str = Field(
        default="",
        max_length=223,
        pattern=NQN_PATTERN,
        description="the nvmet subsystem that exports the volume (nvme-tcp)",
    )
    layout: Layout = Field(default=Layout.CONCAT, description="composed: how the legs combine")
    chunk_bytes: int = Field(default=0, ge=0, le=16 * MiB, description="composed: stripe chunk")
    array_uuid: str = Field(
        default="",
        pattern=r"^$|^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
        description="composed raid1/raid10: the md array's UUID (assemble exactly this array)",
    )
    data_bytes: int = Field(
        default=0, ge=0, le=MAX_BYTES, description="composed: the volume's size (what it shows)"
    )
    legs: list[LegConnection] = Field(
        default_factory=list, max_length=16, description="composed: one per in-sync leg"
    )
    generation: int = Field(
        default=0,
        ge=0,
        le=2**31 - 1,
        description="composed: bumped by management on every change of the volume's legs "
        "(repair, discard); a consumer never applies legs older than those it has applied",
    )

    def endpoint(self) -> tuple[str, str, int, str]:
        """What a device made from this connection talks to: two publishes of one volume
        to one node differ here when the owner exported it anew (another port, a new key)."""
        return (self.transport.value, self.host, self.port, self.psk_identity)


class Attachment(BaseModel):
    volume_id: str
    node_id: str
    access_mode: AccessMode
    readonly: bool
    created_at: float
    connection: Connection = Field(default_factory=Connection)


# ---- snapshots and group snapshots ---------------------------------------------


class SnapshotCreate(Strict):
    name: str = Field(min_length=1, max_length=MAX_VOLUME_NAME, pattern=TEXT_PATTERN)
    source_volume_id: VolumeId
    parameters: dict[Text, Text] = Field(default_factory=dict, json_schema_extra=TEXT_MAP)


class SnapshotState(StrEnum):
    CREATING = "creating"  # the row exists; the file may not yet (a crash here is re-driven)
    READY = "ready"
    DELETING = "deleting"


class Snapshot(BaseModel):
    id: str
    name: str
    source_volume_id: str
    size_bytes: int = Field(description="the source volume's size when it was cut")
    node_id: str
    pool: str
    created_at: float
    state: SnapshotState
    ready_to_use: bool
    method: SnapshotMethod = SnapshotMethod.REFLINK
    allocated_bytes: int = Field(
        default=0,
        description="space the snapshot may pin in its pool (the source's written bytes when "
        "it was cut): counted against the pool so later writes to the source never hit ENOSPC",
    )
    group_snapshot_id: str = ""


class GroupSnapshotCreate(Strict):
    name: str = Field(min_length=1, max_length=MAX_VOLUME_NAME, pattern=TEXT_PATTERN)
    source_volume_ids: list[VolumeId] = Field(min_length=1, max_length=64)
    parameters: dict[Text, Text] = Field(default_factory=dict, json_schema_extra=TEXT_MAP)


class GroupSnapshot(BaseModel):
    id: str
    name: str
    created_at: float
    ready_to_use: bool
    snapshots: list[Snapshot]


class Extent(BaseModel):
    offset: int
    length: int


class ExtentPage(BaseModel):
    """Changed-block metadata: byte ranges of a snapshot, in offset order."""

    size_bytes: int = Field(description="the snapshot's volume size")
    extents: list[Extent]
    next_offset: int | None = Field(
        default=None, description="ask again from here for more; null when there is no more"
    )


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_token: str = ""


class Capacity(BaseModel):
    available_bytes: int
    maximum_volume_bytes: int
    minimum_volume_bytes: int = 0


# ---- reconcile -----------------------------------------------------------------


class ReconcileRequest(Strict):
    fix: bool = Field(default=False, description="also repair what is provably safe to repair")


class FindingKind(StrEnum):
    """What differs between a node and management's rows."""

    #: a volume file on a node that no volume row names (e.g. a create whose row was lost)
    ORPHAN_FILE = "orphan_file"
    #: an `available` volume row whose file is not on its node
    MISSING_FILE = "missing_file"
    #: a volume file whose size is not the row's size
    SIZE_MISMATCH = "size_mismatch"
    #: a row left `creating` (a create that did not finish)
    STUCK_CREATING = "stuck_creating"
    #: a row left `deleting` (a delete that did not finish)
    STUCK_DELETING = "stuck_deleting"
    #: a volume attached on a node without an attachment row for that node
    ORPHAN_ATTACHMENT = "orphan_attachment"
    #: an attachment row whose node has no device for the volume
    STALE_ATTACHMENT = "stale_attachment"
    #: a node whose agent did not answer: nothing on it was compared
    NODE_UNREACHABLE = "node_unreachable"
    #: a volume file or device the agent could not describe on the second look (busy,
    #: failing, gone away): not judged this time; the next run looks again
    UNCHECKED = "unchecked"


class ReconcileFinding(BaseModel):
    kind: FindingKind
    node_id: str
    volume_id: str = ""
    pool: str = ""
    detail: str
    fixed: bool = Field(default=False, description="true when this run repaired it (fix=true)")


class ReconcileReport(BaseModel):
    fix: bool
    nodes_checked: list[str] = Field(default_factory=list)
    findings: list[ReconcileFinding] = Field(default_factory=list)


# ---- node-agent local API -----------------------------------------------------


class AgentSourceKind(StrEnum):
    SNAPSHOT = "snapshot"
    VOLUME = "volume"


class AgentSource(Strict):
    """A clone's source on the same node: its file is reflinked (or copied) into the new one."""

    kind: AgentSourceKind
    id: str = Field(
        min_length=5, max_length=63, pattern=f"{VOLUME_ID_PATTERN}|{SNAPSHOT_ID_PATTERN}"
    )


class AgentVolumeCreate(Strict):
    pool: str
    size_bytes: int = Field(gt=0, le=MAX_BYTES, description="at most the pool's capacity")
    source: AgentSource | None = Field(
        default=None, description="start with this snapshot's or volume's data, then grow"
    )


class AgentSnapshotCreate(Strict):
    pool: str
    source_volume_id: VolumeId


class AgentSnapshot(BaseModel):
    id: str
    pool: str
    source_volume_id: str
    size_bytes: int
    path: str
    method: SnapshotMethod
    allocated_bytes: int = 0


#: who holds a freeze: a snapshot or group snapshot id (a filesystem is thawed
#: only when its last holder lets go, so two cuts of one volume cannot thaw each other)
FREEZE_HOLDER_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"


class AgentFreeze(Strict):
    lease_seconds: float = Field(
        default=10.0,
        gt=0,
        le=120,
        description="the agent thaws by itself after this long, whatever happens to the caller",
    )
    holder: str = Field(
        default="",
        pattern="^$|" + FREEZE_HOLDER_PATTERN[1:],
        description="the cut this freeze is for (a snapshot or group snapshot id)",
    )
    renew: bool = Field(
        default=False,
        description="extend this holder's lease only: 409 when its freeze is no longer held "
        "(lapsed, thawed, or the agent restarted), so the caller knows the instant was lost",
    )


class AgentThaw(Strict):
    holder: str = Field(
        default="",
        pattern="^$|" + FREEZE_HOLDER_PATTERN[1:],
        description="release this holder's freeze; empty: every holder (thaw now)",
    )


class AgentFreezeState(BaseModel):
    volume_id: str
    frozen: bool
    mountpoints: list[str] = Field(
        default_factory=list, description="the filesystems frozen (empty: not mounted here)"
    )


class AgentVolumeResize(Strict):
    size_bytes: int = Field(gt=0, le=MAX_BYTES, description="at most the pool's capacity")


class AgentVolume(BaseModel):
    id: str
    pool: str
    size_bytes: int
    path: str
    allocated_bytes: int = Field(
        default=0, description="bytes the filesystem holds for the file (0: nothing written)"
    )


class AgentAttach(Strict):
    readonly: bool = False
    connection: Connection | None = Field(
        default=None,
        description="publish_context as management answered it; none: the local file "
        "(loop), or whatever is attached already",
    )
    min_size_bytes: int = Field(
        default=0,
        ge=0,
        le=MAX_BYTES,
        description="NodeExpandVolume: the device must show at least this size (a remote "
        "device reconnects for it when nothing uses it); 0: only pick up growth cheaply",
    )


PskKey = Annotated[str, StringConstraints(pattern=PSK_KEY_PATTERN)]


class AgentExportCreate(Strict):
    """Export a volume to one client node (owner side): NBD with TLS-PSK, or an nvmet
    subsystem whose host entry (per client and volume) authenticates with DH-HMAC-CHAP
    using the same key material."""

    transport: Transport = Field(default=Transport.NBD, description="nbd or nvme-tcp")
    psk_identity: NodeId
    psk_key: PskKey = Field(description="256-bit key, hex; never logged, never echoed", repr=False)
    readonly: bool = False
    client_address: str = Field(
        default="",
        max_length=255,
        pattern=CLIENT_ADDRESS_PATTERN,
        description="only this address (an IP address or a host name) may connect; empty: any",
    )


class AgentExport(BaseModel):
    volume_id: str
    client_node: str
    host: str
    port: int
    readonly: bool
    transport: Transport = Transport.NBD
    subsystem_nqn: str = ""


class AgentKey(Strict):
    """A TLS-PSK key for connecting to a remote volume (consumer side)."""

    psk_identity: NodeId
    psk_key: PskKey = Field(repr=False)  # a repr (in a log line, a traceback) hides it


class AgentAttachment(BaseModel):
    volume_id: str
    device: str = Field(description="the stable symlink, /dev/tessera/<volume-id>")
    backing_device: str = Field(description="the real block device, e.g. /dev/loop3")
    transport: str = "loop"
    readonly: bool
    size_bytes: int
    blank: bool = Field(
        default=False,
        description=(
            "true only when nothing was ever written to the volume (its backing file has no "
            "allocated blocks, checked after flushing the device): it reads as zeros, so "
            "staging may format it without probing for signatures"
        ),
    )
    views: dict[str, str] = Field(
        default_factory=dict,
        description="read-only views of the volume on this node: view key -> device",
    )
    condition: str = Field(
        default="",
        description="empty when healthy; else why the data path is broken (a dead connection)",
    )
    connection: Connection = Field(
        default_factory=Connection, description="what the volume was connected from"
    )


class Registration(StrEnum):
    """Whether management knows a node-agent's node and pools."""

    REGISTERED = "registered"  # the node and every pool, at least once since the agent started
    PENDING = "pending"  # management has not answered yet; the agent keeps trying
    DISABLED = "disabled"  # the agent runs with --no-register: it serves locally only


class AgentNode(BaseModel):
    """The agent's own node (GET /v1/node): what the CSI plugin's first Probe waits for."""

    node_id: str
    registration: Registration


class AgentView(BaseModel):
    """A read-only device on an attached volume, for one read-only block publish.

    A read-only bind of a writable device node still lets its opener write
    the device; a device the kernel itself keeps read-only does not.
    """

    volume_id: str
    key: str
    device: str = Field(description="the read-only block device, e.g. /dev/loop5")
