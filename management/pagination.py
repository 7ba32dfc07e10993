"""Opaque keyset page tokens.

A token is the base64url JSON of the last key of the previous page; the
next page is "everything after that key". Unlike an offset this stays
correct when items before or at the key are deleted between requests.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, select, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

from tessera.errors import InvalidArgument

DEFAULT_MAX_ENTRIES = 100
MAX_ENTRIES_CAP = 1000


def page_size(max_entries: int) -> int:
    """0 means "server default"; larger than the cap is clamped (still paginated)."""
    if max_entries < 0:
        raise InvalidArgument("max_entries must be 0 or more", field="max_entries")
    if max_entries == 0:
        return DEFAULT_MAX_ENTRIES
    return min(max_entries, MAX_ENTRIES_CAP)


def encode_token(key: list[str]) -> str:
    raw = json.dumps(key, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, parts: int) -> list[str] | None:
    """The key a token names, or None for the first page; malformed → InvalidArgument."""
    if not token:
        return None
    bad = InvalidArgument(
        "page_token is not a token this server issued; start again without one",
        field="page_token",
    )
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise bad from None
    if not isinstance(key, list) or len(key) != parts or not all(isinstance(k, str) for k in key):
        raise bad
    if any("\x00" in k for k in key):  # no key holds one; PostgreSQL would refuse the query
        raise bad
    return key


def fetch_page(
    session: Session,
    entity: type[Any],
    keys: list[InstrumentedAttribute[str]],
    page_token: str,
    max_entries: int,
    where: Sequence[ColumnElement[bool]] = (),
) -> tuple[list[Any], str]:
    """One page of `entity` rows in key order, and the token of the next page ("" at the end).

    `where`: filters (the same on every page of one listing)."""
    limit = page_size(max_entries)
    after = decode_token(page_token, len(keys))
    stmt = select(entity).where(*where).order_by(*keys).limit(limit + 1)
    if after:
        stmt = stmt.where(tuple_(*keys) > tuple_(*after) if len(keys) > 1 else keys[0] > after[0])
    rows = list(session.scalars(stmt))
    if len(rows) <= limit:
        return rows, ""
    rows = rows[:limit]
    return rows, encode_token([getattr(rows[-1], key.key) for key in keys])
