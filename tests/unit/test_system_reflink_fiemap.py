"""Host code for snapshots on whatever filesystem the tests run on (no root needed).

The real pools (XFS with reflink, ext4) are exercised as root in
tests/integration/test_snapshots_agent.py; here the parts that work on any
local filesystem: the sparse copy keeps holes, extent maps page and match
what was written, and the reflink probe leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tessera.system import fiemap, reflink

KiB, MiB = 1024, 1024**2


def sparse_file(path: Path, pieces: dict[int, bytes], size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_the_copy_fallback_keeps_the_bytes_and_the_holes(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    pieces = {0: b"a" * 64 * KiB, 3 * MiB: b"b" * 128 * KiB, 7 * MiB: b"c" * 4 * KiB}
    sparse_file(src, pieces, 8 * MiB + 123)
    with open(src, "rb") as s, open(dst, "wb") as d:
        reflink.copy_sparse(s.fileno(), d.fileno())
    assert dst.read_bytes() == src.read_bytes()
    assert dst.stat().st_size == 8 * MiB + 123
    if allocated(src) < MiB:  # the filesystem keeps holes at all
        assert allocated(dst) <= allocated(src) + 64 * KiB


def test_an_empty_or_all_hole_file_copies_to_its_size(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    sparse_file(src, {}, 5 * MiB)
    with open(src, "rb") as s, open(dst, "wb") as d:
        reflink.copy_sparse(s.fileno(), d.fileno())
    assert dst.stat().st_size == 5 * MiB and dst.read_bytes() == bytes(5 * MiB)


def test_extent_maps_cover_what_was_written_and_page_past_one_batch(tmp_path: Path) -> None:
    path = tmp_path / "f"
    # more extents than one FIEMAP batch: every other 4 KiB block written
    offsets = [i * 8 * KiB for i in range(700)]
    sparse_file(path, {o: b"x" * 4 * KiB for o in offsets}, 700 * 8 * KiB)
    try:
        found = fiemap.extents(path)
    except OSError as exc:
        pytest.skip(f"this filesystem has no FIEMAP: {exc}")
    covered = set()
    for e in found:
        assert e.length > 0 and e.placed
        covered.update(range(e.logical // (4 * KiB), e.end // (4 * KiB)))
    assert {o // (4 * KiB) for o in offsets} <= covered
    assert len(found) > 512  # paged: one batch holds 512
    assert found[-1].last and [e.logical for e in found] == sorted(e.logical for e in found)
    with open(path, "rb") as f:  # a window: the extents that overlap it, in order
        middle = fiemap.extents_fd(f.fileno(), 100 * 8 * KiB, 200 * 8 * KiB)
    assert [e.logical for e in middle] == [i * 8 * KiB for i in range(100, 200)]


def test_the_reflink_probe_answers_and_leaves_nothing(tmp_path: Path) -> None:
    assert isinstance(reflink.can_reflink(tmp_path), bool)
    assert list(tmp_path.iterdir()) == []
