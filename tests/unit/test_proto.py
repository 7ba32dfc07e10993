"""proto/csi.proto: the generated stubs are fresh, and the wire contract is CSI v1.12.0.

The field numbers, enum values and RPC names asserted here are copied from the
upstream CSI spec (github.com/container-storage-interface/spec, v1.12.0); they
are what every CO and sidecar puts on the wire, so they must never drift.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools not installed")
csi_pb2 = pytest.importorskip("csi_driver._gen.csi_pb2", reason="CSI stubs not generated yet")

from google.protobuf import descriptor, descriptor_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "csi.proto"
GEN_PACKAGE = "csi_driver/_gen"
FD = descriptor.FieldDescriptor


def _regenerate(tmp_path: Path) -> Path:
    """Run protoc the way setup.py's generate_csi_stubs does, into tmp_path/out."""
    src = tmp_path / "src"
    out = tmp_path / "out"
    staged = src / GEN_PACKAGE / "csi.proto"
    staged.parent.mkdir(parents=True)
    out.mkdir()
    shutil.copy(PROTO, staged)
    include = str(Path(protoc.__file__).parent / "_proto")
    rc = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{src}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(staged),
        ]
    )
    assert rc == 0, f"protoc failed with exit code {rc}"
    return out / GEN_PACKAGE


@pytest.mark.parametrize("name", ["csi_pb2.py", "csi_pb2_grpc.py"])
def test_generated_stubs_match_proto(tmp_path: Path, name: str) -> None:
    fresh = _regenerate(tmp_path) / name
    installed = ROOT / GEN_PACKAGE / name
    assert installed.exists(), f"{installed} missing: run `pip install -e .`"
    assert fresh.read_text() == installed.read_text(), (
        f"{installed} is stale relative to proto/csi.proto: run `pip install -e .`"
    )


def test_file_header() -> None:
    fd = csi_pb2.DESCRIPTOR
    proto = descriptor_pb2.FileDescriptorProto.FromString(fd.serialized_pb)
    assert proto.syntax == "proto3"
    assert fd.package == "csi.v1"
    assert fd.GetOptions().go_package == ("github.com/container-storage-interface/spec/lib/go/csi")
    deps = {d.name for d in fd.dependencies}
    assert deps == {
        "google/protobuf/descriptor.proto",
        "google/protobuf/timestamp.proto",
        "google/protobuf/wrappers.proto",
    }


def test_custom_option_extensions() -> None:
    exts = csi_pb2.DESCRIPTOR.extensions_by_name
    expected = {
        "alpha_enum": ("google.protobuf.EnumOptions", 1060),
        "alpha_enum_value": ("google.protobuf.EnumValueOptions", 1060),
        "csi_secret": ("google.protobuf.FieldOptions", 1059),
        "alpha_field": ("google.protobuf.FieldOptions", 1060),
        "alpha_message": ("google.protobuf.MessageOptions", 1060),
        "alpha_method": ("google.protobuf.MethodOptions", 1060),
        "alpha_service": ("google.protobuf.ServiceOptions", 1060),
    }
    assert set(exts) == set(expected)
    for name, (extendee, number) in expected.items():
        assert exts[name].containing_type.full_name == extendee, name
        assert exts[name].number == number, name
        assert exts[name].type == FD.TYPE_BOOL, name


SERVICES = {
    "Identity": ["GetPluginInfo", "GetPluginCapabilities", "Probe"],
    "Controller": [
        "CreateVolume",
        "DeleteVolume",
        "ControllerPublishVolume",
        "ControllerUnpublishVolume",
        "ValidateVolumeCapabilities",
        "ListVolumes",
        "GetCapacity",
        "ControllerGetCapabilities",
        "CreateSnapshot",
        "DeleteSnapshot",
        "ListSnapshots",
        "GetSnapshot",
        "ControllerExpandVolume",
        "ControllerGetVolume",
        "ControllerModifyVolume",
    ],
    "GroupController": [
        "GroupControllerGetCapabilities",
        "CreateVolumeGroupSnapshot",
        "DeleteVolumeGroupSnapshot",
        "GetVolumeGroupSnapshot",
    ],
    "SnapshotMetadata": ["GetMetadataAllocated", "GetMetadataDelta"],
    "Node": [
        "NodeStageVolume",
        "NodeUnstageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeGetVolumeStats",
        "NodeExpandVolume",
        "NodeGetCapabilities",
        "NodeGetInfo",
    ],
}


def test_services_and_methods() -> None:
    services = csi_pb2.DESCRIPTOR.services_by_name
    assert set(services) == set(SERVICES)
    for name, methods in SERVICES.items():
        svc = services[name]
        assert svc.full_name == f"csi.v1.{name}"
        assert [m.name for m in svc.methods] == methods, name
        for m in svc.methods:
            assert m.input_type.name == f"{m.name}Request"
            assert m.output_type.name == f"{m.name}Response"


def test_streaming_rpcs() -> None:
    services = csi_pb2.DESCRIPTOR.services_by_name
    for svc in services.values():
        for m in svc.methods:
            streaming = svc.name == "SnapshotMetadata"
            assert m.server_streaming is streaming, m.full_name
            assert m.client_streaming is False, m.full_name


def _is_repeated(field: descriptor.FieldDescriptor) -> bool:
    # protobuf >= 6 dropped FieldDescriptor.label in favour of is_repeated.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return field.label == FD.LABEL_REPEATED


def _fields(message: descriptor.Descriptor) -> dict[str, int]:
    return {f.name: f.number for f in message.fields}


def test_create_volume_request_fields() -> None:
    msg = csi_pb2.CreateVolumeRequest.DESCRIPTOR
    assert _fields(msg) == {
        "name": 1,
        "capacity_range": 2,
        "volume_capabilities": 3,
        "parameters": 4,
        "secrets": 5,
        "volume_content_source": 6,
        "accessibility_requirements": 7,
        "mutable_parameters": 8,
    }
    by_name = msg.fields_by_name
    assert _is_repeated(by_name["volume_capabilities"])
    assert not _is_repeated(by_name["name"])
    assert by_name["volume_capabilities"].message_type.full_name == "csi.v1.VolumeCapability"
    assert by_name["parameters"].message_type.GetOptions().map_entry
    assert by_name["accessibility_requirements"].message_type.full_name == (
        "csi.v1.TopologyRequirement"
    )
    secret = csi_pb2.DESCRIPTOR.extensions_by_name["csi_secret"]
    assert by_name["secrets"].GetOptions().Extensions[secret] is True
    assert by_name["parameters"].GetOptions().Extensions[secret] is False


def test_volume_capability_shape() -> None:
    cap = csi_pb2.VolumeCapability.DESCRIPTOR
    assert _fields(cap) == {"block": 1, "mount": 2, "access_mode": 3}
    assert [f.name for f in cap.oneofs_by_name["access_type"].fields] == ["block", "mount"]
    assert _fields(cap.nested_types_by_name["MountVolume"]) == {
        "fs_type": 1,
        "mount_flags": 2,
        "volume_mount_group": 3,
    }
    mode = csi_pb2.VolumeCapability.AccessMode.Mode
    assert dict(mode.items()) == {
        "UNKNOWN": 0,
        "SINGLE_NODE_WRITER": 1,
        "SINGLE_NODE_READER_ONLY": 2,
        "MULTI_NODE_READER_ONLY": 3,
        "MULTI_NODE_SINGLE_WRITER": 4,
        "MULTI_NODE_MULTI_WRITER": 5,
        "SINGLE_NODE_SINGLE_WRITER": 6,
        "SINGLE_NODE_MULTI_WRITER": 7,
    }


def test_node_get_info_response_fields() -> None:
    msg = csi_pb2.NodeGetInfoResponse.DESCRIPTOR
    assert _fields(msg) == {"node_id": 1, "max_volumes_per_node": 2, "accessible_topology": 3}
    by_name = msg.fields_by_name
    assert by_name["node_id"].type == FD.TYPE_STRING
    assert by_name["max_volumes_per_node"].type == FD.TYPE_INT64
    assert by_name["accessible_topology"].message_type.full_name == "csi.v1.Topology"


def test_capability_enums() -> None:
    assert dict(csi_pb2.PluginCapability.Service.Type.items()) == {
        "UNKNOWN": 0,
        "CONTROLLER_SERVICE": 1,
        "VOLUME_ACCESSIBILITY_CONSTRAINTS": 2,
        "GROUP_CONTROLLER_SERVICE": 3,
        "SNAPSHOT_METADATA_SERVICE": 4,
    }
    assert dict(csi_pb2.ControllerServiceCapability.RPC.Type.items()) == {
        "UNKNOWN": 0,
        "CREATE_DELETE_VOLUME": 1,
        "PUBLISH_UNPUBLISH_VOLUME": 2,
        "LIST_VOLUMES": 3,
        "GET_CAPACITY": 4,
        "CREATE_DELETE_SNAPSHOT": 5,
        "LIST_SNAPSHOTS": 6,
        "CLONE_VOLUME": 7,
        "PUBLISH_READONLY": 8,
        "EXPAND_VOLUME": 9,
        "LIST_VOLUMES_PUBLISHED_NODES": 10,
        "VOLUME_CONDITION": 11,
        "GET_VOLUME": 12,
        "SINGLE_NODE_MULTI_WRITER": 13,
        "MODIFY_VOLUME": 14,
        "GET_SNAPSHOT": 15,
    }
    assert dict(csi_pb2.NodeServiceCapability.RPC.Type.items()) == {
        "UNKNOWN": 0,
        "STAGE_UNSTAGE_VOLUME": 1,
        "GET_VOLUME_STATS": 2,
        "EXPAND_VOLUME": 3,
        "VOLUME_CONDITION": 4,
        "SINGLE_NODE_MULTI_WRITER": 5,
        "VOLUME_MOUNT_GROUP": 6,
    }


def test_selected_wire_facts() -> None:
    assert _fields(csi_pb2.GetPluginCapabilitiesResponse.DESCRIPTOR) == {"capabilities": 1}
    assert _fields(csi_pb2.NodePublishVolumeRequest.DESCRIPTOR) == {
        "volume_id": 1,
        "publish_context": 2,
        "staging_target_path": 3,
        "target_path": 4,
        "volume_capability": 5,
        "readonly": 6,
        "secrets": 7,
        "volume_context": 8,
    }
    assert _fields(csi_pb2.Snapshot.DESCRIPTOR) == {
        "size_bytes": 1,
        "snapshot_id": 2,
        "source_volume_id": 3,
        "creation_time": 4,
        "ready_to_use": 5,
        "group_snapshot_id": 6,
    }
    assert csi_pb2.Snapshot.DESCRIPTOR.fields_by_name["creation_time"].message_type.full_name == (
        "google.protobuf.Timestamp"
    )
    assert csi_pb2.ProbeResponse.DESCRIPTOR.fields_by_name["ready"].message_type.full_name == (
        "google.protobuf.BoolValue"
    )
    assert _fields(csi_pb2.NodeExpandVolumeRequest.DESCRIPTOR)["secrets"] == 6
    assert dict(csi_pb2.BlockMetadataType.items()) == {
        "UNKNOWN": 0,
        "FIXED_LENGTH": 1,
        "VARIABLE_LENGTH": 2,
    }
