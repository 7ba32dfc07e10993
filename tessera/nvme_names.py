"""NVMe qualified names and DH-HMAC-CHAP secrets, computed the same way on both ends.

A subsystem per volume, and a host NQN per (client node, volume): nvmet keeps
one DH-HMAC-CHAP key per host entry, globally, so a host NQN per attachment
is what lets management issue a key per attachment (like the NBD TLS-PSK
keys) and revoke it by removing that host from the subsystem.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
import uuid

#: our NQN prefix: nqn.<yyyy-mm of the domain>.<reversed domain>
NQN_PREFIX = "nqn.2026-01.io.tessera"
_HOST_ID_NAMESPACE = uuid.UUID("6c1f7f3e-3a55-4d0b-9a51-7f4c2f1b9e10")


def subsystem_nqn(volume_id: str, owner_node: str) -> str:
    """The nvmet subsystem that exports `owner_node`'s leg of `volume_id` (<= 215 bytes).

    The owner is part of it: legs of one volume are on distinct nodes, and
    two subsystems must never share a name where nodes share a kernel (the
    VM suite's network-namespace nodes share one configfs).
    """
    return f"{NQN_PREFIX}:{volume_id}:{owner_node}"


def host_nqn(client_node: str, volume_id: str) -> str:
    """The host NQN `client_node` presents when it connects to `volume_id`'s subsystem.

    NQNs are at most 223 bytes and lower-case here: node ids may have
    upper-case letters, which NQNs allow, so they are kept as they are.
    """
    return f"{NQN_PREFIX}:host:{client_node}:{volume_id}"


def host_id(nqn: str) -> str:
    """A stable host identifier (UUID) for a host NQN, as `nvme connect --hostid` wants."""
    return str(uuid.uuid5(_HOST_ID_NAMESPACE, nqn))


def dhchap_secret(hex_key: str) -> str:
    """The DH-HMAC-CHAP secret representation (NVMe base spec 8.13.5.8) of a 256-bit key.

    `DHHC-1:00:<base64(key || crc32(key) little-endian)>:` — 00: the key is
    used as it is, without a hash transformation. Never log the result.
    """
    key = bytes.fromhex(hex_key)
    if len(key) != 32:
        raise ValueError("a DH-HMAC-CHAP key here is 32 bytes (64 hex digits)")
    crc = struct.pack("<I", binascii.crc32(key) & 0xFFFFFFFF)
    return f"DHHC-1:00:{base64.b64encode(key + crc).decode()}:"


#: what the controller (target) key is derived with: a fixed label, so both ends
#: compute it from the attachment's key without another field on the wire
_CTRL_KEY_LABEL = b"tessera nvme-tcp controller key v1"


def dhchap_ctrl_secret(hex_key: str) -> str:
    """The controller's DH-HMAC-CHAP secret for bidirectional authentication.

    HMAC-SHA256 of the attachment's key with a fixed label: a different key
    (the target proves itself with a key the host never sends), derived the
    same way on both ends. Never log the result.
    """
    key = bytes.fromhex(hex_key)
    if len(key) != 32:
        raise ValueError("a DH-HMAC-CHAP key here is 32 bytes (64 hex digits)")
    return dhchap_secret(hmac.new(key, _CTRL_KEY_LABEL, hashlib.sha256).hexdigest())


def ctrl_secret_of(secret: str) -> str:
    """`dhchap_ctrl_secret` of the key inside a `dhchap_secret` (the consumer holds the
    secret, not the hex key, where it connects). Never log the result."""
    prefix, _, rest = secret.partition("DHHC-1:00:")
    try:
        blob = base64.b64decode(rest.rstrip(":"), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not a DH-HMAC-CHAP secret of ours") from None
    if prefix or len(blob) != 36:
        raise ValueError("not a DH-HMAC-CHAP secret of ours")
    return dhchap_ctrl_secret(blob[:32].hex())
