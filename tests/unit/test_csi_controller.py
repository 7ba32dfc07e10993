"""The CSI Controller service against a real management and node-agent.

Status codes follow the CSI v1.12 spec tables; messages must name the field
the caller has to fix.
"""

# The shared fixtures are imported by name, so parameters that use them look
# like redefinitions to ruff.
# ruff: noqa: F811

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

pytest.importorskip("csi_driver._gen.csi_pb2", reason="CSI stubs not generated yet")

from csi_driver._gen import csi_pb2, csi_pb2_grpc  # noqa: E402
from csi_driver.controller import ControllerServicer  # noqa: E402
from csi_driver.interceptor import ErrorMappingInterceptor  # noqa: E402
from tessera.clients import ManagementClient  # noqa: E402
from tessera.locks import VolumeLocks  # noqa: E402
from tessera_dev.csi_client import block_capability, mount_capability  # noqa: E402
from tests.unit.test_csi_controller_fixtures import (  # noqa: F401 - fixtures
    TOKEN,
    GiB,
    MiB,
    Stack,
    agent_url,
    code_of,
    management_url,
    mgmt,
    sock_dir,
    stack,
)

TOPO = "topology.tessera.io/node"
Code = grpc.StatusCode
_Rpc = csi_pb2.ControllerServiceCapability.RPC


def create_req(name: str = "pvc-1", size: int = GiB, **kw: object) -> csi_pb2.CreateVolumeRequest:
    kw.setdefault("volume_capabilities", [mount_capability()])
    if size:
        kw.setdefault("capacity_range", csi_pb2.CapacityRange(required_bytes=size))
    return csi_pb2.CreateVolumeRequest(name=name, **kw)  # type: ignore[arg-type]


def create(stack: Stack, name: str = "pvc-1", **kw: object) -> csi_pb2.Volume:
    return stack.csi.controller.CreateVolume(create_req(name, **kw)).volume


def publish_req(volume_id: str, node_id: str = "n1", **kw: object):  # type: ignore[no-untyped-def]
    kw.setdefault("volume_capability", mount_capability())
    return csi_pb2.ControllerPublishVolumeRequest(volume_id=volume_id, node_id=node_id, **kw)  # type: ignore[arg-type]


# ---- capabilities ----------------------------------------------------------------


def test_controller_advertises_exactly_what_it_implements(stack: Stack) -> None:
    resp = stack.csi.controller.ControllerGetCapabilities(
        csi_pb2.ControllerGetCapabilitiesRequest()
    )
    advertised = [_Rpc.Type.Name(c.rpc.type) for c in resp.capabilities]
    assert advertised == [
        "CREATE_DELETE_VOLUME",
        "PUBLISH_UNPUBLISH_VOLUME",
        "LIST_VOLUMES",
        "GET_CAPACITY",
        "EXPAND_VOLUME",
        "LIST_VOLUMES_PUBLISHED_NODES",
        "PUBLISH_READONLY",
        "GET_VOLUME",
        "VOLUME_CONDITION",
        "SINGLE_NODE_MULTI_WRITER",
        "CREATE_DELETE_SNAPSHOT",
        "LIST_SNAPSHOTS",
        "GET_SNAPSHOT",
        "CLONE_VOLUME",
        "MODIFY_VOLUME",
    ]


def test_snapshot_of_a_volume_that_does_not_exist_is_not_found(stack: Stack) -> None:
    code, message = code_of(
        lambda: stack.csi.controller.CreateSnapshot(
            csi_pb2.CreateSnapshotRequest(source_volume_id="vol-1", name="s")
        )
    )
    assert code == Code.NOT_FOUND and "vol-1" in message


# ---- CreateVolume ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (create_req(name=""), Code.INVALID_ARGUMENT, "name is required"),
        (create_req(name="x" * 129), Code.INVALID_ARGUMENT, "name is 129 bytes"),
        (create_req(name="bad\x01name"), Code.INVALID_ARGUMENT, "name must not contain control"),
        (
            create_req(volume_capabilities=[]),
            Code.INVALID_ARGUMENT,
            "volume_capabilities is required",
        ),
        (
            create_req(volume_capabilities=[csi_pb2.VolumeCapability(mount={})]),
            Code.INVALID_ARGUMENT,
            "access_mode",
        ),
        (
            create_req(volume_capabilities=[mount_capability(mode="MULTI_NODE_MULTI_WRITER")]),
            Code.INVALID_ARGUMENT,
            "MULTI_NODE_MULTI_WRITER is only offered for block",
        ),
        (
            create_req(volume_capabilities=[mount_capability(fs_type="btrfs")]),
            Code.INVALID_ARGUMENT,
            "fs_type 'btrfs' is not supported",
        ),
        (
            create_req(size=0, capacity_range=csi_pb2.CapacityRange()),
            Code.INVALID_ARGUMENT,
            "capacity_range: set required_bytes, limit_bytes or both",
        ),
        (
            create_req(size=0, capacity_range=csi_pb2.CapacityRange(required_bytes=-1)),
            Code.INVALID_ARGUMENT,
            "capacity_range.required_bytes must not be negative",
        ),
        (
            create_req(size=0, capacity_range=csi_pb2.CapacityRange(limit_bytes=-5)),
            Code.INVALID_ARGUMENT,
            "capacity_range.limit_bytes must not be negative",
        ),
        (
            create_req(
                size=0,
                capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB, limit_bytes=GiB),
            ),
            Code.INVALID_ARGUMENT,
            "capacity_range.limit_bytes (1073741824) is smaller than required_bytes",
        ),
        (
            create_req(
                size=0,
                capacity_range=csi_pb2.CapacityRange(required_bytes=MiB + 1, limit_bytes=MiB + 1),
            ),
            Code.OUT_OF_RANGE,
            "whole MiB",
        ),
        (
            create_req(parameters={"vgp": "fast"}),
            Code.INVALID_ARGUMENT,
            "unknown parameter 'vgp'; allowed: vpg, csi.storage.k8s.io/fstype, mkfsOptions, "
            "locality",
        ),
        (
            create_req(parameters={"csi.storage.k8s.io/fstype": "ntfs"}),
            Code.INVALID_ARGUMENT,
            "parameters.csi.storage.k8s.io/fstype 'ntfs' is not supported",
        ),
        (
            create_req(parameters={"locality": "nearby"}),
            Code.INVALID_ARGUMENT,
            "parameters.locality 'nearby' is not one of any, preferred, required",
        ),
        (
            create_req(parameters={"mkfsOptions": "-O ^has_journal /dev/sda"}),
            Code.INVALID_ARGUMENT,
            "parameters.mkfsOptions: '/dev/sda' is not allowed",
        ),
        (
            create_req(parameters={"mkfsOptions": "-E 'unbalanced"}),
            Code.INVALID_ARGUMENT,
            "parameters.mkfsOptions cannot be parsed",
        ),
        (
            create_req(parameters={"vpg": "no-such-group"}),
            Code.INVALID_ARGUMENT,
            "parameters.vpg: volume provisioning group 'no-such-group' does not exist",
        ),
        (
            create_req(
                parameters={"csi.storage.k8s.io/fstype": "xfs"},
                volume_capabilities=[mount_capability(fs_type="ext4")],
            ),
            Code.INVALID_ARGUMENT,
            "fstype is xfs but the mount capability asks for ext4",
        ),
        (
            create_req(
                volume_content_source=csi_pb2.VolumeContentSource(
                    snapshot=csi_pb2.VolumeContentSource.SnapshotSource(snapshot_id="snap-1")
                )
            ),
            Code.NOT_FOUND,
            "snap-1",
        ),
        (
            create_req(
                volume_content_source=csi_pb2.VolumeContentSource(
                    volume=csi_pb2.VolumeContentSource.VolumeSource(volume_id="vol-1")
                )
            ),
            Code.NOT_FOUND,
            "vol-1",
        ),
        (create_req(size=1024 * GiB), Code.OUT_OF_RANGE, "the maximum volume size is 10 GiB"),
        (
            create_req(
                accessibility_requirements=csi_pb2.TopologyRequirement(
                    requisite=[csi_pb2.Topology(segments={TOPO: "n9"})]
                )
            ),
            Code.RESOURCE_EXHAUSTED,
            "no online node",
        ),
    ],
    ids=lambda v: v.name if isinstance(v, Code) else None,
)
def test_create_volume_refuses_bad_requests_with_the_spec_code_and_a_message_naming_the_field(
    stack: Stack, request_: csi_pb2.CreateVolumeRequest, code: Code, words: str
) -> None:
    got_code, message = code_of(lambda: stack.csi.controller.CreateVolume(request_))
    assert got_code == code, message
    assert words in message
    assert stack.mgmt.list_volumes().items == []  # nothing half-made


def test_create_volume_answers_the_same_volume_every_time_it_is_retried(stack: Stack) -> None:
    answers = [create(stack, "pvc-retry", size=GiB + 1) for _ in range(3)]
    assert answers[0] == answers[1] == answers[2]
    volume = answers[0]
    assert volume.volume_id.startswith("vol-")
    assert volume.capacity_bytes == GiB + MiB  # whole MiB, never less than asked
    assert len(stack.mgmt.list_volumes().items) == 1


def test_create_volume_without_capacity_range_gives_one_gib(stack: Stack) -> None:
    volume = create(stack, "pvc-default", size=0)
    assert volume.capacity_bytes == GiB


def test_create_volume_with_only_a_limit_stays_within_it(stack: Stack) -> None:
    volume = create(
        stack, "pvc-limit", size=0, capacity_range=csi_pb2.CapacityRange(limit_bytes=256 * MiB)
    )
    assert volume.capacity_bytes == 256 * MiB


def test_create_volume_reports_where_the_volume_is_reachable_and_how_to_format_it(
    stack: Stack,
) -> None:
    volume = create(
        stack,
        "pvc-ctx",
        volume_capabilities=[mount_capability(fs_type="xfs")],
        parameters={
            "mkfsOptions": "-m crc=1",
            "csi.storage.k8s.io/pvc/name": "data",
            "csi.storage.k8s.io/pvc/namespace": "default",
        },
    )
    assert dict(volume.volume_context) == {"fsType": "xfs", "mkfsOptions": "-m crc=1"}
    stored = stack.mgmt.get_volume(volume.volume_id)
    assert list(volume.accessible_topology) == []  # locality any: reachable from every node
    assert stored.parameters["fsType"] == "xfs"
    assert stored.parameters["csi.storage.k8s.io/pvc/name"] == "data"


def test_create_volume_with_the_same_name_and_another_size_is_already_exists(
    stack: Stack,
) -> None:
    create(stack, "pvc-clash", size=GiB)
    code, message = code_of(lambda: create(stack, "pvc-clash", size=2 * GiB))
    assert code == Code.ALREADY_EXISTS
    assert "pvc-clash" in message


def test_create_volume_with_the_same_name_and_another_filesystem_is_already_exists(
    stack: Stack,
) -> None:
    create(stack, "pvc-fs", volume_capabilities=[mount_capability(fs_type="ext4")])
    code, message = code_of(
        lambda: create(stack, "pvc-fs", volume_capabilities=[mount_capability(fs_type="xfs")])
    )
    assert code == Code.ALREADY_EXISTS
    assert "fsType='ext4', not 'xfs'" in message


def test_create_volume_places_the_volume_on_a_requisite_node(stack: Stack) -> None:
    topo = csi_pb2.TopologyRequirement(
        requisite=[csi_pb2.Topology(segments={TOPO: "n2"})],
        preferred=[csi_pb2.Topology(segments={TOPO: "n2"})],
    )
    volume = create(stack, "pvc-n2", accessibility_requirements=topo)
    assert stack.mgmt.get_volume(volume.volume_id).node_id == "n2"


def test_locality_required_puts_the_volume_on_the_consumer_node(stack: Stack) -> None:
    topo = csi_pb2.TopologyRequirement(
        requisite=[csi_pb2.Topology(segments={TOPO: n}) for n in ("n1", "n2")],
        preferred=[csi_pb2.Topology(segments={TOPO: "n2"})],
    )
    volume = create(
        stack, "pvc-local", accessibility_requirements=topo, parameters={"locality": "required"}
    )
    assert volume.accessible_topology[0].segments[TOPO] == "n2"


def test_a_second_create_of_the_same_name_in_flight_is_aborted(
    mgmt: ManagementClient, management_url: str
) -> None:
    locks = VolumeLocks()
    with serve_controller(management_url, locks) as stub, locks.hold("volume name pvc-busy"):
        code, message = code_of(lambda: stub.CreateVolume(create_req("pvc-busy")))
    assert code == Code.ABORTED
    assert "in progress" in message


# ---- DeleteVolume ------------------------------------------------------------------------


def test_delete_volume_of_an_unknown_or_foreign_id_is_ok(stack: Stack) -> None:
    for volume_id in ("vol-" + "0" * 32, "pvc-from-another-driver", "../../etc"):
        stack.csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id))


def test_delete_volume_twice_is_ok_and_the_volume_is_gone(stack: Stack) -> None:
    volume = create(stack, "pvc-del")
    for _ in range(2):
        stack.csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))
    assert stack.mgmt.list_volumes().items == []


def test_delete_volume_without_an_id_is_invalid_argument(stack: Stack) -> None:
    code, message = code_of(
        lambda: stack.csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest())
    )
    assert (code, message) == (Code.INVALID_ARGUMENT, "volume_id is required")


def test_delete_volume_while_published_is_failed_precondition(stack: Stack) -> None:
    volume = create(stack, "pvc-busy", accessibility_requirements=_on("n1"))
    stack.csi.controller.ControllerPublishVolume(publish_req(volume.volume_id))
    code, message = code_of(
        lambda: stack.csi.controller.DeleteVolume(
            csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)
        )
    )
    assert code == Code.FAILED_PRECONDITION
    assert "n1" in message


# ---- ControllerPublishVolume / Unpublish -------------------------------------------------


def _on(node: str) -> csi_pb2.TopologyRequirement:
    return csi_pb2.TopologyRequirement(requisite=[csi_pb2.Topology(segments={TOPO: node})])


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"volume_id": ""}, Code.INVALID_ARGUMENT, "volume_id is required"),
        ({"node_id": ""}, Code.INVALID_ARGUMENT, "node_id is required"),
        ({"volume_capability": None}, Code.INVALID_ARGUMENT, "volume_capability is required"),
        ({"volume_id": "vol-" + "0" * 32}, Code.NOT_FOUND, "does not exist"),
        ({"volume_id": "not-ours"}, Code.NOT_FOUND, "volume_id"),
        ({"node_id": "n9"}, Code.NOT_FOUND, "n9"),
        (
            {"volume_capability": mount_capability(fs_type="xfs")},
            Code.INVALID_ARGUMENT,
            "made for ext4; the capability asks for xfs",
        ),
    ],
)
def test_controller_publish_refuses_bad_requests_with_the_spec_code(
    stack: Stack, fields: dict, code: Code, words: str
) -> None:
    volume = create(stack, "pvc-pub", accessibility_requirements=_on("n1"))
    args = {"volume_id": volume.volume_id, "node_id": "n1", "volume_capability": mount_capability()}
    args.update(fields)
    if args["volume_capability"] is None:
        del args["volume_capability"]
    got, message = code_of(
        lambda: stack.csi.controller.ControllerPublishVolume(
            csi_pb2.ControllerPublishVolumeRequest(**args)
        )
    )
    assert got == code, message
    assert words in message


def test_controller_publish_tells_the_node_how_to_reach_the_volume(stack: Stack) -> None:
    volume = create(stack, "pvc-ctx", accessibility_requirements=_on("n1"))
    answers = [
        stack.csi.controller.ControllerPublishVolume(publish_req(volume.volume_id))
        for _ in range(2)
    ]
    assert answers[0] == answers[1]
    assert dict(answers[0].publish_context) == {
        "transport": "loop",
        "ownerNode": "n1",
        "readonly": "false",
    }
    assert stack.mgmt.get_volume(volume.volume_id).published_nodes == ["n1"]


def test_a_single_node_volume_published_elsewhere_is_refused_on_a_second_node(
    stack: Stack,
) -> None:
    volume = create(stack, "pvc-single", accessibility_requirements=_on("n1"))
    stack.csi.controller.ControllerPublishVolume(publish_req(volume.volume_id))
    got, message = code_of(
        lambda: stack.csi.controller.ControllerPublishVolume(
            publish_req(volume.volume_id, node_id="n2")
        )
    )
    assert got == Code.FAILED_PRECONDITION, message
    assert "n1" in message


def test_reader_only_access_modes_publish_read_only(stack: Stack) -> None:
    volume = create(stack, "pvc-ro", accessibility_requirements=_on("n1"))
    resp = stack.csi.controller.ControllerPublishVolume(
        publish_req(
            volume.volume_id, volume_capability=mount_capability(mode="SINGLE_NODE_READER_ONLY")
        )
    )
    assert resp.publish_context["readonly"] == "true"


def test_a_writer_mode_can_be_published_read_only(stack: Stack) -> None:
    volume = create(stack, "pvc-rw-ro", accessibility_requirements=_on("n1"))
    resp = stack.csi.controller.ControllerPublishVolume(
        publish_req(volume.volume_id, readonly=True)
    )
    assert resp.publish_context["readonly"] == "true"


def test_publishing_again_with_other_flags_is_already_exists(stack: Stack) -> None:
    volume = create(stack, "pvc-again", accessibility_requirements=_on("n1"))
    stack.csi.controller.ControllerPublishVolume(publish_req(volume.volume_id))
    code, _ = code_of(
        lambda: stack.csi.controller.ControllerPublishVolume(
            publish_req(volume.volume_id, readonly=True)
        )
    )
    assert code == Code.ALREADY_EXISTS


def test_controller_unpublish_is_idempotent_and_ok_for_unknown_volumes(stack: Stack) -> None:
    volume = create(stack, "pvc-unpub", accessibility_requirements=_on("n1"))
    stack.csi.controller.ControllerPublishVolume(publish_req(volume.volume_id))
    for _ in range(2):
        stack.csi.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id, node_id="n1")
        )
    assert stack.mgmt.get_volume(volume.volume_id).published_nodes == []
    for volume_id in ("vol-" + "0" * 32, "foreign-id"):
        stack.csi.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume_id, node_id="n1")
        )


def test_controller_unpublish_without_a_node_unpublishes_everywhere(stack: Stack) -> None:
    volume = create(stack, "pvc-all", accessibility_requirements=_on("n1"))
    stack.csi.controller.ControllerPublishVolume(publish_req(volume.volume_id))
    stack.csi.controller.ControllerUnpublishVolume(
        csi_pb2.ControllerUnpublishVolumeRequest(volume_id=volume.volume_id)
    )
    assert stack.mgmt.get_volume(volume.volume_id).published_nodes == []
    stack.csi.controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id))


def test_controller_unpublish_without_a_volume_id_is_invalid_argument(stack: Stack) -> None:
    code, message = code_of(
        lambda: stack.csi.controller.ControllerUnpublishVolume(
            csi_pb2.ControllerUnpublishVolumeRequest(node_id="n1")
        )
    )
    assert (code, message) == (Code.INVALID_ARGUMENT, "volume_id is required")


# ---- ValidateVolumeCapabilities -----------------------------------------------------------


def _validate(stack: Stack, volume_id: str, caps: list, **kw: object):  # type: ignore[no-untyped-def]
    return stack.csi.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=volume_id, volume_capabilities=caps, **kw
        )
    )


def test_validate_confirms_supported_capabilities_and_echoes_them(stack: Stack) -> None:
    volume = create(stack, "pvc-val")
    caps = [mount_capability(), block_capability("MULTI_NODE_MULTI_WRITER")]
    resp = _validate(
        stack,
        volume.volume_id,
        caps,
        volume_context=volume.volume_context,
        parameters={"vpg": "default"},
    )
    assert list(resp.confirmed.volume_capabilities) == caps
    assert dict(resp.confirmed.volume_context) == dict(volume.volume_context)
    assert dict(resp.confirmed.parameters) == {"vpg": "default"}


@pytest.mark.parametrize(
    ("cap", "params", "words"),
    [
        (mount_capability(mode="MULTI_NODE_MULTI_WRITER"), {}, "not a cluster filesystem"),
        (mount_capability(fs_type="xfs"), {}, "asks for xfs"),
        (mount_capability(), {"vgp": "x"}, "unknown parameter 'vgp'"),
    ],
)
def test_validate_does_not_confirm_unsupported_capabilities_and_says_why(
    stack: Stack, cap: csi_pb2.VolumeCapability, params: dict, words: str
) -> None:
    volume = create(stack, "pvc-val")
    resp = _validate(stack, volume.volume_id, [cap], parameters=params)
    assert not resp.HasField("confirmed")
    assert words in resp.message


def test_validate_of_an_unknown_volume_is_not_found(stack: Stack) -> None:
    code, _ = code_of(lambda: _validate(stack, "vol-" + "0" * 32, [mount_capability()]))
    assert code == Code.NOT_FOUND


def test_validate_without_ids_or_capabilities_is_invalid_argument(stack: Stack) -> None:
    volume = create(stack, "pvc-val")
    code, message = code_of(lambda: _validate(stack, "", [mount_capability()]))
    assert (code, message) == (Code.INVALID_ARGUMENT, "volume_id is required")
    code, message = code_of(lambda: _validate(stack, volume.volume_id, []))
    assert code == Code.INVALID_ARGUMENT and "volume_capabilities is required" in message


# ---- ListVolumes / ControllerGetVolume -------------------------------------------------------


def test_list_volumes_pages_through_every_volume(stack: Stack) -> None:
    made = {create(stack, f"pvc-{i}", size=64 * MiB).volume_id for i in range(5)}
    seen, token, pages = [], "", 0
    while True:
        resp = stack.csi.controller.ListVolumes(
            csi_pb2.ListVolumesRequest(max_entries=2, starting_token=token)
        )
        assert len(resp.entries) <= 2
        seen += [e.volume.volume_id for e in resp.entries]
        pages += 1
        token = resp.next_token
        if not token:
            break
    assert sorted(seen) == sorted(made) and pages == 3


def test_list_volumes_with_a_bad_starting_token_is_aborted(stack: Stack) -> None:
    code, message = code_of(
        lambda: stack.csi.controller.ListVolumes(
            csi_pb2.ListVolumesRequest(starting_token="not-a-token")
        )
    )
    assert code == Code.ABORTED
    assert "starting_token" in message


def test_list_volumes_with_negative_max_entries_is_invalid_argument(stack: Stack) -> None:
    code, message = code_of(
        lambda: stack.csi.controller.ListVolumes(csi_pb2.ListVolumesRequest(max_entries=-1))
    )
    assert code == Code.INVALID_ARGUMENT and "max_entries" in message


def test_list_and_get_volume_show_where_it_is_published_and_its_condition(stack: Stack) -> None:
    volume = create(stack, "pvc-status", accessibility_requirements=_on("n1"))
    stack.csi.controller.ControllerPublishVolume(publish_req(volume.volume_id))
    (entry,) = stack.csi.controller.ListVolumes(csi_pb2.ListVolumesRequest()).entries
    got = stack.csi.controller.ControllerGetVolume(
        csi_pb2.ControllerGetVolumeRequest(volume_id=volume.volume_id)
    )
    assert entry.volume == got.volume == volume
    for status in (entry.status, got.status):
        assert list(status.published_node_ids) == ["n1"]
        assert not status.volume_condition.abnormal
        assert status.volume_condition.message == "ok"


def test_get_volume_of_an_unknown_volume_is_not_found(stack: Stack) -> None:
    code, _ = code_of(
        lambda: stack.csi.controller.ControllerGetVolume(
            csi_pb2.ControllerGetVolumeRequest(volume_id="vol-" + "0" * 32)
        )
    )
    assert code == Code.NOT_FOUND
    code, message = code_of(
        lambda: stack.csi.controller.ControllerGetVolume(csi_pb2.ControllerGetVolumeRequest())
    )
    assert (code, message) == (Code.INVALID_ARGUMENT, "volume_id is required")


# ---- GetCapacity ----------------------------------------------------------------------------


def test_get_capacity_reports_room_for_one_volume_per_topology_segment(stack: Stack) -> None:
    """A volume of locality any can go on any node and be reached from n2; required cannot."""

    def on_n2(locality: str) -> csi_pb2.GetCapacityResponse:
        return stack.csi.controller.GetCapacity(
            csi_pb2.GetCapacityRequest(
                accessible_topology=csi_pb2.Topology(segments={TOPO: "n2"}),
                parameters={"vpg": "default", "locality": locality},
                volume_capabilities=[mount_capability()],
            )
        )

    everywhere = stack.csi.controller.GetCapacity(csi_pb2.GetCapacityRequest())
    assert everywhere.available_capacity == 10 * GiB
    assert on_n2("any").available_capacity == 10 * GiB
    local = on_n2("required")
    assert local.available_capacity == 4 * GiB
    assert local.maximum_volume_size.value == 4 * GiB
    assert local.minimum_volume_size.value == MiB


def test_get_capacity_is_zero_for_capabilities_no_volume_can_have(stack: Stack) -> None:
    resp = stack.csi.controller.GetCapacity(
        csi_pb2.GetCapacityRequest(
            volume_capabilities=[mount_capability(mode="MULTI_NODE_MULTI_WRITER")]
        )
    )
    assert resp.available_capacity == 0


def test_get_capacity_refuses_a_parameter_typo(stack: Stack) -> None:
    code, message = code_of(
        lambda: stack.csi.controller.GetCapacity(
            csi_pb2.GetCapacityRequest(parameters={"vgp": "default"})
        )
    )
    assert code == Code.INVALID_ARGUMENT and "'vgp'" in message


# ---- ControllerExpandVolume --------------------------------------------------------------


def _expand(stack: Stack, volume_id: str, size: int, **kw: object):  # type: ignore[no-untyped-def]
    return stack.csi.controller.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=size), **kw
        )
    )


def test_expand_grows_the_volume_and_asks_the_node_to_grow_the_filesystem(stack: Stack) -> None:
    volume = create(stack, "pvc-grow")
    resp = _expand(stack, volume.volume_id, 2 * GiB, volume_capability=mount_capability())
    assert (resp.capacity_bytes, resp.node_expansion_required) == (2 * GiB, True)
    assert stack.mgmt.get_volume(volume.volume_id).size_bytes == 2 * GiB


def test_expand_of_a_block_volume_needs_no_node_step(stack: Stack) -> None:
    volume = create(stack, "pvc-blk", volume_capabilities=[block_capability()])
    resp = _expand(stack, volume.volume_id, 2 * GiB, volume_capability=block_capability())
    assert resp.node_expansion_required is False


def test_expand_to_a_smaller_size_never_shrinks(stack: Stack) -> None:
    volume = create(stack, "pvc-shrink", size=2 * GiB)
    resp = _expand(stack, volume.volume_id, GiB)
    assert resp.capacity_bytes == 2 * GiB


@pytest.mark.parametrize(
    ("request_", "code", "words"),
    [
        (csi_pb2.ControllerExpandVolumeRequest(), Code.INVALID_ARGUMENT, "volume_id is required"),
        (
            csi_pb2.ControllerExpandVolumeRequest(volume_id="vol-" + "0" * 32),
            Code.INVALID_ARGUMENT,
            "capacity_range is required",
        ),
        (
            csi_pb2.ControllerExpandVolumeRequest(
                volume_id="vol-" + "0" * 32,
                capacity_range=csi_pb2.CapacityRange(required_bytes=GiB),
            ),
            Code.NOT_FOUND,
            "does not exist",
        ),
    ],
)
def test_expand_refuses_bad_requests(
    stack: Stack, request_: csi_pb2.ControllerExpandVolumeRequest, code: Code, words: str
) -> None:
    got, message = code_of(lambda: stack.csi.controller.ControllerExpandVolume(request_))
    assert got == code and words in message


def test_expand_beyond_what_the_pool_could_ever_hold_is_out_of_range(stack: Stack) -> None:
    volume = create(stack, "pvc-huge", accessibility_requirements=_on("n2"))
    code, _ = code_of(lambda: _expand(stack, volume.volume_id, 100 * GiB))
    assert code == Code.OUT_OF_RANGE


def test_expand_past_the_free_space_left_is_resource_exhausted(stack: Stack) -> None:
    volume = create(stack, "pvc-a", accessibility_requirements=_on("n2"))
    create(stack, "pvc-b", size=2 * GiB, accessibility_requirements=_on("n2"))
    code, message = code_of(lambda: _expand(stack, volume.volume_id, 3 * GiB))
    assert code == Code.RESOURCE_EXHAUSTED and "p2" in message


# ---- concurrency ------------------------------------------------------------------------------


def test_a_second_call_for_a_volume_already_in_flight_is_aborted(
    mgmt: ManagementClient, management_url: str
) -> None:
    locks = VolumeLocks()
    with serve_controller(management_url, locks) as stub:
        volume = stub.CreateVolume(create_req("pvc-lock")).volume
        with locks.hold(volume.volume_id):
            calls: list[Callable[[], object]] = [
                lambda: stub.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume.volume_id)),
                lambda: stub.ControllerPublishVolume(publish_req(volume.volume_id)),
                lambda: _expand_stub(stub, volume.volume_id),
            ]
            for call in calls:
                assert code_of(call)[0] == Code.ABORTED


def _expand_stub(stub: csi_pb2_grpc.ControllerStub, volume_id: str) -> object:
    return stub.ControllerExpandVolume(
        csi_pb2.ControllerExpandVolumeRequest(
            volume_id=volume_id, capacity_range=csi_pb2.CapacityRange(required_bytes=2 * GiB)
        )
    )


class serve_controller:
    """A controller with locks the test can hold, on a private socket."""

    def __init__(self, management_url: str, locks: VolumeLocks) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tcsi-"))
        self.server = grpc.server(
            ThreadPoolExecutor(max_workers=4), interceptors=[ErrorMappingInterceptor()]
        )
        servicer = ControllerServicer(ManagementClient(management_url, TOKEN), locks)
        csi_pb2_grpc.add_ControllerServicer_to_server(servicer, self.server)
        self.server.add_insecure_port(f"unix:{self.dir / 'c.sock'}")
        self.channel = grpc.insecure_channel(f"unix://{self.dir / 'c.sock'}")

    def __enter__(self) -> csi_pb2_grpc.ControllerStub:
        self.server.start()
        return csi_pb2_grpc.ControllerStub(self.channel)

    def __exit__(self, *exc: object) -> None:
        self.channel.close()
        self.server.stop(None).wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def test_parallel_creates_of_one_name_make_one_volume(stack: Stack) -> None:
    barrier = threading.Barrier(4)

    def attempt() -> str:
        barrier.wait()
        try:
            return create(stack, "pvc-race").volume_id
        except grpc.RpcError as err:
            assert err.code() == Code.ABORTED
            return ""

    with ThreadPoolExecutor(4) as pool:
        got = {v for v in pool.map(lambda _: attempt(), range(4)) if v}
    final = create(stack, "pvc-race").volume_id
    assert got <= {final}
    assert len(stack.mgmt.list_volumes().items) == 1
