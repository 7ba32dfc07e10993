"""CSI and layouts: the controller refuses multi-writer mirrors and bad transports, and
publish_context carries nvme-tcp and composed connections to NodeStage intact."""

# ruff: noqa: F811

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("csi_driver._gen.csi_pb2", reason="CSI stubs not generated yet")

import grpc  # noqa: E402

from csi_driver._gen import csi_pb2  # noqa: E402
from csi_driver.publish_context import from_publish_context, to_publish_context  # noqa: E402
from csi_driver.validation import MAX_MAP_BYTES  # noqa: E402
from tessera.errors import InvalidArgument  # noqa: E402
from tessera.ids import new_volume_id  # noqa: E402
from tessera.models import Connection, LegConnection, Transport, VpgCreate  # noqa: E402
from tessera.nvme_names import subsystem_nqn  # noqa: E402
from tessera_dev.csi_client import block_capability  # noqa: E402
from tests.unit.test_csi_controller import create_req  # noqa: E402
from tests.unit.test_csi_controller_fixtures import (  # noqa: E402, F401 - fixtures
    TOKEN,
    Stack,
    agent_url,
    code_of,
    management_url,
    mgmt,
    serving,
    sock_dir,
    stack,
)


def test_a_multi_writer_volume_of_a_mirrored_vpg_is_refused_saying_why(stack: Stack) -> None:
    stack.mgmt.create_vpg(VpgCreate(name="safe", layout="raid1"))
    req = create_req(
        volume_capabilities=[block_capability("MULTI_NODE_MULTI_WRITER")],
        parameters={"vpg": "safe"},
    )
    code, message = code_of(lambda: stack.csi.controller.CreateVolume(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, message
    assert "MULTI_NODE_MULTI_WRITER" in message and "diverge" in message
    assert stack.mgmt.list_volumes().items == []


def test_an_unknown_transport_parameter_is_invalid_argument_naming_it(stack: Stack) -> None:
    req = create_req(parameters={"transport": "iscsi"})
    code, message = code_of(lambda: stack.csi.controller.CreateVolume(req))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "parameters.transport 'iscsi'" in message


def test_a_forced_transport_is_stored_with_the_volume(stack: Stack) -> None:
    vol = stack.csi.controller.CreateVolume(create_req(parameters={"transport": "nbd"})).volume
    assert stack.mgmt.get_volume(vol.volume_id).parameters["transport"] == "nbd"


def _composed(volume_id: str, legs: int) -> Connection:
    nodes = [f"worker-node-{i:02d}.example" for i in range(legs)]
    return Connection(
        transport=Transport.COMPOSED,
        owner_node=nodes[0],
        psk_identity="consumer-node-01",
        layout="raid10",
        chunk_bytes=65536,
        array_uuid="0b5e8a4e-6f0c-4b8e-9d1e-2f3a4b5c6d7e",
        data_bytes=8 * 1024**3,
        generation=2**31 - 1,  # a repair's newer legs are told from older ones by it
        legs=[
            LegConnection(
                index=i,
                node_id=n,
                transport=Transport.NVME_TCP,
                host="10.20.30.40",
                port=4420,
                subsystem_nqn=subsystem_nqn(volume_id, n),
                state="rebuilding" if i == 1 else "in_sync",
            )
            for i, n in enumerate(nodes)
        ],
    )


def test_a_composed_connection_survives_publish_context_and_fits_the_csi_limit() -> None:
    volume_id = new_volume_id()
    connection = _composed(volume_id, 16)
    context = to_publish_context(connection, readonly=False)
    size = sum(len(k.encode()) + len(v.encode()) for k, v in context.items())
    assert size <= MAX_MAP_BYTES, size  # 16 legs with realistic node names
    assert from_publish_context(context) == (connection, False)


def test_an_nvme_connection_survives_publish_context_with_its_subsystem() -> None:
    volume_id = new_volume_id()
    connection = Connection(
        transport=Transport.NVME_TCP,
        owner_node="n1",
        host="10.0.0.1",
        port=4420,
        psk_identity="n2",
        subsystem_nqn=subsystem_nqn(volume_id, "n1"),
    )
    assert from_publish_context(to_publish_context(connection, True)) == (connection, True)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("legs", "not json"),
        ("legs", json.dumps({"index": 0})),
        ("legs", json.dumps([[0, "n1", "loop"]])),
        ("legs", json.dumps([[0, "../n1", "loop", "", 0, "", "in_sync"]])),
        ("layout", "raid5"),
        ("arrayUuid", "not-a-uuid"),
        ("dataBytes", "-1"),
        ("generation", "x"),
        ("generation", str(2**31)),
    ],
)
def test_a_broken_composed_publish_context_is_invalid_argument_naming_the_key(key, value):
    context = to_publish_context(_composed(new_volume_id(), 2), readonly=False)
    context[key] = value
    with pytest.raises(InvalidArgument) as err:
        from_publish_context(context)
    assert err.value.field == f"publish_context.{key}"
    assert err.value.message.startswith(f"publish_context.{key}")


def test_multi_writer_is_not_confirmed_for_a_mirrored_volume_nor_given_capacity(
    stack: Stack, tmp_path: Path, sock_dir: Path
) -> None:
    from node_agent.agent import Agent
    from node_agent.api import create_app
    from node_agent.pools import Pool

    # a leg per node: n2 needs its own agent (the stack's one serves both nodes' pools)
    (tmp_path / "n2-p2").mkdir()
    pools = {"p2": Pool.open("p2", tmp_path / "n2-p2")}
    agent = Agent("n2", pools, dev_dir=tmp_path / "n2-dev", transports={},
                  state_dir=tmp_path / "n2-state")  # fmt: skip
    with serving(create_app(agent, TOKEN), sock_dir / "n2.sock"):
        url = f"unix://{sock_dir / 'n2.sock'}"
        stack.mgmt.register_node("n2", url, {"topology.tessera.io/node": "n2"})
        _mirrored_multi_writer_refused(stack)


def _mirrored_multi_writer_refused(stack: Stack) -> None:
    stack.mgmt.create_vpg(VpgCreate(name="safe", layout="raid1"))
    vol = stack.csi.controller.CreateVolume(create_req(parameters={"vpg": "safe"})).volume
    multi = [block_capability("MULTI_NODE_MULTI_WRITER")]
    resp = stack.csi.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=multi
        )
    )
    assert not resp.HasField("confirmed")
    assert "MULTI_NODE_MULTI_WRITER" in resp.message and "diverge" in resp.message
    single = [block_capability("SINGLE_NODE_WRITER")]
    ok = stack.csi.controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(
            volume_id=vol.volume_id, volume_capabilities=single
        )
    )
    assert ok.HasField("confirmed")

    def capacity(caps: list) -> int:  # type: ignore[type-arg]
        req = csi_pb2.GetCapacityRequest(parameters={"vpg": "safe"}, volume_capabilities=caps)
        return stack.csi.controller.GetCapacity(req).available_capacity

    assert capacity(multi) == 0
    assert capacity(single) > 0
