"""The one validation order of every CSI RPC: presence, then form, then existence.

The validators are pure functions of the request (plus an `os.path.exists`
for stats/expand), so they are tested directly; the sanity suite and the
CSI fuzzer check the same answers over the plugin's socket.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest

pytest.importorskip("csi_driver._gen.csi_pb2", reason="CSI stubs not generated yet")

from csi_driver import validation  # noqa: E402
from csi_driver._gen import csi_pb2  # noqa: E402
from tessera.errors import FailedPrecondition, InvalidArgument, NotFound  # noqa: E402

MADE_UP = "pvc-not-a-tessera-id"
UNKNOWN = "vol-" + "0" * 32
Mode = csi_pb2.VolumeCapability.AccessMode.Mode


def mount_cap(mode: int = Mode.SINGLE_NODE_WRITER, **mount: object) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(**mount),  # type: ignore[arg-type]
        access_mode=csi_pb2.VolumeCapability.AccessMode(mode=mode),  # type: ignore[arg-type]
    )


def error(check: Callable[[], object]) -> InvalidArgument | NotFound | FailedPrecondition:
    with pytest.raises((InvalidArgument, NotFound, FailedPrecondition)) as info:
        check()
    return info.value  # type: ignore[return-value]


# ---- a missing required field wins over a made-up ID ---------------------------------------

#: (validator, a request with a made-up volume id, the required field to clear)
MISSING_WITH_MADE_UP_ID = [
    (validation.node_stage_volume, csi_pb2.NodeStageVolumeRequest(
        volume_id=MADE_UP, staging_target_path="/tmp/x", volume_capability=mount_cap()),
     "staging_target_path"),
    (validation.node_stage_volume, csi_pb2.NodeStageVolumeRequest(
        volume_id=MADE_UP, staging_target_path="/tmp/x", volume_capability=mount_cap()),
     "volume_capability"),
    (validation.node_unstage_volume, csi_pb2.NodeUnstageVolumeRequest(
        volume_id=MADE_UP, staging_target_path="/tmp/x"), "staging_target_path"),
    (validation.node_publish_volume, csi_pb2.NodePublishVolumeRequest(
        volume_id=MADE_UP, staging_target_path="/tmp/s", target_path="/tmp/t",
        volume_capability=mount_cap()), "target_path"),
    (validation.node_publish_volume, csi_pb2.NodePublishVolumeRequest(
        volume_id=MADE_UP, staging_target_path="/tmp/s", target_path="/tmp/t",
        volume_capability=mount_cap()), "volume_capability"),
    (validation.node_unpublish_volume, csi_pb2.NodeUnpublishVolumeRequest(
        volume_id=MADE_UP, target_path="/tmp/t"), "target_path"),
    (validation.node_get_volume_stats, csi_pb2.NodeGetVolumeStatsRequest(
        volume_id=MADE_UP, volume_path="/tmp"), "volume_path"),
    (validation.node_expand_volume, csi_pb2.NodeExpandVolumeRequest(
        volume_id=MADE_UP, volume_path="/tmp"), "volume_path"),
    (validation.controller_publish, csi_pb2.ControllerPublishVolumeRequest(
        volume_id=MADE_UP, node_id="n1", volume_capability=mount_cap()), "node_id"),
    (validation.controller_publish, csi_pb2.ControllerPublishVolumeRequest(
        volume_id=MADE_UP, node_id="n1", volume_capability=mount_cap()), "volume_capability"),
    (validation.validate_volume_capabilities, csi_pb2.ValidateVolumeCapabilitiesRequest(
        volume_id=MADE_UP, volume_capabilities=[mount_cap()]), "volume_capabilities"),
    (validation.controller_expand_volume, csi_pb2.ControllerExpandVolumeRequest(
        volume_id=MADE_UP, capacity_range=csi_pb2.CapacityRange(required_bytes=1)),
     "capacity_range"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("check", "request_", "missing"),
    MISSING_WITH_MADE_UP_ID,
    ids=[f"{type(r).__name__}-{m}" for _, r, m in MISSING_WITH_MADE_UP_ID],
)
def test_a_missing_field_is_invalid_argument_even_with_a_made_up_volume_id(
    check: Callable[[object], object], request_: object, missing: str
) -> None:
    request_.ClearField(missing)  # type: ignore[attr-defined]
    err = error(lambda: check(request_))
    assert isinstance(err, InvalidArgument), f"{type(err).__name__}: {err}"
    assert err.field == missing and f"{missing} is required" in err.message


def test_every_missing_field_is_named_at_once() -> None:
    err = error(lambda: validation.node_publish_volume(csi_pb2.NodePublishVolumeRequest()))
    assert isinstance(err, InvalidArgument)
    for name in ("volume_id", "target_path", "volume_capability"):
        assert f"{name} is required" in err.message


def test_a_publish_without_staging_path_is_failed_precondition_once_the_rest_is_there() -> None:
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id=MADE_UP, target_path="/tmp/t", volume_capability=mount_cap()
    )
    err = error(lambda: validation.node_publish_volume(req))
    assert isinstance(err, FailedPrecondition) and err.field == "staging_target_path"


def test_a_complete_request_with_a_made_up_volume_id_is_not_found() -> None:
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=MADE_UP, staging_target_path="/tmp/x", volume_capability=mount_cap()
    )
    assert isinstance(error(lambda: validation.node_stage_volume(req)), NotFound)


def test_a_malformed_path_beats_a_made_up_volume_id() -> None:
    req = csi_pb2.NodeUnpublishVolumeRequest(volume_id=MADE_UP, target_path="relative/t")
    err = error(lambda: validation.node_unpublish_volume(req))
    assert isinstance(err, InvalidArgument) and err.field == "target_path"


# ---- NodeGetVolumeStats / NodeExpandVolume volume_path -----------------------------------------


@pytest.mark.parametrize("path", ["some/path", "/nonexistent-tessera-test/x"])
def test_stats_of_a_path_where_nothing_is_is_not_found(path: str) -> None:
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=UNKNOWN, volume_path=path)
    err = error(lambda: validation.node_get_volume_stats(req))
    assert isinstance(err, NotFound) and err.field == "volume_path"


@pytest.mark.parametrize("path", ["/tmp/../etc", "/tmp/a\x00b", "/tmp/a\nb"])
def test_stats_of_a_malformed_path_are_invalid_argument(path: str) -> None:
    req = csi_pb2.NodeGetVolumeStatsRequest(volume_id=UNKNOWN, volume_path=path)
    err = error(lambda: validation.node_get_volume_stats(req))
    assert isinstance(err, InvalidArgument) and err.field == "volume_path"


def test_expand_of_an_existing_path_gets_the_normalized_path(tmp_path: Path) -> None:
    req = csi_pb2.NodeExpandVolumeRequest(volume_id=UNKNOWN, volume_path=f"{tmp_path}//./")
    got = validation.node_expand_volume(req)
    assert got.volume_path == str(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.volume_path = "/"  # type: ignore[misc]


# ---- form ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/", "relative", "/a/../b", "/a\x00b", "/" + "x" * 256, "/a/" + "y/" * 2100],
    ids=["root", "relative", "dotdot", "nul", "long-component", "too-long"],
)
def test_a_staging_path_the_kernel_cannot_take_is_invalid_argument(path: str) -> None:
    req = csi_pb2.NodeUnstageVolumeRequest(volume_id=UNKNOWN, staging_target_path=path)
    err = error(lambda: validation.node_unstage_volume(req))
    assert isinstance(err, InvalidArgument) and err.field == "staging_target_path"


def test_an_access_mode_from_a_newer_spec_is_invalid_argument_not_a_crash() -> None:
    req = csi_pb2.ControllerPublishVolumeRequest(
        volume_id=UNKNOWN, node_id="n1", volume_capability=mount_cap(mode=99)
    )
    err = error(lambda: validation.controller_publish(req))
    assert isinstance(err, InvalidArgument) and "99" in err.message


@pytest.mark.parametrize("flag", ["", "rw\x00", "a" * 4097])
def test_mount_flags_that_mount_cannot_take_are_invalid_argument(flag: str) -> None:
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=UNKNOWN, staging_target_path="/tmp/x", volume_capability=mount_cap(
            mount_flags=[flag]))  # fmt: skip
    assert isinstance(error(lambda: validation.node_stage_volume(req)), InvalidArgument)


def test_a_bad_secret_key_is_refused_without_quoting_it() -> None:
    req = csi_pb2.DeleteVolumeRequest(volume_id=UNKNOWN, secrets={"pass word=hunter2": "x"})
    err = error(lambda: validation.delete_volume(req))
    assert isinstance(err, InvalidArgument) and err.field == "secrets"
    assert "hunter2" not in err.message


def test_a_volume_id_over_the_csi_size_limit_is_invalid_argument_even_for_delete() -> None:
    err = error(lambda: validation.delete_volume(csi_pb2.DeleteVolumeRequest(volume_id="v" * 129)))
    assert isinstance(err, InvalidArgument) and err.field == "volume_id"


def test_a_foreign_volume_id_is_nothing_to_delete() -> None:
    got = validation.delete_volume(csi_pb2.DeleteVolumeRequest(volume_id=MADE_UP))
    assert not got.ours


@pytest.mark.parametrize(
    ("required", "limit"),
    [(-1, 0), (0, -1), (0, 0), (10, 5)],
    ids=["neg", "neg-limit", "zero", "inverted"],
)
def test_a_malformed_capacity_range_is_invalid_argument(required: int, limit: int) -> None:
    req = csi_pb2.ControllerExpandVolumeRequest(
        volume_id=MADE_UP, capacity_range=csi_pb2.CapacityRange(
            required_bytes=required, limit_bytes=limit))  # fmt: skip
    err = error(lambda: validation.controller_expand_volume(req))
    assert isinstance(err, InvalidArgument) and err.field == "capacity_range"


def test_a_map_over_4_kib_is_invalid_argument() -> None:
    req = csi_pb2.CreateVolumeRequest(
        name="x",
        volume_capabilities=[mount_cap()],
        parameters={"vpg": "default", "k" * 10: "v" * 5000},
    )
    err = error(lambda: validation.create_volume(req))
    assert isinstance(err, InvalidArgument) and err.field == "parameters"


def test_a_create_request_comes_back_complete() -> None:
    req = csi_pb2.CreateVolumeRequest(
        name="pvc-1",
        volume_capabilities=[mount_cap(fs_type="xfs")],
        capacity_range=csi_pb2.CapacityRange(required_bytes=5, limit_bytes=9),
    )
    got = validation.create_volume(req)
    assert (got.name, got.size, got.limit, got.params.fs_type) == ("pvc-1", 5, 9, "xfs")


@pytest.mark.parametrize("target", ["/var/stage", "/var/stage/", "/var/stage/pod"])
def test_publishing_onto_or_into_the_staging_path_is_invalid_argument(target: str) -> None:
    # fuzz example: target_path == staging_target_path answered OK, and the
    # NodeUnpublish that followed unmounted the staged volume
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id=UNKNOWN,
        staging_target_path="/var/stage",
        target_path=target,
        volume_capability=mount_cap(),
    )
    err = error(lambda: validation.node_publish_volume(req))
    assert isinstance(err, InvalidArgument) and err.field == "target_path"


def test_a_target_beside_the_staging_path_is_fine() -> None:
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id=UNKNOWN,
        staging_target_path="/var/stage",
        target_path="/var/stage-2",
        volume_capability=mount_cap(),
    )
    assert validation.node_publish_volume(req).target_path == "/var/stage-2"


def test_a_volume_id_with_a_trailing_newline_is_not_one_of_ours() -> None:
    # `$` matched before a trailing newline, so "vol-<hex>\n" passed as a volume ID
    req = csi_pb2.ControllerGetVolumeRequest(volume_id=UNKNOWN + "\n")
    assert isinstance(error(lambda: validation.controller_get_volume(req)), NotFound)


def test_a_secret_key_with_a_trailing_newline_is_invalid_argument() -> None:
    req = csi_pb2.DeleteVolumeRequest(volume_id=UNKNOWN, secrets={"user\n": "x"})
    assert isinstance(error(lambda: validation.delete_volume(req)), InvalidArgument)


# ---- snapshots, group snapshots, snapshot metadata --------------------------------------------


@pytest.mark.parametrize(
    ("check", "kind", "field"),
    [
        (lambda: validation.create_snapshot(csi_pb2.CreateSnapshotRequest(
            source_volume_id=MADE_UP)), InvalidArgument, "name"),
        (lambda: validation.create_snapshot(csi_pb2.CreateSnapshotRequest(name="s")),
         InvalidArgument, "source_volume_id"),
        (lambda: validation.create_snapshot(csi_pb2.CreateSnapshotRequest(
            name="s", source_volume_id=MADE_UP)), NotFound, "source_volume_id"),
        (lambda: validation.create_snapshot(csi_pb2.CreateSnapshotRequest(
            name="s", source_volume_id=UNKNOWN, parameters={"retain": "1"})),
         InvalidArgument, "parameters"),
        (lambda: validation.get_snapshot(csi_pb2.GetSnapshotRequest()), InvalidArgument,
         "snapshot_id"),
        (lambda: validation.get_snapshot(csi_pb2.GetSnapshotRequest(snapshot_id=MADE_UP)),
         NotFound, "snapshot_id"),
        (lambda: validation.create_group_snapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
            source_volume_ids=[MADE_UP])), InvalidArgument, "name"),
        (lambda: validation.create_group_snapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
            name="g", source_volume_ids=[UNKNOWN, UNKNOWN])), InvalidArgument,
         "source_volume_ids"),
        (lambda: validation.create_group_snapshot(csi_pb2.CreateVolumeGroupSnapshotRequest(
            name="g", source_volume_ids=[UNKNOWN, MADE_UP])), NotFound, "source_volume_ids[1]"),
        (lambda: validation.get_metadata_delta(csi_pb2.GetMetadataDeltaRequest(
            target_snapshot_id=MADE_UP)), InvalidArgument, "base_snapshot_id"),
        (lambda: validation.get_metadata_allocated(csi_pb2.GetMetadataAllocatedRequest(
            snapshot_id=MADE_UP)), NotFound, "snapshot_id"),
        (lambda: validation.get_metadata_allocated(csi_pb2.GetMetadataAllocatedRequest(
            snapshot_id="snap-1", max_results=-1)), InvalidArgument, "max_results"),
    ],
)  # fmt: skip
def test_snapshot_requests_are_checked_presence_first_naming_the_field(
    check: Callable[[], object], kind: type, field: str
) -> None:
    err = error(check)
    assert isinstance(err, kind) and err.field == field, err


def test_snapshot_lookups_that_need_no_answer_say_so_without_an_error() -> None:
    assert not validation.delete_snapshot(csi_pb2.DeleteSnapshotRequest(snapshot_id=MADE_UP)).ours
    listing = validation.list_snapshots(csi_pb2.ListSnapshotsRequest(source_volume_id=MADE_UP))
    assert listing.names_nothing
    ref = validation.group_snapshot_ref(
        csi_pb2.DeleteVolumeGroupSnapshotRequest(group_snapshot_id=MADE_UP)
    )
    assert not ref.ours  # no snapshot_ids needed to learn a made-up group is gone
