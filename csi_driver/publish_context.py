"""publish_context: the connection info ControllerPublishVolume hands NodeStageVolume.

Both directions live here, so the keys are spelled once. Kubernetes keeps
publish_context in VolumeAttachment objects that many can read: nothing
secret ever goes in (the TLS-PSK key travels agent to agent, see
docs/data-path.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

from pydantic import ValidationError

from tessera.errors import InvalidArgument
from tessera.models import (
    CLIENT_ADDRESS_PATTERN,
    OPTIONAL_NODE_ID_PATTERN,
    Connection,
    LegConnection,
    Transport,
)

T = TypeVar("T")

TRANSPORT = "transport"
OWNER_NODE = "ownerNode"
READONLY = "readonly"
HOST = "host"
PORT = "port"
PSK_IDENTITY = "pskIdentity"
#: nvme-tcp: the owner's subsystem
SUBSYSTEM_NQN = "subsystemNqn"
#: composed: how the legs combine, and the legs themselves: a JSON list of LegConnection
#: fields as arrays in LEG_FIELDS order (publish_context is 4 KiB at most, keys and all)
LAYOUT = "layout"
CHUNK_BYTES = "chunkBytes"
ARRAY_UUID = "arrayUuid"
DATA_BYTES = "dataBytes"
#: composed: the legs' version (Kubernetes never refreshes a publish_context: the node
#: must know an old one from the legs a repair sent it since)
GENERATION = "generation"
LEGS = "legs"
LEG_FIELDS = ("index", "node_id", "transport", "host", "port", "subsystem_nqn", "state")


def to_publish_context(connection: Connection, readonly: bool) -> dict[str, str]:
    context = {
        TRANSPORT: connection.transport.value,
        OWNER_NODE: connection.owner_node,
        READONLY: "true" if readonly else "false",
    }
    if connection.transport == Transport.COMPOSED:
        context |= {
            PSK_IDENTITY: connection.psk_identity,
            LAYOUT: connection.layout.value,
            CHUNK_BYTES: str(connection.chunk_bytes),
            ARRAY_UUID: connection.array_uuid,
            DATA_BYTES: str(connection.data_bytes),
            GENERATION: str(connection.generation),
            LEGS: json.dumps(
                [[leg.model_dump(mode="json")[f] for f in LEG_FIELDS] for leg in connection.legs],
                separators=(",", ":"),
            ),
        }
    elif connection.transport != Transport.LOOP:
        context |= {
            HOST: connection.host,
            PORT: str(connection.port),
            PSK_IDENTITY: connection.psk_identity,
        }
        if connection.subsystem_nqn:
            context[SUBSYSTEM_NQN] = connection.subsystem_nqn
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
    if transport == Transport.COMPOSED:
        return _composed(context), readonly
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
    connection = _parsed(
        SUBSYSTEM_NQN,
        lambda: Connection(
            transport=transport,
            owner_node=context.get(OWNER_NODE, ""),
            host=host,
            port=int(port),
            psk_identity=identity,
            subsystem_nqn=context.get(SUBSYSTEM_NQN, ""),
        ),
    )
    return connection, readonly


def _composed(context: Mapping[str, str]) -> Connection:
    """A composed connection; InvalidArgument naming the key that does not parse."""
    numbers = {}
    for key in (CHUNK_BYTES, DATA_BYTES, GENERATION):
        raw = context.get(key, "0")
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 20:
            raise InvalidArgument(
                f"publish_context.{key} {raw[:20]!r} is not a byte count",
                field=f"publish_context.{key}",
            )
        numbers[key] = int(raw)

    def legs() -> list[LegConnection]:
        raw = json.loads(context.get(LEGS, "[]"))
        if not isinstance(raw, list):
            raise ValueError("not a list")
        if not all(isinstance(leg, list) and len(leg) == len(LEG_FIELDS) for leg in raw):
            raise ValueError(f"every leg must be a list of {', '.join(LEG_FIELDS)}")
        return [
            LegConnection.model_validate(dict(zip(LEG_FIELDS, leg, strict=True))) for leg in raw
        ]

    parsed_legs = _parsed(LEGS, legs)
    return _parsed(
        LAYOUT,
        lambda: Connection(
            transport=Transport.COMPOSED,
            owner_node=context.get(OWNER_NODE, ""),
            psk_identity=context.get(PSK_IDENTITY, ""),
            layout=context.get(LAYOUT, ""),
            chunk_bytes=numbers[CHUNK_BYTES],
            array_uuid=context.get(ARRAY_UUID, ""),
            data_bytes=numbers[DATA_BYTES],
            generation=numbers[GENERATION],
            legs=parsed_legs,
        ),
    )


def _parsed(key: str, make: Callable[[], T]) -> T:
    """`make()`, its validation errors as InvalidArgument naming publish_context.<key>."""
    try:
        return make()
    except (ValueError, ValidationError) as exc:  # ValidationError is a ValueError
        first = exc.errors()[0] if isinstance(exc, ValidationError) else None
        where = ".".join(str(p) for p in first["loc"]) if first else key
        why = first["msg"] if first else str(exc)
        if first and first["loc"] and key != LEGS:  # the key the bad field came from
            key = _KEY_OF_FIELD.get(str(first["loc"][0]), key)
        raise InvalidArgument(
            f"publish_context.{key}: {where}: {why}"[:300], field=f"publish_context.{key}"
        ) from None


_KEY_OF_FIELD = {
    "owner_node": OWNER_NODE,
    "psk_identity": PSK_IDENTITY,
    "subsystem_nqn": SUBSYSTEM_NQN,
    "layout": LAYOUT,
    "chunk_bytes": CHUNK_BYTES,
    "array_uuid": ARRAY_UUID,
    "data_bytes": DATA_BYTES,
    "generation": GENERATION,
}
