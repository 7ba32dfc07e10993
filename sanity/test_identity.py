"""Identity service: what kubelet's plugin registration and the sidecars ask first."""

from __future__ import annotations

import re

from sanity.support import DRIVER_NAME, PluginCap, Stack, csi_pb2

T = 30


def test_plugin_reports_the_driver_name_and_a_version(stack: Stack) -> None:
    reply = stack.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=T)
    assert reply.name == DRIVER_NAME
    # the spec: a domain name, at most 63 characters, alphanumerics, '-', '.'
    assert len(reply.name) <= 63 and re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", reply.name)
    assert reply.vendor_version, "vendor_version is REQUIRED by the spec"


def test_plugin_info_is_the_same_every_time(stack: Stack) -> None:
    answers = [stack.identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=T)
               for _ in range(3)]  # fmt: skip
    assert answers[0] == answers[1] == answers[2]


def test_plugin_offers_a_controller_service_with_topology_and_online_expansion(
    stack: Stack,
) -> None:
    reply = stack.identity.GetPluginCapabilities(csi_pb2.GetPluginCapabilitiesRequest(), timeout=T)
    services = {c.service.type for c in reply.capabilities if c.HasField("service")}
    assert PluginCap.CONTROLLER_SERVICE in services
    assert PluginCap.VOLUME_ACCESSIBILITY_CONSTRAINTS in services, (
        "volumes live on one node's pool: the plugin must report topology"
    )
    expansions = {
        c.volume_expansion.type for c in reply.capabilities if c.HasField("volume_expansion")
    }
    assert csi_pb2.PluginCapability.VolumeExpansion.ONLINE in expansions


def test_probe_says_ready(stack: Stack) -> None:
    for _ in range(3):
        reply = stack.identity.Probe(csi_pb2.ProbeRequest(), timeout=T)
        # `ready` unset means ready, by the spec
        assert not reply.HasField("ready") or reply.ready.value


#: field 99 (varint 1): what a CO speaking a newer CSI version could send
UNKNOWN_FIELD = b"\x98\x06\x01"


def test_identity_answers_a_request_carrying_fields_from_a_newer_spec(stack: Stack) -> None:
    # proto3 keeps unknown fields: a newer CO's request must not be refused
    for method, reply_type in (
        ("GetPluginInfo", csi_pb2.GetPluginInfoResponse),
        ("GetPluginCapabilities", csi_pb2.GetPluginCapabilitiesResponse),
        ("Probe", csi_pb2.ProbeResponse),
    ):
        call = stack.channel.unary_unary(
            f"/csi.v1.Identity/{method}", response_deserializer=reply_type.FromString
        )
        reply = call(UNKNOWN_FIELD, timeout=T)
        assert isinstance(reply, reply_type)
    info = stack.channel.unary_unary(
        "/csi.v1.Identity/GetPluginInfo",
        response_deserializer=csi_pb2.GetPluginInfoResponse.FromString,
    )(UNKNOWN_FIELD, timeout=T)
    assert info.name == DRIVER_NAME
