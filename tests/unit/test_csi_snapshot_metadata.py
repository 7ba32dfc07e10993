"""SnapshotMetadata streaming rules on pages as management sends them (no server needed).

The fetcher is a list of pages: what a management answer holds, the input of
the function under test. The real service is tested end to end in
sanity/test_snapshot_metadata.py.
"""

from __future__ import annotations

import pytest

pytest.importorskip("csi_driver._gen.csi_pb2", reason="CSI stubs not generated yet")

from csi_driver._gen import csi_pb2  # noqa: E402
from csi_driver.snapshot_metadata import stream_ranges  # noqa: E402
from csi_driver.validation import MetadataRequest  # noqa: E402
from tessera.models import Extent, ExtentPage  # noqa: E402

SIZE = 1 << 20


def pages(*chunks: tuple[list[tuple[int, int]], int | None]):  # type: ignore[no-untyped-def]
    """A fetcher answering the given pages in order, recording the offsets asked for."""
    asked: list[tuple[int, int]] = []
    queue = list(chunks)

    def fetch(offset: int, count: int) -> ExtentPage:
        asked.append((offset, count))
        extents, next_offset = queue.pop(0)
        return ExtentPage(
            size_bytes=SIZE,
            extents=[Extent(offset=o, length=n) for o, n in extents],
            next_offset=next_offset,
        )

    return fetch, asked


def run(fetch, start: int = 0, max_results: int = 0) -> list[csi_pb2.GetMetadataDeltaResponse]:  # type: ignore[no-untyped-def]
    args = MetadataRequest("snap-a", "snap-b", start, max_results)
    return list(stream_ranges(fetch, args, csi_pb2.GetMetadataDeltaResponse))


def ranges(messages: list[csi_pb2.GetMetadataDeltaResponse]) -> list[tuple[int, int]]:
    return [(r.byte_offset, r.size_bytes) for m in messages for r in m.block_metadata]


def test_every_message_says_variable_length_and_the_capacity_and_holds_at_most_max_results() -> (
    None
):
    fetch, asked = pages(([(0, 4096), (8192, 4096), (16384, 4096)], 20480), ([(20480, 4096)], None))
    messages = run(fetch, max_results=2)
    assert all(len(m.block_metadata) <= 2 for m in messages)
    assert {m.block_metadata_type for m in messages} == {csi_pb2.VARIABLE_LENGTH}
    assert {m.volume_capacity_bytes for m in messages} == {SIZE}
    assert ranges(messages) == [(0, 4096), (8192, 4096), (16384, 4096), (20480, 4096)]
    assert asked == [(0, 2), (20480, 2)]  # management is asked for pages of max_results


def test_an_empty_result_is_still_one_message_with_type_and_capacity() -> None:
    fetch, _ = pages(([], None))
    messages = run(fetch)
    assert len(messages) == 1 and not messages[0].block_metadata
    assert messages[0].volume_capacity_bytes == SIZE


def test_a_range_straddling_starting_offset_is_sent_whole_and_earlier_ones_dropped() -> None:
    fetch, _ = pages(([(0, 4096), (8192, 8192), (20480, 4096)], None))
    assert ranges(run(fetch, start=10000)) == [(8192, 8192), (20480, 4096)]


def test_overlapping_pages_never_repeat_or_overlap_a_byte() -> None:
    fetch, _ = pages(([(0, 8192)], 4096), ([(0, 8192), (12288, 4096)], None))
    assert ranges(run(fetch)) == [(0, 8192), (12288, 4096)]


def test_a_page_that_does_not_move_forward_ends_the_stream_instead_of_looping() -> None:
    fetch, asked = pages(([(0, 4096)], 0))
    assert ranges(run(fetch)) == [(0, 4096)]
    assert len(asked) == 1


def test_ranges_past_the_end_of_the_volume_are_cut_at_the_end() -> None:
    fetch, _ = pages(([(SIZE - 4096, 8192)], None))
    assert ranges(run(fetch)) == [(SIZE - 4096, 4096)]
