"""QoS parameters at CreateVolume and ControllerModifyVolume (docs/data-services.md, QoS).

Parsing is strict (whole numbers only; a typo is an error naming the key),
and ControllerModifyVolume follows the spec's table: INVALID_ARGUMENT for
what is malformed or not mutable, NOT_FOUND for a volume that does not
exist, only the keys given change, and the same request again is OK. The
CSI tests run against a real management and node-agent.
"""

# ruff: noqa: F811

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

pytest.importorskip("csi_driver._gen.csi_pb2", reason="CSI stubs not generated yet")

from csi_driver._gen import csi_pb2  # noqa: E402
from csi_driver.parameters import (  # noqa: E402
    POD_UID,
    consumer_pod,
    parse_mutable_parameters,
    parse_parameters,
)
from tessera.errors import InvalidArgument  # noqa: E402
from tessera.models import MAX_IOPS, QosLimits  # noqa: E402
from tessera.system.cgroups import UNKNOWN_POD  # noqa: E402
from tessera_dev.csi_client import mount_capability  # noqa: E402
from tests.unit.test_csi_controller_fixtures import (  # noqa: E402, F401 - fixtures
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

Code = grpc.StatusCode
VOLUME_ID_UNKNOWN = "vol-" + "0" * 32


# ---- parsing -----------------------------------------------------------------------


def test_storage_class_qos_keys_become_the_volumes_limits() -> None:
    params = parse_parameters(
        {
            "maxReadBytesPerSecond": "104857600",
            "maxWriteBytesPerSecond": "52428800",
            "maxReadIops": "1000",
            "maxWriteIops": "0",
        }
    )
    assert params.qos == QosLimits(
        max_read_bytes_per_second=100 * MiB,
        max_write_bytes_per_second=50 * MiB,
        max_read_iops=1000,
    )
    assert "maxReadIops" not in params.stored()  # mutable: kept in qos, not as a parameter


@pytest.mark.parametrize("value", ["-1", "1.5", "10M", " 5", "", "abc", "1e6", "٣", "+7"])
def test_a_qos_value_that_is_not_a_whole_number_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_parameters({"maxWriteIops": value})
    assert "maxWriteIops" in info.value.message and info.value.field == "parameters"


def test_a_qos_value_beyond_what_the_kernel_takes_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="maxReadIops"):
        parse_parameters({"maxReadIops": str(MAX_IOPS + 1)})


def test_a_misspelt_qos_key_is_refused_naming_it() -> None:
    with pytest.raises(InvalidArgument, match="maxReadIOPS"):
        parse_parameters({"maxReadIOPS": "5"})


def test_mutable_parameters_change_only_the_keys_given() -> None:
    base = QosLimits(max_read_iops=10, max_write_iops=20)
    limits = parse_mutable_parameters({"maxWriteIops": "0", "maxReadBytesPerSecond": "4096"}, base)
    assert limits == QosLimits(max_read_iops=10, max_read_bytes_per_second=4096)


def test_a_storage_class_key_is_not_mutable() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_mutable_parameters({"vpg": "fast"}, QosLimits())
    assert "'vpg'" in info.value.message and info.value.field == "mutable_parameters"


def test_the_pod_is_found_from_pod_info_then_the_kubelet_path() -> None:
    uid = "0b5e1f0e-7d38-4c4a-9a51-2f1f0a6c1e11"
    other = "9b5e1f0e-7d38-4c4a-9a51-2f1f0a6c1e22"
    target = f"/var/lib/kubelet/pods/{other}/volumes/kubernetes.io~csi/pv-1/mount"
    assert consumer_pod({POD_UID: uid}, target) == uid
    assert consumer_pod({}, target) == other
    block = f"/var/lib/kubelet/plugins/kubernetes.io/csi/volumeDevices/publish/pv-1/{other}"
    assert consumer_pod({}, block) == other
    assert consumer_pod({}, "/mnt/somewhere") == UNKNOWN_POD
    assert consumer_pod({POD_UID: "../../etc"}, "/mnt/x") == UNKNOWN_POD


# ---- CreateVolume and ControllerModifyVolume ---------------------------------------------


def create(stack: Stack, name: str = "pvc-qos", **kw: object) -> str:
    req = csi_pb2.CreateVolumeRequest(
        name=name,
        volume_capabilities=[mount_capability()],
        capacity_range=csi_pb2.CapacityRange(required_bytes=GiB),
        **kw,  # type: ignore[arg-type]
    )
    return str(stack.csi.controller.CreateVolume(req).volume.volume_id)


def modify(stack: Stack, volume_id: str, **params: str) -> None:
    req = csi_pb2.ControllerModifyVolumeRequest(volume_id=volume_id, mutable_parameters=params)
    stack.csi.controller.ControllerModifyVolume(req)


def test_create_volume_stores_the_storage_class_limits(stack: Stack) -> None:
    vid = create(stack, parameters={"maxReadIops": "500", "maxWriteBytesPerSecond": "1048576"})
    assert stack.mgmt.get_volume(vid).qos == QosLimits(
        max_read_iops=500, max_write_bytes_per_second=MiB
    )


def test_create_volume_mutable_parameters_win_over_the_storage_class(stack: Stack) -> None:
    vid = create(stack, parameters={"maxReadIops": "500"}, mutable_parameters={"maxReadIops": "50"})
    assert stack.mgmt.get_volume(vid).qos.max_read_iops == 50


def test_create_volume_with_a_bad_limit_is_invalid_argument_naming_it(stack: Stack) -> None:
    code, message = code_of(lambda: create(stack, parameters={"maxReadIops": "fast"}))
    assert code == Code.INVALID_ARGUMENT and "maxReadIops" in message


def test_modify_volume_changes_only_the_keys_given_and_can_be_repeated(stack: Stack) -> None:
    vid = create(stack, parameters={"maxReadIops": "500"})
    modify(stack, vid, maxWriteIops="300")
    modify(stack, vid, maxWriteIops="300")  # idempotent
    assert stack.mgmt.get_volume(vid).qos == QosLimits(max_read_iops=500, max_write_iops=300)
    modify(stack, vid, maxReadIops="0")  # 0 lifts a limit
    assert stack.mgmt.get_volume(vid).qos == QosLimits(max_write_iops=300)


def test_modify_volume_reaches_the_agent_of_the_node_it_is_published_on(
    stack: Stack, tmp_path: Path
) -> None:
    vid = create(stack)
    stack.csi.controller.ControllerPublishVolume(
        csi_pb2.ControllerPublishVolumeRequest(
            volume_id=vid, node_id="n1", volume_capability=mount_capability()
        )
    )
    modify(stack, vid, maxReadBytesPerSecond="2097152")
    stored = json.loads((tmp_path / "agent-state" / "qos" / f"{vid}.json").read_text())
    assert stored["limits"]["max_read_bytes_per_second"] == 2 * MiB


@pytest.mark.parametrize(
    ("request_", "code", "named"),
    [
        (csi_pb2.ControllerModifyVolumeRequest(mutable_parameters={"maxReadIops": "1"}),
         Code.INVALID_ARGUMENT, "volume_id"),
        (csi_pb2.ControllerModifyVolumeRequest(volume_id=VOLUME_ID_UNKNOWN),
         Code.INVALID_ARGUMENT, "mutable_parameters"),
        (csi_pb2.ControllerModifyVolumeRequest(
            volume_id=VOLUME_ID_UNKNOWN, mutable_parameters={"fsType": "xfs"}),
         Code.INVALID_ARGUMENT, "fsType"),
        (csi_pb2.ControllerModifyVolumeRequest(
            volume_id=VOLUME_ID_UNKNOWN, mutable_parameters={"maxReadIops": "-3"}),
         Code.INVALID_ARGUMENT, "maxReadIops"),
        (csi_pb2.ControllerModifyVolumeRequest(
            volume_id=VOLUME_ID_UNKNOWN, mutable_parameters={"maxReadIops": "1"}),
         Code.NOT_FOUND, VOLUME_ID_UNKNOWN),
        (csi_pb2.ControllerModifyVolumeRequest(
            volume_id="someone-elses-volume", mutable_parameters={"maxReadIops": "1"}),
         Code.NOT_FOUND, "someone-elses-volume"),
    ],
)  # fmt: skip
def test_modify_volume_answers_the_spec_code_naming_what_is_wrong(
    stack: Stack, request_: csi_pb2.ControllerModifyVolumeRequest, code: Code, named: str
) -> None:
    got, message = code_of(lambda: stack.csi.controller.ControllerModifyVolume(request_))
    assert (got, named in message) == (code, True), message


# ---- which cgroup a pod's limits go to (tessera/system/cgroups.py) -------------------------

POD = "0b5e1f0e-7d38-4c4a-9a51-2f1f0a6c1e11"
_POD = POD.replace("-", "_")  # the systemd driver's spelling


@pytest.mark.parametrize(
    "layout",
    [
        f"kubepods/pod{POD}",
        f"kubepods/burstable/pod{POD}",
        f"kubepods/besteffort/pod{POD}",
        f"kubepods.slice/kubepods-pod{_POD}.slice",
        f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{_POD}.slice",
        f"kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{_POD}.slice",
    ],
)
@pytest.mark.parametrize("version", [1, 2])
def test_a_pods_cgroup_is_found_under_either_kubelet_driver_and_cgroup_version(
    tmp_path: Path, layout: str, version: int
) -> None:
    from tessera.system import cgroups

    root = tmp_path / "cgroup"
    tree = root / "blkio" if version == 1 else root
    tree.mkdir(parents=True)
    marker = "blkio.throttle.read_bps_device" if version == 1 else "cgroup.controllers"
    (tree / marker).write_text("")
    (tree / layout).mkdir(parents=True)
    h = cgroups.hierarchy(root)
    assert h is not None and (h.root, h.version) == (tree.resolve(), version)
    assert cgroups.pod_cgroup(h, POD) == h.root / layout
    assert cgroups.pod_cgroup(h, "1b5e1f0e-7d38-4c4a-9a51-2f1f0a6c1e11") is None
    assert cgroups.kubepods_cgroup(h) == h.root / layout.split("/")[0]


def test_a_cgroup_v2_rule_names_every_limit_and_max_for_none(tmp_path: Path) -> None:
    from tessera.system import cgroups

    (tmp_path / "cgroup.controllers").write_text("io")
    (tmp_path / "io.max").write_text("")
    h = cgroups.hierarchy(tmp_path)
    assert h is not None and h.version == 2
    limits = cgroups.IoLimits(rbps=1048576, wiops=50)
    assert cgroups.set_limits(h, tmp_path, (7, 3), limits)
    assert (tmp_path / "io.max").read_text() == "7:3 rbps=1048576 wbps=max riops=max wiops=50\n"
    assert cgroups.read_limits(h, tmp_path, (7, 3)) == limits
    assert not cgroups.set_limits(h, tmp_path, (7, 3), limits)  # already so: nothing written


def test_a_cgroup_v2_without_the_io_controller_says_so_instead_of_limiting_nothing(
    tmp_path: Path,
) -> None:
    from tessera.errors import FailedPrecondition
    from tessera.system import cgroups

    (tmp_path / "cgroup.controllers").write_text("io")
    pod = tmp_path / "kubepods" / "pod1"
    pod.mkdir(parents=True)  # a pod cgroup whose parent never enabled `io` for it
    h = cgroups.hierarchy(tmp_path)
    assert h is not None and h.version == 2
    with pytest.raises(FailedPrecondition, match="subtree_control"):
        cgroups.set_limits(h, pod, (7, 3), cgroups.IoLimits(rbps=1048576))
    # a cgroup that went away (its container exited) is still simply skipped
    assert not cgroups.set_limits(h, tmp_path / "gone", (7, 3), cgroups.IoLimits(rbps=1))
