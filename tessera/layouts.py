"""Layout arithmetic shared by management (placement) and the node-agent (composition).

One place decides how big each leg is and what the composed device shows,
so the two processes can never disagree about a volume's geometry.

- raid0: device-mapper `striped` over the legs, no on-disk metadata: the
  table (leg order, chunk) is stored in management, so assembly is exact.
- raid1 / raid10: md with a v1.2 superblock and an internal write-intent
  bitmap on every leg, before the data (MD_DATA_OFFSET): event counts let
  md refuse a stale leg, the bitmap makes a returning or new leg resync
  only what changed, and `--grow --size` grows the array online.
"""

from __future__ import annotations

from tessera.models import Layout, MiB

DEFAULT_CHUNK = 64 * 1024
MIN_CHUNK = 4 * 1024
#: where md puts the data on each mirrored leg: superblock and bitmap live before it
MD_DATA_OFFSET = 4 * MiB
DEFAULT_LEGS = {Layout.CONCAT: 1, Layout.RAID0: 2, Layout.RAID1: 2, Layout.RAID10: 4}
#: (fewest, most) legs a layout takes
LEG_RANGE = {
    Layout.CONCAT: (1, 1),
    Layout.RAID0: (2, 16),
    Layout.RAID1: (2, 3),
    Layout.RAID10: (3, 16),
}


def is_mirrored(layout: Layout | str) -> bool:
    return Layout(layout) in (Layout.RAID1, Layout.RAID10)


def is_striped(layout: Layout | str) -> bool:
    return Layout(layout) in (Layout.RAID0, Layout.RAID10)


def volume_size(layout: Layout | str, size_bytes: int, legs: int, chunk_bytes: int) -> int:
    """The size a volume of `size_bytes` really gets: rounded up so every leg holds whole chunks.

    Always >= size_bytes (CSI allows more than required, never less) and a
    multiple of 1 MiB like every volume.
    """
    layout = Layout(layout)
    unit = MiB
    if is_striped(layout):
        unit = _lcm(unit, legs * (chunk_bytes or DEFAULT_CHUNK))
    return -(-size_bytes // unit) * unit


def leg_data_bytes(layout: Layout | str, size_bytes: int, legs: int) -> int:
    """The bytes of volume data each leg holds, for a size already rounded by volume_size."""
    layout = Layout(layout)
    if layout == Layout.RAID0:
        return size_bytes // legs
    if layout == Layout.RAID10:
        return 2 * size_bytes // legs  # two copies of every chunk, spread over the legs
    return size_bytes  # concat (one leg), raid1 (full copies)


def leg_size(layout: Layout | str, size_bytes: int, legs: int) -> int:
    """Each leg's file size: its data plus md's superblock and bitmap on mirrored layouts."""
    data = leg_data_bytes(layout, size_bytes, legs)
    return data + MD_DATA_OFFSET if is_mirrored(layout) else data


def _lcm(a: int, b: int) -> int:
    from math import gcd

    return a * b // gcd(a, b)
