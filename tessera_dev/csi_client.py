"""A convenience CSI client for the dev stack, the demo, benchmarks and tests.

It is what kubelet and the sidecars would send, minus Kubernetes: typed
stubs on the plugin's unix socket and builders for capabilities.
"""

from __future__ import annotations

import grpc

from csi_driver._gen import csi_pb2, csi_pb2_grpc

_AccessMode = csi_pb2.VolumeCapability.AccessMode


def mount_capability(
    fs_type: str = "ext4", mode: str = "SINGLE_NODE_WRITER", flags: tuple[str, ...] = ()
) -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        mount=csi_pb2.VolumeCapability.MountVolume(fs_type=fs_type, mount_flags=list(flags)),
        access_mode=_AccessMode(mode=_AccessMode.Mode.Value(mode)),
    )


def block_capability(mode: str = "SINGLE_NODE_WRITER") -> csi_pb2.VolumeCapability:
    return csi_pb2.VolumeCapability(
        block=csi_pb2.VolumeCapability.BlockVolume(),
        access_mode=_AccessMode(mode=_AccessMode.Mode.Value(mode)),
    )


class CsiClient:
    def __init__(self, endpoint: str) -> None:
        self.channel = grpc.insecure_channel(endpoint)
        self.identity = csi_pb2_grpc.IdentityStub(self.channel)
        self.controller = csi_pb2_grpc.ControllerStub(self.channel)
        self.node = csi_pb2_grpc.NodeStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> CsiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
