"""A refused node request reports its own error, whatever its cleanup runs into.

Reproduced before: NodeStageVolume's refusal of a blank read-only volume
(FAILED_PRECONDITION, final for kubelet) came back as UNAVAILABLE when the
agent could not detach what the call had attached, and kubelet retried for
ever with the wrong diagnosis; NodePublishVolume's release of a read-only
view did the same. No root needed: nothing is mounted on the way to these
refusals, and the agent here answers the attach, then is gone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import pytest

from csi_driver._gen import csi_pb2
from csi_driver.config import Mode, PluginConfig
from csi_driver.node import NodeServicer
from tessera.clients import AgentClient
from tessera.errors import FailedPrecondition, NotFound, Unavailable
from tessera.ids import new_volume_id
from tessera.models import AgentAttachment, AgentView, Connection

GONE = "node-agent at unix:///run/tessera/agent.sock did not answer"


class AgentGoneAfterAttach:
    """Attaches (and makes views), then is unreachable for every undo."""

    def __init__(self, attachment: AgentAttachment, attached: bool) -> None:
        self.attachment = attachment
        self.attached = attached
        self.undos: list[str] = []

    def get_attachment(self, volume_id: str) -> AgentAttachment:
        if not self.attached:
            raise NotFound(f"volume {volume_id} is not attached")
        return self.attachment

    def attach(
        self, volume_id: str, readonly: bool = False, connection: Connection | None = None
    ) -> AgentAttachment:
        self.attached = True
        return self.attachment

    def attach_view(self, volume_id: str, view_key: str) -> AgentView:
        return AgentView(volume_id=volume_id, key=view_key, device="/nonexistent/loop-view")

    def detach(self, volume_id: str) -> None:
        self.undos.append("detach")
        raise Unavailable(GONE)

    def release_view(self, volume_id: str, view_key: str) -> None:
        self.undos.append("release_view")
        raise Unavailable(GONE)


def servicer(agent: AgentGoneAfterAttach) -> NodeServicer:
    config = PluginConfig(mode=Mode.NODE, endpoint="unix:///csi.sock", node_id="n1")
    return NodeServicer(config, cast(AgentClient, agent))


def attachment(volume_id: str, *, readonly: bool, blank: bool) -> AgentAttachment:
    return AgentAttachment(
        volume_id=volume_id,
        device=f"/dev/tessera/{volume_id}",
        backing_device="/nonexistent/loop-primary",
        readonly=readonly,
        size_bytes=1 << 30,
        blank=blank,
    )


def test_a_refused_stage_reports_its_refusal_when_the_agent_cannot_detach(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vid = new_volume_id()
    agent = AgentGoneAfterAttach(attachment(vid, readonly=True, blank=True), attached=False)
    cap = csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_READER_ONLY
        ),
    )
    req = csi_pb2.NodeStageVolumeRequest(
        volume_id=vid, staging_target_path=str(tmp_path / "staging"), volume_capability=cap
    )
    with caplog.at_level(logging.WARNING), pytest.raises(FailedPrecondition) as err:
        servicer(agent).NodeStageVolume(req, None)  # type: ignore[arg-type]
    assert "blank and published read-only" in err.value.message
    assert agent.undos == ["detach"], "the attachment this call made was not undone"
    assert GONE in caplog.text, "the failed cleanup must be logged"


def test_a_refused_read_only_block_publish_reports_its_refusal_when_the_view_cannot_go(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vid = new_volume_id()
    agent = AgentGoneAfterAttach(attachment(vid, readonly=False, blank=False), attached=True)
    cap = csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=csi_pb2.VolumeCapability.AccessMode(
            mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER
        ),
    )
    staging = tmp_path / "staging"
    staging.mkdir()
    req = csi_pb2.NodePublishVolumeRequest(
        volume_id=vid,
        staging_target_path=str(staging),
        target_path=str(tmp_path / "pod" / "dev"),
        volume_capability=cap,
        readonly=True,
    )
    # the view's device is gone by the time it is bound: FAILED_PRECONDITION
    with caplog.at_level(logging.WARNING), pytest.raises(FailedPrecondition) as err:
        servicer(agent).NodePublishVolume(req, None)  # type: ignore[arg-type]
    assert "is gone" in err.value.message
    assert agent.undos == ["release_view"], "the view this call made was not released"
    assert GONE in caplog.text, "the failed cleanup must be logged"
