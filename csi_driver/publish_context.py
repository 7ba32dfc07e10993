"""publish_context: the connection info ControllerPublishVolume hands NodeStageVolume.

Both directions live here, so the keys are spelled once. Kubernetes keeps
publish_context in VolumeAttachment objects that many can read: nothing
secret ever goes in (the TLS-PSK key travels agent to agent, see
docs/data-path.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from tessera.errors import InvalidArgument
from tessera.models import (
    CLIENT_ADDRESS_PATTERN,
    OPTIONAL_NODE_ID_PATTERN,
    Connection,
    Transport,
)

TRANSPORT = "transport"
OWNER_NODE = "ownerNode"
READONLY = "readonly"
HOST = "host"
PORT = "port"
PSK_IDENTITY = "pskIdentity"


def to_publish_context(connection: Connection, readonly: bool) -> dict[str, str]:
    context = {
        TRANSPORT: connection.transport.value,
        OWNER_NODE: connection.owner_node,
        READONLY: "true" if readonly else "false",
    }
    if connection.transport != Transport.LOOP:
        context |= {
            HOST: connection.host,
            PORT: str(connection.port),
            PSK_IDENTITY: connection.psk_identity,
        }
    return context


def from_publish_context(context: Mapping[str, str]) -> tuple[Connection, bool]:
    """(connection, readonly); an empty context is a local volume (no ControllerPublish)."""
    raw = context.get(TRANSPORT, "") or Transport.LOOP.value
    try:
        transport = Transport(raw)
    except ValueError:
        known = ", ".join(t.value for t in Transport)
        raise InvalidArgument(
            f"publish_context.{TRANSPORT} {raw[:40]!r} is not one of {known}",
            field=f"publish_context.{TRANSPORT}",
        ) from None
    readonly = context.get(READONLY, "false") == "true"
    if transport == Transport.LOOP:
        return Connection(owner_node=context.get(OWNER_NODE, "")), readonly
    port = context.get(PORT, "")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidArgument(
            f"publish_context.{PORT} {port[:20]!r} is not a TCP port",
            field=f"publish_context.{PORT}",
        )
    host, identity = context.get(HOST, ""), context.get(PSK_IDENTITY, "")
    if not re.fullmatch(CLIENT_ADDRESS_PATTERN, host):
        raise InvalidArgument(
            f"publish_context.{HOST} {host[:80]!r} is not a host name or IP address",
            field=f"publish_context.{HOST}",
        )
    if not re.fullmatch(OPTIONAL_NODE_ID_PATTERN, identity) or len(identity) > 128:
        raise InvalidArgument(
            f"publish_context.{PSK_IDENTITY} {identity[:80]!r} is not a node ID",
            field=f"publish_context.{PSK_IDENTITY}",
        )
    connection = Connection(
        transport=transport,
        owner_node=context.get(OWNER_NODE, ""),
        host=host,
        port=int(port),
        psk_identity=identity,
    )
    return connection, readonly
