"""Size arithmetic and input bounds that the wire models leave open.

The shared models accept any positive int; the database stores 64-bit
integers, so anything beyond that must be refused with a clear message
here, not surface as an overflow deep inside the driver.
"""

from __future__ import annotations

from tessera.errors import InvalidArgument, OutOfRange
from tessera.models import MAX_BYTES, MAX_VOLUMES_PER_NODE, MiB  # the models state them too
from tessera.units import format_size


def round_up_mib(size: int) -> int:
    """Volumes are allocated in whole MiB so every layer agrees on the size."""
    return -(-size // MiB) * MiB


def check_bytes(value: int, field: str) -> int:
    if value > MAX_BYTES:
        raise OutOfRange(f"{field} {value} is larger than the maximum {MAX_BYTES}", field=field)
    return value


def check_count(value: int, field: str) -> int:
    if value > MAX_VOLUMES_PER_NODE:
        raise OutOfRange(f"{field} must be at most {MAX_VOLUMES_PER_NODE}", field=field)
    return value


def sized_within_limit(size_bytes: int, limit_bytes: int, field: str = "size_bytes") -> int:
    """Rounded size for a request, refusing one whose rounding passes its limit."""
    check_bytes(size_bytes, field)
    check_bytes(limit_bytes, "limit_bytes")
    if limit_bytes and size_bytes > limit_bytes:
        raise OutOfRange(
            f"{field} {size_bytes} is larger than limit_bytes {limit_bytes}", field="limit_bytes"
        )
    rounded = round_up_mib(size_bytes)
    if limit_bytes and rounded > limit_bytes:
        raise OutOfRange(
            f"{field} rounds up to {format_size(rounded)} (volumes are allocated in whole MiB), "
            f"which exceeds limit_bytes {limit_bytes}",
            field="limit_bytes",
        )
    return rounded


def check_text(value: str, field: str) -> str:
    """Refuse control characters and lone surrogates: they cannot be stored or shown safely."""
    for ch in value:
        if ord(ch) < 0x20 or ord(ch) == 0x7F or 0xD800 <= ord(ch) <= 0xDFFF:
            raise InvalidArgument(
                f"{field} must not contain control characters or invalid unicode", field=field
            )
    return value
