"""Controller service: provisioning, attachment records, listing, capacity, growth.

Error codes are the ones of the CSI spec v1.12 error tables; an error about a
request field must name that field, so a user reading the event on the PVC
knows what to fix.
"""

from __future__ import annotations

import grpc
import pytest

from sanity.conftest import SecondNode
from sanity.support import (
    NODE_ID,
    POOL_SIZE,
    SMALL,
    TOPOLOGY_KEY,
    Code,
    ControllerCap,
    Csi,
    GiB,
    Kind,
    MiB,
    assert_code,
    block_cap,
    capacity,
    csi_pb2,
    mount_cap,
    node_topology,
    unique_name,
)

#: well-formed, never issued
UNKNOWN_VOLUME = "vol-" + "0" * 32
#: ids that must never reach a path: not ours, so not found
PATH_LIKE_IDS = ["../../etc", "vol-../../x", "a/b", "/dev/sda", "..", "vol-abc/.."]
BEYOND_POOL = 64 * POOL_SIZE


def controller_caps(csi: Csi) -> set[int]:
    reply = csi.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest(), timeout=30
    )
    return {c.rpc.type for c in reply.capabilities}


def create_request(kind: Kind | None = None, **fields: object) -> csi_pb2.CreateVolumeRequest:
    kind = kind or Kind("ext4")
    defaults: dict[str, object] = {
        "name": unique_name(kind.name),
        "capacity_range": capacity(kind.size),
        "volume_capabilities": [kind.cap()],
    }
    defaults.update(fields)
    return csi_pb2.CreateVolumeRequest(**defaults)


# ---- capabilities ------------------------------------------------------------------------


def test_controller_offers_everything_kubernetes_needs(csi: Csi) -> None:
    caps = controller_caps(csi)
    wanted = {
        ControllerCap.CREATE_DELETE_VOLUME: "provisioning",
        ControllerCap.PUBLISH_UNPUBLISH_VOLUME: "attach/detach",
        ControllerCap.EXPAND_VOLUME: "volume growth",
        ControllerCap.LIST_VOLUMES: "ListVolumes",
        ControllerCap.GET_CAPACITY: "storage capacity tracking",
        ControllerCap.GET_VOLUME: "ControllerGetVolume",
        ControllerCap.SINGLE_NODE_MULTI_WRITER: "SINGLE_NODE_SINGLE/MULTI_WRITER modes",
    }
    missing = [what for cap, what in wanted.items() if cap not in caps]
    assert not missing, f"ControllerGetCapabilities lacks: {missing}"
    assert caps == controller_caps(csi) == controller_caps(csi)


# ---- CreateVolume: bad input -------------------------------------------------------------


def test_creating_a_volume_without_a_name_is_refused(csi: Csi) -> None:
    csi.expect(csi.controller.CreateVolume, create_request(name=""), Code.INVALID_ARGUMENT, "name")


def test_a_name_of_129_characters_is_refused(csi: Csi) -> None:
    name = ("sanity-long-" + "x" * 200)[:129]
    csi.expect(
        csi.controller.CreateVolume, create_request(name=name), Code.INVALID_ARGUMENT, "name"
    )


def test_a_name_of_128_characters_is_accepted(csi: Csi) -> None:
    name = (unique_name("max") + "-" + "y" * 200)[:128]
    reply = csi.create(create_request(name=name))
    assert reply.volume.volume_id


def test_creating_a_volume_without_capabilities_is_refused(csi: Csi) -> None:
    req = create_request(volume_capabilities=[])
    csi.expect(csi.controller.CreateVolume, req, Code.INVALID_ARGUMENT, "volume_capabilities")


def test_a_capability_without_access_mode_is_refused(csi: Csi) -> None:
    cap = csi_pb2.VolumeCapability(mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"))
    req = create_request(volume_capabilities=[cap])
    csi.expect(csi.controller.CreateVolume, req, Code.INVALID_ARGUMENT, "access_mode")


def test_a_capability_without_access_type_is_refused(csi: Csi) -> None:
    cap = csi_pb2.VolumeCapability(
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        )
    )
    req = create_request(volume_capabilities=[cap])
    csi.expect(csi.controller.CreateVolume, req, Code.INVALID_ARGUMENT, "access_type")


def test_an_unsupported_filesystem_is_refused_by_name(csi: Csi) -> None:
    req = create_request(volume_capabilities=[mount_cap("btrfs")])
    csi.expect(csi.controller.CreateVolume, req, Code.INVALID_ARGUMENT, "btrfs")


def test_a_misspelled_storageclass_parameter_is_refused_by_name(csi: Csi) -> None:
    req = create_request(parameters={"vgp": "default"})
    csi.expect(csi.controller.CreateVolume, req, Code.INVALID_ARGUMENT, "vgp")


def test_parameters_added_by_the_external_provisioner_are_accepted(csi: Csi) -> None:
    params = {
        "csi.storage.k8s.io/pvc/name": "data-postgres-0",
        "csi.storage.k8s.io/pvc/namespace": "db",
        "csi.storage.k8s.io/pv/name": "pvc-1234",
        "vpg": "default",
    }
    reply = csi.create(create_request(parameters=params))
    assert reply.volume.volume_id


def test_a_capacity_range_of_zeros_is_refused(csi: Csi) -> None:
    # CapacityRange: "At least one of these fields MUST be specified."
    req = create_request(capacity_range=capacity(0, 0))
    csi.expect(csi.controller.CreateVolume, req, Code.INVALID_ARGUMENT, "capacity")


def test_a_limit_below_the_required_size_is_refused(csi: Csi) -> None:
    req = create_request(capacity_range=capacity(256 * MiB, 128 * MiB))
    csi.expect(
        csi.controller.CreateVolume, req, (Code.INVALID_ARGUMENT, Code.OUT_OF_RANGE), "limit"
    )


def test_a_volume_larger_than_any_pool_is_out_of_range(csi: Csi) -> None:
    req = create_request(capacity_range=capacity(BEYOND_POOL))
    csi.expect(csi.controller.CreateVolume, req, Code.OUT_OF_RANGE)


def test_creating_from_a_source_is_refused_unless_offered(csi: Csi) -> None:
    caps = controller_caps(csi)
    clone = csi_pb2.VolumeContentSource(
        volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id=UNKNOWN_VOLUME)
    )
    snap = csi_pb2.VolumeContentSource(
        snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="snap-" + "0" * 32)
    )
    for source, offered in (
        (clone, ControllerCap.CLONE_VOLUME in caps),
        (snap, ControllerCap.CREATE_DELETE_SNAPSHOT in caps),
    ):
        req = create_request(volume_content_source=source)
        if offered:
            # an offered source that does not exist
            csi.expect(csi.controller.CreateVolume, req, Code.NOT_FOUND)
        else:
            csi.expect(csi.controller.CreateVolume, req, Code.INVALID_ARGUMENT, "source")


def test_a_topology_no_node_can_satisfy_is_resource_exhausted(csi: Csi) -> None:
    req = create_request(
        accessibility_requirements=csi_pb2.TopologyRequirement(
            requisite=[node_topology("no-such-node")]
        )
    )
    csi.expect(csi.controller.CreateVolume, req, Code.RESOURCE_EXHAUSTED)


# ---- CreateVolume: what comes back -------------------------------------------------------


def test_a_volume_without_capacity_range_gets_a_default_size(csi: Csi) -> None:
    req = create_request()
    req.ClearField("capacity_range")
    reply = csi.create(req)
    assert reply.volume.capacity_bytes > 0


@pytest.mark.parametrize(
    ("required", "limit"),
    [(64 * MiB, 64 * MiB), (100 * MiB + 1, 0), (100 * MiB, 200 * MiB), (0, 96 * MiB)],
    ids=["exact", "odd-required", "range", "limit-only"],
)
def test_the_volume_size_honours_the_capacity_range(csi: Csi, required: int, limit: int) -> None:
    volume = csi.create(create_request(capacity_range=capacity(required, limit))).volume
    assert volume.capacity_bytes >= required
    if limit:
        assert volume.capacity_bytes <= limit
    assert volume.capacity_bytes > 0


def test_a_volume_reachable_over_the_network_carries_no_topology_constraint(csi: Csi) -> None:
    """locality any (the default): every node can attach it, so a pod may go anywhere."""
    volume = csi.create_volume()
    assert list(volume.accessible_topology) == []


def test_a_local_only_volume_lands_on_the_node_the_topology_requires(csi: Csi) -> None:
    req = create_request(
        parameters={"locality": "required"},
        accessibility_requirements=csi_pb2.TopologyRequirement(
            requisite=[node_topology()], preferred=[node_topology()]
        ),
    )
    volume = csi.create(req).volume
    assert [dict(t.segments) for t in volume.accessible_topology] == [{TOPOLOGY_KEY: NODE_ID}]


def test_creating_the_same_volume_three_times_gives_the_same_volume(csi: Csi) -> None:
    req = create_request()
    answers = [csi.create(req).volume for _ in range(3)]
    assert answers[0].volume_id == answers[1].volume_id == answers[2].volume_id
    assert answers[0].capacity_bytes == answers[1].capacity_bytes == answers[2].capacity_bytes
    assert answers[0] == answers[1] == answers[2]


def test_the_same_name_with_another_size_is_already_exists(csi: Csi) -> None:
    req = create_request(capacity_range=capacity(SMALL, SMALL))
    csi.create(req)
    other = create_request(name=req.name, capacity_range=capacity(2 * SMALL, 2 * SMALL))
    csi.expect(csi.controller.CreateVolume, other, Code.ALREADY_EXISTS)


# ---- DeleteVolume ------------------------------------------------------------------------


def test_deleting_without_a_volume_id_is_refused(csi: Csi) -> None:
    csi.expect(
        csi.controller.DeleteVolume,
        csi_pb2.DeleteVolumeRequest(),
        Code.INVALID_ARGUMENT,
        "volume_id",
    )


@pytest.mark.parametrize("volume_id", [UNKNOWN_VOLUME, "pvc-from-another-driver", *PATH_LIKE_IDS])
def test_deleting_a_volume_that_does_not_exist_succeeds(csi: Csi, volume_id: str) -> None:
    # spec: a volume that does not exist MUST get 0 OK
    for _ in range(3):
        csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=60)


def test_deleting_three_times_succeeds_and_the_volume_is_gone(csi: Csi) -> None:
    volume = csi.create_volume()
    for _ in range(3):
        csi.delete_volume(volume.volume_id)
    csi.expect(
        csi.controller.ControllerGetVolume,
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id),
        Code.NOT_FOUND,
    )


def test_a_published_volume_cannot_be_deleted(csi: Csi) -> None:
    volume = csi.create_volume()
    csi.controller_publish(volume.volume_id, mount_cap())
    csi.expect(
        csi.controller.DeleteVolume,
        csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id),
        Code.FAILED_PRECONDITION,
    )
    got = csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id), timeout=60
    )
    assert got.volume.volume_id == volume.volume_id, "the refused delete must leave the volume"
    csi.controller_unpublish(volume.volume_id)
    csi.delete_volume(volume.volume_id)


# ---- ValidateVolumeCapabilities ----------------------------------------------------------


def test_validating_without_a_volume_id_is_refused(csi: Csi) -> None:
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_capabilities=[mount_cap()])
    csi.expect(csi.controller.ValidateVolumeCapabilities, req, Code.INVALID_ARGUMENT, "volume_id")


def test_validating_without_capabilities_is_refused(csi: Csi) -> None:
    volume = csi.create_volume()
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id=volume.volume_id)
    csi.expect(
        csi.controller.ValidateVolumeCapabilities,
        req,
        Code.INVALID_ARGUMENT,
        "volume_capabilities",
    )


def test_validating_an_unknown_volume_is_not_found(csi: Csi) -> None:
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=UNKNOWN_VOLUME, volume_capabilities=[mount_cap()]
    )
    csi.expect(csi.controller.ValidateVolumeCapabilities, req, Code.NOT_FOUND)


def test_supported_capabilities_are_confirmed(csi: Csi, kind: Kind) -> None:
    volume = csi.create_volume(kind)
    req = csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=volume.volume_id,
        volume_capabilities=[kind.cap()],
        volume_context=dict(volume.volume_context),
    )
    for _ in range(3):
        reply = csi.controller.ValidateVolumeCapabilities(req, timeout=60)
        assert reply.HasField("confirmed"), reply.message
        assert list(reply.confirmed.volume_capabilities) == [kind.cap()]


# ---- ControllerGetVolume -----------------------------------------------------------------


def test_getting_a_volume_without_an_id_is_refused(csi: Csi) -> None:
    csi.expect(
        csi.controller.ControllerGetVolume,
        csi_pb2.ControllerGetVolumeRequest(),
        Code.INVALID_ARGUMENT,
        "volume_id",
    )


@pytest.mark.parametrize("volume_id", [UNKNOWN_VOLUME, *PATH_LIKE_IDS])
def test_getting_an_unknown_volume_is_not_found(csi: Csi, volume_id: str) -> None:
    csi.expect(
        csi.controller.ControllerGetVolume,
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume_id),
        Code.NOT_FOUND,
    )


def test_a_volume_shows_where_it_is_published(csi: Csi) -> None:
    volume = csi.create_volume()
    req = csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id)
    got = csi.controller.ControllerGetVolume(req, timeout=60)
    assert got.volume.volume_id == volume.volume_id
    assert got.volume.capacity_bytes == volume.capacity_bytes
    assert list(got.status.published_node_ids) == []
    csi.controller_publish(volume.volume_id, mount_cap())
    for _ in range(3):
        got = csi.controller.ControllerGetVolume(req, timeout=60)
        assert list(got.status.published_node_ids) == [NODE_ID]
        if ControllerCap.VOLUME_CONDITION in controller_caps(csi):
            assert not got.status.volume_condition.abnormal, got.status.volume_condition.message
    csi.controller_unpublish(volume.volume_id)
    got = csi.controller.ControllerGetVolume(req, timeout=60)
    assert list(got.status.published_node_ids) == []


# ---- ListVolumes -------------------------------------------------------------------------


def list_all(csi: Csi, max_entries: int) -> list[csi_pb2.ListVolumesResponse.Entry]:
    entries = []
    token = ""
    for _ in range(10_000):
        reply = csi.controller.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=max_entries, starting_token=token), timeout=60
        )
        assert len(reply.entries) <= max_entries or max_entries == 0
        entries.extend(reply.entries)
        token = reply.next_token
        if not token:
            return entries
    raise AssertionError("ListVolumes never stopped handing out next_token")


@pytest.mark.parametrize("page", [0, 1, 2, 3])
def test_listing_in_pages_returns_every_volume_once(csi: Csi, page: int) -> None:
    created = {csi.create_volume(size=16 * MiB).volume_id for _ in range(5)}
    ids = [e.volume.volume_id for e in list_all(csi, page)]
    assert len(ids) == len(set(ids)), "a volume was listed twice"
    assert created <= set(ids), f"missing from the listing: {created - set(ids)}"


def test_a_bad_starting_token_is_aborted(csi: Csi) -> None:
    for token in ("not-a-token", "%%%", "9" * 60):
        csi.expect(
            csi.controller.ListVolumes,
            csi_pb2.ListVolumesRequest(starting_token=token),
            Code.ABORTED,
            "starting_token",
        )


def test_a_negative_max_entries_is_refused(csi: Csi) -> None:
    csi.expect(
        csi.controller.ListVolumes,
        csi_pb2.ListVolumesRequest(max_entries=-1),
        Code.INVALID_ARGUMENT,
        "max_entries",
    )


def test_a_page_token_survives_deleting_the_last_volume_of_the_page(csi: Csi) -> None:
    for _ in range(4):
        csi.create_volume(size=16 * MiB)
    first = csi.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=2), timeout=60)
    assert len(first.entries) == 2 and first.next_token
    last = first.entries[-1].volume.volume_id
    # only delete what this test made; anything else is another test's volume
    if csi.owns(last):
        csi.delete_volume(last)
    rest = csi.controller.ListVolumes(
        csi_pb2.ListVolumesRequest(max_entries=2, starting_token=first.next_token), timeout=60
    )
    seen = {e.volume.volume_id for e in first.entries}
    assert not seen & {e.volume.volume_id for e in rest.entries}


def test_the_listing_shows_where_volumes_are_published(csi: Csi) -> None:
    if ControllerCap.LIST_VOLUMES_PUBLISHED_NODES not in controller_caps(csi):
        pytest.skip("LIST_VOLUMES_PUBLISHED_NODES not offered")
    volume = csi.create_volume()
    csi.controller_publish(volume.volume_id, mount_cap())
    entry = next(e for e in list_all(csi, 0) if e.volume.volume_id == volume.volume_id)
    assert list(entry.status.published_node_ids) == [NODE_ID]


# ---- GetCapacity -------------------------------------------------------------------------


def available(csi: Csi, **fields: object) -> csi_pb2.GetCapacityResponse:
    return csi.controller.GetCapacity(csi_pb2.GetCapacityRequest(**fields), timeout=60)


def test_capacity_is_what_the_pool_has_left(csi: Csi) -> None:
    reply = available(csi)
    assert 0 < reply.available_capacity <= POOL_SIZE
    mine = available(csi, accessible_topology=node_topology(), volume_capabilities=[mount_cap()])
    assert 0 < mine.available_capacity <= POOL_SIZE
    if reply.HasField("maximum_volume_size"):
        assert 0 < reply.maximum_volume_size.value <= POOL_SIZE


def test_capacity_shrinks_when_a_volume_is_created_and_returns_when_it_is_deleted(
    csi: Csi,
) -> None:
    before = available(csi).available_capacity
    volume = csi.create_volume(size=256 * MiB)
    during = available(csi).available_capacity
    assert during <= before - volume.capacity_bytes
    csi.delete_volume(volume.volume_id)
    assert available(csi).available_capacity == before


def test_a_node_that_does_not_exist_has_no_capacity(csi: Csi) -> None:
    reply = available(csi, accessible_topology=node_topology("no-such-node"))
    assert reply.available_capacity == 0


# ---- ControllerPublishVolume / ControllerUnpublishVolume ---------------------------------


def publish_request(**fields: object) -> csi_pb2.ControllerPublishVolumeRequest:
    defaults: dict[str, object] = {
        "volume_id": UNKNOWN_VOLUME,
        "node_id": NODE_ID,
        "volume_capability": mount_cap(),
    }
    defaults.update(fields)
    return csi_pb2.ControllerPublishVolumeRequest(**defaults)


@pytest.mark.parametrize("missing", ["volume_id", "node_id", "volume_capability"])
def test_publishing_without_a_required_field_is_refused(csi: Csi, missing: str) -> None:
    volume = csi.create_volume()
    req = publish_request(volume_id=volume.volume_id)
    req.ClearField(missing)
    csi.expect(csi.controller.ControllerPublishVolume, req, Code.INVALID_ARGUMENT, missing)


@pytest.mark.parametrize("volume_id", [UNKNOWN_VOLUME, *PATH_LIKE_IDS])
def test_publishing_an_unknown_volume_is_not_found(csi: Csi, volume_id: str) -> None:
    csi.expect(
        csi.controller.ControllerPublishVolume, publish_request(volume_id=volume_id), Code.NOT_FOUND
    )


def test_publishing_to_an_unknown_node_is_not_found(csi: Csi) -> None:
    volume = csi.create_volume()
    req = publish_request(volume_id=volume.volume_id, node_id="no-such-node")
    csi.expect(csi.controller.ControllerPublishVolume, req, Code.NOT_FOUND)


def test_publishing_three_times_gives_the_same_answer(csi: Csi, kind: Kind) -> None:
    volume = csi.create_volume(kind)
    answers = [csi.controller_publish(volume.volume_id, kind.cap()) for _ in range(3)]
    assert answers[0] == answers[1] == answers[2]


def test_publishing_again_read_only_on_the_same_node_is_already_exists(
    csi: Csi, kind: Kind
) -> None:
    volume = csi.create_volume(kind)
    csi.controller_publish(volume.volume_id, kind.cap())
    req = publish_request(volume_id=volume.volume_id, volume_capability=kind.cap(), readonly=True)
    csi.expect(csi.controller.ControllerPublishVolume, req, Code.ALREADY_EXISTS)


def test_unpublishing_without_a_volume_id_is_refused(csi: Csi) -> None:
    csi.expect(
        csi.controller.ControllerUnpublishVolume,
        csi_pb2.ControllerUnpublishVolumeRequest(node_id=NODE_ID),
        Code.INVALID_ARGUMENT,
        "volume_id",
    )


def test_unpublishing_three_times_succeeds(csi: Csi) -> None:
    volume = csi.create_volume()
    csi.controller_publish(volume.volume_id, mount_cap())
    for _ in range(3):
        csi.controller_unpublish(volume.volume_id)
    csi.delete_volume(volume.volume_id)


@pytest.mark.parametrize("volume_id", [UNKNOWN_VOLUME, *PATH_LIKE_IDS])
def test_unpublishing_an_unknown_volume_is_ok_or_not_found(csi: Csi, volume_id: str) -> None:
    # spec: NOT_FOUND, or OK when it can be regarded as unpublished
    req = csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id=NODE_ID)
    try:
        csi.controller.ControllerUnpublishVolume(req, timeout=60)
    except grpc.RpcError as err:
        assert_code(err, Code.NOT_FOUND)


def test_unpublishing_without_a_node_unpublishes_from_every_node(
    csi: Csi, second_node: SecondNode
) -> None:
    volume = csi.create_volume(Kind("block"), mode="MULTI_NODE_READER_ONLY")
    cap = block_cap("MULTI_NODE_READER_ONLY")
    csi.controller_publish(volume.volume_id, cap, readonly=True)
    second_node.heartbeat()
    csi.controller_publish(volume.volume_id, cap, node_id=second_node.id, readonly=True)
    csi.controller.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id), timeout=60
    )
    got = csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id), timeout=60
    )
    assert list(got.status.published_node_ids) == []
    csi.delete_volume(volume.volume_id)


# ---- ControllerExpandVolume --------------------------------------------------------------


def expand_request(volume_id: str, required: int) -> csi_pb2.ControllerExpandVolumeRequest:
    return csi_pb2.ControllerExpandVolumeRequest(
        volume_id=volume_id, capacity_range=capacity(required), volume_capability=mount_cap()
    )


def test_expanding_without_a_volume_id_is_refused(csi: Csi) -> None:
    req = expand_request("", GiB)
    csi.expect(csi.controller.ControllerExpandVolume, req, Code.INVALID_ARGUMENT, "volume_id")


def test_expanding_without_a_capacity_range_is_refused(csi: Csi) -> None:
    volume = csi.create_volume()
    req = expand_request(volume.volume_id, GiB)
    req.ClearField("capacity_range")
    csi.expect(csi.controller.ControllerExpandVolume, req, Code.INVALID_ARGUMENT, "capacity_range")


@pytest.mark.parametrize("volume_id", [UNKNOWN_VOLUME, *PATH_LIKE_IDS])
def test_expanding_an_unknown_volume_is_not_found(csi: Csi, volume_id: str) -> None:
    csi.expect(csi.controller.ControllerExpandVolume, expand_request(volume_id, GiB),
               Code.NOT_FOUND)  # fmt: skip


def test_expanding_beyond_the_pool_is_out_of_range(csi: Csi) -> None:
    volume = csi.create_volume()
    req = expand_request(volume.volume_id, BEYOND_POOL)
    csi.expect(csi.controller.ControllerExpandVolume, req, Code.OUT_OF_RANGE)


def test_expanding_three_times_gives_the_same_size(csi: Csi) -> None:
    volume = csi.create_volume(size=SMALL)
    answers = [
        csi.controller.ControllerExpandVolume(expand_request(volume.volume_id, 2 * SMALL),
                                              timeout=60)
        for _ in range(3)
    ]  # fmt: skip
    assert answers[0].capacity_bytes >= 2 * SMALL
    assert answers[0] == answers[1] == answers[2]


def test_asking_for_a_smaller_size_never_shrinks_the_volume(csi: Csi) -> None:
    volume = csi.create_volume(size=2 * SMALL)
    reply = csi.controller.ControllerExpandVolume(
        expand_request(volume.volume_id, SMALL), timeout=60
    )
    assert reply.capacity_bytes >= volume.capacity_bytes
    got = csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id), timeout=60
    )
    assert got.volume.capacity_bytes == volume.capacity_bytes


# ---- a missing field is INVALID_ARGUMENT whatever the ID says ------------------------------

#: not ours, ours in form but never issued, path-like
MADE_UP_IDS = ["pvc-made-up-by-the-test", UNKNOWN_VOLUME, "../../etc"]


def _controller_requests(volume_id: str) -> dict[str, object]:
    return {
        "ControllerPublishVolume": publish_request(volume_id=volume_id),
        "ValidateVolumeCapabilities": csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume_id, volume_capabilities=[mount_cap()]
        ),
        "ControllerExpandVolume": expand_request(volume_id, GiB),
    }


CONTROLLER_MISSING = [
    ("ControllerPublishVolume", "node_id"),
    ("ControllerPublishVolume", "volume_capability"),
    ("ValidateVolumeCapabilities", "volume_capabilities"),
    ("ControllerExpandVolume", "capacity_range"),
]


@pytest.mark.parametrize("volume_id", MADE_UP_IDS)
@pytest.mark.parametrize(
    ("rpc", "missing"), CONTROLLER_MISSING, ids=[f"{r}-{m}" for r, m in CONTROLLER_MISSING]
)
def test_a_missing_field_is_invalid_argument_even_with_a_made_up_volume_id(
    csi: Csi, rpc: str, missing: str, volume_id: str
) -> None:
    req = _controller_requests(volume_id)[rpc]
    req.ClearField(missing)  # type: ignore[attr-defined]
    csi.expect(getattr(csi.controller, rpc), req, Code.INVALID_ARGUMENT, missing)


@pytest.mark.parametrize("volume_id", MADE_UP_IDS)
def test_a_capability_without_access_type_is_invalid_argument_even_for_an_unknown_volume(
    csi: Csi, volume_id: str
) -> None:
    cap = csi_pb2.VolumeCapability(access_mode=mount_cap().access_mode)
    for rpc, req in _controller_requests(volume_id).items():
        field = (
            "volume_capabilities" if rpc == "ValidateVolumeCapabilities" else "volume_capability"
        )
        if field == "volume_capabilities":
            del req.volume_capabilities[:]  # type: ignore[attr-defined]
            req.volume_capabilities.append(cap)  # type: ignore[attr-defined]
        else:
            req.volume_capability.CopyFrom(cap)  # type: ignore[attr-defined]
        csi.expect(getattr(csi.controller, rpc), req, Code.INVALID_ARGUMENT, "access_type")


def test_an_id_over_the_csi_size_limit_is_invalid_argument(csi: Csi) -> None:
    long_id = "vol-" + "a" * 200
    csi.expect(
        csi.controller.ControllerGetVolume,
        csi_pb2.ControllerGetVolumeRequest(volume_id=long_id),
        Code.INVALID_ARGUMENT,
        "volume_id",
    )


def test_an_access_mode_this_plugin_never_heard_of_is_invalid_argument(csi: Csi) -> None:
    volume = csi.create_volume()
    cap = mount_cap()
    cap.access_mode.mode = 42  # a newer spec's mode: proto3 enums are open
    req = publish_request(volume_id=volume.volume_id, volume_capability=cap)
    csi.expect(csi.controller.ControllerPublishVolume, req, Code.INVALID_ARGUMENT, "access_mode")
