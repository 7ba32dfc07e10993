"""Changed-block metadata from extent maps (FIEMAP), never from reading data.

allocated(snapshot): the ranges that hold written data (unwritten extents
read as zeroes: not allocated). delta(base, target): the ranges where the
two files map different physical blocks. Reflinked files share physical
blocks until one side writes, and copy-on-write gives the writer new ones,
so "same physical block at the same logical offset" means "same bytes".
The converse does not hold: a block rewritten with identical bytes gets a
new block and is reported (a backup copies it once more: harmless).
"""

from __future__ import annotations

import os
from pathlib import Path

from tessera.models import Extent, ExtentPage
from tessera.system import fiemap

#: entries per page when the caller gives no max_entries
DEFAULT_MAX_ENTRIES = 4096

Range = tuple[int, int]  # [start, end)


def allocated(path: Path) -> tuple[int, list[Range]]:
    """(size, written ranges merged and clipped at the size)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        found = fiemap.extents_fd(fd)
    finally:
        os.close(fd)
    return size, _merge((e.logical, min(e.end, size)) for e in found if _written(e))


def delta(base: Path, target: Path) -> tuple[int, list[Range]]:
    """(target's size, ranges of target whose blocks differ from base's at the same offset)."""
    size = target.stat().st_size
    a = [e for e in fiemap.extents(base) if _written(e)]
    b = [e for e in fiemap.extents(target) if _written(e)]
    cuts = sorted({0, size} | {x for e in a + b for x in (e.logical, e.end) if x < size})
    changed = []
    ia = ib = 0
    for start, end in zip(cuts, cuts[1:], strict=False):
        ia = _advance(a, ia, start)
        ib = _advance(b, ib, start)
        if _where(a, ia, start) != _where(b, ib, start):
            changed.append((start, end))
    return size, _merge(changed)


def _written(e: fiemap.Extent) -> bool:
    return not e.unwritten


def _advance(extents: list[fiemap.Extent], i: int, pos: int) -> int:
    while i < len(extents) and extents[i].end <= pos:
        i += 1
    return i


def _where(extents: list[fiemap.Extent], i: int, pos: int) -> int | None:
    """The physical byte holding logical `pos`; None for a hole (zeroes).

    Between two cuts nothing changes, so the segment's first byte speaks
    for all of it. An extent whose physical address means nothing (delayed,
    inline, encoded) gets a unique negative marker: reported as changed.
    """
    if i >= len(extents) or extents[i].logical > pos:
        return None
    e = extents[i]
    if not e.placed:
        return -1 - id(e)
    return e.physical + (pos - e.logical)


def _merge(ranges: object) -> list[Range]:
    merged: list[Range] = []
    for start, end in sorted(ranges):  # type: ignore[call-overload]
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def page(size: int, ranges: list[Range], offset: int, max_entries: int) -> ExtentPage:
    """The ranges from `offset` on (the first cut there), at most `max_entries` of them."""
    limit = max_entries or DEFAULT_MAX_ENTRIES
    picked = [(max(s, offset), e) for s, e in ranges if e > offset]
    more = len(picked) > limit
    picked = picked[:limit]
    return ExtentPage(
        size_bytes=size,
        extents=[Extent(offset=s, length=e - s) for s, e in picked],
        next_offset=picked[-1][1] if more else None,
    )
