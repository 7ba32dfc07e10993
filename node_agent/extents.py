"""Changed-block metadata from extent maps (FIEMAP), never from reading data.

allocated(snapshot): the ranges that hold written data (unwritten extents
read as zeroes: not allocated). delta(base, target): the ranges where the
two files map different physical blocks. Reflinked files share physical
blocks until one side writes, and copy-on-write gives the writer new ones,
so "same physical block at the same logical offset" means "same bytes".
The converse does not hold: a block rewritten with identical bytes gets a
new block and is reported (a backup copies it once more: harmless).

Pages are computed window by window from the asked offset, each window
twice the last, until one range more than the page holds is found: a
page costs about what it returns, not what the whole file maps (a backup
tool pages through a large volume in many small requests).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

from tessera.models import Extent, ExtentPage
from tessera.system import fiemap

#: entries per page when the caller gives no max_entries
DEFAULT_MAX_ENTRIES = 4096
FIRST_WINDOW = 256 * 1024**2

Range = tuple[int, int]  # [start, end)
Finder = Callable[[int, int], list[Range]]  # the ranges within [start, end)


def allocated_page(path: Path, offset: int, max_entries: int) -> ExtentPage:
    """The written ranges of the file from `offset` on."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        return _page(size, lambda s, e: _allocated(fd, s, e), offset, max_entries)
    finally:
        os.close(fd)


def delta_page(base: Path, target: Path, offset: int, max_entries: int) -> ExtentPage:
    """The ranges of target, from `offset` on, whose blocks differ from base's there."""
    fb = os.open(base, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ft = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            size = os.fstat(ft).st_size
            return _page(size, lambda s, e: _delta(fb, ft, s, e), offset, max_entries)
        finally:
            os.close(ft)
    finally:
        os.close(fb)


def _page(size: int, find: Finder, offset: int, max_entries: int) -> ExtentPage:
    limit = max_entries or DEFAULT_MAX_ENTRIES
    found: list[Range] = []
    pos, window = offset, FIRST_WINDOW
    while pos < size and len(found) <= limit:
        end = min(size, pos + window)
        for start, stop in find(pos, end):
            if found and start == found[-1][1]:  # a range that crossed the window's edge
                found[-1] = (found[-1][0], stop)
            else:
                found.append((start, stop))
        pos, window = end, window * 2
    picked = found[:limit]
    more = len(found) > limit  # the last one picked is complete: another follows it
    return ExtentPage(
        size_bytes=size,
        extents=[Extent(offset=s, length=e - s) for s, e in picked],
        next_offset=picked[-1][1] if more else None,
    )


def _allocated(fd: int, start: int, end: int) -> list[Range]:
    return _merge(
        (max(e.logical, start), min(e.end, end))
        for e in fiemap.extents_fd(fd, start, end)
        if not e.unwritten
    )


def _delta(base_fd: int, target_fd: int, start: int, end: int) -> list[Range]:
    a = [e for e in fiemap.extents_fd(base_fd, start, end) if not e.unwritten]
    b = [e for e in fiemap.extents_fd(target_fd, start, end) if not e.unwritten]
    cuts = sorted({start, end} | {x for e in a + b for x in (e.logical, e.end) if start < x < end})
    changed = []
    ia = ib = 0
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        ia = _advance(a, ia, lo)
        ib = _advance(b, ib, lo)
        if _where(a, ia, lo) != _where(b, ib, lo):
            changed.append((lo, hi))
    return _merge(changed)


def _advance(extents: list[fiemap.Extent], i: int, pos: int) -> int:
    while i < len(extents) and extents[i].end <= pos:
        i += 1
    return i


def _where(extents: list[fiemap.Extent], i: int, pos: int) -> int | None:
    """The physical byte holding logical `pos`; None for a hole (zeroes).

    Between two cuts nothing changes, so the segment's first byte speaks
    for all of it. An extent whose physical address means nothing (delayed,
    inline, encoded) gets a marker of its own: always reported as changed.
    """
    if i >= len(extents) or extents[i].logical > pos:
        return None
    e = extents[i]
    if not e.placed:
        return -1 - id(e)
    return e.physical + (pos - e.logical)


def _merge(ranges: Iterable[Range]) -> list[Range]:
    merged: list[Range] = []
    for start, end in sorted(ranges):
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged
