"""Property-based fuzzing of the CSI socket of a real dev stack.

For every RPC hypothesis builds requests with any subset of fields missing,
random strings (empty, 129+ bytes, control characters, `..`, unicode),
absolute and relative paths, random capabilities, parameter maps, sizes,
foreign, unknown and real IDs. Properties, checked on every example:

- the answer is OK or one of the codes `ALLOWED` lists for the RPC (the
  spec's table for it plus the general Error Scheme), never INTERNAL/UNKNOWN;
- a missing REQUIRED field (a capability's own included) is INVALID_ARGUMENT;
- nothing is left behind: loop devices on the pool, mounts under the run's
  directory, files in the pool, volumes and attachments in management are
  the same after the example (and after undoing what an OK answer made,
  as the CO would) as before it;
- the plugin still answers Probe, ready.

Budget and seed are fixed (`FUZZ_SEED`, `EXAMPLES`); TESSERA_FUZZ_SEED and
TESSERA_FUZZ_SCALE change them for a longer local hunt. The run prints the
seed and, per RPC, how many examples ran and which codes came back.

Paths the fuzzer sends are inside the run's work directory, under
/nonexistent-tessera-fuzz, or relative and prefixed `fuzz-nonexistent-`:
nothing it sends can name a real system path.
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from csi_driver._gen import csi_pb2
from tessera.topology import TOPOLOGY_KEY
from tests.fuzz.csi_fixtures import (  # noqa: F401 - fixture
    NODE_ID,
    NONEXISTENT_ROOT,
    REAL_VOLUME_NAME,
    RPC_TIMEOUT,
    FuzzStack,
    fuzz_stack,
    staged_and_published,
)

FUZZ_SEED = int(os.environ.get("TESSERA_FUZZ_SEED", "20261201"))
SCALE = float(os.environ.get("TESSERA_FUZZ_SCALE", "1"))
C = grpc.StatusCode
MiB = 1024**2

# ---- what the spec allows, per RPC ---------------------------------------------------------
#
# Error Scheme (every RPC): INVALID_ARGUMENT (missing or invalid field); ABORTED
# (operation pending for the volume: RPCs that name one). PERMISSION_DENIED and
# UNAUTHENTICATED need secrets we never check; UNAVAILABLE/DEADLINE_EXCEEDED mean a
# peer is down, which it is not during this run: none of those may appear here.

GENERAL = frozenset({C.INVALID_ARGUMENT})
PER_VOLUME = GENERAL | {C.ABORTED}
ALLOWED: dict[str, frozenset[C]] = {
    "CreateVolume": PER_VOLUME
    | {C.NOT_FOUND, C.ALREADY_EXISTS, C.RESOURCE_EXHAUSTED, C.OUT_OF_RANGE},
    "DeleteVolume": PER_VOLUME | {C.FAILED_PRECONDITION},
    "ControllerPublishVolume": PER_VOLUME
    | {C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED},
    "ControllerUnpublishVolume": PER_VOLUME | {C.NOT_FOUND},
    "ValidateVolumeCapabilities": PER_VOLUME | {C.NOT_FOUND},
    "ListVolumes": GENERAL | {C.ABORTED},
    "GetCapacity": GENERAL,
    "ControllerGetVolume": PER_VOLUME | {C.NOT_FOUND},
    # RESOURCE_EXHAUSTED: the pool has no room left now (docs/contracts.md); the
    # spec's OUT_OF_RANGE means "fix the range", a different recovery
    "ControllerExpandVolume": PER_VOLUME
    | {C.NOT_FOUND, C.FAILED_PRECONDITION, C.OUT_OF_RANGE, C.RESOURCE_EXHAUSTED},
    "NodeStageVolume": PER_VOLUME | {C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION},
    # FAILED_PRECONDITION: still published at another target, or another volume is
    # mounted at staging_target_path (docs/contracts.md)
    "NodeUnstageVolume": PER_VOLUME | {C.NOT_FOUND, C.FAILED_PRECONDITION},
    "NodePublishVolume": PER_VOLUME | {C.NOT_FOUND, C.ALREADY_EXISTS, C.FAILED_PRECONDITION},
    # FAILED_PRECONDITION: another volume is mounted at target_path (docs/contracts.md)
    "NodeUnpublishVolume": PER_VOLUME | {C.NOT_FOUND, C.FAILED_PRECONDITION},
    "NodeGetVolumeStats": PER_VOLUME | {C.NOT_FOUND},
    "NodeExpandVolume": PER_VOLUME | {C.NOT_FOUND, C.FAILED_PRECONDITION, C.OUT_OF_RANGE},
}

#: REQUIRED fields, from the spec's messages (bools such as `readonly` cannot be missing)
REQUIRED: dict[str, tuple[str, ...]] = {
    "CreateVolume": ("name", "volume_capabilities"),
    "DeleteVolume": ("volume_id",),
    "ControllerPublishVolume": ("volume_id", "node_id", "volume_capability"),
    "ControllerUnpublishVolume": ("volume_id",),
    "ValidateVolumeCapabilities": ("volume_id", "volume_capabilities"),
    "ListVolumes": (),
    "GetCapacity": (),
    "ControllerGetVolume": ("volume_id",),
    "ControllerExpandVolume": ("volume_id", "capacity_range"),
    "NodeStageVolume": ("volume_id", "staging_target_path", "volume_capability"),
    "NodeUnstageVolume": ("volume_id", "staging_target_path"),
    "NodePublishVolume": ("volume_id", "target_path", "volume_capability"),
    "NodeUnpublishVolume": ("volume_id", "target_path"),
    "NodeGetVolumeStats": ("volume_id", "volume_path"),
    "NodeExpandVolume": ("volume_id", "volume_path"),
}

#: examples per RPC: about 2-3 minutes for the whole run on a 2-core box
EXAMPLES: dict[str, int] = {
    "CreateVolume": 300,
    "DeleteVolume": 200,
    "ControllerPublishVolume": 300,
    "ControllerUnpublishVolume": 200,
    "ValidateVolumeCapabilities": 300,
    "ListVolumes": 150,
    "GetCapacity": 200,
    "ControllerGetVolume": 150,
    "ControllerExpandVolume": 300,
    "NodeStageVolume": 350,
    "NodeUnstageVolume": 200,
    "NodePublishVolume": 350,
    "NodeUnpublishVolume": 200,
    "NodeGetVolumeStats": 300,
    "NodeExpandVolume": 300,
}


def fuzz_settings(rpc: str) -> settings:
    return settings(
        max_examples=max(1, int(EXAMPLES[rpc] * SCALE)),
        deadline=None,
        database=None,  # the same examples on every machine: the seed alone decides
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            # `staged` is set up once per test on purpose: examples share the pod
            HealthCheck.function_scoped_fixture,
        ],
        print_blob=True,
        # No shrinking: a failing example may leave state behind (that is what
        # it found), and replaying smaller ones on top of it misleads; the
        # first failure is reported as it happened.
        phases=(Phase.explicit, Phase.generate),
        report_multiple_bugs=False,
    )


# ---- strategies ---------------------------------------------------------------------------

CONTROL = st.text(alphabet=st.characters(max_codepoint=0x1F), min_size=1, max_size=3)
UNICODE = st.text(
    alphabet=st.characters(min_codepoint=0x80, exclude_categories=("Cs",)), max_size=20
)
SAFE_NAME = st.text(string.ascii_letters + string.digits + "._-", min_size=1, max_size=24).filter(
    lambda s: s not in (".", "..")
)
JUNK = st.one_of(
    st.just(""),
    st.text(max_size=24),
    st.text(min_size=129, max_size=300),
    st.tuples(st.text(max_size=4), CONTROL, st.text(max_size=4)).map("".join),
    UNICODE,
    st.sampled_from(
        ["..", ".", "/", "a/b", "../../etc", "-rf", "vol-", "VOL-ABC", "vol-" + "f" * 200]
    ),
)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Absent (None) about a quarter of the time."""
    return st.one_of(st.none(), strategy, strategy, strategy)


def volume_ids(fs: FuzzStack, *, real: bool = True) -> st.SearchStrategy[str]:
    hex32 = st.text("0123456789abcdef", min_size=32, max_size=32).map(lambda h: "vol-" + h)
    options = [hex32, st.just("vol-" + "0" * 32), st.just("pvc-9c1f2e7a-foreign"), JUNK]
    if real:
        options = [st.just(fs.real_volume_id)] * 2 + [st.just(fs.real_volume_id + "\n")] + options
    return st.one_of(*options)


NODE_IDS = st.one_of(
    st.just(NODE_ID),
    st.just("fuzz-unknown-node"),
    JUNK,
    st.text(string.ascii_letters + "._-", min_size=129, max_size=300),
)


def _is_safe_path(path: str, work: str) -> bool:
    if not path or not path.startswith("/"):
        return not path or path.startswith("fuzz-nonexistent-")
    norm = os.path.normpath(path.replace("\x00", ""))
    return norm.startswith(work + "/") or norm.startswith(NONEXISTENT_ROOT + "/")


def paths(fs: FuzzStack) -> st.SearchStrategy[str]:
    w = str(fs.work)
    free = st.text(max_size=16).filter(lambda s: ".." not in s)
    return st.one_of(
        st.just(""),
        SAFE_NAME.map(lambda n: f"{w}/{n}"),
        SAFE_NAME.map(lambda n: f"{w}/{n}/../{n}"),
        SAFE_NAME.map(lambda n: f"{w}//{n}/./"),
        st.just(f"{w}/existing"),
        free.map(lambda n: f"{w}/x{n}"),
        UNICODE.map(lambda n: f"{w}/u{n}".replace("..", "")),
        st.just(f"{w}/" + "x" * 300),
        st.just(f"{w}/" + "/".join(["y" * 200] * 25)),
        SAFE_NAME.map(lambda n: f"{NONEXISTENT_ROOT}/{n}"),
        free.map(lambda n: f"fuzz-nonexistent-{n}"),
    ).filter(lambda p: _is_safe_path(p, w))


MODES = st.one_of(st.integers(0, 7), st.integers(8, 2**31 - 1), st.integers(-(2**31), -1))
FLAGS = st.lists(
    st.one_of(st.sampled_from(["noatime", "ro", "rw", "nodev", "discard", "sync"]), JUNK),
    max_size=4,
)
MOUNT = st.builds(
    csi_pb2.VolumeCapability.MountVolume,
    fs_type=st.one_of(st.sampled_from(["", "ext4", "xfs", "btrfs", "vfat"]), JUNK),
    mount_flags=FLAGS,
    volume_mount_group=st.one_of(st.just(""), st.just(""), JUNK),
)


@st.composite
def capabilities(draw: st.DrawFn) -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability()
    kind = draw(st.sampled_from(["block", "mount", "mount", "none"]))
    if kind == "block":
        cap.block.SetInParent()
    elif kind == "mount":
        cap.mount.CopyFrom(draw(MOUNT))
    mode = draw(maybe(MODES))
    if mode is not None:
        cap.access_mode.mode = mode
    return cap


SIZES = st.one_of(
    st.sampled_from([0, 1, -1, 4096, MiB, 64 * MiB, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63)]),
    st.integers(-(2**63), 2**63 - 1),
)
CAPACITY = st.builds(csi_pb2.CapacityRange, required_bytes=SIZES, limit_bytes=SIZES)
PARAM_KEYS = st.one_of(
    st.sampled_from(
        [
            "vpg",
            "csi.storage.k8s.io/fstype",
            "mkfsOptions",
            "locality",
            "csi.storage.k8s.io/pvc/name",
            "vgp",
        ]
    ),
    JUNK,
)
PARAM_VALUES = st.one_of(
    st.sampled_from(
        ["default", "ext4", "xfs", "any", "required", "preferred", "-b 4096", "/dev/sda"]
    ),
    JUNK,
)
PARAMS = st.one_of(
    st.dictionaries(PARAM_KEYS, PARAM_VALUES, max_size=5),
    st.just({"vpg": "default", "csi.storage.k8s.io/pvc/name": "p" * 5000}),
)
SECRETS = st.dictionaries(
    st.one_of(st.sampled_from(["user", "pass.word", "key_1"]), JUNK), JUNK, max_size=3
)
CONTEXT = st.dictionaries(
    st.one_of(
        st.sampled_from(["transport", "ownerNode", "readonly", "fsType", "mkfsOptions"]), JUNK
    ),
    st.one_of(st.sampled_from(["loop", "nbd", "true", "false", NODE_ID, "ext4", "xfs"]), JUNK),
    max_size=4,
)
TOPOLOGY = st.builds(
    csi_pb2.Topology,
    segments=st.dictionaries(
        st.one_of(st.just(TOPOLOGY_KEY), st.just("topology.kubernetes.io/zone"), JUNK),
        NODE_IDS,
        max_size=3,
    ),
)
TOKENS = st.one_of(st.just(""), JUNK, st.text("0123456789", min_size=1, max_size=40))
MAX_ENTRIES = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([0, 1, -1, 2]))


# ---- well-formed values: most fields of most examples, so the deep paths run too ----------


def good_volume_ids(fs: FuzzStack) -> st.SearchStrategy[str]:
    return st.sampled_from([fs.real_volume_id] * 3 + ["vol-" + "0" * 32, "pvc-9c1f2e7a-foreign"])


GOOD_NODE_IDS = st.sampled_from([NODE_ID, NODE_ID, NODE_ID, "fuzz-unknown-node"])


def good_paths(fs: FuzzStack) -> st.SearchStrategy[str]:
    w = str(fs.work)
    return st.one_of(
        SAFE_NAME.map(lambda n: f"{w}/{n}"),
        SAFE_NAME.map(lambda n: f"{w}/{n}"),
        st.sampled_from([f"{w}/existing", f"{w}/staged", f"{w}/published"]),
        SAFE_NAME.map(lambda n: f"{NONEXISTENT_ROOT}/{n}"),
    )


@st.composite
def good_capabilities(draw: st.DrawFn) -> csi_pb2.VolumeCapability:
    cap = csi_pb2.VolumeCapability()
    if draw(st.booleans()):
        cap.block.SetInParent()
    else:
        cap.mount.fs_type = draw(st.sampled_from(["", "ext4", "ext4", "xfs"]))
        cap.mount.mount_flags.extend(draw(st.sampled_from([[], [], ["noatime"], ["nodev", "ro"]])))
    cap.access_mode.mode = draw(st.integers(1, 7))
    return cap


GOOD_SIZES = st.sampled_from([1, 4096, MiB, 64 * MiB, 100 * MiB + 1, 2**62])
GOOD_CAPACITY = st.one_of(
    st.builds(csi_pb2.CapacityRange, required_bytes=GOOD_SIZES),
    st.builds(csi_pb2.CapacityRange, limit_bytes=GOOD_SIZES),
    GOOD_SIZES.map(lambda n: csi_pb2.CapacityRange(required_bytes=n, limit_bytes=n)),
)
GOOD_PARAMS = st.sampled_from(
    [
        {},
        {"vpg": "default"},
        {"csi.storage.k8s.io/fstype": "xfs"},
        {"locality": "required"},
        {"locality": "preferred", "csi.storage.k8s.io/pvc/name": "data-0"},
    ]
)
GOOD_SECRETS = st.sampled_from([{}, {}, {"user": "fuzz", "pass.word": "not-logged"}])
GOOD_PUBLISH_CONTEXT = st.sampled_from(
    [{}, {"transport": "loop", "readonly": "false", "ownerNode": NODE_ID}, {"transport": "nbd"}]
)
GOOD_VOLUME_CONTEXT = st.sampled_from(
    [{}, {"fsType": "ext4", "mkfsOptions": ""}, {"fsType": "xfs"}]
)
GOOD_TOPOLOGY = st.sampled_from(
    [
        csi_pb2.Topology(segments={TOPOLOGY_KEY: NODE_ID}),
        csi_pb2.Topology(segments={TOPOLOGY_KEY: "fuzz-unknown-node"}),
        csi_pb2.Topology(segments={"topology.kubernetes.io/zone": "z1"}),
    ]
)


def draw_fields(
    data: st.DataObject,
    spec: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]],
) -> dict[str, Any]:
    """Up to three fields get a malformed or absent value; the rest a well-formed one."""
    bad = data.draw(st.sets(st.sampled_from(sorted(spec)), max_size=3), label="malformed fields")
    out = {}
    for name, (good, malformed) in spec.items():
        strategy = st.one_of(st.none(), malformed) if name in bad else good
        out[name] = data.draw(strategy, label=name)
    return out


# ---- the properties -----------------------------------------------------------------------


def _present(request: Any, name: str) -> bool:
    value = getattr(request, name)
    if hasattr(value, "ListFields") and not hasattr(value, "__len__"):
        return request.HasField(name)
    if isinstance(value, str):
        return bool(value)
    return len(value) > 0


def missing_required(rpc: str, request: Any) -> list[str]:
    """REQUIRED fields the request lacks, a present capability's own ones included."""
    out = [n for n in REQUIRED[rpc] if not _present(request, n)]
    fields = request.DESCRIPTOR.fields_by_name
    caps = list(request.volume_capabilities) if "volume_capabilities" in fields else []
    if "volume_capability" in fields and request.HasField("volume_capability"):
        caps.append(request.volume_capability)
    for cap in caps:
        if cap.WhichOneof("access_type") is None:
            out.append("access_type")
        if cap.access_mode.mode == 0:
            out.append("access_mode")
    return out


def _undo(fs: FuzzStack, rpc: str, request: Any, reply: Any) -> None:
    """What the CO does with an OK answer it no longer wants."""
    t = RPC_TIMEOUT
    if rpc == "CreateVolume" and reply.volume.volume_id != fs.real_volume_id:
        fs.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=reply.volume.volume_id), timeout=t
        )
    elif rpc == "ControllerPublishVolume":
        fs.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(
                volume_id=request.volume_id, node_id=request.node_id
            ),
            timeout=t,
        )
    elif rpc == "NodeStageVolume":
        fs.node.NodeUnstageVolume(
            csi_pb2.NodeUnstageVolumeRequest(
                volume_id=request.volume_id, staging_target_path=request.staging_target_path
            ),
            timeout=t,
        )
    elif rpc == "NodePublishVolume":
        fs.node.NodeUnpublishVolume(
            csi_pb2.NodeUnpublishVolumeRequest(
                volume_id=request.volume_id, target_path=request.target_path
            ),
            timeout=t,
        )


def check(fs: FuzzStack, rpc: str, call: Callable[..., Any], fields: dict[str, Any]) -> None:
    request_type = getattr(csi_pb2, f"{rpc}Request")
    request = request_type(**{k: v for k, v in fields.items() if v is not None})
    before = fs.state()
    try:
        reply = call(request, timeout=RPC_TIMEOUT)
        code, details = C.OK, ""
    except grpc.RpcError as err:
        reply, code, details = None, err.code(), err.details() or ""
    fs.count(rpc, code)
    missing = missing_required(rpc, request)
    if missing:
        assert code == C.INVALID_ARGUMENT, (
            f"{rpc} without {missing} answered {code.name} ({details!r}), not INVALID_ARGUMENT"
        )
    elif code != C.OK:
        assert code in ALLOWED[rpc], f"{rpc} answered {code.name}: {details!r}"
    if code == C.OK:
        _undo(fs, rpc, request, reply)
    leaks = fs.settled_diff(before)
    assert not leaks, f"{rpc} ({code.name}) left behind: {leaks}"
    assert fs.probe_ready(), f"Probe is not ready after {rpc}"


# ---- one test per RPC -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fs(fuzz_stack: FuzzStack) -> FuzzStack:  # noqa: F811 - the fixture imported above
    (fuzz_stack.work / "existing").mkdir(exist_ok=True)
    return fuzz_stack


@pytest.fixture
def staged(fs: FuzzStack) -> Iterator[FuzzStack]:
    """The real volume in use by a pod for the whole test: publish, stats and expand reach it."""
    with staged_and_published(fs):
        yield fs


def fuzz(
    rpc: str,
    spec: Callable[[FuzzStack], dict[str, Any]],
    service: str,
    *,
    with_staged_volume: bool = False,
) -> Callable[..., None]:
    """One hypothesis test of `rpc`, with its fixed budget and the run's seed."""

    def body(fs: FuzzStack, data: st.DataObject) -> None:
        fields = draw_fields(data, spec(fs))
        check(fs, rpc, getattr(getattr(fs, service), rpc), fields)

    def run_staged(staged: FuzzStack, data: st.DataObject) -> None:
        body(staged, data)

    def run_plain(fs: FuzzStack, data: st.DataObject) -> None:
        body(fs, data)

    run = run_staged if with_staged_volume else run_plain
    return seed(FUZZ_SEED)(fuzz_settings(rpc)(given(data=st.data())(run)))


def _vid(fs: FuzzStack, *, real: bool = True) -> tuple[Any, Any]:
    if real:
        return good_volume_ids(fs), volume_ids(fs)
    return st.sampled_from(["vol-" + "0" * 32, "pvc-9c1f2e7a-foreign"]), volume_ids(fs, real=False)


def _path(fs: FuzzStack) -> tuple[Any, Any]:
    return good_paths(fs), paths(fs)


def _volume_path(fs: FuzzStack) -> tuple[Any, Any]:
    """Where the `staged` fixture's pod has the real volume, most of the time."""
    w = fs.work
    in_use = st.sampled_from([f"{w}/published", f"{w}/published", f"{w}/staged"])
    return st.one_of(in_use, in_use, good_paths(fs)), paths(fs)


CAPS = (good_capabilities(), capabilities())
CAP_LISTS = (
    st.lists(good_capabilities(), min_size=1, max_size=2),
    st.lists(capabilities(), max_size=3),
)
OPTIONAL_CAP = (st.one_of(st.none(), good_capabilities()), capabilities())
NAMES = (
    SAFE_NAME.map(lambda n: f"fuzz-{n}"),
    JUNK.filter(lambda n: n != REAL_VOLUME_NAME),
)
SECRET_MAPS = (GOOD_SECRETS, SECRETS)


test_create_volume_answers_only_spec_codes_and_leaks_nothing = fuzz(
    "CreateVolume",
    lambda fs: {
        "name": NAMES,
        "capacity_range": (st.one_of(st.none(), GOOD_CAPACITY), CAPACITY),
        "volume_capabilities": CAP_LISTS,
        "parameters": (GOOD_PARAMS, PARAMS),
        "secrets": SECRET_MAPS,
        "mutable_parameters": (st.none(), PARAMS),
        "accessibility_requirements": (
            st.one_of(
                st.none(),
                st.builds(
                    csi_pb2.TopologyRequirement,
                    requisite=st.lists(GOOD_TOPOLOGY, max_size=2),
                    preferred=st.lists(GOOD_TOPOLOGY, max_size=2),
                ),
            ),
            st.builds(
                csi_pb2.TopologyRequirement,
                requisite=st.lists(TOPOLOGY, max_size=2),
                preferred=st.lists(TOPOLOGY, max_size=2),
            ),
        ),
    },
    "controller",
)

# never the real volume: deleting it is allowed, and would end the run's real-ID cases
test_delete_volume_answers_only_spec_codes = fuzz(
    "DeleteVolume",
    lambda fs: {"volume_id": _vid(fs, real=False), "secrets": SECRET_MAPS},
    "controller",
)

test_controller_publish_answers_only_spec_codes_and_leaks_nothing = fuzz(
    "ControllerPublishVolume",
    lambda fs: {
        "volume_id": _vid(fs),
        "node_id": (GOOD_NODE_IDS, NODE_IDS),
        "volume_capability": CAPS,
        "readonly": (st.booleans(), st.booleans()),
        "secrets": SECRET_MAPS,
        "volume_context": (GOOD_VOLUME_CONTEXT, CONTEXT),
    },
    "controller",
)

test_controller_unpublish_answers_only_spec_codes = fuzz(
    "ControllerUnpublishVolume",
    lambda fs: {
        "volume_id": _vid(fs),
        "node_id": (st.one_of(st.none(), GOOD_NODE_IDS), NODE_IDS),
        "secrets": SECRET_MAPS,
    },
    "controller",
)

test_validate_capabilities_answers_only_spec_codes = fuzz(
    "ValidateVolumeCapabilities",
    lambda fs: {
        "volume_id": _vid(fs),
        "volume_capabilities": CAP_LISTS,
        "volume_context": (GOOD_VOLUME_CONTEXT, CONTEXT),
        "parameters": (GOOD_PARAMS, PARAMS),
        "mutable_parameters": (st.none(), PARAMS),
        "secrets": SECRET_MAPS,
    },
    "controller",
)

test_list_volumes_answers_only_spec_codes = fuzz(
    "ListVolumes",
    lambda fs: {
        "max_entries": (st.integers(0, 5), MAX_ENTRIES),
        "starting_token": (st.just(""), TOKENS),
    },
    "controller",
)

test_get_capacity_answers_only_spec_codes = fuzz(
    "GetCapacity",
    lambda fs: {
        "volume_capabilities": (
            st.lists(good_capabilities(), max_size=2),
            st.lists(capabilities(), max_size=3),
        ),
        "parameters": (GOOD_PARAMS, PARAMS),
        "accessible_topology": (st.one_of(st.none(), GOOD_TOPOLOGY), TOPOLOGY),
    },
    "controller",
)

test_controller_get_volume_answers_only_spec_codes = fuzz(
    "ControllerGetVolume", lambda fs: {"volume_id": _vid(fs)}, "controller"
)

test_controller_expand_answers_only_spec_codes = fuzz(
    "ControllerExpandVolume",
    lambda fs: {
        "volume_id": _vid(fs),
        "capacity_range": (GOOD_CAPACITY, CAPACITY),
        "volume_capability": OPTIONAL_CAP,
        "secrets": SECRET_MAPS,
    },
    "controller",
)

test_node_stage_answers_only_spec_codes_and_leaks_nothing = fuzz(
    "NodeStageVolume",
    lambda fs: {
        "volume_id": _vid(fs),
        "staging_target_path": _path(fs),
        "volume_capability": CAPS,
        "publish_context": (GOOD_PUBLISH_CONTEXT, CONTEXT),
        "volume_context": (GOOD_VOLUME_CONTEXT, CONTEXT),
        "secrets": SECRET_MAPS,
    },
    "node",
)

test_node_unstage_answers_only_spec_codes = fuzz(
    "NodeUnstageVolume",
    lambda fs: {"volume_id": _vid(fs), "staging_target_path": _path(fs)},
    "node",
)

test_node_publish_answers_only_spec_codes_and_leaks_nothing = fuzz(
    "NodePublishVolume",
    lambda fs: {
        "volume_id": _vid(fs),
        "staging_target_path": _path(fs),
        "target_path": _path(fs),
        "volume_capability": CAPS,
        "readonly": (st.booleans(), st.booleans()),
        "publish_context": (GOOD_PUBLISH_CONTEXT, CONTEXT),
        "volume_context": (GOOD_VOLUME_CONTEXT, CONTEXT),
        "secrets": SECRET_MAPS,
    },
    "node",
    with_staged_volume=True,
)

test_node_unpublish_answers_only_spec_codes = fuzz(
    "NodeUnpublishVolume",
    lambda fs: {"volume_id": _vid(fs), "target_path": _path(fs)},
    "node",
)

test_node_stats_answer_only_spec_codes = fuzz(
    "NodeGetVolumeStats",
    lambda fs: {
        "volume_id": _vid(fs),
        "volume_path": _volume_path(fs),
        "staging_target_path": (st.one_of(st.none(), good_paths(fs)), paths(fs)),
    },
    "node",
    with_staged_volume=True,
)

test_node_expand_answers_only_spec_codes = fuzz(
    "NodeExpandVolume",
    lambda fs: {
        "volume_id": _vid(fs),
        "volume_path": _volume_path(fs),
        "capacity_range": (st.one_of(st.none(), GOOD_CAPACITY), CAPACITY),
        "staging_target_path": (st.one_of(st.none(), good_paths(fs)), paths(fs)),
        "volume_capability": OPTIONAL_CAP,
        "secrets": SECRET_MAPS,
    },
    "node",
    with_staged_volume=True,
)


# ---- RPCs without fields, and the ones we do not offer ------------------------------------------


def test_information_rpcs_always_answer_ok(fs: FuzzStack) -> None:
    calls = [
        (fs.identity.GetPluginInfo, csi_pb2.GetPluginInfoRequest()),
        (fs.identity.GetPluginCapabilities, csi_pb2.GetPluginCapabilitiesRequest()),
        (fs.identity.Probe, csi_pb2.ProbeRequest()),
        (fs.controller.ControllerGetCapabilities, csi_pb2.ControllerGetCapabilitiesRequest()),
        (fs.node.NodeGetCapabilities, csi_pb2.NodeGetCapabilitiesRequest()),
        (fs.node.NodeGetInfo, csi_pb2.NodeGetInfoRequest()),
    ]
    for call, request in calls:
        call(request, timeout=30)


@seed(FUZZ_SEED)
@settings(max_examples=max(1, int(30 * SCALE)), deadline=None, database=None)
@given(volume_id=JUNK, name=JUNK)
def test_snapshot_and_modify_rpcs_answer_junk_with_the_spec_codes_never_internal(
    fs: FuzzStack, volume_id: str, name: str
) -> None:
    """Offered since issue 10: junk is a bad argument, names nothing, or is already gone."""
    ctl = fs.controller
    calls = [
        (ctl.CreateSnapshot, csi_pb2.CreateSnapshotRequest(source_volume_id=volume_id, name=name),
         {C.INVALID_ARGUMENT, C.NOT_FOUND}),
        (ctl.DeleteSnapshot, csi_pb2.DeleteSnapshotRequest(snapshot_id=volume_id),
         {C.OK, C.INVALID_ARGUMENT}),
        (ctl.GetSnapshot, csi_pb2.GetSnapshotRequest(snapshot_id=volume_id),
         {C.INVALID_ARGUMENT, C.NOT_FOUND}),
        (ctl.ListSnapshots, csi_pb2.ListSnapshotsRequest(source_volume_id=volume_id),
         {C.OK, C.INVALID_ARGUMENT}),
        (ctl.ControllerModifyVolume, csi_pb2.ControllerModifyVolumeRequest(volume_id=volume_id),
         {C.INVALID_ARGUMENT, C.NOT_FOUND}),
    ]  # fmt: skip
    for call, request, allowed in calls:
        try:
            call(request, timeout=30)
            code = C.OK
        except grpc.RpcError as err:
            code = err.code()
        assert code in allowed, f"{type(request).__name__}({volume_id!r}, {name!r}): {code}"
