"""CSI SnapshotMetadata service: allocated and changed byte ranges of snapshots, streamed.

What backup tools (through the external-snapshot-metadata sidecar) use to
copy only what holds data, or only what changed since the last backup.
Management asks the owner node's agent, which reads the files' extent maps
(FIEMAP; extents shared between two reflinked snapshots are unchanged) and
never the data; this service pages through management's
/v1/snapshots/{id}/allocated and /delta and streams what they return.

Choices the spec leaves to the plugin:

- block_metadata_type is VARIABLE_LENGTH: the ranges are the filesystem's
  extents, merged and of any length. FIXED_LENGTH would cut a 2 GiB extent
  into 524288 4 KiB tuples for the same information.
- max_results 0 means DEFAULT_RESULTS ranges per message; a message never
  holds more than the caller's max_results.
- starting_offset beyond the volume's size, or negative, is OUT_OF_RANGE
  (the spec's table); equal to the size gives an empty stream. The first
  range may start before starting_offset but never ends at or before it.
- A delta between snapshots of two different volumes is an invalid argument
  (the spec's "target: a second snapshot in the same volume"), checked
  before anything is streamed; a snapshot that does not exist is NOT_FOUND.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import grpc

from csi_driver import validation
from csi_driver._gen import csi_pb2, csi_pb2_grpc
from tessera.clients import ManagementClient
from tessera.errors import InvalidArgument, OutOfRange
from tessera.models import Extent, ExtentPage

log = logging.getLogger("tessera.csi.snapshot_metadata")

#: ranges per message when the caller leaves max_results at 0 (well under gRPC's 4 MiB)
DEFAULT_RESULTS = 1024
BLOCK_METADATA_TYPE = csi_pb2.VARIABLE_LENGTH

Response = TypeVar(
    "Response", csi_pb2.GetMetadataAllocatedResponse, csi_pb2.GetMetadataDeltaResponse
)
#: one page of ranges from `offset` on, at most `max_entries` of them
PageFetcher = Callable[[int, int], ExtentPage]


class SnapshotMetadataServicer(csi_pb2_grpc.SnapshotMetadataServicer):
    def __init__(self, management: ManagementClient) -> None:
        self.mgmt = management

    def GetMetadataAllocated(
        self, request: csi_pb2.GetMetadataAllocatedRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataAllocatedResponse]:
        args = validation.get_metadata_allocated(request)
        snap = self.mgmt.get_snapshot(args.snapshot_id)  # NOT_FOUND before the stream starts
        check_start(args, snap.size_bytes)

        def fetch(offset: int, count: int) -> ExtentPage:
            return self.mgmt.snapshot_allocated(args.snapshot_id, offset, count)

        yield from stream_ranges(
            fetch, args, csi_pb2.GetMetadataAllocatedResponse, context.is_active
        )

    def GetMetadataDelta(
        self, request: csi_pb2.GetMetadataDeltaRequest, context: grpc.ServicerContext
    ) -> Iterator[csi_pb2.GetMetadataDeltaResponse]:
        args = validation.get_metadata_delta(request)
        base = self.mgmt.get_snapshot(args.base_snapshot_id)
        target = self.mgmt.get_snapshot(args.snapshot_id)
        if base.source_volume_id != target.source_volume_id:
            raise InvalidArgument(
                f"base_snapshot_id {base.id} is of volume {base.source_volume_id} but "
                f"target_snapshot_id {target.id} is of volume {target.source_volume_id}; "
                "a delta is between two snapshots of the same volume",
                field="target_snapshot_id",
            )
        check_start(args, target.size_bytes)

        def fetch(offset: int, count: int) -> ExtentPage:
            return self.mgmt.snapshot_delta(base.id, target.id, offset, count)

        yield from stream_ranges(fetch, args, csi_pb2.GetMetadataDeltaResponse, context.is_active)


def check_start(args: validation.MetadataRequest, size_bytes: int) -> None:
    """Before the stream starts: an offset past the end is the spec's OUT_OF_RANGE."""
    if args.starting_offset > size_bytes:
        raise OutOfRange(
            f"starting_offset {args.starting_offset} is beyond the end of the volume "
            f"({size_bytes} bytes)",
            field="starting_offset",
        )


def stream_ranges(
    fetch: PageFetcher,
    args: validation.MetadataRequest,
    response: type[Response],
    active: Callable[[], bool] = lambda: True,
) -> Iterator[Response]:
    """Messages of at most max_results ranges, in offset order, never overlapping.

    At least one message: an empty result still tells the CO the type and capacity.
    """
    per_message = args.max_results or DEFAULT_RESULTS
    offset: int | None = args.starting_offset
    emitted_end = 0
    size = 0
    sent = False
    while offset is not None and active():
        page = fetch(offset, per_message)
        size = page.size_bytes
        ranges = list(_clean(page.extents, args.starting_offset, emitted_end, size))
        if ranges:
            emitted_end = ranges[-1].byte_offset + ranges[-1].size_bytes
        for i in range(0, len(ranges), per_message):
            sent = True
            yield response(
                block_metadata_type=BLOCK_METADATA_TYPE,
                volume_capacity_bytes=size,
                block_metadata=ranges[i : i + per_message],
            )
        offset = _advance(offset, page.next_offset)
    if not sent:
        yield response(block_metadata_type=BLOCK_METADATA_TYPE, volume_capacity_bytes=size)


def _clean(
    extents: list[Extent], start: int, emitted_end: int, size: int
) -> Iterator[csi_pb2.BlockMetadata]:
    """Ranges that end after `start`, none overlapping what was sent or past the end.

    A range that straddles `start` is sent whole (the spec allows the first
    range to begin before starting_offset), so offsets stay block-aligned.
    """
    for ext in extents:
        begin, end = max(ext.offset, emitted_end), min(ext.offset + ext.length, size)
        if end <= max(begin, start):
            continue
        yield csi_pb2.BlockMetadata(byte_offset=begin, size_bytes=end - begin)
        emitted_end = end


def _advance(offset: int, next_offset: int | None) -> int | None:
    """The next page's offset; a server that does not move forward ends the stream."""
    if next_offset is None:
        return None
    if next_offset <= offset:
        log.warning("extent page did not advance (offset %d -> %d); stopping", offset, next_offset)
        return None
    return next_offset
